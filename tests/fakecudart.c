/* A fake CUDA runtime for tests/test_native.py: the few calls evtrace makes, with CUDA's C
 * signatures, so that the native core (evtrace/_core.c) can dlopen it by path and run its
 * GIL-free resolver on a machine without a GPU.
 *
 * An event is a malloc'd stamp in CLOCK_MONOTONIC ns (the clock time.perf_counter_ns reads).
 * A record stamps it at now + a settable latency, and never before the last stamp on the same
 * stream (a stream runs its work in order); a query says done once the clock has reached the
 * stamp; elapsed time is (b - a) in float32 ms, as CUDA gives it. Records on a refused stream
 * fail with error 900 (cudaErrorStreamCaptureUnsupported), and every failure is this thread's
 * last error until cudaGetLastError clears it, as in CUDA.
 *
 * No locks, only atomics: the core calls in from its resolver thread while the test's thread
 * records, and a fork must never find a lock of ours held. Counters are exported so that a test
 * can see which calls were made, and whether they came from a thread other than the one that
 * called fake_reset().
 *
 * Build: cc -shared -fPIC -O1 -o libfakecudart.so tests/fakecudart.c
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define SUCCESS 0
#define NOT_READY 600
#define INVALID_VALUE 1
#define INVALID_HANDLE 400
#define REFUSED 900
#define SLOTS 64

typedef struct {
    int64_t stamp; /* atomic; 0: never recorded */
    int64_t magic;
} Event;

#define MAGIC 0x65767472616365LL

/* per-stream "busy until" (stream handle + 1, so that the default stream 0 has a key) */
static uintptr_t busy_key[SLOTS];
static int64_t busy_until[SLOTS];
static uintptr_t refused[SLOTS]; /* handle + 1; 0: free */
static int64_t latency_ns, query_delay_ns;
static int query_error; /* nonzero: every query fails with it */
static int in_query;    /* queries in progress */
static pthread_t owner;
static int has_owner;
static __thread int last_error;

static long long n_created, n_destroyed, n_records, n_refused, n_queries, n_not_ready, n_elapsed,
    n_last_error, n_foreign_queries, n_foreign_elapsed, n_foreign_records;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define BUMP(x) __atomic_add_fetch(&(x), 1, __ATOMIC_RELAXED)

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int foreign(void) { return LOAD(has_owner) && !pthread_equal(pthread_self(), owner); }

static int fail(int code) {
    last_error = code;
    return code;
}

static int valid(const Event *e) { return e && e->magic == MAGIC; }

/* ---- the CUDA runtime calls ------------------------------------------------------------- */

int cudaEventCreateWithFlags(void **ev, unsigned flags) {
    if (!ev) return fail(INVALID_VALUE);
    Event *e = calloc(1, sizeof(Event));
    if (!e) return fail(2); /* cudaErrorMemoryAllocation */
    e->magic = MAGIC;
    *ev = e;
    BUMP(n_created);
    return SUCCESS;
}

int cudaEventDestroy(void *ev) {
    Event *e = ev;
    if (!valid(e)) return fail(INVALID_HANDLE);
    e->magic = 0;
    free(e);
    BUMP(n_destroyed);
    return SUCCESS;
}

/* Streams made through the runtime: distinct handles, counted (the anchors' stream is one) */
static uintptr_t next_stream = 0x7000000;
static long long n_streams;

int cudaStreamCreateWithFlags(void **s, unsigned flags) {
    if (!s || flags != 1) return fail(INVALID_VALUE); /* evtrace asks for cudaStreamNonBlocking */
    *s = (void *)__atomic_add_fetch(&next_stream, 0x100, __ATOMIC_RELAXED);
    BUMP(n_streams);
    return SUCCESS;
}

int cudaStreamDestroy(void *s) {
    if (!s) return fail(INVALID_HANDLE);
    __atomic_sub_fetch(&n_streams, 1, __ATOMIC_RELAXED);
    return SUCCESS;
}

long long fake_streams(void) { return LOAD(n_streams); }

/* the stream's slot, claimed on first use; -1 if the table is full (no ordering then) */
static int slot_of(uintptr_t stream) {
    uintptr_t key = stream + 1;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t k = LOAD(busy_key[i]);
        if (k == key) return i;
        if (k == 0) {
            uintptr_t zero = 0;
            if (__atomic_compare_exchange_n(&busy_key[i], &zero, key, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return i;
            if (zero == key) return i; /* another thread claimed it for this stream */
        }
    }
    return -1;
}

int cudaEventRecord(void *ev, void *stream) {
    Event *e = ev;
    if (!valid(e)) return fail(INVALID_HANDLE);
    uintptr_t key = (uintptr_t)stream + 1;
    for (int i = 0; i < SLOTS; i++)
        if (LOAD(refused[i]) == key) {
            BUMP(n_refused);
            return fail(REFUSED);
        }
    int64_t t = mono_ns() + LOAD(latency_ns);
    int s = slot_of((uintptr_t)stream);
    if (s >= 0) { /* in stream order: never before the stream's last stamp */
        int64_t prev = LOAD(busy_until[s]);
        do {
            if (prev > t) t = prev;
        } while (!__atomic_compare_exchange_n(&busy_until[s], &prev, t, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    }
    STORE(e->stamp, t);
    BUMP(n_records);
    if (foreign()) BUMP(n_foreign_records);
    return SUCCESS;
}

int cudaEventQuery(void *ev) {
    Event *e = ev;
    if (!valid(e)) return fail(INVALID_HANDLE);
    BUMP(n_queries);
    if (foreign()) BUMP(n_foreign_queries);
    BUMP(in_query);
    int64_t delay = LOAD(query_delay_ns);
    if (delay > 0) { /* a slow driver call */
        struct timespec ts = {(time_t)(delay / 1000000000), (long)(delay % 1000000000)};
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
    int rc = mono_ns() < LOAD(e->stamp) ? NOT_READY : SUCCESS; /* never recorded: done, as CUDA says */
    if (LOAD(query_error)) rc = LOAD(query_error);
    if (rc == NOT_READY) BUMP(n_not_ready);
    __atomic_sub_fetch(&in_query, 1, __ATOMIC_RELEASE);
    return rc ? fail(rc) : rc;
}

int cudaEventElapsedTime(float *ms, void *a, void *b) {
    Event *x = a, *y = b;
    if (!ms) return fail(INVALID_VALUE);
    if (!valid(x) || !valid(y)) return fail(INVALID_HANDLE);
    BUMP(n_elapsed);
    if (foreign()) BUMP(n_foreign_elapsed);
    int64_t t0 = LOAD(x->stamp), t1 = LOAD(y->stamp), now = mono_ns();
    if (!t0 || !t1) return fail(INVALID_HANDLE);
    if (now < t0 || now < t1) return fail(NOT_READY);
    *ms = (float)((double)(t1 - t0) / 1e6);
    return SUCCESS;
}

int cudaGetLastError(void) {
    BUMP(n_last_error);
    int e = last_error;
    last_error = 0;
    return e;
}

/* ---- the test's controls -------------------------------------------------------------------- */

/* Forget streams, refusals and counts; the calling thread becomes the one not counted as foreign. */
void fake_reset(void) {
    for (int i = 0; i < SLOTS; i++) {
        STORE(busy_key[i], 0);
        STORE(busy_until[i], 0);
        STORE(refused[i], 0);
    }
    STORE(latency_ns, 0);
    STORE(query_delay_ns, 0);
    STORE(query_error, 0);
    long long *counters[] = {
        &n_created, &n_destroyed, &n_records, &n_refused, &n_queries, &n_not_ready,
        &n_elapsed, &n_last_error, &n_foreign_queries, &n_foreign_elapsed, &n_foreign_records,
    };
    for (size_t i = 0; i < sizeof counters / sizeof *counters; i++) STORE(*counters[i], 0);
    owner = pthread_self();
    STORE(has_owner, 1);
    last_error = 0;
}

/* Records stamp this long after the call (and never before their stream's last stamp). */
void fake_set_latency_ns(long long ns) { STORE(latency_ns, (int64_t)ns); }

/* Each query takes this long (a slow driver call), so that a test can fork mid-query. */
void fake_set_query_delay_ns(long long ns) { STORE(query_delay_ns, (int64_t)ns); }

/* Every query fails with this CUDA error from now on (0: they work again). */
void fake_fail_queries(int code) { STORE(query_error, code); }

/* Queries in progress right now, on any thread. */
long long fake_in_query(void) { return LOAD(in_query); }

/* Records on this stream fail with 900 from now on; 0 if the table is full. */
int fake_refuse_stream(void *stream) {
    uintptr_t key = (uintptr_t)stream + 1;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t zero = 0;
        if (LOAD(refused[i]) == key) return 1;
        if (__atomic_compare_exchange_n(&refused[i], &zero, key, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return 1;
    }
    return 0;
}

/* Wait until every stamp given so far has been reached (cudaDeviceSynchronize). */
void fake_synchronize(void) {
    int64_t until = 0;
    for (int i = 0; i < SLOTS; i++) {
        int64_t b = LOAD(busy_until[i]);
        if (b > until) until = b;
    }
    struct timespec ts = {(time_t)(until / 1000000000), (long)(until % 1000000000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
}

/* This thread's last error, left as it is (cudaPeekAtLastError). */
int fake_peek_error(void) { return last_error; }

long long fake_created(void) { return LOAD(n_created); }
long long fake_destroyed(void) { return LOAD(n_destroyed); }
long long fake_records(void) { return LOAD(n_records); }
long long fake_refused(void) { return LOAD(n_refused); }
long long fake_queries(void) { return LOAD(n_queries); }
long long fake_not_ready(void) { return LOAD(n_not_ready); }
long long fake_elapsed_calls(void) { return LOAD(n_elapsed); }
long long fake_last_error_calls(void) { return LOAD(n_last_error); }
/* calls made by a thread other than the one that called fake_reset() (the core's resolver) */
long long fake_foreign_queries(void) { return LOAD(n_foreign_queries); }
long long fake_foreign_elapsed(void) { return LOAD(n_foreign_elapsed); }
long long fake_foreign_records(void) { return LOAD(n_foreign_records); }
