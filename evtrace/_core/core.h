/* evtrace's native core: what its files share (types, state, the few inline helpers).
 *
 * The files, by job:
 *   core.h      this: the types, the core's global state, inline helpers and what crosses files
 *   hot.c       the hot path: thread states, enter/exit, boundary, make_mark, args encoding
 *   pool.c      the event pool, marks, the backend's event calls, and the anchors
 *   resolver.c  stamping marks, finishing regions, the resolver thread
 *   journal.c   the journal's writer and reader
 *   forward.c   Region, region(), and the module forwards (forward, sequential)
 *   common.c    rows, text buffers and errors, which every part fills
 *   module.c    the Core type, its lifecycle methods, the module's functions and init
 * A function used by another file is declared at the end of this header with the prefix et_;
 * hot-path helpers stay static inline here so that -O2 inlines them as before the split.
 *
 * The seam with Python (evtrace/recorder.py owns the session, this file the hot loop):
 *   Core(backend-facing callables, options)  one per session
 *   Core.enter/exit/enter_host/exit_host      tokens for Python callers (module hooks, decorators)
 *   Region, region()                          the `with evtrace.region(...)` object, all in C
 *   Core.poll()                               one resolver pass (Python-backend sessions, tests)
 *   Core.run()/halt()                         the resolver on a native thread (CUDA sessions)
 *   Core.take()                               finished rows, packed as recorder.LIVE_DTYPE, and their args
 *
 * Every hot-path call runs with the GIL held, so what only hot paths touch (thread states, open
 * stacks, host rows) needs no lock. The resolver shares four things with them: the inbox of marks
 * just recorded (a lock-free stack: each mark is stamped as soon as its stream reaches it, open
 * region or not), and, each under its own mutex never held across a Python call, the queue of
 * finished device regions, the event pools, and the rows it resolved. Args travel as JSON text. With a native CUDA runtime (found by soname at run time:
 * no CUDA headers or toolkit at build time) the resolver never touches Python, so it runs
 * without the GIL and costs the launching thread nothing but those mutexes.
 */
#ifndef EVTRACE_CORE_H
#define EVTRACE_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Everything declared here is the module's own: hidden, so that -O2 reaches et_g and the et_tls
 * pair PC-relative (one TLS lookup a function for both, as with statics) rather than through the
 * GOT, and calls across files are direct. Only PyInit__core is exported (PyMODINIT_FUNC). */
#pragma GCC visibility push(hidden)

#define NEVER (-(INT64_C(1) << 62))
#define ALWAYS (INT64_C(1) << 62)
#define MAX_ERRORS 10
#define CUDA_NOT_READY 600

/* Why a region has no device span: every region is in the trace, and each lost span is counted
 * under its reason (recorder.counts()). */
enum { WHY_POOL, WHY_REFUSED, WHY_CAPTURE, WHY_HOT_ERROR, WHY_NEW_DEVICE, WHY_UNREADABLE, WHY_SPLIT, NWHY };
extern const char *const et_why_names[NWHY];

/* ---- rows: recorder.LIVE_DTYPE, packed -------------------------------------------------- */
#pragma pack(push, 1)
typedef struct {
    int32_t name, thread;
    int64_t h0, h1;
    int16_t device;
    int32_t stream;
    double t0, t1;
} Row;
#pragma pack(pop)
/* Row's fields under recorder.LIVE_DTYPE's names: row_layout() gives their offsets, sizes and
 * kinds, which recorder.py checks against the dtype at import. */
#define ROW_FIELDS(X)                                                                                  \
    X(name, name) X(thread, thread) X(host_start, h0) X(host_end, h1) X(device, device) X(stream, stream) \
    X(dev_start, t0) X(dev_end, t1)

/* Region args travel as JSON object text, encoded on entry (a copy: the trace keeps what they
 * were then): plain bytes that need no GIL to move, drop or write out. */
typedef struct {
    char *p; /* malloc'd, or NULL: no args */
    Py_ssize_t n;
} Args;

/* Finished rows, and the args of those that have any: row index and end offset in the blob. */
typedef struct {
    Row *v;
    Py_ssize_t n, cap;
    int64_t *at, *end;
    Py_ssize_t nat, capat, capend;
    char *blob;
    Py_ssize_t nblob, capblob;
} Rows;

/* A mark: one recorded event, shared by the boundaries that had nothing launched between them.
 * Referenced by its thread's last mark, open entries, finished records and the resolver's queue
 * of its stream, which stamps it as soon as it is done (against the latest anchor: a short
 * elapsed, whatever the region's length) and returns its event to the pool. */
typedef struct Mark {
    uintptr_t ev, s;
    double ms;
    uint64_t seq; /* record order: stream order on one stream */
    int dev;
    int state; /* resolver-owned: 0 waiting, 1 stamped, -1 could not be read */
    int refs;  /* atomic */
    struct Mark *next; /* in the resolver's inbox */
} Mark;

typedef struct {
    PyObject *owner; /* the Region entered (borrowed: `with` keeps it alive), or NULL */
    uint64_t id;     /* the token of enter(), or 0 */
    int32_t key;
    int host, cross, dev, why;
    Args args;       /* owned */
    PyObject *extra; /* owned */
    int64_t h0;
    uintptr_t s;
    Mark *m;
} Entry;

typedef struct {
    int32_t key, thread;
    Args args; /* owned, handed to the row */
    int64_t h0, h1;
    int d0, d1, why; /* why: the reason a missing mark is missing */
    uintptr_t s0, s1;
    Mark *m0, *m1;
} Done;

typedef struct {
    uint64_t gen;
    int32_t ix;
    Entry *open;
    Py_ssize_t nopen, capopen;
    Mark *last_m;
    int last_d, last_why;
    uintptr_t last_s;
    int64_t last_t;
} TState;

/* The marks recorded on one stream and not yet stamped, in record order */
typedef struct {
    int d;
    uintptr_t s;
    Mark **v;
    Py_ssize_t head, n, cap;
} MarkQ;

typedef struct {
    int64_t lo, hi;
    uintptr_t ev;
} Pending;

typedef struct {
    int64_t lo, hi;
    double ms;
} Anchor;

typedef struct {
    uintptr_t *v;
    Py_ssize_t n, cap;
} Pool;

typedef struct {
    int (*record)(void *, void *);
    int (*query)(void *);
    int (*elapsed)(float *, void *, void *);
    int (*last_error)(void);
} Cudart;

typedef struct Batch Batch; /* one flush's worth (journal.c) */

/* The journal's writer (see "the journal" below); its fields are the writer's, or under mu. */
typedef struct {
    char *dir;
    int cat, seg;            /* file descriptors: the catalog, the current segment of rows */
    int64_t interval_ns;
    int64_t seg_rows, keep_rows, seg_count, seg_no, total;
    int64_t *seg_before;     /* rows journaled before each segment still on disk, oldest first */
    int64_t first_seg, nsegs, capsegs;
    Py_ssize_t *anchors_done, streams_done;
    int64_t flushes, last_h;
    int failed;
    pthread_mutex_t mu;      /* notes, jrows, the thread's stop */
    char *notes;             /* catalog records from Python, framed, waiting to be written */
    Py_ssize_t nnotes, capnotes;
    pthread_t thread;
    int running, stopping;
    pthread_cond_t wake;
    Batch *last;             /* the last flush, written on last_thread; its rows lent to take() */
    pthread_t last_thread;
    int last_running, lent;
} Journal;

typedef struct Core {
    PyObject_HEAD
    uint64_t gen;
    int ndev, multi, active;
    int64_t share_ns, anchor_interval_ns, poll_ns;
    Py_ssize_t chunk;
    /* Python side: the clock (NULL: perf_counter_ns), backend calls, recorder callbacks */
    PyObject *clock, *get_device, *raw_stream, *py_record, *py_query, *py_elapsed, *record_failed,
        *learn_stream, *new_event, *on_thread, *on_full, *on_capture, *nvtx_push, *nvtx_pop,
        *nvtx_start, *nvtx_end, *names, *events;
    Cudart rt;
    int native;
    uintptr_t *side;
    /* hot-path state (GIL) */
    TState **threads;
    Py_ssize_t nthreads, capthreads;
    uint64_t next_id;
    uintptr_t *seen;
    Py_ssize_t nseen, capseen;
    Rows hrows; /* rows finished on the hot path (host-only, unfinished) */
    Py_ssize_t *created;
    int64_t max_events;
    long captured;
    /* shared, each under its mutex */
    pthread_mutex_t qmu, pmu, rmu, pass_mu;
    Done *done;
    Py_ssize_t ndone, capdone;
    Pool *pools;
    Rows drows; /* rows the resolver finished */
    long lost[NWHY]; /* regions without a device span, by why */
    Mark *inbox;   /* marks recorded since the resolver's last pass, newest first (atomic) */
    uint64_t seq;  /* marks recorded (GIL) */
    long hot_errors; /* device calls on the hot path that failed: their regions kept host spans */
    /* resolver-owned (under pass_mu) */
    MarkQ *mq;
    Py_ssize_t nmq;
    Done *pend; /* finished regions whose marks are not all stamped yet */
    Py_ssize_t npend, cappend;
    uintptr_t *streams; /* (d, s) pairs in stream-index order */
    Py_ssize_t nstreams, capstreams;
    int *has_ref;
    uintptr_t *ref_ev;
    double *ref_ms;
    Pending **pending;
    Py_ssize_t *npending, *cappending;
    Anchor **anchors;
    Py_ssize_t *nanchors, *capanchors;
    int64_t last_anchor;
    int anchor_tries;
    char *errors[MAX_ERRORS];
    int nerrors;
    /* the native resolver thread */
    pthread_t thread;
    int running, stopping;
    pthread_cond_t wake;
    /* the journal: while jon, hot paths hold hlk (a spinlock) to change what its writer reads
     * (open stacks, hrows, the thread table); jon changes only with the GIL held and no writer */
    int jon, hlk;
    Journal *j;
    Rows jrows; /* rows journaled, not yet taken (under j->mu) */
    Py_ssize_t njrows; /* their count, read racily by the hot path */
} Core;


/* Text being encoded (args, journal records): on the stack until it outgrows it */
typedef struct {
    char *p;
    Py_ssize_t n, cap;
    char small[112];
} Buf;

/* ---- the core's global state ----------------------------------------------------------------
 * One per process, in one place. Static, not PEP 489 module state: Region.__enter__/__exit__,
 * region() and forward() would each have to find the module's state first (PyType_GetModuleByDef
 * walks the type's MRO), a cost on every region boundary for an isolation that one recording per
 * process does not need. */
typedef struct {
    Core *current;          /* the recording core (a reference): read by Region per entry */
    uint64_t gen;           /* sessions started, so that a thread's state names its session */
    int capturing;          /* CUDA graph captures in progress (changed under calls) */
    pthread_mutex_t calls;  /* held by a resolver pass's CUDA calls */
    pthread_mutex_t errors; /* a core's errors: the hot path's and the resolver's */
    /* bound by bind() (module.c) at `import evtrace` (regions.py): recorder's name table and
     * name_key(), values.encode (args' slow path) and MAX_STR, regions.py's decorator and
     * region()'s slow path */
    PyObject *name_keys, *name_key, *encode, *decorate, *region_slow;
    Py_ssize_t max_str;
    /* bound by bind() once torch is imported (instrumentation.bind_torch), for forward() and
     * sequential(): torch.compiler's globals (its "is compiling" flag, key compiling_flag) or,
     * where that private flag is missing, torch.compiler.is_compiling (evtrace.private decides);
     * torch.is_grad_enabled; the Python that watches a module's backward; the instrumented
     * forward's type; torch's global module hooks; forward()'s Python frame for torch.compile */
    PyObject *compiler_globals, *compiling_flag, *is_compiling, *grad_enabled, *watch, *forward_type,
        *global_hooks, *frame;
} Globals;

extern Globals et_g;
/* local-dynamic: one TLS lookup a function for both, as when they were statics of one file */
#define ET_TLS __attribute__((tls_model("local-dynamic")))
extern __thread TState *et_tls ET_TLS;     /* this thread's state in session et_tls_gen (freed once that ends) */
extern __thread uint64_t et_tls_gen ET_TLS;
extern PyTypeObject et_CoreType, et_RegionType;

/* ---- what crosses files ------------------------------------------------------------------- */

/* common.c */
void et_lock_gil_free(pthread_mutex_t *mu);
void et_add_error(Core *c, const char *msg);
int et_rows_push(Rows *r, const Row *row, const Args *a);
void et_rows_free(Rows *r);
int et_journal_lent(Core *c, Rows *hr, Rows *dr);
int et_start_thread(pthread_t *t, void *(*fn)(void *), void *arg, const char *name);
void et_rows_append(Rows *dst, const Rows *src);
int et_reserve(Buf *b, Py_ssize_t more);
int et_buf_take(Buf *b, Args *out);
/* pool.c */
void et_pool_put(Core *c, int d, uintptr_t ev);
void et_mark_drop(Core *c, Mark *m);
uintptr_t et_new_event(Core *c, int d);
uintptr_t et_pool_grow(Core *c, int d);
int et_b_query(Core *c, uintptr_t ev);
int et_b_elapsed(Core *c, uintptr_t a, uintptr_t b, double *ms);
int et_anchor_all(Core *c);
int et_resolve_anchors(Core *c);
/* hot.c */
TState *et_new_tstate(Core *c);
void et_free_tstate(Core *c, TState *t);
int et_hot_failed(Core *c);
int et_do_enter(Core *c, PyObject *owner, uint64_t id, int32_t key, PyObject *args, int host, int cross);
int et_do_exit(Core *c, TState *t, Py_ssize_t i);
TState *et_find_entry(Core *c, PyObject *owner, uint64_t id, Py_ssize_t *at);
/* resolver.c */
int et_take_inbox(Core *c);
int et_finish_done(Core *c);
void et_done_free(Core *c, Done *r);
void et_halt(Core *c);
/* journal.c */
void et_crc_init(void);
void et_journal_join(Core *c);
void et_journal_free(Core *c);
PyObject *et_read_flush(PyObject *mod, PyObject *arg);
/* forward.c: module functions */
PyObject *et_region_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames);
PyObject *et_forward_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames);
PyObject *et_forward_here_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames);
PyObject *et_sequential_fn(PyObject *mod, PyObject *const *a, Py_ssize_t n);
/* module.c */
void et_core_free_state(Core *c);
/* Core's methods that live with their job (hot.c, pool.c, resolver.c, journal.c), tabled in module.c */
PyObject *Core_enter(Core *c, PyObject *const *a, Py_ssize_t n);
PyObject *Core_enter_host(Core *c, PyObject *const *a, Py_ssize_t n);
PyObject *Core_enter_cross(Core *c, PyObject *const *a, Py_ssize_t n);
PyObject *Core_exit(Core *c, PyObject *tok);
PyObject *Core_fill(Core *c, PyObject *const *a, Py_ssize_t n);
PyObject *Core_last_brackets(Core *c, PyObject *unused);
PyObject *Core_anchors(Core *c, PyObject *arg);
PyObject *Core_streams(Core *c, PyObject *unused);
PyObject *Core_poll(Core *c, PyObject *unused);
PyObject *Core_run(Core *c, PyObject *unused);
PyObject *Core_halt(Core *c, PyObject *unused);
PyObject *Core_anchor_now(Core *c, PyObject *unused);
PyObject *Core_resolve_anchors(Core *c, PyObject *unused);
PyObject *Core_journal_open(Core *c, PyObject *args);
PyObject *Core_journal_note(Core *c, PyObject *arg);
PyObject *Core_journal_stop(Core *c, PyObject *unused);
PyObject *Core_journal_flush(Core *c, PyObject *unused);
PyObject *Core_journal_close(Core *c, PyObject *arg);

/* ---- inline helpers --------------------------------------------------------------------------- */

static inline int grow(void **v, Py_ssize_t *cap, Py_ssize_t need, size_t size) {
    if (need <= *cap) return 0;
    Py_ssize_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *p = realloc(*v, (size_t)c * size);
    if (!p) return -1;
    *v = p;
    *cap = c;
    return 0;
}
#define GROW(v, cap, need) grow((void **)&(v), &(cap), (need), sizeof(*(v)))

static inline int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter_ns reads on Linux */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The session clock: -1 with an exception set if a Python clock fails. */
static inline int64_t now(Core *c) {
    if (!c->clock) return mono_ns();
    PyObject *r = PyObject_CallNoArgs(c->clock);
    if (!r) return -1;
    int64_t t = PyLong_AsLongLong(r);
    Py_DECREF(r);
    return t;
}

/* Against the journal's writer, which copies open stacks and takes hrows once per flush: a hot
 * path holds the GIL, so only the writer ever contends, for the length of a copy. Never held
 * across a Python call (another thread may then run its own hot path). */
static inline void hlock(Core *c) {
    if (!c->jon) return;
    while (__atomic_exchange_n(&c->hlk, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&c->hlk, __ATOMIC_RELAXED)) sched_yield();
}

static inline void hunlock(Core *c) {
    if (c->jon) __atomic_store_n(&c->hlk, 0, __ATOMIC_RELEASE);
}

static inline void args_free(Args *a) {
    free(a->p);
    a->p = NULL;
    a->n = 0;
}

static inline void mark_keep(Mark *m) {
    if (m) __atomic_add_fetch(&m->refs, 1, __ATOMIC_RELAXED);
}

static inline uintptr_t pool_take(Core *c, int d) {
    uintptr_t ev = 0;
    pthread_mutex_lock(&c->pmu);
    Pool *p = &c->pools[d];
    if (p->n) ev = p->v[--p->n];
    pthread_mutex_unlock(&c->pmu);
    return ev;
}

static inline PyObject *handle_obj(Core *c, uintptr_t h) {
    return c->native ? PyLong_FromVoidPtr((void *)h) : (Py_INCREF((PyObject *)h), (PyObject *)h);
}

/* record: 0, an error code, or -1 with a Python exception */
static inline int b_record(Core *c, uintptr_t ev, uintptr_t s) {
    if (c->native) return c->rt.record((void *)ev, (void *)s);
    PyObject *e = handle_obj(c, ev), *st = PyLong_FromSize_t(s);
    PyObject *r = (e && st) ? PyObject_CallFunctionObjArgs(c->py_record, e, st, NULL) : NULL;
    Py_XDECREF(e);
    Py_XDECREF(st);
    if (!r) return -1;
    long rc = PyLong_AsLong(r);
    Py_DECREF(r);
    return rc == -1 && PyErr_Occurred() ? -1 : (int)rc;
}

/* This thread's state in c's session, made on its first region. */
static inline TState *tstate(Core *c) {
    return et_tls_gen == c->gen && et_tls ? et_tls : et_new_tstate(c);
}

/* Close the open region with token id, wherever it is; none if the session has stopped. */
static inline int exit_id(Core *c, uint64_t id) {
    Py_ssize_t at;
    TState *t = c->active ? et_find_entry(c, NULL, id, &at) : NULL;
    return t ? et_do_exit(c, t, at) : 0;
}

static inline void buf_init(Buf *b) {
    b->p = b->small;
    b->n = 0;
    b->cap = (Py_ssize_t)sizeof b->small;
}

static inline void buf_free(Buf *b) {
    if (b->p != b->small) free(b->p);
}

static inline int put(Buf *b, const char *s, Py_ssize_t n) {
    if (et_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

#pragma GCC visibility pop

#endif
