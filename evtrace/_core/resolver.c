/* The resolver: stamps each mark once its stream reaches it, finishes regions whose marks are
 * settled into rows; on a native thread without the GIL (CUDA) or by poll() (Python backends). */
#include "core.h"

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
int et_take_inbox(Core *c) {
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
            et_mark_drop(c, m);
        }
    }
    return rc;
}

/* Stamp a done mark against its device's latest anchor (an elapsed of at most about one anchor
 * interval, which float32 ms keeps to ~10 ns) and return its event to the pool. */
static int stamp(Core *c, Mark *m) {
    double e;
    if (et_b_elapsed(c, c->ref_ev[m->dev], m->ev, &e) < 0) return -1;
    m->ms = c->ref_ms[m->dev] + e;
    m->state = 1;
    uintptr_t ev = m->ev;
    m->ev = 0;
    et_pool_put(c, m->dev, ev);
    return 0;
}

/* Each stream's done marks, stamped in record order. With the native runtime, record order is
 * the stream's order (records are made holding the GIL), so once the newest is done all are. */
static int stamp_marks(Core *c) {
    for (Py_ssize_t k = 0; k < c->nmq; k++) {
        MarkQ *q = &c->mq[k];
        if (!q->n || !c->has_ref[q->d]) continue; /* the device's first anchor is not read yet */
        int all = 0;
        if (c->native && (all = et_b_query(c, q->v[q->head + q->n - 1]->ev)) < 0) return -1;
        while (q->n) {
            Mark *m = q->v[q->head];
            if (!all) {
                int done = et_b_query(c, m->ev);
                if (done < 0) return -1;
                if (!done) break; /* later marks on this stream are not done either */
            }
            if (stamp(c, m) < 0) return -1;
            q->head++, q->n--;
            et_mark_drop(c, m);
        }
        if (!q->n) q->head = 0;
    }
    return 0;
}

static int emit_row(Core *c, const Done *r, int16_t dev, int32_t stream, double t0, double t1) {
    Row row = {r->key, r->thread, r->h0, r->h1, dev, stream, t0, t1};
    pthread_mutex_lock(&c->rmu);
    int rc = et_rows_push(&c->drows, &row, &r->args);
    pthread_mutex_unlock(&c->rmu);
    return rc;
}

/* A region that keeps its host span only, counted under why. */
static int emit_lost(Core *c, const Done *r, int why) {
    __atomic_add_fetch(&c->lost[why], 1, __ATOMIC_RELAXED);
    return emit_row(c, r, -1, -1, NAN, NAN);
}

void et_done_free(Core *c, Done *r) {
    args_free(&r->args);
    et_mark_drop(c, r->m0);
    et_mark_drop(c, r->m1);
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
    et_done_free(c, r);
    return rc;
}

static inline int settled(const Mark *m) { return !m || m->state != 0; }

/* Regions finished on the hot path join those waiting; each whose marks are settled is emitted. */
int et_finish_done(Core *c) {
    pthread_mutex_lock(&c->qmu);
    Done *batch = c->done;
    Py_ssize_t n = c->ndone;
    c->done = NULL;
    c->ndone = c->capdone = 0;
    pthread_mutex_unlock(&c->qmu);
    int rc = 0;
    if (n && GROW(c->pend, c->cappend, c->npend + n) < 0) { /* no room: they keep host spans */
        for (Py_ssize_t i = 0; i < n; i++) {
            et_mark_drop(c, batch[i].m0), et_mark_drop(c, batch[i].m1);
            batch[i].m0 = batch[i].m1 = NULL;
            emit_lost(c, &batch[i], WHY_UNREADABLE);
            et_done_free(c, &batch[i]);
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

static int resolve_device(Core *c) {
    int64_t t = now(c);
    if (t == -1 && PyErr_Occurred()) return -1;
    if (t - c->last_anchor >= c->anchor_interval_ns && et_anchor_all(c) < 0) return -1;
    if (et_resolve_anchors(c) < 0) return -1;
    return stamp_marks(c);
}

/* One resolver pass. With the GIL (Python backends) it may raise; natively it records errors. */
static int pass(Core *c) {
    if (!c->ndev) return 0;
    int rc = et_take_inbox(c);
    pthread_mutex_lock(&et_g.calls); /* a CUDA graph capture waits for this block, and holds the next */
    if (rc == 0 && !__atomic_load_n(&et_g.capturing, __ATOMIC_RELAXED)) rc = resolve_device(c);
    pthread_mutex_unlock(&et_g.calls);
    if (et_finish_done(c) < 0) rc = -1;
    return rc;
}

/* One resolver step by hand (with the GIL), between the resolver's own passes. */
static PyObject *by_hand(Core *c, int (*step)(Core *)) {
    et_lock_gil_free(&c->pass_mu);
    int rc = step(c);
    pthread_mutex_unlock(&c->pass_mu);
    if (rc < 0) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *Core_poll(Core *c, PyObject *unused) {
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
        if (pass(c) < 0 && c->nerrors == 0) et_add_error(c, "MemoryError: the resolver ran out of memory");
    }
    pthread_mutex_unlock(&c->pass_mu);
    return NULL;
}

PyObject *Core_run(Core *c, PyObject *unused) {
    if (!c->native) return PyErr_Format(PyExc_RuntimeError, "a native resolver needs the native runtime");
    if (c->running) Py_RETURN_NONE;
    c->stopping = 0;
    if (et_start_thread(&c->thread, resolver_main, c, "evtrace-resolve") != 0)
        return PyErr_Format(PyExc_OSError, "could not start the resolver thread");
    c->running = 1;
    Py_RETURN_NONE;
}

void et_halt(Core *c) {
    if (!c->running) return;
    pthread_mutex_lock(&c->pass_mu);
    c->stopping = 1;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->pass_mu);
    pthread_join(c->thread, NULL);
    c->running = 0;
}

PyObject *Core_halt(Core *c, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS et_halt(c);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject *Core_anchor_now(Core *c, PyObject *unused) { return by_hand(c, et_anchor_all); }

PyObject *Core_resolve_anchors(Core *c, PyObject *unused) { return by_hand(c, et_resolve_anchors); }
