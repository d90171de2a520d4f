/* evtrace's native core: the region hot path, the event pool and the resolver.
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

#define NEVER (-(INT64_C(1) << 62))
#define ALWAYS (INT64_C(1) << 62)
#define MAX_ERRORS 10
#define CUDA_NOT_READY 600

/* Why a region has no device span: every region is in the trace, and each lost span is counted
 * under its reason (recorder.counts()). */
enum { WHY_POOL, WHY_REFUSED, WHY_CAPTURE, WHY_HOT_ERROR, WHY_NEW_DEVICE, WHY_UNREADABLE, WHY_SPLIT, NWHY };
static const char *const why_names[NWHY] = {
    "event_pool_exhausted", "record_refused", "graph_capture", "device_call_failed",
    "device_not_seen_at_start", "unreadable_event", "split_over_devices",
};

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

static PyTypeObject CoreType, RegionType;
static Core *g_current;          /* the recording core: read by Region per entry */
static uint64_t g_gen;           /* sessions started, so that a thread's state names its session */
static __thread TState *tls;     /* this thread's state in session tls_gen (freed once that ends) */
static __thread uint64_t tls_gen;
static int g_capturing;          /* CUDA graph captures in progress */
static pthread_mutex_t g_calls = PTHREAD_MUTEX_INITIALIZER; /* held by a resolver pass's CUDA calls */
static PyObject *g_name_keys, *g_name_key, *g_encode, *g_decorate, *g_region_slow;
/* instrumentation.py's parts for forward(): torch.compiler's globals (its "is compiling" flag),
 * torch.is_grad_enabled, and the Python that watches a module's backward */
static PyObject *g_compiler_globals, *g_compiling_flag, *g_grad_enabled, *g_watch, *g_forward_type,
    *g_global_hooks, *g_frame;
static Py_ssize_t g_max_str = 1000;

/* ---- small helpers ---------------------------------------------------------------------- */

static int grow(void **v, Py_ssize_t *cap, Py_ssize_t need, size_t size) {
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

/* A native thread of evtrace's, started with every signal blocked: a signal sent to the process
 * must reach a thread that can act on it. Delivered to ours, it would only set Python's flag,
 * and a main thread blocked in sleep() or a read would not wake up for it. */
static int start_thread(pthread_t *t, void *(*fn)(void *), void *arg, const char *name) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) pthread_setname_np(*t, name); /* as top -H and py-spy show it */
    return rc;
}

/* Lock a mutex that a Python-mode resolver may hold while it waits for the GIL. */
static void lock_gil_free(pthread_mutex_t *mu) {
    if (pthread_mutex_trylock(mu) == 0) return;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(mu);
    Py_END_ALLOW_THREADS
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

static pthread_mutex_t g_errors = PTHREAD_MUTEX_INITIALIZER; /* errors: the hot path's and the resolver's */

static void add_error(Core *c, const char *msg) {
    pthread_mutex_lock(&g_errors);
    if (!c->nerrors || strcmp(c->errors[c->nerrors - 1], msg) != 0) /* a failing pass repeats itself */
        if (c->nerrors < MAX_ERRORS) c->errors[c->nerrors++] = strdup(msg);
    pthread_mutex_unlock(&g_errors);
}

static inline void args_free(Args *a) {
    free(a->p);
    a->p = NULL;
    a->n = 0;
}

/* Append a row and a copy of its args (the caller keeps its own). */
static int rows_push(Rows *r, const Row *row, const Args *a) {
    if (GROW(r->v, r->cap, r->n + 1) < 0) return -1;
    if (a && a->p) {
        if (GROW(r->at, r->capat, r->nat + 1) < 0 || GROW(r->end, r->capend, r->nat + 1) < 0 ||
            GROW(r->blob, r->capblob, r->nblob + a->n) < 0)
            return -1;
        memcpy(r->blob + r->nblob, a->p, (size_t)a->n);
        r->nblob += a->n;
        r->at[r->nat] = r->n;
        r->end[r->nat++] = r->nblob;
    }
    r->v[r->n++] = *row;
    return 0;
}

static void rows_free(Rows *r) {
    free(r->v), free(r->at), free(r->end), free(r->blob);
    memset(r, 0, sizeof *r);
}

/* Append src's rows to dst, with their args (best effort: out of memory, the rest are lost). */
static void rows_append(Rows *dst, const Rows *src) {
    Py_ssize_t j = 0, from = 0;
    for (Py_ssize_t i = 0; i < src->n; i++) {
        Args a = {NULL, 0};
        if (j < src->nat && src->at[j] == i) a.p = src->blob + from, a.n = src->end[j] - from, from = src->end[j++];
        if (rows_push(dst, &src->v[i], &a) < 0) return;
    }
}

/* ---- the event pool and marks ---------------------------------------------------------- */

static void pool_put(Core *c, int d, uintptr_t ev) {
    pthread_mutex_lock(&c->pmu);
    Pool *p = &c->pools[d];
    if (GROW(p->v, p->cap, p->n + 1) == 0) p->v[p->n++] = ev;
    pthread_mutex_unlock(&c->pmu);
}

static uintptr_t pool_take(Core *c, int d) {
    uintptr_t ev = 0;
    pthread_mutex_lock(&c->pmu);
    Pool *p = &c->pools[d];
    if (p->n) ev = p->v[--p->n];
    pthread_mutex_unlock(&c->pmu);
    return ev;
}

static void mark_drop(Core *c, Mark *m) {
    if (m && __atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        if (m->ev) pool_put(c, m->dev, m->ev); /* never read (e.g. unfinished): reusable all the same */
        free(m);
    }
}

static inline void mark_keep(Mark *m) {
    if (m) __atomic_add_fetch(&m->refs, 1, __ATOMIC_RELAXED);
}

/* A new event from the backend (hot path, GIL): 0 if it failed (exception set). */
static uintptr_t new_event(Core *c, int d) {
    PyObject *ev = PyObject_CallFunction(c->new_event, "i", d);
    if (!ev) return 0;
    uintptr_t h;
    if (c->native) {
        h = (uintptr_t)PyLong_AsVoidPtr(ev);
        Py_DECREF(ev);
        if (PyErr_Occurred()) return 0;
    } else { /* a Python object: the core keeps it alive, and its address is the handle */
        if (PyList_Append(c->events, ev) < 0) {
            Py_DECREF(ev);
            return 0;
        }
        h = (uintptr_t)ev;
        Py_DECREF(ev);
    }
    return h;
}

/* The pool is dry: add up to 256 events (up to max_events), else drop the device span. */
static int hot_failed(Core *c);

/* 0 if none could be made: the region loses its device span (with an exception set if one
 * failed); past max_events that is counted as the pool exhausted. */
static uintptr_t pool_grow(Core *c, int d) {
    Py_ssize_t n = c->max_events - c->created[d];
    if (n > 256) n = 256;
    uintptr_t first = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uintptr_t ev = new_event(c, d);
        if (!ev) {
            if (first && hot_failed(c) < 0) { /* not the device's (KeyboardInterrupt): it propagates */
                pool_put(c, d, first);
                return 0;
            }
            break; /* with some made, the failure is said and this region keeps its span */
        }
        c->created[d]++;
        if (first)
            pool_put(c, d, ev);
        else
            first = ev;
    }
    return first;
}

/* ---- backend calls ---------------------------------------------------------------------- */

static PyObject *handle_obj(Core *c, uintptr_t h) {
    return c->native ? PyLong_FromVoidPtr((void *)h) : (Py_INCREF((PyObject *)h), (PyObject *)h);
}

/* record: 0, an error code, or -1 with a Python exception */
static int b_record(Core *c, uintptr_t ev, uintptr_t s) {
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

/* query: 1 done, 0 not yet, -1 failed (native: error recorded; Python: exception set) */
static int b_query(Core *c, uintptr_t ev) {
    if (c->native) {
        int rc = c->rt.query((void *)ev);
        if (rc == 0) return 1;
        c->rt.last_error();
        if (rc == CUDA_NOT_READY) return 0;
        char msg[96];
        snprintf(msg, sizeof msg, "RuntimeError: cudaEventQuery failed with CUDA error %d", rc);
        add_error(c, msg);
        return -1;
    }
    PyObject *e = handle_obj(c, ev);
    PyObject *r = e ? PyObject_CallOneArg(c->py_query, e) : NULL;
    Py_XDECREF(e);
    if (!r) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

static int b_elapsed(Core *c, uintptr_t a, uintptr_t b, double *ms) {
    if (c->native) {
        float f = 0;
        int rc = c->rt.elapsed(&f, (void *)a, (void *)b);
        if (rc != 0) {
            c->rt.last_error();
            char msg[96];
            snprintf(msg, sizeof msg, "RuntimeError: cudaEventElapsedTime failed with CUDA error %d", rc);
            add_error(c, msg);
            return -1;
        }
        *ms = f;
        return 0;
    }
    PyObject *x = handle_obj(c, a), *y = handle_obj(c, b);
    PyObject *r = (x && y) ? PyObject_CallFunctionObjArgs(c->py_elapsed, x, y, NULL) : NULL;
    Py_XDECREF(x);
    Py_XDECREF(y);
    if (!r) return -1;
    *ms = PyFloat_AsDouble(r);
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : 0;
}

/* ---- thread states ---------------------------------------------------------------------- */

static TState *new_tstate(Core *c) {
    TState *t = calloc(1, sizeof(TState));
    if (!t) return (TState *)PyErr_NoMemory();
    t->gen = c->gen;
    t->last_t = NEVER;
    t->last_d = -1;
    t->last_s = (uintptr_t)-1;
    hlock(c);
    int ok = GROW(c->threads, c->capthreads, c->nthreads + 1) == 0;
    if (ok) t->ix = (int32_t)c->nthreads, c->threads[c->nthreads++] = t;
    hunlock(c);
    if (!ok) return free(t), (TState *)PyErr_NoMemory();
    tls = t;
    tls_gen = c->gen;
    PyObject *r = PyObject_CallNoArgs(c->on_thread); /* the recorder names the lane */
    if (!r) return NULL;
    Py_DECREF(r);
    return t;
}

static inline TState *tstate(Core *c) {
    return tls_gen == c->gen && tls ? tls : new_tstate(c);
}

static void free_tstate(Core *c, TState *t) {
    for (Py_ssize_t i = 0; i < t->nopen; i++) {
        args_free(&t->open[i].args);
        Py_XDECREF(t->open[i].extra);
        mark_drop(c, t->open[i].m);
    }
    mark_drop(c, t->last_m);
    free(t->open);
    free(t);
}

/* ---- the hot path ----------------------------------------------------------------------- */

static void in_capture(Core *c) {
    if (++c->captured == 1)
        PySys_WriteStderr(
            "evtrace: regions inside a CUDA graph capture get host spans only; "
            "a region around replay() times the replay\n");
}

/* A device call on the hot path raised. A CUDA failure must never reach user code: the region
 * keeps its host span and loses its device span (counted), and the first failure is said once.
 * 0 if it was handled; -1 to propagate what is not an error of the device's (KeyboardInterrupt). */
static int hot_failed(Core *c) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *msg = ev ? PyObject_Str(ev) : NULL;
    const char *m = msg ? PyUnicode_AsUTF8(msg) : NULL;
    if (!m) PyErr_Clear();
    char line[320];
    snprintf(line, sizeof line, "%s: %s (on the hot path)", et ? ((PyTypeObject *)et)->tp_name : "Error", m ? m : "?");
    if (c->hot_errors++ == 0)
        PySys_WriteStderr("evtrace: a device call failed while recording (%.300s); regions keep their host spans, "
                          "and the device spans lost are counted in the trace\n", line);
    add_error(c, line);
    Py_XDECREF(msg);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
    return 0;
}

/* Record a pooled event on stream s of device d: a new mark (refs 2: the caller's and the
 * resolver's queue), or NULL with the reason in *why. -1 on error. */
static int make_mark(Core *c, int d, uintptr_t s, Mark **out, int *why) {
    *out = NULL;
    if (__atomic_load_n(&g_capturing, __ATOMIC_RELAXED)) {
        in_capture(c);
        *why = WHY_CAPTURE;
        return 0;
    }
    int known = 0; /* by (device, stream): the legacy default stream is handle 0 on every device */
    for (Py_ssize_t i = 0; i < c->nseen; i++)
        if (c->seen[2 * i] == (uintptr_t)d && c->seen[2 * i + 1] == s) known = 1;
    if (!known) {
        if (GROW(c->seen, c->capseen, 2 * c->nseen + 2) < 0) return PyErr_NoMemory(), -1;
        c->seen[2 * c->nseen] = (uintptr_t)d;
        c->seen[2 * c->nseen++ + 1] = s;
        PyObject *r = PyObject_CallFunction(c->learn_stream, "iK", d, (unsigned long long)s);
        if (!r) return -1;
        Py_DECREF(r);
    }
    uintptr_t ev = pool_take(c, d);
    if (!ev) {
        ev = pool_grow(c, d);
        if (!ev) return PyErr_Occurred() ? -1 : (*why = WHY_POOL, 0);
    }
    int rc = b_record(c, ev, s);
    if (rc != 0) {
        pool_put(c, d, ev);
        if (rc < 0) return -1;
        if (c->native) c->rt.last_error(); /* torch must never see our refused record */
        PyObject *r = PyObject_CallFunction(c->record_failed, "i", rc);
        if (!r) return -1;
        Py_DECREF(r);
        *why = WHY_REFUSED;
        return 0;
    }
    Mark *m = malloc(sizeof(Mark));
    if (!m) return PyErr_NoMemory(), -1;
    m->ev = ev;
    m->s = s;
    m->ms = 0;
    m->seq = ++c->seq;
    m->dev = d;
    m->state = 0;
    m->refs = 2;
    /* to the resolver's inbox: every hot path holds the GIL, so only the resolver's exchange
     * races with this push */
    Mark *head = __atomic_load_n(&c->inbox, __ATOMIC_RELAXED);
    do m->next = head;
    while (!__atomic_compare_exchange_n(&c->inbox, &head, m, 1, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    *out = m;
    return 0;
}

/* The current device and stream, and a mark there: shared with the thread's last one when
 * nothing can have been launched since (closer than one record), else new. The returned mark
 * carries a reference for the caller; NULL (with *why) if the device span is lost. */
static int boundary(Core *c, TState *t, int64_t h, int *d, uintptr_t *s, Mark **m, int *why) {
    *d = 0;
    *s = 0;
    *m = NULL;
    if (c->multi) {
        PyObject *r = PyObject_CallNoArgs(c->get_device);
        if (!r) goto failed;
        *d = (int)PyLong_AsLong(r);
        Py_DECREF(r);
        if (*d == -1 && PyErr_Occurred()) goto failed;
        if (*d < 0 || *d >= c->ndev) { /* a device the session did not see at its start */
            *d = 0;
            *why = WHY_NEW_DEVICE;
            return 0;
        }
    }
    PyObject *dv = PyLong_FromLong(*d);
    PyObject *r = dv ? PyObject_CallOneArg(c->raw_stream, dv) : NULL;
    Py_XDECREF(dv);
    if (!r) goto failed;
    *s = (uintptr_t)PyLong_AsUnsignedLongLongMask(r);
    Py_DECREF(r);
    if (h - t->last_t < c->share_ns && t->last_s == *s && t->last_d == *d) {
        *m = t->last_m;
        *why = t->last_why;
        mark_keep(*m);
        t->last_t = h;
        return 0;
    }
    Mark *nm;
    if (make_mark(c, *d, *s, &nm, why) < 0) goto failed;
    mark_drop(c, t->last_m);
    t->last_m = nm;
    t->last_why = *why;
    mark_keep(nm);
    *m = nm;
    t->last_d = *d;
    t->last_s = *s;
    int64_t after = now(c);
    if (after == -1 && PyErr_Occurred()) return -1;
    t->last_t = after;
    return 0;
failed:
    *why = WHY_HOT_ERROR;
    return hot_failed(c);
}

static int call_nvtx_name(PyObject *fn, Core *c, int32_t key, PyObject **keep) {
    PyObject *name = PyList_GetItem(c->names, key);
    if (!name) return -1;
    PyObject *r = PyObject_CallOneArg(fn, name);
    if (!r) return -1;
    if (keep)
        *keep = r;
    else
        Py_DECREF(r);
    return 0;
}

static int encode_args(PyObject *args, Args *out);

/* Open a region on this thread: an entry on its stack, with a copy of args (a dict, or NULL). */
static int do_enter(Core *c, PyObject *owner, uint64_t id, int32_t key, PyObject *args, int host, int cross) {
    int64_t h0 = now(c); /* first: the gap to the last mark must be as short as it really was */
    if (h0 == -1 && PyErr_Occurred()) return -1;
    TState *t = tstate(c);
    if (!t) return -1;
    PyObject *extra = NULL;
    if (cross && c->nvtx_start) {
        if (call_nvtx_name(c->nvtx_start, c, key, &extra) < 0) return -1;
    } else if (c->nvtx_push && call_nvtx_name(c->nvtx_push, c, key, NULL) < 0)
        return -1;
    Entry e = {owner, id, key, host, cross, 0, 0, {NULL, 0}, extra, h0, 0, NULL};
    if (!host && c->ndev && boundary(c, t, h0, &e.dev, &e.s, &e.m, &e.why) < 0) goto fail;
    if (!c->active) goto done; /* stopped while a device call let another thread run: not ours */
    if (args && encode_args(args, &e.args) < 0) goto fail; /* after the record: off the gap */
    hlock(c);
    int ok = GROW(t->open, t->capopen, t->nopen + 1) == 0;
    if (ok) t->open[t->nopen++] = e;
    hunlock(c);
    if (!ok) {
        PyErr_NoMemory();
        goto fail;
    }
    return 0;
done:
fail:
    Py_XDECREF(extra);
    mark_drop(c, e.m);
    args_free(&e.args);
    return PyErr_Occurred() ? -1 : 0;
}

static int drain_if_full(Core *c) {
    /* drows.n, njrows: racy reads, fine. Journaled, rows come through the journal's flushes. */
    if (c->jon ? __atomic_load_n(&c->njrows, __ATOMIC_RELAXED) < c->chunk
               : c->hrows.n < c->chunk && c->drows.n < c->chunk)
        return 0;
    PyObject *r = PyObject_CallNoArgs(c->on_full);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* Close entry i of thread t's stack, on the calling thread's clock and stream. Whatever fails,
 * the region is kept: with its host span at least. */
static int do_exit(Core *c, TState *t, Py_ssize_t i) {
    Entry e = t->open[i];
    int rc = 0, host = e.host || !c->ndev, kept = 0;
    /* before the record: the device cannot stamp the end earlier than this */
    int64_t h1 = c->clock ? 0 : mono_ns();
    hlock(c); /* off the stack and (host lane, native clock) into the rows in one step */
    memmove(&t->open[i], &t->open[i + 1], (size_t)(t->nopen - i - 1) * sizeof(Entry));
    t->nopen--;
    if (host && !c->clock) {
        Row row = {e.key, t->ix, e.h0, h1, -1, -1, NAN, NAN};
        kept = rows_push(&c->hrows, &row, &e.args) == 0;
    }
    hunlock(c);
    if (c->clock) {
        h1 = now(c);
        if (h1 == -1 && PyErr_Occurred()) rc = -1, h1 = e.h0;
    }
    if (host) {
        if (c->clock) {
            Row row = {e.key, t->ix, e.h0, h1, -1, -1, NAN, NAN};
            hlock(c);
            kept = rows_push(&c->hrows, &row, &e.args) == 0;
            hunlock(c);
        }
        if (!kept && rc == 0) rc = -1, PyErr_NoMemory();
    } else {
        int d = 0, why = e.why;
        uintptr_t s = 0;
        Mark *m1 = NULL;
        if (rc == 0) {
            TState *me = tstate(c);
            int w1 = 0;
            if (!me || boundary(c, me, h1, &d, &s, &m1, &w1) < 0) rc = -1;
            if (e.m && !m1) why = me ? w1 : WHY_HOT_ERROR;
        } else if (e.m)
            why = WHY_HOT_ERROR; /* the clock failed: no end mark */
        Done r = {e.key, t->ix, e.args, e.h0, h1, e.dev, d, why, e.s, s, e.m, m1};
        pthread_mutex_lock(&c->qmu);
        int ok = GROW(c->done, c->capdone, c->ndone + 1) == 0;
        if (ok) c->done[c->ndone++] = r;
        pthread_mutex_unlock(&c->qmu);
        if (ok)
            e.m = NULL, e.args.p = NULL; /* handed over */
        else {
            mark_drop(c, m1);
            if (rc == 0) rc = -1, PyErr_NoMemory();
        }
        mark_drop(c, e.m);
    }
    args_free(&e.args);
    if (e.extra) { /* an NVTX range of a cross-thread span */
        PyObject *r = PyObject_CallOneArg(c->nvtx_end, e.extra);
        Py_DECREF(e.extra);
        if (!r && rc == 0) rc = -1;
        else if (!r) PyErr_Clear();
        Py_XDECREF(r);
    } else if (c->nvtx_pop && !e.cross) {
        PyObject *r = PyObject_CallNoArgs(c->nvtx_pop);
        if (!r && rc == 0) rc = -1;
        else if (!r) PyErr_Clear();
        Py_XDECREF(r);
    }
    if (rc == 0) rc = drain_if_full(c);
    return rc;
}

/* The calling thread's open entry for a Region object (a thread closes only what it opened), or
 * for a token (unique: a cross-thread span may end on another thread), top down. */
static TState *find_entry(Core *c, PyObject *owner, uint64_t id, Py_ssize_t *at) {
    TState *me = tls_gen == c->gen ? tls : NULL;
    if (me)
        for (Py_ssize_t i = me->nopen - 1; i >= 0; i--)
            if (owner ? me->open[i].owner == owner : me->open[i].id == id) return *at = i, me;
    if (owner) return NULL;
    for (Py_ssize_t k = 0; k < c->nthreads; k++) {
        TState *t = c->threads[k];
        if (t == me) continue;
        for (Py_ssize_t i = t->nopen - 1; i >= 0; i--)
            if (t->open[i].id == id) return *at = i, t;
    }
    return NULL;
}

/* ---- args: JSON object text, encoded on entry --------------------------------------------- */

/* Text being encoded: on the stack until it outgrows it (one malloc a region, for its copy) */
typedef struct {
    char *p;
    Py_ssize_t n, cap;
    char small[112];
} Buf;

static inline void buf_init(Buf *b) {
    b->p = b->small;
    b->n = 0;
    b->cap = (Py_ssize_t)sizeof b->small;
}

static inline void buf_free(Buf *b) {
    if (b->p != b->small) free(b->p);
}

static int reserve(Buf *b, Py_ssize_t more) {
    if (b->n + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->n + more) cap *= 2;
    char *p = b->p == b->small ? malloc((size_t)cap) : realloc(b->p, (size_t)cap);
    if (!p) return -1;
    if (b->p == b->small) memcpy(p, b->small, (size_t)b->n);
    b->p = p;
    b->cap = cap;
    return 0;
}

/* The text as Args (malloc'd to its size; NULL when empty); the buffer is spent. -1: no memory */
static int buf_take(Buf *b, Args *out) {
    out->n = b->n;
    out->p = NULL;
    if (!b->n) return buf_free(b), 0;
    if (b->p != b->small) return out->p = b->p, 0;
    if (!(out->p = malloc((size_t)b->n))) return -1;
    memcpy(out->p, b->small, (size_t)b->n);
    return 0;
}

static inline int put(Buf *b, const char *s, Py_ssize_t n) {
    if (reserve(b, n) < 0) return -1;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

static int put_int(Buf *b, long long x) {
    char t[24];
    int i = 24;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    do t[--i] = (char)('0' + u % 10);
    while (u /= 10);
    if (x < 0) t[--i] = '-';
    return put(b, t + i, 24 - i);
}

/* A str as a JSON string: 0, 1 if the slow path must take it (too long, surrogates), -1 */
static int put_str(Buf *b, PyObject *v) {
    if (PyUnicode_GET_LENGTH(v) > g_max_str) return 1;
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(v, &n);
    if (!u) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeError)) return -1;
        PyErr_Clear();
        return 1;
    }
    if (reserve(b, 2 + 6 * n) < 0) return -1; /* worst case: every byte \u00XX */
    char *o = b->p + b->n;
    *o++ = '"';
    static const char hex[] = "0123456789abcdef";
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)u[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *o++ = (char)ch;
        } else if (ch == '"' || ch == '\\') {
            *o++ = '\\', *o++ = (char)ch;
        } else if (ch == '\n') {
            *o++ = '\\', *o++ = 'n';
        } else if (ch == '\t') {
            *o++ = '\\', *o++ = 't';
        } else {
            *o++ = '\\', *o++ = 'u', *o++ = '0', *o++ = '0', *o++ = hex[ch >> 4], *o++ = hex[ch & 15];
        }
    }
    *o++ = '"';
    b->n = o - b->p;
    return 0;
}

/* The common case in C: str keys, and values that are int (64-bit), finite float, bool, None
 * or str up to max_str. 0, 1 for the slow path, -1 on error. */
static int encode_fast(Buf *b, PyObject *args) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    int first = 1, rc;
    if (put(b, "{", 1) < 0) return -1;
    while (PyDict_Next(args, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k)) return 1;
        if (put(b, first ? "" : ",", first ? 0 : 1) < 0) return -1;
        first = 0;
        if ((rc = put_str(b, k)) != 0) return rc;
        if (put(b, ":", 1) < 0) return -1;
        PyTypeObject *t = Py_TYPE(v);
        if (t == &PyLong_Type) {
            int over;
            long long x = PyLong_AsLongLongAndOverflow(v, &over);
            if (over) return 1; /* values.snapshot knows the bounds beyond int64 */
            if (x == -1 && PyErr_Occurred()) return -1;
            if (put_int(b, x) < 0) return -1;
        } else if (t == &PyFloat_Type) {
            double x = PyFloat_AS_DOUBLE(v);
            if (!isfinite(x)) return 1;
            char *r = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
            if (!r) return -1;
            rc = put(b, r, (Py_ssize_t)strlen(r));
            PyMem_Free(r);
            if (rc < 0) return -1;
        } else if (t == &PyBool_Type) {
            if (v == Py_True ? put(b, "true", 4) : put(b, "false", 5)) return -1;
        } else if (v == Py_None) {
            if (put(b, "null", 4) < 0) return -1;
        } else if (t == &PyUnicode_Type) {
            if ((rc = put_str(b, v)) != 0) return rc;
        } else
            return 1;
    }
    return put(b, "}", 1);
}

/* args (a dict or any mapping) as the trace keeps them: JSON text, NULL when empty. The rare
 * values (containers, tensors, anything else) go through values.encode. */
static int encode_args(PyObject *args, Args *out) {
    out->p = NULL, out->n = 0;
    if (PyDict_CheckExact(args) && PyDict_GET_SIZE(args) == 0) return 0;
    Buf b;
    buf_init(&b);
    int rc = PyDict_CheckExact(args) ? encode_fast(&b, args) : 1;
    if (rc == 1) {
        b.n = 0;
        PyObject *j = PyObject_CallOneArg(g_encode, args);
        if (!j) rc = -1;
        else if (!PyBytes_Check(j)) rc = -1, PyErr_SetString(PyExc_TypeError, "values.encode gives bytes");
        else if (PyBytes_GET_SIZE(j) > 2) rc = put(&b, PyBytes_AS_STRING(j), PyBytes_GET_SIZE(j));
        else rc = 0; /* {} */
        Py_XDECREF(j);
    }
    if (rc < 0 || buf_take(&b, out) < 0) {
        if (rc < 0) buf_free(&b);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* ---- Core: Python methods ---------------------------------------------------------------- */

static PyObject *Core_enter_impl(Core *c, PyObject *const *a, Py_ssize_t n, int host, int cross) {
    if (n != 2) return PyErr_Format(PyExc_TypeError, "enter(key, args) takes 2 arguments");
    int32_t key = (int32_t)PyLong_AsLong(a[0]);
    if (key == -1 && PyErr_Occurred()) return NULL;
    uint64_t id = ++c->next_id;
    if (!c->active) return PyLong_FromUnsignedLongLong(id);
    if (do_enter(c, NULL, id, key, a[1] == Py_None ? NULL : a[1], host || !c->ndev, cross) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(id);
}

static PyObject *Core_enter(Core *c, PyObject *const *a, Py_ssize_t n) { return Core_enter_impl(c, a, n, 0, 0); }
static PyObject *Core_enter_host(Core *c, PyObject *const *a, Py_ssize_t n) { return Core_enter_impl(c, a, n, 1, 0); }
static PyObject *Core_enter_cross(Core *c, PyObject *const *a, Py_ssize_t n) { return Core_enter_impl(c, a, n, 0, 1); }

/* Close the open region with token id, wherever it is; none if the session has stopped. */
static int exit_id(Core *c, uint64_t id) {
    Py_ssize_t at;
    TState *t = c->active ? find_entry(c, NULL, id, &at) : NULL;
    return t ? do_exit(c, t, at) : 0;
}

static PyObject *Core_exit(Core *c, PyObject *tok) {
    uint64_t id = PyLong_AsUnsignedLongLong(tok);
    if (id == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    if (exit_id(c, id) < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---- the resolver ------------------------------------------------------------------------ */

static int32_t stream_index(Core *c, int d, uintptr_t s) {
    for (Py_ssize_t i = 0; i < c->nstreams; i++)
        if (c->streams[2 * i] == (uintptr_t)d && c->streams[2 * i + 1] == s) return (int32_t)i;
    if (GROW(c->streams, c->capstreams, 2 * c->nstreams + 2) < 0) return -1;
    c->streams[2 * c->nstreams] = (uintptr_t)d;
    c->streams[2 * c->nstreams + 1] = s;
    return (int32_t)c->nstreams++;
}

static MarkQ *markq_for(Core *c, int d, uintptr_t s) {
    for (Py_ssize_t i = 0; i < c->nmq; i++)
        if (c->mq[i].d == d && c->mq[i].s == s) return &c->mq[i];
    MarkQ *q = realloc(c->mq, (size_t)(c->nmq + 1) * sizeof(MarkQ));
    if (!q) return NULL;
    c->mq = q;
    q = &c->mq[c->nmq++];
    memset(q, 0, sizeof *q);
    q->d = d;
    q->s = s;
    return q;
}

static int markq_push(MarkQ *q, Mark *m) {
    if (q->head && q->head + q->n == q->cap) { /* reuse the room the stamped ones left */
        memmove(q->v, q->v + q->head, (size_t)q->n * sizeof(Mark *));
        q->head = 0;
    }
    if (GROW(q->v, q->cap, q->head + q->n + 1) < 0) return -1;
    q->v[q->head + q->n++] = m;
    return 0;
}

/* The marks recorded since the last pass, to their streams' queues in record order. A mark the
 * resolver has no room for cannot be read: its regions keep their host spans. */
static int take_inbox(Core *c) {
    Mark *m = __atomic_exchange_n(&c->inbox, NULL, __ATOMIC_ACQUIRE), *order = NULL;
    while (m) { /* newest first: reversed */
        Mark *next = m->next;
        m->next = order;
        order = m;
        m = next;
    }
    int rc = 0;
    while (order) {
        m = order;
        order = m->next;
        MarkQ *q = rc ? NULL : markq_for(c, m->dev, m->s);
        if (!q || markq_push(q, m) < 0) {
            rc = -1;
            m->state = -1;
            mark_drop(c, m);
        }
    }
    return rc;
}

/* Stamp a done mark against its device's latest anchor (an elapsed of at most about one anchor
 * interval, which float32 ms keeps to ~10 ns) and return its event to the pool. */
static int stamp(Core *c, Mark *m) {
    double e;
    if (b_elapsed(c, c->ref_ev[m->dev], m->ev, &e) < 0) return -1;
    m->ms = c->ref_ms[m->dev] + e;
    m->state = 1;
    uintptr_t ev = m->ev;
    m->ev = 0;
    pool_put(c, m->dev, ev);
    return 0;
}

/* Each stream's done marks, stamped in record order. With the native runtime, record order is
 * the stream's order (records are made holding the GIL), so once the newest is done all are. */
static int stamp_marks(Core *c) {
    for (Py_ssize_t k = 0; k < c->nmq; k++) {
        MarkQ *q = &c->mq[k];
        if (!q->n || !c->has_ref[q->d]) continue; /* the device's first anchor is not read yet */
        int all = 0;
        if (c->native && (all = b_query(c, q->v[q->head + q->n - 1]->ev)) < 0) return -1;
        while (q->n) {
            Mark *m = q->v[q->head];
            if (!all) {
                int done = b_query(c, m->ev);
                if (done < 0) return -1;
                if (!done) break; /* later marks on this stream are not done either */
            }
            if (stamp(c, m) < 0) return -1;
            q->head++, q->n--;
            mark_drop(c, m);
        }
        if (!q->n) q->head = 0;
    }
    return 0;
}

static int emit_row(Core *c, const Done *r, int16_t dev, int32_t stream, double t0, double t1) {
    Row row = {r->key, r->thread, r->h0, r->h1, dev, stream, t0, t1};
    pthread_mutex_lock(&c->rmu);
    int rc = rows_push(&c->drows, &row, &r->args);
    pthread_mutex_unlock(&c->rmu);
    return rc;
}

/* A region that keeps its host span only, counted under why. */
static int emit_lost(Core *c, const Done *r, int why) {
    __atomic_add_fetch(&c->lost[why], 1, __ATOMIC_RELAXED);
    return emit_row(c, r, -1, -1, NAN, NAN);
}

static void done_free(Core *c, Done *r) {
    args_free(&r->args);
    mark_drop(c, r->m0);
    mark_drop(c, r->m1);
    r->m0 = r->m1 = NULL;
}

/* A finished region whose marks are settled: its row, with a device span or counted as lost. */
static int finish(Core *c, Done *r) {
    int rc;
    if (!r->m0 || !r->m1)
        rc = emit_lost(c, r, r->why);
    else if (r->m0->state < 0 || r->m1->state < 0)
        rc = emit_lost(c, r, WHY_UNREADABLE);
    else if (r->d0 != r->d1)
        rc = emit_lost(c, r, WHY_SPLIT);
    else {
        int32_t ix = stream_index(c, r->d0, r->s0);
        rc = ix < 0 ? -1 : emit_row(c, r, (int16_t)r->d0, ix, r->m0->ms, r->m1->ms);
    }
    done_free(c, r);
    return rc;
}

static inline int settled(const Mark *m) { return !m || m->state != 0; }

/* Regions finished on the hot path join those waiting; each whose marks are settled is emitted. */
static int finish_done(Core *c) {
    pthread_mutex_lock(&c->qmu);
    Done *batch = c->done;
    Py_ssize_t n = c->ndone;
    c->done = NULL;
    c->ndone = c->capdone = 0;
    pthread_mutex_unlock(&c->qmu);
    int rc = 0;
    if (n && GROW(c->pend, c->cappend, c->npend + n) < 0) { /* no room: they keep host spans */
        for (Py_ssize_t i = 0; i < n; i++) {
            mark_drop(c, batch[i].m0), mark_drop(c, batch[i].m1);
            batch[i].m0 = batch[i].m1 = NULL;
            emit_lost(c, &batch[i], WHY_UNREADABLE);
            done_free(c, &batch[i]);
        }
        n = 0;
        rc = -1;
    }
    if (n) memcpy(c->pend + c->npend, batch, (size_t)n * sizeof(Done));
    c->npend += n;
    free(batch);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < c->npend; i++) {
        Done *r = &c->pend[i];
        if (settled(r->m0) && settled(r->m1)) {
            if (finish(c, r) < 0) rc = -1;
        } else
            c->pend[k++] = *r;
    }
    c->npend = k;
    return rc;
}

/* Each device: the tightest of a few host-bracketed records on its idle side stream. */
static int anchor_all(Core *c) {
    for (int d = 0; d < c->ndev; d++) {
        Pending best = {0, 0, 0};
        for (int i = 0; i < c->anchor_tries; i++) {
            uintptr_t ev = pool_take(c, d);
            if (!ev) break; /* the hot path grows the pool; an anchor waits for the next round */
            int64_t lo = now(c);
            int rc = b_record(c, ev, c->side[d]);
            int64_t hi = rc < 0 ? 0 : now(c); /* a Python clock must not run with an error set */
            if (rc != 0) {
                pool_put(c, d, ev);
                if (rc < 0) return -1;
                if (c->native) c->rt.last_error();
                continue;
            }
            if (!c->native && (lo == -1 || hi == -1) && PyErr_Occurred()) { /* no GIL natively */
                pool_put(c, d, ev);
                return -1;
            }
            if (!best.ev || hi - lo < best.hi - best.lo) {
                if (best.ev) pool_put(c, d, best.ev);
                best.lo = lo, best.hi = hi, best.ev = ev;
            } else
                pool_put(c, d, ev);
        }
        if (best.ev) {
            if (GROW(c->pending[d], c->cappending[d], c->npending[d] + 1) < 0) return -1;
            c->pending[d][c->npending[d]++] = best;
        }
    }
    c->last_anchor = now(c);
    return c->last_anchor == -1 && PyErr_Occurred() ? -1 : 0;
}

/* Chain completed anchors: each one's device time is the previous one's plus a short elapsed. */
static int resolve_anchors(Core *c) {
    for (int d = 0; d < c->ndev; d++) {
        Py_ssize_t k = 0;
        while (k < c->npending[d]) {
            Pending p = c->pending[d][k];
            int q = b_query(c, p.ev);
            if (q < 0) return -1;
            if (!q) break;
            double ms = 0;
            if (c->has_ref[d]) {
                double e;
                if (b_elapsed(c, c->ref_ev[d], p.ev, &e) < 0) return -1;
                ms = c->ref_ms[d] + e;
                pool_put(c, d, c->ref_ev[d]);
            }
            c->has_ref[d] = 1;
            c->ref_ev[d] = p.ev;
            c->ref_ms[d] = ms;
            if (GROW(c->anchors[d], c->capanchors[d], c->nanchors[d] + 1) < 0) return -1;
            c->anchors[d][c->nanchors[d]++] = (Anchor){p.lo, p.hi, ms};
            k++;
        }
        memmove(c->pending[d], c->pending[d] + k, (size_t)(c->npending[d] - k) * sizeof(Pending));
        c->npending[d] -= k;
    }
    return 0;
}

static int resolve_device(Core *c) {
    int64_t t = now(c);
    if (t == -1 && PyErr_Occurred()) return -1;
    if (t - c->last_anchor >= c->anchor_interval_ns && anchor_all(c) < 0) return -1;
    if (resolve_anchors(c) < 0) return -1;
    return stamp_marks(c);
}

/* One resolver pass. With the GIL (Python backends) it may raise; natively it records errors. */
static int pass(Core *c) {
    if (!c->ndev) return 0;
    int rc = take_inbox(c);
    pthread_mutex_lock(&g_calls); /* a CUDA graph capture waits for this block, and holds the next */
    if (rc == 0 && !__atomic_load_n(&g_capturing, __ATOMIC_RELAXED)) rc = resolve_device(c);
    pthread_mutex_unlock(&g_calls);
    if (finish_done(c) < 0) rc = -1;
    return rc;
}

/* One resolver step by hand (with the GIL), between the resolver's own passes. */
static PyObject *by_hand(Core *c, int (*step)(Core *)) {
    lock_gil_free(&c->pass_mu);
    int rc = step(c);
    pthread_mutex_unlock(&c->pass_mu);
    if (rc < 0) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Core_poll(Core *c, PyObject *unused) {
    if (c->native) {
        Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&c->pass_mu);
        pass(c);
        pthread_mutex_unlock(&c->pass_mu);
        Py_END_ALLOW_THREADS
        Py_RETURN_NONE;
    }
    return by_hand(c, pass);
}

static void *resolver_main(void *arg) {
    Core *c = arg;
    pthread_mutex_lock(&c->pass_mu);
    while (!c->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t ns = ts.tv_nsec + c->poll_ns;
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&c->wake, &c->pass_mu, &ts);
        if (c->stopping) break;
        if (pass(c) < 0 && c->nerrors == 0) add_error(c, "MemoryError: the resolver ran out of memory");
    }
    pthread_mutex_unlock(&c->pass_mu);
    return NULL;
}

static PyObject *Core_run(Core *c, PyObject *unused) {
    if (!c->native) return PyErr_Format(PyExc_RuntimeError, "a native resolver needs the native runtime");
    if (c->running) Py_RETURN_NONE;
    c->stopping = 0;
    if (start_thread(&c->thread, resolver_main, c, "evtrace-resolve") != 0)
        return PyErr_Format(PyExc_OSError, "could not start the resolver thread");
    c->running = 1;
    Py_RETURN_NONE;
}

static void halt(Core *c) {
    if (!c->running) return;
    pthread_mutex_lock(&c->pass_mu);
    c->stopping = 1;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->pass_mu);
    pthread_join(c->thread, NULL);
    c->running = 0;
}

static PyObject *Core_halt(Core *c, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS halt(c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Core_anchor_now(Core *c, PyObject *unused) { return by_hand(c, anchor_all); }

static PyObject *Core_resolve_anchors(Core *c, PyObject *unused) { return by_hand(c, resolve_anchors); }

/* The host brackets of the last anchor taken on each device (share window at start). */
static PyObject *Core_last_brackets(Core *c, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (int d = 0; out && d < c->ndev; d++) {
        Pending *p = c->npending[d] ? &c->pending[d][c->npending[d] - 1] : NULL;
        PyObject *x = p ? Py_BuildValue("(LL)", (long long)p->lo, (long long)p->hi) : (Py_INCREF(Py_None), Py_None);
        if (!x || PyList_Append(out, x) < 0) Py_CLEAR(out);
        Py_XDECREF(x);
    }
    return out;
}

static PyObject *Core_anchors(Core *c, PyObject *arg) {
    long d = PyLong_AsLong(arg);
    if (d == -1 && PyErr_Occurred()) return NULL;
    if (d < 0 || d >= c->ndev) return PyErr_Format(PyExc_IndexError, "no device %ld", d);
    lock_gil_free(&c->pass_mu);
    PyObject *out = PyList_New(c->nanchors[d]);
    for (Py_ssize_t i = 0; out && i < c->nanchors[d]; i++) {
        Anchor a = c->anchors[d][i];
        PyObject *x = Py_BuildValue("(LLd)", (long long)a.lo, (long long)a.hi, a.ms);
        if (!x) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, x);
    }
    pthread_mutex_unlock(&c->pass_mu);
    return out;
}

static PyObject *Core_streams(Core *c, PyObject *unused) {
    lock_gil_free(&c->pass_mu);
    PyObject *out = PyList_New(c->nstreams);
    for (Py_ssize_t i = 0; out && i < c->nstreams; i++) {
        PyObject *x = Py_BuildValue("(nK)", (Py_ssize_t)c->streams[2 * i], (unsigned long long)c->streams[2 * i + 1]);
        if (!x) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, x);
    }
    pthread_mutex_unlock(&c->pass_mu);
    return out;
}

/* take() -> (rows, at, end, blob): everything finished so far, emptied from the core. rows in
 * recorder.LIVE_DTYPE; for each row with args, its index among rows and the end of its args
 * (JSON text) in blob, both int64. Those the journal wrote first, then the hot path's, then the
 * resolver's. */
static PyObject *Core_take(Core *c, PyObject *unused) {
    Rows part[3];
    memset(part, 0, sizeof part);
    if (c->j) pthread_mutex_lock(&c->j->mu);
    part[0] = c->jrows;
    memset(&c->jrows, 0, sizeof c->jrows);
    __atomic_store_n(&c->njrows, 0, __ATOMIC_RELAXED);
    if (c->j) pthread_mutex_unlock(&c->j->mu);
    if (!c->jon) { /* journaled, rows come through the journal's flushes only */
        part[1] = c->hrows;
        memset(&c->hrows, 0, sizeof c->hrows);
        pthread_mutex_lock(&c->rmu);
        part[2] = c->drows;
        memset(&c->drows, 0, sizeof c->drows);
        pthread_mutex_unlock(&c->rmu);
    }
    Py_ssize_t n = 0, nat = 0, nblob = 0;
    for (int k = 0; k < 3; k++) n += part[k].n, nat += part[k].nat, nblob += part[k].nblob;
    PyObject *rows = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Row));
    PyObject *at = PyBytes_FromStringAndSize(NULL, nat * 8), *end = PyBytes_FromStringAndSize(NULL, nat * 8);
    PyObject *blob = PyBytes_FromStringAndSize(NULL, nblob);
    PyObject *out = NULL;
    if (rows && at && end && blob) {
        char *r = PyBytes_AS_STRING(rows), *bl = PyBytes_AS_STRING(blob);
        int64_t *a = (int64_t *)PyBytes_AS_STRING(at), *e = (int64_t *)PyBytes_AS_STRING(end);
        Py_ssize_t n0 = 0, at0 = 0, b0 = 0;
        for (int k = 0; k < 3; k++) {
            Rows *p = &part[k];
            if (p->n) memcpy(r + n0 * (Py_ssize_t)sizeof(Row), p->v, (size_t)p->n * sizeof(Row));
            if (p->nblob) memcpy(bl + b0, p->blob, (size_t)p->nblob);
            for (Py_ssize_t i = 0; i < p->nat; i++) a[at0 + i] = p->at[i] + n0, e[at0 + i] = p->end[i] + b0;
            n0 += p->n, at0 += p->nat, b0 += p->nblob;
        }
        out = Py_BuildValue("(OOOO)", rows, at, end, blob);
    }
    Py_XDECREF(rows), Py_XDECREF(at), Py_XDECREF(end), Py_XDECREF(blob);
    if (!out) { /* out of memory: the rows stay (as the resolver's), older ones first */
        pthread_mutex_lock(&c->rmu);
        rows_append(&part[0], &part[1]);
        rows_append(&part[0], &part[2]);
        rows_append(&part[0], &c->drows);
        rows_free(&c->drows);
        c->drows = part[0];
        pthread_mutex_unlock(&c->rmu);
        rows_free(&part[1]), rows_free(&part[2]);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    for (int k = 0; k < 3; k++) rows_free(&part[k]);
    return out;
}

/* After the final pass at stop: what could still not be resolved (a device error that lasted)
 * keeps its host span, counted as lost, rather than vanishing. */
static PyObject *Core_flush(Core *c, PyObject *unused) {
    lock_gil_free(&c->pass_mu);
    int rc = take_inbox(c);
    for (Py_ssize_t k = 0; k < c->nmq; k++) { /* marks never done: unreadable */
        MarkQ *q = &c->mq[k];
        for (; q->n; q->n--, q->head++) {
            q->v[q->head]->state = -1;
            mark_drop(c, q->v[q->head]);
        }
        q->head = 0;
    }
    if (finish_done(c) < 0) rc = -1; /* now every region's marks are settled */
    pthread_mutex_unlock(&c->pass_mu);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Regions still open keep their host span, closed at end_ns and marked unfinished. */
static PyObject *Core_close_open(Core *c, PyObject *arg) {
    int64_t end = PyLong_AsLongLong(arg);
    if (end == -1 && PyErr_Occurred()) return NULL;
    static const char flag[] = "\"unfinished\":true}";
    long n = 0;
    for (Py_ssize_t k = 0; k < c->nthreads; k++) {
        TState *t = c->threads[k];
        for (Py_ssize_t i = 0; i < t->nopen; i++) {
            Entry *e = &t->open[i];
            Buf b;
            buf_init(&b);
            Args a;
            if ((e->args.p ? put(&b, e->args.p, e->args.n - 1) < 0 || put(&b, ",", 1) < 0 : put(&b, "{", 1) < 0) ||
                put(&b, flag, sizeof flag - 1) < 0 || buf_take(&b, &a) < 0)
                return buf_free(&b), PyErr_NoMemory();
            Row row = {e->key, t->ix, e->h0, end > e->h0 ? end : e->h0, -1, -1, NAN, NAN};
            hlock(c);
            int rc = rows_push(&c->hrows, &row, &a);
            hunlock(c);
            args_free(&a);
            if (rc < 0) { /* out of memory: the entries not yet closed stay open */
                memmove(t->open, t->open + i, (size_t)(t->nopen - i) * sizeof(Entry));
                t->nopen -= i;
                return PyErr_NoMemory();
            }
            args_free(&e->args);
            Py_CLEAR(e->extra);
            mark_drop(c, e->m);
            e->m = NULL;
            n++;
        }
        t->nopen = 0;
    }
    return PyLong_FromLong(n);
}

static void core_free_state(Core *c);

static PyObject *Core_activate(Core *c, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    if (on) {
        c->gen = ++g_gen;
        c->active = 1;
        Py_XSETREF(g_current, (Py_INCREF(c), c));
    } else {
        c->active = 0;
        if (g_current == c) Py_CLEAR(g_current);
    }
    Py_RETURN_NONE;
}

/* Counters: ({why: regions without a device span}, marks skipped in graph captures, errors of
 * the resolver and the hot path). */
static PyObject *Core_counts(Core *c, PyObject *unused) {
    PyObject *errs = PyList_New(0);
    pthread_mutex_lock(&g_errors);
    for (int i = 0; errs && i < c->nerrors; i++) {
        PyObject *s = c->errors[i] ? PyUnicode_FromString(c->errors[i]) : NULL;
        if (!s || PyList_Append(errs, s) < 0) Py_CLEAR(errs);
        Py_XDECREF(s);
    }
    pthread_mutex_unlock(&g_errors);
    PyObject *lost = errs ? PyDict_New() : NULL;
    for (int w = 0; lost && w < NWHY; w++) {
        long n = __atomic_load_n(&c->lost[w], __ATOMIC_RELAXED);
        PyObject *v = n ? PyLong_FromLong(n) : NULL;
        if (n && (!v || PyDict_SetItemString(lost, why_names[w], v) < 0)) Py_CLEAR(lost);
        Py_XDECREF(v);
    }
    if (!lost) {
        Py_XDECREF(errs);
        return NULL;
    }
    return Py_BuildValue("(NlN)", lost, c->captured, errs);
}

/* After stop: no more events are taken; the pools' events go back to the backend's close(). */
static PyObject *Core_close(Core *c, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS halt(c);
    Py_END_ALLOW_THREADS
    c->active = 0;
    if (g_current == c) Py_CLEAR(g_current);
    c->max_events = 0;
    pthread_mutex_lock(&c->pmu);
    for (int d = 0; d < c->ndev; d++) c->pools[d].n = 0;
    pthread_mutex_unlock(&c->pmu);
    Py_RETURN_NONE;
}

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

static void crc_init(void) {
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
    if (reserve(b, 10) < 0) return -1;
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
    if (reserve(b, 10) < 0) return -1;
    b->n += 10;
    return 0;
}

static inline char *wv(char *p, uint64_t v) { /* a varint, room reserved */
    while (v >= 0x80) *p++ = (char)(v | 0x80), v >>= 7;
    *p++ = (char)v;
    return p;
}

/* Rows: count, then each: name, thread, h0 - the previous h0, h1 - h0 (zigzag), device + 1,
 * [stream, t0, t1 as float64], args length and text. prev: the previous h0, carried across. */
static int put_rows(Buf *b, const Rows *r, int64_t *prev, int64_t *last_h) {
    if (put_varint(b, (uint64_t)r->n) < 0) return -1;
    Py_ssize_t j = 0, from = 0;
    int64_t p0 = *prev, hi = *last_h;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        const Row *w = &r->v[i];
        Py_ssize_t an = 0;
        if (j < r->nat && r->at[j] == i) an = r->end[j] - from;
        if (reserve(b, 80 + an) < 0) return -1; /* 7 varints and two doubles at most */
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
    add_error(c, msg);
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
            if (rows_push(out, &row, &e->args) < 0) return -1;
        }
    }
    return 0;
}

static int copy_done(const Done *v, Py_ssize_t n, Rows *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Row row = {v[i].key, v[i].thread, v[i].h0, v[i].h1, -1, -1, NAN, NAN};
        if (rows_push(out, &row, &v[i].args) < 0) return -1;
    }
    return 0;
}

/* One flush: the catalog's new records, then one record of rows and snapshot in the segment.
 * Rows taken here wait in jrows for take(). A region between its thread's stack and the device
 * queue at this moment is in neither snapshot: it comes with the next flush. */
static void journal_flush(Core *c) {
    Journal *j = c->j;
    Rows dr, hr, open, pend;
    memset(&dr, 0, sizeof dr), memset(&hr, 0, sizeof hr), memset(&open, 0, sizeof open);
    memset(&pend, 0, sizeof pend);
    Buf cat, seg;
    buf_init(&cat), buf_init(&seg);
    int bad = 0;
    if (j->failed) { /* nothing more is written: the rows still go on to take() */
        pthread_mutex_lock(&c->rmu);
        dr = c->drows;
        memset(&c->drows, 0, sizeof c->drows);
        pthread_mutex_unlock(&c->rmu);
        hlock(c);
        hr = c->hrows;
        memset(&c->hrows, 0, sizeof c->hrows);
        hunlock(c);
        goto hand_over;
    }
    /* what the resolver owns: stamped rows, the queue and pend, anchors, streams, in one state */
    pthread_mutex_lock(&c->pass_mu);
    pthread_mutex_lock(&c->rmu);
    dr = c->drows;
    memset(&c->drows, 0, sizeof c->drows);
    pthread_mutex_unlock(&c->rmu);
    pthread_mutex_lock(&c->qmu);
    bad |= copy_done(c->done, c->ndone, &pend);
    pthread_mutex_unlock(&c->qmu);
    bad |= copy_done(c->pend, c->npend, &pend);
    for (int d = 0; d < c->ndev; d++) {
        Py_ssize_t from = j->anchors_done[d], n = c->nanchors[d] - from;
        if (n <= 0) continue;
        Py_ssize_t at = cat.n + 10;
        if (open_record(&cat) < 0 || put_varint(&cat, (uint64_t)d) < 0 || put_varint(&cat, (uint64_t)n) < 0 ||
            put(&cat, (const char *)(c->anchors[d] + from), n * (Py_ssize_t)sizeof(Anchor)) < 0)
            bad = 1;
        else
            frame(&cat, at, J_ANCHORS), j->anchors_done[d] = c->nanchors[d];
    }
    if (c->nstreams > j->streams_done) {
        Py_ssize_t at = cat.n + 10;
        bad |= open_record(&cat) < 0 || put_varint(&cat, (uint64_t)j->streams_done) < 0 ||
               put_varint(&cat, (uint64_t)(c->nstreams - j->streams_done)) < 0;
        for (Py_ssize_t i = j->streams_done; !bad && i < c->nstreams; i++)
            bad |= put_varint(&cat, c->streams[2 * i]) < 0 || put_varint(&cat, c->streams[2 * i + 1]) < 0;
        if (!bad) frame(&cat, at, J_STREAMS), j->streams_done = c->nstreams;
    }
    pthread_mutex_unlock(&c->pass_mu);
    /* the hot path's: its finished rows and open stacks */
    hlock(c);
    hr = c->hrows;
    memset(&c->hrows, 0, sizeof c->hrows);
    bad |= copy_open(c, &open);
    hunlock(c);
    /* notes from Python (names, threads, labels): every key a row above uses is noted by now */
    pthread_mutex_lock(&j->mu);
    if (j->nnotes) bad |= put(&cat, j->notes, j->nnotes) < 0, j->nnotes = 0;
    pthread_mutex_unlock(&j->mu);
    int64_t t = c->clock ? 0 : mono_ns(), prev = 0;
    Py_ssize_t at = 10;
    long lost[NWHY];
    for (int w = 0; w < NWHY; w++) lost[w] = __atomic_load_n(&c->lost[w], __ATOMIC_RELAXED);
    bad |= open_record(&seg) < 0 || put_varint(&seg, (uint64_t)++j->flushes) < 0 ||
           put_varint(&seg, (uint64_t)j->total) < 0 || put_rows(&seg, &hr, &prev, &j->last_h) < 0 ||
           put_rows(&seg, &dr, &prev, &j->last_h) < 0 || put_rows(&seg, &open, &prev, &j->last_h) < 0 ||
           put_rows(&seg, &pend, &prev, &j->last_h) < 0 || put_varint(&seg, NWHY) < 0;
    for (int w = 0; !bad && w < NWHY; w++) bad |= put_varint(&seg, (uint64_t)lost[w]) < 0;
    /* the moment of this snapshot: the native clock now, else the latest host stamp seen */
    bad |= put_varint(&seg, (uint64_t)c->captured) < 0 || put_varint(&seg, zigzag(t > j->last_h ? t : j->last_h)) < 0;
    if (!bad) frame(&seg, at, J_FLUSH);
    int64_t n = hr.n + dr.n;
    if (bad)
        journal_failed(c, "written", ENOMEM);
    else if (write_all(j->cat, cat.p, cat.n) < 0 || write_all(j->seg, seg.p, seg.n) < 0)
        journal_failed(c, "written", errno);
    else {
        j->total += n, j->seg_count += n;
        if (j->seg_count >= j->seg_rows && open_segment(c) < 0) journal_failed(c, "rotated", errno);
    }
hand_over: /* the rows go on to take() whether or not they reached the disk */
    buf_free(&cat), buf_free(&seg);
    rows_free(&open), rows_free(&pend);
    pthread_mutex_lock(&j->mu);
    if (!c->jrows.n) { /* the usual case, take() having drained them: moved, not copied */
        rows_free(&c->jrows);
        c->jrows = hr;
        memset(&hr, 0, sizeof hr);
    }
    rows_append(&c->jrows, &hr);
    rows_append(&c->jrows, &dr);
    __atomic_store_n(&c->njrows, c->jrows.n, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&j->mu);
    rows_free(&hr), rows_free(&dr);
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

static void journal_join(Core *c) {
    Journal *j = c->j;
    if (!j || !j->running) return;
    pthread_mutex_lock(&j->mu);
    j->stopping = 1;
    pthread_cond_signal(&j->wake);
    pthread_mutex_unlock(&j->mu);
    pthread_join(j->thread, NULL);
    j->running = 0;
}

static void journal_free(Core *c) {
    Journal *j = c->j;
    if (!j) return;
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
static PyObject *Core_journal_open(Core *c, PyObject *args) {
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
    if (!j->dir || !j->anchors_done) return journal_free(c), PyErr_NoMemory();
    if ((j->cat = open(path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644)) < 0 ||
        journal_record(c, J_HEADER, head, nhead) < 0 || open_segment(c) < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        journal_free(c);
        return NULL;
    }
    c->jon = 1; /* with the GIL: no hot path is between its lock and unlock */
    if (start_thread(&j->thread, journal_main, c, "evtrace-journal") != 0) {
        c->jon = 0;
        journal_free(c);
        return PyErr_Format(PyExc_OSError, "could not start the journal's thread");
    }
    j->running = 1;
    Py_RETURN_NONE;
}

/* A note for the catalog (JSON text from Python), written with the next flush. */
static PyObject *Core_journal_note(Core *c, PyObject *arg) {
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
static PyObject *Core_journal_stop(Core *c, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS journal_join(c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* One flush by the caller, the writer stopped: the session's last state, before the write. */
static PyObject *Core_journal_flush(Core *c, PyObject *unused) {
    if (!c->j || c->j->running) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS journal_flush(c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* journal_close(finished: bytes | None) -> the error that stopped the journal, or None. With
 * finished (JSON: where the trace is), the journal is marked finished; the caller removes it. */
static PyObject *Core_journal_close(Core *c, PyObject *arg) {
    if (!c->j) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS journal_join(c);
    Py_END_ALLOW_THREADS
    int failed = c->j->failed;
    if (arg != Py_None && !failed) {
        char *p;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(arg, &p, &n) < 0) return NULL;
        if (journal_record(c, J_FINISHED, p, n) < 0) failed = errno;
    }
    c->jon = 0;
    journal_free(c);
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
        if (rows_push(&out, &w, an ? &a : NULL) < 0) {
            rows_free(&out);
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
    rows_free(&out);
    return res;
}

/* read_flush(payload) -> (flush, rows_before, host_rows, device_rows, open, pending, lost,
 * captured, at): each rows part as take() gives them. ValueError if the payload does not parse. */
static PyObject *read_flush(PyObject *mod, PyObject *arg) {
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

static PyObject *Core_fill(Core *c, PyObject *const *a, Py_ssize_t n);

static PyMethodDef Core_methods[] = {
    {"enter", (PyCFunction)(void (*)(void))Core_enter, METH_FASTCALL, "enter(key, args) -> token"},
    {"enter_host", (PyCFunction)(void (*)(void))Core_enter_host, METH_FASTCALL, "host lane only"},
    {"enter_cross", (PyCFunction)(void (*)(void))Core_enter_cross, METH_FASTCALL, "may end on another thread"},
    {"exit", (PyCFunction)Core_exit, METH_O, "exit(token)"},
    {"poll", (PyCFunction)Core_poll, METH_NOARGS, "one resolver pass"},
    {"run", (PyCFunction)Core_run, METH_NOARGS, "start the native resolver thread"},
    {"halt", (PyCFunction)Core_halt, METH_NOARGS, "stop and join it"},
    {"anchor_now", (PyCFunction)Core_anchor_now, METH_NOARGS, "anchor every device"},
    {"resolve_anchors", (PyCFunction)Core_resolve_anchors, METH_NOARGS, "resolve the anchors stamped so far"},
    {"last_brackets", (PyCFunction)Core_last_brackets, METH_NOARGS, "the newest pending anchor's brackets"},
    {"anchors", (PyCFunction)Core_anchors, METH_O, "a device's resolved anchors"},
    {"streams", (PyCFunction)Core_streams, METH_NOARGS, "(device, handle) by stream index"},
    {"take", (PyCFunction)Core_take, METH_NOARGS, "take() -> (rows, at, end, blob): rows finished so far"},
    {"close_open", (PyCFunction)Core_close_open, METH_O, "close the regions still open"},
    {"flush", (PyCFunction)Core_flush, METH_NOARGS, "what is still unresolved keeps its host span"},
    {"activate", (PyCFunction)Core_activate, METH_O, "make this the recording core, or not"},
    {"counts", (PyCFunction)Core_counts, METH_NOARGS, "counters and resolver errors"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "after stop: take no more events"},
    {"fill", (PyCFunction)(void (*)(void))Core_fill, METH_FASTCALL, "fill(device, n): events for the pool"},
    {"journal_open", (PyCFunction)Core_journal_open, METH_VARARGS, "journal_open(dir, header, interval_ns, seg_rows, keep_rows)"},
    {"journal_note", (PyCFunction)Core_journal_note, METH_O, "a note (JSON bytes) for the catalog"},
    {"journal_stop", (PyCFunction)Core_journal_stop, METH_NOARGS, "stop the journal's writer thread"},
    {"journal_flush", (PyCFunction)Core_journal_flush, METH_NOARGS, "one flush, the writer stopped"},
    {"journal_close", (PyCFunction)Core_journal_close, METH_O, "journal_close(finished or None) -> error or None"},
    {NULL},
};

static PyObject *opt(PyObject *kw, const char *name) {
    PyObject *v = kw ? PyDict_GetItemString(kw, name) : NULL;
    if (!v || v == Py_None) return NULL;
    Py_INCREF(v);
    return v;
}

static int load_cudart(Core *c, const char *soname) {
    void *h = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen(soname, RTLD_NOW);
    if (!h) return -1;
    c->rt.record = (int (*)(void *, void *))dlsym(h, "cudaEventRecord");
    c->rt.query = (int (*)(void *))dlsym(h, "cudaEventQuery");
    c->rt.elapsed = (int (*)(float *, void *, void *))dlsym(h, "cudaEventElapsedTime");
    c->rt.last_error = (int (*)(void))dlsym(h, "cudaGetLastError");
    return c->rt.record && c->rt.query && c->rt.elapsed && c->rt.last_error ? 0 : -1;
}

/* Core(ndev, **options): see recorder.Recorder for what each is. */
static int Core_init(Core *c, PyObject *args, PyObject *kw) {
    int ndev;
    if (!PyArg_ParseTuple(args, "i", &ndev)) return -1;
    if (ndev < 0 || ndev > 32767) return PyErr_Format(PyExc_ValueError, "bad device count %d", ndev), -1;
    c->ndev = ndev;
    c->multi = ndev > 1;
#define O(f) c->f = opt(kw, #f)
    O(clock); O(get_device); O(raw_stream); O(py_record); O(py_query); O(py_elapsed); O(record_failed);
    O(learn_stream); O(new_event); O(on_thread); O(on_full); O(nvtx_push); O(nvtx_pop); O(nvtx_start);
    O(nvtx_end); O(names);
#undef O
    c->events = PyList_New(0);
    if (!c->events || !c->on_thread || !c->on_full || !c->names)
        return PyErr_SetString(PyExc_TypeError, "Core needs on_thread, on_full and names"), -1;
    PyObject *v;
#define I(f, dflt) c->f = (v = kw ? PyDict_GetItemString(kw, #f) : NULL) ? PyLong_AsLongLong(v) : (dflt)
    I(share_ns, 0); I(anchor_interval_ns, 100000000); I(poll_ns, 10000000); I(chunk, 16384);
    I(max_events, 1 << 16); I(anchor_tries, 5);
#undef I
    if (PyErr_Occurred()) return -1;
    PyObject *lib = kw ? PyDict_GetItemString(kw, "cudart") : NULL;
    if (lib && lib != Py_None) {
        const char *so = PyUnicode_AsUTF8(lib);
        if (!so) return -1;
        if (load_cudart(c, so) < 0)
            return PyErr_Format(PyExc_OSError, "could not load the CUDA runtime %s", so), -1;
        c->native = 1;
    }
    if (ndev) {
        if (!c->get_device || !c->raw_stream || !c->learn_stream || !c->new_event || !c->record_failed ||
            (!c->native && (!c->py_record || !c->py_query || !c->py_elapsed)))
            return PyErr_SetString(PyExc_TypeError, "Core needs the backend's calls"), -1;
        PyObject *side = kw ? PyDict_GetItemString(kw, "side") : NULL;
        if (!side || !PyList_Check(side) || PyList_GET_SIZE(side) != ndev)
            return PyErr_SetString(PyExc_TypeError, "Core needs each device's side stream"), -1;
        c->side = calloc((size_t)ndev, sizeof(uintptr_t));
        c->pools = calloc((size_t)ndev, sizeof(Pool));
        c->created = calloc((size_t)ndev, sizeof(Py_ssize_t));
        c->has_ref = calloc((size_t)ndev, sizeof(int));
        c->ref_ev = calloc((size_t)ndev, sizeof(uintptr_t));
        c->ref_ms = calloc((size_t)ndev, sizeof(double));
        c->pending = calloc((size_t)ndev, sizeof(Pending *));
        c->npending = calloc((size_t)ndev, sizeof(Py_ssize_t));
        c->cappending = calloc((size_t)ndev, sizeof(Py_ssize_t));
        c->anchors = calloc((size_t)ndev, sizeof(Anchor *));
        c->nanchors = calloc((size_t)ndev, sizeof(Py_ssize_t));
        c->capanchors = calloc((size_t)ndev, sizeof(Py_ssize_t));
        if (!c->side || !c->pools || !c->created || !c->has_ref || !c->ref_ev || !c->ref_ms || !c->pending ||
            !c->npending || !c->cappending || !c->anchors || !c->nanchors || !c->capanchors)
            return PyErr_NoMemory(), -1;
        for (int d = 0; d < ndev; d++) {
            c->side[d] = (uintptr_t)PyLong_AsUnsignedLongLongMask(PyList_GET_ITEM(side, d));
            if (GROW(c->seen, c->capseen, 2 * c->nseen + 2) < 0) return PyErr_NoMemory(), -1;
            c->seen[2 * c->nseen] = (uintptr_t)d;
            c->seen[2 * c->nseen++ + 1] = c->side[d];
        }
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* Fill device d's pool with n events (session start, off the hot path). */
static PyObject *Core_fill(Core *c, PyObject *const *a, Py_ssize_t n) {
    if (n != 2) return PyErr_Format(PyExc_TypeError, "fill(device, n)");
    long d = PyLong_AsLong(a[0]), k = PyLong_AsLong(a[1]);
    if (PyErr_Occurred()) return NULL;
    if (d < 0 || d >= c->ndev) return PyErr_Format(PyExc_IndexError, "no device %ld", d);
    for (long i = 0; i < k; i++) {
        uintptr_t ev = new_event(c, (int)d);
        if (!ev) return NULL;
        pool_put(c, (int)d, ev);
        c->created[d]++;
    }
    Py_RETURN_NONE;
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (!c) return NULL;
    pthread_mutex_init(&c->qmu, NULL);
    pthread_mutex_init(&c->pmu, NULL);
    pthread_mutex_init(&c->rmu, NULL);
    pthread_mutex_init(&c->pass_mu, NULL);
    pthread_cond_init(&c->wake, NULL);
    c->last_anchor = NEVER;
    return (PyObject *)c;
}

static void core_free_state(Core *c) {
    for (Py_ssize_t k = 0; k < c->nthreads; k++) free_tstate(c, c->threads[k]);
    free(c->threads);
    c->threads = NULL;
    c->nthreads = 0;
    for (Py_ssize_t i = 0; i < c->ndone; i++) done_free(c, &c->done[i]);
    free(c->done);
    c->done = NULL;
    c->ndone = 0;
    for (Py_ssize_t i = 0; i < c->npend; i++) done_free(c, &c->pend[i]);
    free(c->pend);
    c->pend = NULL;
    c->npend = c->cappend = 0;
    for (Mark *m = __atomic_exchange_n(&c->inbox, NULL, __ATOMIC_ACQUIRE), *next; m; m = next) {
        next = m->next;
        mark_drop(c, m);
    }
    for (Py_ssize_t k = 0; k < c->nmq; k++) {
        for (Py_ssize_t i = 0; i < c->mq[k].n; i++) mark_drop(c, c->mq[k].v[c->mq[k].head + i]);
        free(c->mq[k].v);
    }
    free(c->mq);
    c->mq = NULL;
    c->nmq = 0;
    rows_free(&c->hrows);
    rows_free(&c->drows);
    rows_free(&c->jrows);
}

/* The Python objects a core holds: its callbacks are bound methods of its Recorder, which holds
 * the core, so the collector must see them to free a finished session. */
#define CORE_OBJECTS(X)                                                                                \
    X(clock) X(get_device) X(raw_stream) X(py_record) X(py_query) X(py_elapsed) X(record_failed)      \
    X(learn_stream) X(new_event) X(on_thread) X(on_full) X(nvtx_push) X(nvtx_pop) X(nvtx_start)       \
    X(nvtx_end) X(names) X(events)

static int Core_traverse(Core *c, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(c->f);
    CORE_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int Core_clear(Core *c) {
#define CLEAR(f) Py_CLEAR(c->f);
    CORE_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void Core_dealloc(Core *c) {
    PyObject_GC_UnTrack(c);
    halt(c); /* the native threads must be gone before their memory is */
    journal_join(c);
    journal_free(c);
    core_free_state(c);
    for (int d = 0; d < c->ndev; d++) {
        free(c->pools ? c->pools[d].v : NULL);
        free(c->pending ? c->pending[d] : NULL);
        free(c->anchors ? c->anchors[d] : NULL);
    }
    free(c->pools), free(c->side), free(c->created), free(c->has_ref), free(c->ref_ev), free(c->ref_ms);
    free(c->pending), free(c->npending), free(c->cappending), free(c->anchors), free(c->nanchors);
    free(c->capanchors), free(c->seen), free(c->streams);
    for (int i = 0; i < c->nerrors; i++) free(c->errors[i]);
    Core_clear(c);
    pthread_mutex_destroy(&c->qmu);
    pthread_mutex_destroy(&c->pmu);
    pthread_mutex_destroy(&c->rmu);
    pthread_mutex_destroy(&c->pass_mu);
    pthread_cond_destroy(&c->wake);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMemberDef Core_members[] = {
    {"native", T_INT, offsetof(Core, native), READONLY, "events through the native CUDA runtime"},
    {"share_ns", T_LONGLONG, offsetof(Core, share_ns), 0, "the share window"},
    {NULL},
};


static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "evtrace._core.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One session's native store: hot path, event pool, resolver.",
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_new = Core_new,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
};

/* ---- Region ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *name, *args;
    int32_t key;
    int host_only;
} Region;

static int region_key(PyObject *name, int32_t *key) {
    if (name == Py_None) return *key = -1, 0;
    PyObject *k = PyDict_GetItemWithError(g_name_keys, name);
    if (!k) {
        if (PyErr_Occurred()) return -1;
        k = PyObject_CallOneArg(g_name_key, name);
        if (!k) return -1;
        *key = (int32_t)PyLong_AsLong(k);
        Py_DECREF(k);
    } else
        *key = (int32_t)PyLong_AsLong(k);
    return PyErr_Occurred() ? -1 : 0;
}

/* args: a dict the region may keep (its own), or NULL */
static PyObject *make_region(PyObject *name, PyObject *args, int host_only) {
    int32_t key;
    if (region_key(name, &key) < 0) return NULL;
    Region *r = PyObject_New(Region, &RegionType);
    if (!r) return NULL;
    Py_INCREF(name);
    r->name = name;
    r->args = args && PyDict_GET_SIZE(args) ? (Py_INCREF(args), args) : NULL;
    r->key = key;
    r->host_only = host_only;
    return (PyObject *)r;
}

static PyObject *Region_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *name, *a = Py_None;
    int host_only = 0;
    static char *kws[] = {"name", "args", "host_only", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Op", kws, &name, &a, &host_only)) return NULL;
    if (name != Py_None && !PyUnicode_Check(name)) return PyErr_Format(PyExc_TypeError, "a region's name is a str");
    if (a != Py_None && !PyDict_Check(a)) return PyErr_Format(PyExc_TypeError, "a region's args are a dict");
    PyObject *own = a == Py_None ? NULL : PyDict_Copy(a); /* the caller's dict may change later */
    if (a != Py_None && !own) return NULL;
    PyObject *r = make_region(name, own, host_only);
    Py_XDECREF(own);
    return r;
}

static void Region_dealloc(Region *r) {
    Py_XDECREF(r->name);
    Py_XDECREF(r->args);
    PyObject_Free(r);
}

static PyObject *Region_enter(Region *r, PyObject *unused) {
    Core *c = g_current;
    if (c) {
        if (r->key < 0)
            return PyErr_Format(PyExc_TypeError,
                                "region() needs a name when used with \"with\": with evtrace.region(\"step\"): ...");
        if (do_enter(c, (PyObject *)r, 0, r->key, r->args, r->host_only || !c->ndev, 0) < 0) return NULL;
    }
    Py_INCREF(r);
    return (PyObject *)r;
}

static PyObject *Region_exit(Region *r, PyObject *const *a, Py_ssize_t n) {
    Core *c = g_current;
    Py_ssize_t at;
    TState *t = c ? find_entry(c, (PyObject *)r, 0, &at) : NULL;
    if (t && do_exit(c, t, at) < 0) return NULL;
    Py_RETURN_NONE;
}

/* @region("name"): the wrapper is regions.py's */
static PyObject *Region_call(Region *r, PyObject *args, PyObject *kw) {
    PyObject *fn;
    if (kw && PyDict_GET_SIZE(kw)) return PyErr_Format(PyExc_TypeError, "a region decorates one function");
    if (!PyArg_ParseTuple(args, "O", &fn)) return NULL;
    return PyObject_CallFunctionObjArgs(g_decorate, (PyObject *)r, fn, NULL);
}

static PyObject *Region_repr(Region *r) { return PyUnicode_FromFormat("region(%R)", r->name); }

static PyMethodDef Region_methods[] = {
    {"__enter__", (PyCFunction)Region_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Region_exit, METH_FASTCALL, NULL},
    {NULL},
};

static PyMemberDef Region_members[] = {
    {"name", T_OBJECT, offsetof(Region, name), READONLY, "the region's name (None: named when it decorates)"},
    {"key", T_INT, offsetof(Region, key), READONLY, "the interned name's key (-1: no name)"},
    {"host_only", T_BOOL, offsetof(Region, host_only), READONLY, "no device span"},
    {NULL},
};

static PyObject *Region_get_args(Region *r, void *unused) {
    if (!r->args) Py_RETURN_NONE;
    return PyDictProxy_New(r->args); /* read-only: the region's own copy */
}

static PyGetSetDef Region_getset[] = {
    {"args", (getter)Region_get_args, NULL, "its args, read-only (None: none)", NULL},
    {NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "evtrace.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A named span. Near-free when no session is recording.\n\n"
              "One Region object may be entered by several threads at once: each exit closes the span its\n"
              "own thread opened. Args are copied on entry (see evtrace.values).",
    .tp_new = Region_new,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_repr = (reprfunc)Region_repr,
    .tp_call = (ternaryfunc)Region_call,
    .tp_methods = Region_methods,
    .tp_members = Region_members,
    .tp_getset = Region_getset,
};

/* region(name, /, *, host_only=False, **args): the common case here, the rest in regions.py. */
static PyObject *region_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    PyObject *first = n ? a[0] : Py_None;
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (n <= 1 && PyUnicode_CheckExact(first)) {
        int host_only = 0;
        PyObject *args = NULL;
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = a[n + i];
            if (PyUnicode_CompareWithASCIIString(k, "host_only") == 0) {
                if ((host_only = PyObject_IsTrue(v)) < 0) goto fail;
            } else {
                if (!args && !(args = PyDict_New())) goto fail;
                if (PyDict_SetItem(args, k, v) < 0) goto fail;
            }
        }
        PyObject *r = make_region(first, args, host_only);
        Py_XDECREF(args);
        return r;
    fail:
        Py_XDECREF(args);
        return NULL;
    }
    /* a function to decorate, keyword args alone, or a mistake: regions.py says which */
    PyObject *pos = PyTuple_New(n);
    if (!pos) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(pos, i, (Py_INCREF(a[i]), a[i]));
    PyObject *kw = nk ? PyDict_New() : NULL;
    for (Py_ssize_t i = 0; kw && i < nk; i++)
        if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), a[n + i]) < 0) Py_CLEAR(kw);
    PyObject *r = (nk && !kw) ? NULL : PyObject_Call(g_region_slow, pos, kw);
    Py_DECREF(pos);
    Py_XDECREF(kw);
    return r;
}

/* ---- forward ----------------------------------------------------------------------------- */

/* Whether torch is tracing Python for a graph (export, AOT): torch.compiler's own flag. Dynamo
 * never runs forward() while it traces: it inlines forward()'s Python twin instead. */
static int compiling(void) {
    if (!g_compiler_globals) return 0;
    PyObject *v = PyDict_GetItemWithError(g_compiler_globals, g_compiling_flag);
    if (!v) return PyErr_Occurred() ? -1 : 0;
    return PyObject_IsTrue(v);
}

/* Whether a frame evaluator (PEP 523) is installed: torch.compile's, while a compiled call runs on
 * some thread. Dynamo compiles the first Python frame it meets below nn.Module's own (skipped)
 * frames; C has none, so forward() then goes through a Python frame of instrumentation.py's. */
static int evaluating(void) {
    return (void *)_PyInterpreterState_GetEvalFrameFunc(PyInterpreterState_Get()) != (void *)_PyEval_EvalFrameDefault;
}

/* forward(fn, key, bkey, /, *args, **kwargs): fn(*args, **kwargs) as region key, and with grad
 * enabled (bkey >= 0) its backward watched as region bkey. An instrumented module's forward is
 * functools.partial(forward, fn, key, bkey): nn.Module calls straight into C. forward_here: the
 * same, never through that Python frame. */
static PyObject *forward_impl(PyObject *const *a, size_t nargsf, PyObject *kwnames, int here) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n < 3) return PyErr_Format(PyExc_TypeError, "forward(fn, key, bkey, /, *args, **kwargs)");
    if (!here && g_frame && evaluating()) return PyObject_Vectorcall(g_frame, a, (size_t)n, kwnames);
    PyObject *fn = a[0];
    Core *c = g_current;
    int comp = c && c->active ? compiling() : 1;
    if (comp < 0) return NULL;
    if (comp) return PyObject_Vectorcall(fn, a + 3, n - 3, kwnames);
    int32_t key = (int32_t)PyLong_AsLong(a[1]);
    long bkey = PyLong_AsLong(a[2]);
    if ((key == -1 || bkey == -1) && PyErr_Occurred()) return NULL;
    Py_INCREF(c); /* fn may stop the session */
    uint64_t id = ++c->next_id;
    if (do_enter(c, NULL, id, key, NULL, !c->ndev, 0) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    PyObject *res = PyObject_Vectorcall(fn, a + 3, n - 3, kwnames);
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    if (!res) PyErr_Fetch(&et, &ev, &tb);
    int rc = exit_id(c, id);
    Py_DECREF(c);
    if (!res) {
        if (rc < 0) PyErr_Clear(); /* fn's own error is the one to see */
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    if (rc < 0) {
        Py_DECREF(res);
        return NULL;
    }
    if (bkey < 0 || !g_grad_enabled) return res;
    PyObject *on = PyObject_CallNoArgs(g_grad_enabled);
    int grad = on ? PyObject_IsTrue(on) : -1;
    Py_XDECREF(on);
    if (grad <= 0) {
        if (grad < 0) Py_CLEAR(res);
        return res;
    }
    /* the backward's watcher (Python, rare enough): args as a tuple, kwargs as a dict */
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *pos = PyTuple_New(n - 3), *kw = PyDict_New(), *r = NULL;
    if (!pos || !kw) goto done;
    for (Py_ssize_t i = 3; i < n; i++) PyTuple_SET_ITEM(pos, i - 3, (Py_INCREF(a[i]), a[i]));
    for (Py_ssize_t i = 0; i < nk; i++)
        if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), a[n + i]) < 0) goto done;
    r = PyObject_CallFunctionObjArgs(g_watch, a[2], pos, kw, res, NULL);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    if (!r) Py_CLEAR(res);
    Py_XDECREF(r);
    return res;
}

static PyObject *forward_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
    return forward_impl(a, nargsf, kwnames, 0);
}

static PyObject *forward_here_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
    return forward_impl(a, nargsf, kwnames, 1);
}

/* A child that nn.Module calls straight into forward(): an instrumented forward, no hooks, not
 * compiled. Its first and last boundaries are the first and last things it does. */
static int plain_child(PyObject *m) {
    static PyObject *names[6];
    static const char *const strs[6] = {"forward", "_compiled_call_impl", "_forward_pre_hooks",
                                        "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"};
    for (int i = 0; i < 6; i++)
        if (!names[i] && !(names[i] = PyUnicode_InternFromString(strs[i]))) return -1;
    PyObject *d = PyObject_GenericGetDict(m, NULL);
    if (!d) return -1;
    int plain = 0;
    PyObject *f = PyDict_GetItemWithError(d, names[0]);
    if (!f || (PyObject *)Py_TYPE(f) != g_forward_type) goto out;
    PyObject *cc = PyDict_GetItemWithError(d, names[1]);
    if (cc && cc != Py_None) goto out;
    for (int i = 2; i < 6; i++) {
        PyObject *h = PyDict_GetItemWithError(d, names[i]);
        int some = h ? PyObject_IsTrue(h) : 0;
        if (some) {
            if (some < 0) plain = -1;
            goto out;
        }
    }
    plain = 1;
out:
    if (PyErr_Occurred()) plain = -1;
    Py_DECREF(d);
    return plain;
}

/* sequential(seq, input): nn.Sequential.forward, telling the core which boundaries are adjacent.
 * Between the container's start, its children and its end nothing runs but this loop, so a plain
 * child shares its start with the boundary before it, and the container's end shares the last
 * child's end: one event per boundary instead of two per child. */
static PyObject *sequential_fn(PyObject *mod, PyObject *const *a, Py_ssize_t n) {
    if (n != 2) return PyErr_Format(PyExc_TypeError, "sequential(seq, input)");
    Core *c = g_current;
    int share = c && c->active && g_forward_type;
    if (share) {
        int comp = compiling();
        if (comp < 0) return NULL;
        share = !comp;
    }
    for (Py_ssize_t i = 0; share && g_global_hooks && i < PyTuple_GET_SIZE(g_global_hooks); i++) {
        int some = PyObject_IsTrue(PyTuple_GET_ITEM(g_global_hooks, i));
        if (some < 0) return NULL;
        share = !some;
    }
    PyObject *it = PyObject_GetIter(a[0]);
    if (!it) return NULL;
    if (share) Py_INCREF(c); /* a child may stop the session */
    PyObject *x = (Py_INCREF(a[1]), a[1]), *m;
    int prev = 1; /* the last boundary is the container's own start */
    while (x && (m = PyIter_Next(it))) {
        int plain = share ? plain_child(m) : 0;
        TState *t = NULL;
        if (plain > 0 && prev && c->active && !(t = tstate(c))) plain = -1;
        if (plain < 0) {
            Py_DECREF(m);
            Py_CLEAR(x);
            break;
        }
        if (t) t->last_t = ALWAYS; /* the child's start shares the last mark */
        Py_SETREF(x, PyObject_CallOneArg(m, x));
        if (t && t->last_t == ALWAYS) t->last_t = NEVER; /* unused (the child recorded nothing): never stale */
        Py_DECREF(m);
        prev = plain;
    }
    if (x && PyErr_Occurred()) Py_CLEAR(x);
    if (x && share && prev && c->active) {
        TState *t = tstate(c);
        if (!t) Py_CLEAR(x);
        else t->last_t = ALWAYS; /* the container's end shares the last child's */
    }
    if (share) Py_DECREF(c);
    Py_DECREF(it);
    return x;
}

/* bind_forward(compiler_globals, grad_enabled, watch, forward_type, global_hooks, frame):
 * instrumentation.py's parts, once torch is imported */
static PyObject *bind_forward(PyObject *mod, PyObject *args) {
    PyObject *g, *grad, *watch, *ftype, *hooks, *frame;
    if (!PyArg_ParseTuple(args, "O!OOO!O!O", &PyDict_Type, &g, &grad, &watch, &PyType_Type, &ftype, &PyTuple_Type,
                          &hooks, &frame))
        return NULL;
    if (!g_compiling_flag && !(g_compiling_flag = PyUnicode_InternFromString("_is_compiling_flag"))) return NULL;
    Py_XSETREF(g_compiler_globals, (Py_INCREF(g), g));
    Py_XSETREF(g_grad_enabled, (Py_INCREF(grad), grad));
    Py_XSETREF(g_watch, (Py_INCREF(watch), watch));
    Py_XSETREF(g_forward_type, (Py_INCREF(ftype), ftype));
    Py_XSETREF(g_global_hooks, (Py_INCREF(hooks), hooks));
    Py_XSETREF(g_frame, (Py_INCREF(frame), frame));
    Py_RETURN_NONE;
}

/* ---- module functions -------------------------------------------------------------------- */

/* bind(**parts): the Python parts the core calls (names from recorder.py, the rest from regions.py) */
static PyObject *bind(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kws[] = {"name_keys", "name_key", "encode", "decorate", "region_slow", "max_str", NULL};
    PyObject *nk = NULL, *nkf = NULL, *snap = NULL, *dec = NULL, *slow = NULL;
    Py_ssize_t max_str = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$O!OOOOn", kws, &PyDict_Type, &nk, &nkf, &snap, &dec, &slow,
                                     &max_str))
        return NULL;
#define SET(g, v) \
    if (v) Py_XSETREF(g, (Py_INCREF(v), v))
    SET(g_name_keys, nk);
    SET(g_name_key, nkf);
    SET(g_encode, snap);
    SET(g_decorate, dec);
    SET(g_region_slow, slow);
#undef SET
    if (max_str >= 0) g_max_str = max_str;
    Py_RETURN_NONE;
}

static PyObject *capture_began(PyObject *mod, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&g_calls);
    g_capturing++;
    pthread_mutex_unlock(&g_calls);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *capture_ended(PyObject *mod, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&g_calls);
    if (g_capturing > 0) g_capturing--;
    pthread_mutex_unlock(&g_calls);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* After a fork, in the child: one thread, ours. Locks that a thread of the parent held (the
 * resolver's, mid-pass) would stay held for ever: they start afresh. The child does not record
 * into its parent's session. (Nothing is locked before the fork: the forking thread would hold
 * the locks across GIL switches, and a resolver waiting on them with the GIL would deadlock.) */
static PyObject *after_fork_in_child(PyObject *mod, PyObject *unused) {
    Core *c = g_current;
    pthread_mutex_init(&g_calls, NULL);
    pthread_mutex_init(&g_errors, NULL);
    if (c) {
        pthread_mutex_init(&c->qmu, NULL);
        pthread_mutex_init(&c->pmu, NULL);
        pthread_mutex_init(&c->rmu, NULL);
        pthread_mutex_init(&c->pass_mu, NULL);
        c->running = 0; /* its resolver thread does not exist here */
        c->active = 0;
        if (c->j) { /* nor its journal's writer: the journal is the parent's, never written here */
            pthread_mutex_init(&c->j->mu, NULL);
            pthread_cond_init(&c->j->wake, NULL);
            c->j->running = 0;
            journal_free(c);
        }
        c->hlk = 0;
    }
    g_capturing = 0;
    tls = NULL;
    tls_gen = 0;
    Py_CLEAR(g_current);
    Py_RETURN_NONE;
}

/* The hot path stamps CLOCK_MONOTONIC and the recorder reads time.perf_counter_ns: if they were
 * not one clock, every host time would be misplaced. check_clock(fn): raises ImportError unless
 * fn() reads the same clock (a read of it falls between two of ours). */
static PyObject *check_clock(PyObject *mod, PyObject *fn) {
    for (int i = 0; i < 5; i++) { /* a thread switch between the reads can only widen the bracket */
        int64_t a = mono_ns();
        PyObject *r = PyObject_CallNoArgs(fn);
        int64_t b = mono_ns();
        if (!r) return NULL;
        long long p = PyLong_AsLongLong(r);
        Py_DECREF(r);
        if (p == -1 && PyErr_Occurred()) return NULL;
        if (a <= p && p <= b) Py_RETURN_NONE;
    }
    return PyErr_Format(PyExc_ImportError,
                        "evtrace's core stamps CLOCK_MONOTONIC, which is not time.perf_counter_ns on this "
                        "platform: it refuses to load rather than misplace every region");
}

static PyMethodDef module_methods[] = {
    {"check_clock", check_clock, METH_O, "check_clock(fn): ImportError unless fn() reads the core's clock"},
    {"region", (PyCFunction)(void (*)(void))region_fn, METH_FASTCALL | METH_KEYWORDS,
     "region(name, /, *, host_only=False, **args)\n--\n\n"
     "A span on the host lane of this thread and, with CUDA, on the current stream.\n\n"
     "``with region(\"step\", batch=3): ...``, ``@region`` (named after the function) or\n"
     "``@region(\"load\")``. Keyword args become slice args in the trace.\n\n"
     "``host_only=True`` records no device span: for host work such as a CPU task, whose\n"
     "event pair would only show the stream idling (or waiting behind earlier work)."},
    {"bind", (PyCFunction)(void (*)(void))bind, METH_VARARGS | METH_KEYWORDS, "regions.py's Python parts"},
    {"forward", (PyCFunction)(void (*)(void))forward_fn, METH_FASTCALL | METH_KEYWORDS,
     "forward(fn, key, bkey, /, *args, **kwargs): an instrumented module's forward as a region"},
    {"forward_here", (PyCFunction)(void (*)(void))forward_here_fn, METH_FASTCALL | METH_KEYWORDS,
     "forward(), never through instrumentation.py's Python frame"},
    {"sequential", (PyCFunction)(void (*)(void))sequential_fn, METH_FASTCALL,
     "sequential(seq, input): nn.Sequential.forward, its adjacent boundaries sharing events"},
    {"bind_forward", bind_forward, METH_VARARGS, "instrumentation.py's parts, once torch is imported"},
    {"capture_began", capture_began, METH_NOARGS, "a CUDA graph capture begins (waits for the resolver)"},
    {"capture_ended", capture_ended, METH_NOARGS, "a CUDA graph capture ended"},
    {"after_fork_in_child", after_fork_in_child, METH_NOARGS, "fresh locks, no session"},
    {"read_flush", read_flush, METH_O, "a journal's flush record, decoded"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "evtrace._core", "evtrace's native core", -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&RegionType) < 0) return NULL;
    crc_init();
    PyObject *time = PyImport_ImportModule("time");
    PyObject *pc = time ? PyObject_GetAttrString(time, "perf_counter_ns") : NULL;
    PyObject *ok = pc ? check_clock(NULL, pc) : NULL;
    Py_XDECREF(time);
    Py_XDECREF(pc);
    if (!ok) return NULL;
    Py_DECREF(ok);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0 ||
        PyModule_AddObjectRef(m, "Region", (PyObject *)&RegionType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
