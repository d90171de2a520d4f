/* The journal: its writer thread, which puts the recording on disk as it runs, and its reader. */
#include "core.h"

/* ---- the journal: the recording on disk, for a run that ends badly ---------------------------
 *
 * A folder beside the trace (evtrace/journal.py reads it; ``evtrace recover`` rebuilds the trace):
 *   catalog        the header (JSON, from Python), then notes (names, threads, stream labels: JSON,
 *                  from Python), anchors and the stream table as they come, and "finished" at the end
 *   rows-NNNNNN    one record per flush: the rows finished since the last, and a snapshot of the
 *                  regions open and of those finished but waiting for the device (each flush's
 *                  snapshot replaces the one before). Oldest segments go once max_regions are kept.
 * A record: magic, type, u32 length, u32 CRC-32 of the payload, payload (little-endian). Appended
 * with write(2): it outlives the process, not the machine. A record cut by a kill fails its length
 * or CRC, and every record before it stands. The writer is a native thread that never takes the
 * GIL: it flushes while the program blocks in a device call, a collective or holds the GIL. */

#define J_MAGIC 0xE7
enum { J_HEADER = 1, J_NOTE = 2, J_ANCHORS = 3, J_STREAMS = 4, J_FINISHED = 5, J_FLUSH = 6 };

static uint32_t crc_table[256];

void et_crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t x = i;
        for (int k = 0; k < 8; k++) x = x & 1 ? 0xEDB88320u ^ (x >> 1) : x >> 1;
        crc_table[i] = x;
    }
}

static uint32_t crc32(const char *p, Py_ssize_t n) { /* zlib.crc32's */
    uint32_t x = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < n; i++) x = crc_table[(x ^ (uint8_t)p[i]) & 0xFF] ^ (x >> 8);
    return x ^ 0xFFFFFFFFu;
}

static int put_varint(Buf *b, uint64_t v) {
    if (et_reserve(b, 10) < 0) return -1;
    while (v >= 0x80) b->p[b->n++] = (char)(v | 0x80), v >>= 7;
    b->p[b->n++] = (char)v;
    return 0;
}

static inline uint64_t zigzag(int64_t v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }

/* A record around the payload b->p[from:]: its 10-byte head is reserved at from - 10. */
static void frame(Buf *b, Py_ssize_t from, int type) {
    uint32_t n = (uint32_t)(b->n - from), crc = crc32(b->p + from, b->n - from);
    char *h = b->p + from - 10;
    h[0] = (char)J_MAGIC, h[1] = (char)type;
    memcpy(h + 2, &n, 4), memcpy(h + 6, &crc, 4);
}

static int open_record(Buf *b) {
    if (et_reserve(b, 10) < 0) return -1;
    b->n += 10;
    return 0;
}

static inline char *wv(char *p, uint64_t v) { /* a varint, room reserved */
    while (v >= 0x80) *p++ = (char)(v | 0x80), v >>= 7;
    *p++ = (char)v;
    return p;
}

/* Rows: count, then each: name, thread, h0 - the previous h0, h1 - h0 (zigzag), device + 1,
 * [stream, t0, t1 as float64], args length and text. prev: the previous h0, carried across.
 * One room check a row: this runs over every row the session records. */
static int put_rows(Buf *b, const Rows *r, int64_t *prev, int64_t *last_h) {
    if (put_varint(b, (uint64_t)r->n) < 0) return -1;
    Py_ssize_t j = 0, from = 0;
    int64_t p0 = *prev, hi = *last_h;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        const Row *w = &r->v[i];
        Py_ssize_t an = 0;
        if (j < r->nat && r->at[j] == i) an = r->end[j] - from;
        if (et_reserve(b, 80 + an) < 0) return -1; /* 7 varints and two doubles at most */
        char *o = b->p + b->n;
        o = wv(o, (uint32_t)w->name), o = wv(o, (uint32_t)w->thread);
        o = wv(o, zigzag(w->h0 - p0)), o = wv(o, zigzag(w->h1 - w->h0));
        o = wv(o, (uint64_t)(w->device + 1));
        if (w->device >= 0) {
            o = wv(o, (uint32_t)w->stream);
            memcpy(o, &w->t0, 8), memcpy(o + 8, &w->t1, 8);
            o += 16;
        }
        o = wv(o, (uint64_t)an);
        if (an) memcpy(o, r->blob + from, (size_t)an), o += an, from = r->end[j++];
        b->n = o - b->p;
        p0 = w->h0;
        if (w->h1 > hi) hi = w->h1;
    }
    *prev = p0, *last_h = hi; /* h1 >= h0: the latest end is the latest stamp */
    return 0;
}

static int write_all(int fd, const char *p, Py_ssize_t n) {
    while (n > 0) {
        ssize_t k = write(fd, p, (size_t)n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k, n -= k;
    }
    return 0;
}

/* Said once, from the writer thread (no GIL: straight to stderr). */
static void journal_failed(Core *c, const char *what, int err) {
    Journal *j = c->j;
    if (j->failed) return;
    j->failed = err ? err : ENOMEM;
    char line[512];
    int n = snprintf(line, sizeof line,
                     "evtrace: the journal %s could not be %s (%s); it stops here, and a crash from now "
                     "on would lose what is recorded after it\n",
                     j->dir, what, strerror(j->failed));
    if (n > 0 && write(2, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1))) {}
    char msg[300];
    snprintf(msg, sizeof msg, "journal: could not be %s (%s)", what, strerror(j->failed));
    et_add_error(c, msg);
}

static int open_segment(Core *c) {
    Journal *j = c->j;
    char path[4096];
    snprintf(path, sizeof path, "%s/rows-%06lld", j->dir, (long long)(j->first_seg + j->nsegs));
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    if (GROW(j->seg_before, j->capsegs, j->nsegs + 1) < 0) return close(fd), errno = ENOMEM, -1;
    j->seg_before[j->nsegs++] = j->total;
    if (j->seg >= 0) close(j->seg);
    j->seg = fd;
    j->seg_count = 0;
    /* the ring: drop the oldest segments while the others keep max_regions */
    while (j->keep_rows > 0 && j->nsegs > 1 && j->total - j->seg_before[1] >= j->keep_rows) {
        snprintf(path, sizeof path, "%s/rows-%06lld", j->dir, (long long)j->first_seg);
        unlink(path);
        memmove(j->seg_before, j->seg_before + 1, (size_t)(j->nsegs - 1) * sizeof(int64_t));
        j->nsegs--, j->first_seg++;
    }
    return 0;
}

/* Copies of what the writer snapshots: open entries, regions waiting for the device. */
static int copy_open(Core *c, Rows *out) {
    for (Py_ssize_t k = 0; k < c->nthreads; k++) {
        TState *t = c->threads[k];
        for (Py_ssize_t i = 0; i < t->nopen; i++) {
            Entry *e = &t->open[i];
            Row row = {e->key, t->ix, e->h0, e->h0, -1, -1, NAN, NAN};
            if (et_rows_push(out, &row, &e->args) < 0) return -1;
        }
    }
    return 0;
}

static int copy_done(const Done *v, Py_ssize_t n, Rows *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Row row = {v[i].key, v[i].thread, v[i].h0, v[i].h1, -1, -1, NAN, NAN};
        if (et_rows_push(out, &row, &v[i].args) < 0) return -1;
    }
    return 0;
}

/* One flush's worth: the rows finished since the last, the snapshot, the catalog's new records. */
static void last_join(Core *c);

struct Batch {
    Rows hr, dr, open, pend;
    Buf cat;
    long lost[NWHY];
    long captured;
    int64_t t;
    int bad, failed;
};

/* Take what a flush writes, each part under its lock. A region between its thread's stack and the
 * device queue at this moment is in neither snapshot: it comes with the next flush. */
static void gather(Core *c, Batch *b) {
    Journal *j = c->j;
    memset(b, 0, sizeof *b);
    buf_init(&b->cat);
    b->failed = j->failed;
    if (b->failed) { /* nothing more is written: the rows still go on to take() */
        pthread_mutex_lock(&c->rmu);
        b->dr = c->drows;
        memset(&c->drows, 0, sizeof c->drows);
        pthread_mutex_unlock(&c->rmu);
        hlock(c);
        b->hr = c->hrows;
        memset(&c->hrows, 0, sizeof c->hrows);
        hunlock(c);
        return;
    }
    Buf *cat = &b->cat;
    int bad = 0;
    /* what the resolver owns: stamped rows, the queue and pend, anchors, streams, in one state */
    pthread_mutex_lock(&c->pass_mu);
    pthread_mutex_lock(&c->rmu);
    b->dr = c->drows;
    memset(&c->drows, 0, sizeof c->drows);
    pthread_mutex_unlock(&c->rmu);
    pthread_mutex_lock(&c->qmu);
    bad |= copy_done(c->done, c->ndone, &b->pend);
    pthread_mutex_unlock(&c->qmu);
    bad |= copy_done(c->pend, c->npend, &b->pend);
    for (int d = 0; d < c->ndev; d++) {
        Py_ssize_t from = j->anchors_done[d], n = c->nanchors[d] - from;
        if (n <= 0) continue;
        Py_ssize_t at = cat->n + 10;
        if (open_record(cat) < 0 || put_varint(cat, (uint64_t)d) < 0 || put_varint(cat, (uint64_t)n) < 0 ||
            put(cat, (const char *)(c->anchors[d] + from), n * (Py_ssize_t)sizeof(Anchor)) < 0)
            bad = 1;
        else
            frame(cat, at, J_ANCHORS), j->anchors_done[d] = c->nanchors[d];
    }
    if (c->nstreams > j->streams_done) {
        Py_ssize_t at = cat->n + 10;
        bad |= open_record(cat) < 0 || put_varint(cat, (uint64_t)j->streams_done) < 0 ||
               put_varint(cat, (uint64_t)(c->nstreams - j->streams_done)) < 0;
        for (Py_ssize_t i = j->streams_done; !bad && i < c->nstreams; i++)
            bad |= put_varint(cat, c->streams[2 * i]) < 0 || put_varint(cat, c->streams[2 * i + 1]) < 0;
        if (!bad) frame(cat, at, J_STREAMS), j->streams_done = c->nstreams;
    }
    pthread_mutex_unlock(&c->pass_mu);
    /* the hot path's: its finished rows and open stacks */
    hlock(c);
    b->hr = c->hrows;
    memset(&c->hrows, 0, sizeof c->hrows);
    bad |= copy_open(c, &b->open);
    hunlock(c);
    /* notes from Python (names, threads, labels): every key a row above uses is noted by now */
    pthread_mutex_lock(&j->mu);
    if (j->nnotes) bad |= put(cat, j->notes, j->nnotes) < 0, j->nnotes = 0;
    pthread_mutex_unlock(&j->mu);
    for (int w = 0; w < NWHY; w++) b->lost[w] = __atomic_load_n(&c->lost[w], __ATOMIC_RELAXED);
    b->captured = c->captured;
    b->t = c->clock ? 0 : mono_ns();
    b->bad = bad;
}

/* Encode and write a batch: the catalog's records, then one record of rows and snapshot in the
 * segment. Its rows stay the batch's. */
static void write_out(Core *c, Batch *b) {
    Journal *j = c->j;
    if (b->failed) return;
    Buf seg;
    buf_init(&seg);
    int64_t prev = 0;
    int bad = b->bad || open_record(&seg) < 0 || put_varint(&seg, (uint64_t)++j->flushes) < 0 ||
              put_varint(&seg, (uint64_t)j->total) < 0 || put_rows(&seg, &b->hr, &prev, &j->last_h) < 0 ||
              put_rows(&seg, &b->dr, &prev, &j->last_h) < 0 || put_rows(&seg, &b->open, &prev, &j->last_h) < 0 ||
              put_rows(&seg, &b->pend, &prev, &j->last_h) < 0 || put_varint(&seg, NWHY) < 0;
    for (int w = 0; !bad && w < NWHY; w++) bad |= put_varint(&seg, (uint64_t)b->lost[w]) < 0;
    /* the moment of this snapshot: the native clock then, else the latest host stamp seen */
    int64_t t = b->t > j->last_h ? b->t : j->last_h;
    bad |= put_varint(&seg, (uint64_t)b->captured) < 0 || put_varint(&seg, zigzag(t)) < 0;
    if (!bad) frame(&seg, 10, J_FLUSH);
    int64_t n = b->hr.n + b->dr.n;
    if (bad)
        journal_failed(c, "written", ENOMEM);
    else if (write_all(j->cat, b->cat.p, b->cat.n) < 0 || write_all(j->seg, seg.p, seg.n) < 0)
        journal_failed(c, "written", errno);
    else {
        j->total += n, j->seg_count += n;
        if (j->seg_count >= j->seg_rows && open_segment(c) < 0) journal_failed(c, "rotated", errno);
    }
    buf_free(&seg);
}

static void batch_free(Batch *b) {
    buf_free(&b->cat);
    et_rows_free(&b->hr), et_rows_free(&b->dr), et_rows_free(&b->open), et_rows_free(&b->pend);
}

/* One flush of the writer: its rows then wait in jrows for take(), written or not. */
static void journal_flush(Core *c) {
    Journal *j = c->j;
    Batch b;
    gather(c, &b);
    write_out(c, &b);
    pthread_mutex_lock(&j->mu);
    if (!c->jrows.n) { /* the usual case, take() having drained them: moved, not copied */
        et_rows_free(&c->jrows);
        c->jrows = b.hr;
        memset(&b.hr, 0, sizeof b.hr);
    }
    et_rows_append(&c->jrows, &b.hr);
    et_rows_append(&c->jrows, &b.dr);
    __atomic_store_n(&c->njrows, c->jrows.n, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&j->mu);
    batch_free(&b);
}

/* The last flush, at stop: written by a thread of its own while the trace is built and written
 * (its encoding would otherwise lengthen stop() by ~35 ms a million rows), its rows lent to
 * take() meanwhile; journal_close() waits for it. */
static void *last_main(void *arg) {
    Core *c = arg;
    write_out(c, c->j->last);
    return NULL;
}

static void *journal_main(void *arg) {
    Core *c = arg;
    Journal *j = c->j;
    pthread_mutex_lock(&j->mu);
    while (!j->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t ns = ts.tv_nsec + j->interval_ns;
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&j->wake, &j->mu, &ts);
        if (j->stopping) break;
        pthread_mutex_unlock(&j->mu);
        journal_flush(c);
        pthread_mutex_lock(&j->mu);
    }
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

/* A record written now, by the caller (the writer is not running or not started). */
static int journal_record(Core *c, int type, const char *p, Py_ssize_t n) {
    Buf b;
    buf_init(&b);
    int rc = open_record(&b) < 0 || put(&b, p, n) < 0 ? (errno = ENOMEM, -1) : 0;
    if (rc == 0) frame(&b, 10, type), rc = write_all(c->j->cat, b.p, b.n);
    buf_free(&b);
    return rc;
}

void et_journal_join(Core *c) {
    Journal *j = c->j;
    if (!j || !j->running) return;
    pthread_mutex_lock(&j->mu);
    j->stopping = 1;
    pthread_cond_signal(&j->wake);
    pthread_mutex_unlock(&j->mu);
    pthread_join(j->thread, NULL);
    j->running = 0;
}

void et_journal_free(Core *c) {
    Journal *j = c->j;
    if (!j) return;
    last_join(c);
    if (j->cat >= 0) close(j->cat);
    if (j->seg >= 0) close(j->seg);
    free(j->dir), free(j->seg_before), free(j->anchors_done), free(j->notes);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->wake);
    free(j);
    c->j = NULL;
    c->jon = 0;
}

/* journal_open(dir, header, interval_ns, seg_rows, keep_rows): the folder exists and is empty. */
PyObject *Core_journal_open(Core *c, PyObject *args) {
    const char *dir, *head;
    Py_ssize_t nhead;
    long long interval, seg_rows, keep;
    if (!PyArg_ParseTuple(args, "sy#LLL", &dir, &head, &nhead, &interval, &seg_rows, &keep)) return NULL;
    if (c->j) return PyErr_Format(PyExc_RuntimeError, "the journal is open already");
    Journal *j = calloc(1, sizeof(Journal));
    if (!j) return PyErr_NoMemory();
    c->j = j;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->wake, NULL);
    j->cat = j->seg = -1;
    j->dir = strdup(dir);
    j->anchors_done = calloc((size_t)(c->ndev ? c->ndev : 1), sizeof(Py_ssize_t));
    j->interval_ns = interval > 0 ? interval : 500000000;
    j->seg_rows = seg_rows > 0 ? seg_rows : 1;
    j->keep_rows = keep;
    j->last_h = NEVER;
    char path[4096];
    snprintf(path, sizeof path, "%s/catalog", dir);
    if (!j->dir || !j->anchors_done) return et_journal_free(c), PyErr_NoMemory();
    if ((j->cat = open(path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644)) < 0 ||
        journal_record(c, J_HEADER, head, nhead) < 0 || open_segment(c) < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        et_journal_free(c);
        return NULL;
    }
    c->jon = 1; /* with the GIL: no hot path is between its lock and unlock */
    if (et_start_thread(&j->thread, journal_main, c, "evtrace-journal") != 0) {
        c->jon = 0;
        et_journal_free(c);
        return PyErr_Format(PyExc_OSError, "could not start the journal's thread");
    }
    j->running = 1;
    Py_RETURN_NONE;
}

/* A note for the catalog (JSON text from Python), written with the next flush. */
PyObject *Core_journal_note(Core *c, PyObject *arg) {
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &p, &n) < 0) return NULL;
    Journal *j = c->j;
    if (!j) Py_RETURN_NONE;
    Buf b;
    buf_init(&b);
    int rc = open_record(&b) < 0 || put(&b, p, n) < 0 ? -1 : 0;
    if (rc == 0) {
        frame(&b, 10, J_NOTE);
        pthread_mutex_lock(&j->mu);
        rc = GROW(j->notes, j->capnotes, j->nnotes + b.n);
        if (rc == 0) memcpy(j->notes + j->nnotes, b.p, (size_t)b.n), j->nnotes += b.n;
        pthread_mutex_unlock(&j->mu);
    }
    buf_free(&b);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Stop the writer thread (at stop(), before the regions still open are closed). */
PyObject *Core_journal_stop(Core *c, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS et_journal_join(c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The last flush, the writer stopped: the session's last state, before the write (see last_main). */
PyObject *Core_journal_flush(Core *c, PyObject *unused) {
    Journal *j = c->j;
    if (!j || j->running || j->last) Py_RETURN_NONE;
    if (!(j->last = malloc(sizeof(Batch)))) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS gather(c, j->last);
    Py_END_ALLOW_THREADS
    j->lent = 1;
    if (et_start_thread(&j->last_thread, last_main, c, "evtrace-journal") == 0)
        j->last_running = 1;
    else
        write_out(c, j->last); /* no thread: written now */
    Py_RETURN_NONE;
}

/* The last flush's rows, lent once to take() (which copies them): 1 if there were some. */
int et_journal_lent(Core *c, Rows *hr, Rows *dr) {
    Journal *j = c->j;
    if (!j || !j->last || !j->lent) return 0;
    j->lent = 0;
    *hr = j->last->hr, *dr = j->last->dr;
    return 1;
}

/* Wait for the last flush to be written, then free it; rows never taken go to take() still. */
static void last_join(Core *c) {
    Journal *j = c->j;
    if (j->last_running) pthread_join(j->last_thread, NULL), j->last_running = 0;
    if (!j->last) return;
    if (j->lent) {
        et_rows_append(&c->jrows, &j->last->hr);
        et_rows_append(&c->jrows, &j->last->dr);
    }
    batch_free(j->last), free(j->last), j->last = NULL;
}

/* journal_close(finished: bytes | None) -> the error that stopped the journal, or None. With
 * finished (JSON: where the trace is), the journal is marked finished; the caller removes it. */
PyObject *Core_journal_close(Core *c, PyObject *arg) {
    if (!c->j) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS et_journal_join(c);
    last_join(c);
    Py_END_ALLOW_THREADS
    int failed = c->j->failed;
    if (arg != Py_None && !failed) {
        char *p;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(arg, &p, &n) < 0) return NULL;
        if (journal_record(c, J_FINISHED, p, n) < 0) failed = errno;
    }
    c->jon = 0;
    et_journal_free(c);
    if (failed) return PyUnicode_FromString(strerror(failed));
    Py_RETURN_NONE;
}

/* ---- the journal, read back ---------------------------------------------------------------- */

typedef struct {
    const uint8_t *p, *end;
    int bad;
} Reader;

static uint64_t get_varint(Reader *r) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) return r->bad = 1, 0;
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) return v;
    }
    return r->bad = 1, 0;
}

static inline int64_t unzigzag(uint64_t v) { return (int64_t)(v >> 1) ^ -(int64_t)(v & 1); }

/* One block of rows, as take() gives them. */
static PyObject *get_rows(Reader *r, int64_t *prev) {
    Rows out;
    memset(&out, 0, sizeof out);
    uint64_t n = get_varint(r);
    if (n > (uint64_t)(r->end - r->p)) r->bad = 1;
    for (uint64_t i = 0; !r->bad && i < n; i++) {
        Row w = {0, 0, 0, 0, -1, -1, NAN, NAN};
        w.name = (int32_t)get_varint(r), w.thread = (int32_t)get_varint(r);
        w.h0 = *prev + unzigzag(get_varint(r));
        w.h1 = w.h0 + unzigzag(get_varint(r));
        w.device = (int16_t)((int64_t)get_varint(r) - 1);
        if (w.device >= 0) {
            w.stream = (int32_t)get_varint(r);
            if (r->end - r->p < 16) r->bad = 1;
            else memcpy(&w.t0, r->p, 8), memcpy(&w.t1, r->p + 8, 8), r->p += 16;
        }
        uint64_t an = get_varint(r);
        if (r->bad || an > (uint64_t)(r->end - r->p)) {
            r->bad = 1;
            break;
        }
        Args a = {(char *)r->p, (Py_ssize_t)an};
        r->p += an;
        if (et_rows_push(&out, &w, an ? &a : NULL) < 0) {
            et_rows_free(&out);
            return PyErr_NoMemory();
        }
        *prev = w.h0;
    }
    PyObject *res = NULL;
    if (!r->bad) {
        PyObject *at = PyBytes_FromStringAndSize(NULL, out.nat * 8), *end = PyBytes_FromStringAndSize(NULL, out.nat * 8);
        if (at && end) {
            for (Py_ssize_t i = 0; i < out.nat; i++)
                ((int64_t *)PyBytes_AS_STRING(at))[i] = out.at[i], ((int64_t *)PyBytes_AS_STRING(end))[i] = out.end[i];
            res = Py_BuildValue("(y#OOy#)", out.v ? (char *)out.v : "", out.n * (Py_ssize_t)sizeof(Row), at, end,
                                out.blob ? out.blob : "", out.nblob); /* y# of NULL is None */
        }
        Py_XDECREF(at), Py_XDECREF(end);
    }
    et_rows_free(&out);
    return res;
}

/* et_read_flush(payload) -> (flush, rows_before, host_rows, device_rows, open, pending, lost,
 * captured, at): each rows part as take() gives them. ValueError if the payload does not parse. */
PyObject *et_read_flush(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {view.buf, (const uint8_t *)view.buf + view.len, 0};
    int64_t prev = 0;
    uint64_t flush = get_varint(&r), before = get_varint(&r);
    PyObject *part[5] = {NULL, NULL, NULL, NULL, NULL}; /* four blocks of rows, the counts */
    PyObject *out = NULL;
    part[0] = get_rows(&r, &prev);
    part[1] = part[0] ? get_rows(&r, &prev) : NULL;
    part[2] = part[1] ? get_rows(&r, &prev) : NULL;
    part[3] = part[2] ? get_rows(&r, &prev) : NULL;
    if (part[3] && (part[4] = PyList_New(0))) {
        uint64_t nwhy = get_varint(&r);
        for (uint64_t w = 0; !r.bad && w < nwhy && w < 64; w++) {
            PyObject *v = PyLong_FromUnsignedLongLong(get_varint(&r));
            if (!v || PyList_Append(part[4], v) < 0) r.bad = 1;
            Py_XDECREF(v);
        }
        uint64_t captured = get_varint(&r);
        int64_t at = unzigzag(get_varint(&r));
        if (!r.bad && r.p == r.end)
            out = Py_BuildValue("(KKOOOOOKL)", (unsigned long long)flush, (unsigned long long)before, part[0],
                                part[1], part[2], part[3], part[4], (unsigned long long)captured, (long long)at);
    }
    for (int k = 0; k < 5; k++) Py_XDECREF(part[k]);
    PyBuffer_Release(&view);
    if (!out && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a flush record that does not parse");
    return out;
}
