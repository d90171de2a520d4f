/* The hot path: per region boundary, with the GIL held. Thread states, args encoded as JSON text,
 * enter/exit, and the boundary that records (or shares) a mark on the current stream. */
#include "core.h"

/* ---- thread states ---------------------------------------------------------------------- */

TState *et_new_tstate(Core *c) {
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
    et_tls = t;
    et_tls_gen = c->gen;
    PyObject *r = PyObject_CallNoArgs(c->on_thread); /* the recorder names the lane */
    if (!r) return NULL;
    Py_DECREF(r);
    return t;
}

void et_free_tstate(Core *c, TState *t) {
    for (Py_ssize_t i = 0; i < t->nopen; i++) {
        args_free(&t->open[i].args);
        Py_XDECREF(t->open[i].extra);
        et_mark_drop(c, t->open[i].m);
    }
    et_mark_drop(c, t->last_m);
    free(t->open);
    free(t);
}

/* ---- args: JSON object text, encoded on entry --------------------------------------------- */

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
    if (PyUnicode_GET_LENGTH(v) > et_g.max_str) return 1;
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(v, &n);
    if (!u) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeError)) return -1;
        PyErr_Clear();
        return 1;
    }
    if (et_reserve(b, 2 + 6 * n) < 0) return -1; /* worst case: every byte \u00XX */
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
        PyObject *j = PyObject_CallOneArg(et_g.encode, args);
        if (!j) rc = -1;
        else if (!PyBytes_Check(j)) rc = -1, PyErr_SetString(PyExc_TypeError, "values.encode gives bytes");
        else if (PyBytes_GET_SIZE(j) > 2) rc = put(&b, PyBytes_AS_STRING(j), PyBytes_GET_SIZE(j));
        else rc = 0; /* {} */
        Py_XDECREF(j);
    }
    if (rc < 0 || et_buf_take(&b, out) < 0) {
        if (rc < 0) buf_free(&b);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    return 0;
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
int et_hot_failed(Core *c) {
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
    et_add_error(c, line);
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
    if (__atomic_load_n(&et_g.capturing, __ATOMIC_RELAXED)) {
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
        ev = et_pool_grow(c, d);
        if (!ev) return PyErr_Occurred() ? -1 : (*why = WHY_POOL, 0);
    }
    int rc = b_record(c, ev, s);
    if (rc != 0) {
        et_pool_put(c, d, ev);
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
    et_mark_drop(c, t->last_m);
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
    return et_hot_failed(c);
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


/* Open a region on this thread: an entry on its stack, with a copy of args (a dict, or NULL). */
int et_do_enter(Core *c, PyObject *owner, uint64_t id, int32_t key, PyObject *args, int host, int cross) {
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
    et_mark_drop(c, e.m);
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
int et_do_exit(Core *c, TState *t, Py_ssize_t i) {
    Entry e = t->open[i];
    int rc = 0, host = e.host || !c->ndev, kept = 0;
    /* before the record: the device cannot stamp the end earlier than this */
    int64_t h1 = c->clock ? 0 : mono_ns();
    hlock(c); /* off the stack and (host lane, native clock) into the rows in one step */
    memmove(&t->open[i], &t->open[i + 1], (size_t)(t->nopen - i - 1) * sizeof(Entry));
    t->nopen--;
    if (host && !c->clock) {
        Row row = {e.key, t->ix, e.h0, h1, -1, -1, NAN, NAN};
        kept = et_rows_push(&c->hrows, &row, &e.args) == 0;
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
            kept = et_rows_push(&c->hrows, &row, &e.args) == 0;
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
            et_mark_drop(c, m1);
            if (rc == 0) rc = -1, PyErr_NoMemory();
        }
        et_mark_drop(c, e.m);
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
TState *et_find_entry(Core *c, PyObject *owner, uint64_t id, Py_ssize_t *at) {
    TState *me = et_tls_gen == c->gen ? et_tls : NULL;
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

/* ---- Core: Python methods ---------------------------------------------------------------- */

static PyObject *Core_enter_impl(Core *c, PyObject *const *a, Py_ssize_t n, int host, int cross) {
    if (n != 2) return PyErr_Format(PyExc_TypeError, "enter(key, args) takes 2 arguments");
    int32_t key = (int32_t)PyLong_AsLong(a[0]);
    if (key == -1 && PyErr_Occurred()) return NULL;
    uint64_t id = ++c->next_id;
    if (!c->active) return PyLong_FromUnsignedLongLong(id);
    if (et_do_enter(c, NULL, id, key, a[1] == Py_None ? NULL : a[1], host || !c->ndev, cross) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(id);
}

PyObject *Core_enter(Core *c, PyObject *const *a, Py_ssize_t n) { return Core_enter_impl(c, a, n, 0, 0); }
PyObject *Core_enter_host(Core *c, PyObject *const *a, Py_ssize_t n) { return Core_enter_impl(c, a, n, 1, 0); }
PyObject *Core_enter_cross(Core *c, PyObject *const *a, Py_ssize_t n) { return Core_enter_impl(c, a, n, 0, 1); }

PyObject *Core_exit(Core *c, PyObject *tok) {
    uint64_t id = PyLong_AsUnsignedLongLong(tok);
    if (id == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    if (exit_id(c, id) < 0) return NULL;
    Py_RETURN_NONE;
}
