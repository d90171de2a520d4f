/* The event pool and marks, the backend's event calls (native CUDA runtime or Python), and the
 * anchors: host-bracketed records that tie each device's clock to the host's. */
#include "core.h"

/* ---- the event pool and marks ---------------------------------------------------------- */

void et_pool_put(Core *c, int d, uintptr_t ev) {
    pthread_mutex_lock(&c->pmu);
    Pool *p = &c->pools[d];
    if (GROW(p->v, p->cap, p->n + 1) == 0) p->v[p->n++] = ev;
    pthread_mutex_unlock(&c->pmu);
}

void et_mark_drop(Core *c, Mark *m) {
    if (m && __atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        if (m->ev) et_pool_put(c, m->dev, m->ev); /* never read (e.g. unfinished): reusable all the same */
        free(m);
    }
}

/* A new event from the backend (hot path, GIL): 0 if it failed (exception set). */
uintptr_t et_new_event(Core *c, int d) {
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

/* Fill device d's pool with n events (session start, off the hot path). */
PyObject *Core_fill(Core *c, PyObject *const *a, Py_ssize_t n) {
    if (n != 2) return PyErr_Format(PyExc_TypeError, "fill(device, n)");
    long d = PyLong_AsLong(a[0]), k = PyLong_AsLong(a[1]);
    if (PyErr_Occurred()) return NULL;
    if (d < 0 || d >= c->ndev) return PyErr_Format(PyExc_IndexError, "no device %ld", d);
    for (long i = 0; i < k; i++) {
        uintptr_t ev = et_new_event(c, (int)d);
        if (!ev) return NULL;
        et_pool_put(c, (int)d, ev);
        c->created[d]++;
    }
    Py_RETURN_NONE;
}

/* The pool is dry: add up to 256 events (up to max_events), else drop the device span. 0 if none
 * could be made: the region loses its device span (with an exception set if one failed); past
 * max_events that is counted as the pool exhausted. */
uintptr_t et_pool_grow(Core *c, int d) {
    Py_ssize_t n = c->max_events - c->created[d];
    if (n > 256) n = 256;
    uintptr_t first = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uintptr_t ev = et_new_event(c, d);
        if (!ev) {
            if (first && et_hot_failed(c) < 0) { /* not the device's (KeyboardInterrupt): it propagates */
                et_pool_put(c, d, first);
                return 0;
            }
            break; /* with some made, the failure is said and this region keeps its span */
        }
        c->created[d]++;
        if (first)
            et_pool_put(c, d, ev);
        else
            first = ev;
    }
    return first;
}

/* ---- backend calls ---------------------------------------------------------------------- */

/* query: 1 done, 0 not yet, -1 failed (native: error recorded; Python: exception set) */
int et_b_query(Core *c, uintptr_t ev) {
    if (c->native) {
        int rc = c->rt.query((void *)ev);
        if (rc == 0) return 1;
        c->rt.last_error();
        if (rc == CUDA_NOT_READY) return 0;
        char msg[96];
        snprintf(msg, sizeof msg, "RuntimeError: cudaEventQuery failed with CUDA error %d", rc);
        et_add_error(c, msg);
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

int et_b_elapsed(Core *c, uintptr_t a, uintptr_t b, double *ms) {
    if (c->native) {
        float f = 0;
        int rc = c->rt.elapsed(&f, (void *)a, (void *)b);
        if (rc != 0) {
            c->rt.last_error();
            char msg[96];
            snprintf(msg, sizeof msg, "RuntimeError: cudaEventElapsedTime failed with CUDA error %d", rc);
            et_add_error(c, msg);
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


/* Each device: the tightest of a few host-bracketed records on its idle side stream. */
int et_anchor_all(Core *c) {
    for (int d = 0; d < c->ndev; d++) {
        Pending best = {0, 0, 0};
        for (int i = 0; i < c->anchor_tries; i++) {
            uintptr_t ev = pool_take(c, d);
            if (!ev) break; /* the hot path grows the pool; an anchor waits for the next round */
            int64_t lo = now(c);
            int rc = b_record(c, ev, c->side[d]);
            int64_t hi = rc < 0 ? 0 : now(c); /* a Python clock must not run with an error set */
            if (rc != 0) {
                et_pool_put(c, d, ev);
                if (rc < 0) return -1;
                if (c->native) c->rt.last_error();
                continue;
            }
            if (!c->native && (lo == -1 || hi == -1) && PyErr_Occurred()) { /* no GIL natively */
                et_pool_put(c, d, ev);
                return -1;
            }
            if (!best.ev || hi - lo < best.hi - best.lo) {
                if (best.ev) et_pool_put(c, d, best.ev);
                best.lo = lo, best.hi = hi, best.ev = ev;
            } else
                et_pool_put(c, d, ev);
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
int et_resolve_anchors(Core *c) {
    for (int d = 0; d < c->ndev; d++) {
        Py_ssize_t k = 0;
        while (k < c->npending[d]) {
            Pending p = c->pending[d][k];
            int q = et_b_query(c, p.ev);
            if (q < 0) return -1;
            if (!q) break;
            double ms = 0;
            if (c->has_ref[d]) {
                double e;
                if (et_b_elapsed(c, c->ref_ev[d], p.ev, &e) < 0) return -1;
                ms = c->ref_ms[d] + e;
                et_pool_put(c, d, c->ref_ev[d]);
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

/* The host brackets of the last anchor taken on each device (share window at start). */
PyObject *Core_last_brackets(Core *c, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (int d = 0; out && d < c->ndev; d++) {
        Pending *p = c->npending[d] ? &c->pending[d][c->npending[d] - 1] : NULL;
        PyObject *x = p ? Py_BuildValue("(LL)", (long long)p->lo, (long long)p->hi) : (Py_INCREF(Py_None), Py_None);
        if (!x || PyList_Append(out, x) < 0) Py_CLEAR(out);
        Py_XDECREF(x);
    }
    return out;
}

PyObject *Core_anchors(Core *c, PyObject *arg) {
    long d = PyLong_AsLong(arg);
    if (d == -1 && PyErr_Occurred()) return NULL;
    if (d < 0 || d >= c->ndev) return PyErr_Format(PyExc_IndexError, "no device %ld", d);
    et_lock_gil_free(&c->pass_mu);
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

PyObject *Core_streams(Core *c, PyObject *unused) {
    et_lock_gil_free(&c->pass_mu);
    PyObject *out = PyList_New(c->nstreams);
    for (Py_ssize_t i = 0; out && i < c->nstreams; i++) {
        PyObject *x = Py_BuildValue("(nK)", (Py_ssize_t)c->streams[2 * i], (unsigned long long)c->streams[2 * i + 1]);
        if (!x) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, x);
    }
    pthread_mutex_unlock(&c->pass_mu);
    return out;
}
