/* The Core type (one per session: its lifecycle, take(), counts()), the module's functions and
 * its init. */
#include "core.h"

Globals et_g = {.calls = PTHREAD_MUTEX_INITIALIZER, .errors = PTHREAD_MUTEX_INITIALIZER, .max_str = 1000};
__thread TState *et_tls ET_TLS;
__thread uint64_t et_tls_gen ET_TLS;

const char *const et_why_names[NWHY] = {
    "event_pool_exhausted", "record_refused", "graph_capture", "device_call_failed",
    "device_not_seen_at_start", "unreadable_event", "split_over_devices",
};

/* take() -> (rows, at, end, blob): everything finished so far, emptied from the core. rows in
 * recorder.LIVE_DTYPE; for each row with args, its index among rows and the end of its args
 * (JSON text) in blob, both int64. Those the journal wrote first, then the hot path's, then the
 * resolver's. */
static PyObject *Core_take(Core *c, PyObject *unused) {
    enum { NPART = 5, LENT = 3 }; /* parts from LENT on are the journal's last flush: copied, not freed */
    Rows part[NPART];
    memset(part, 0, sizeof part);
    if (c->j) pthread_mutex_lock(&c->j->mu);
    part[0] = c->jrows;
    memset(&c->jrows, 0, sizeof c->jrows);
    __atomic_store_n(&c->njrows, 0, __ATOMIC_RELAXED);
    if (c->j) pthread_mutex_unlock(&c->j->mu);
    et_journal_lent(c, &part[LENT], &part[LENT + 1]);
    if (!c->jon) { /* journaled, rows come through the journal's flushes only */
        part[1] = c->hrows;
        memset(&c->hrows, 0, sizeof c->hrows);
        pthread_mutex_lock(&c->rmu);
        part[2] = c->drows;
        memset(&c->drows, 0, sizeof c->drows);
        pthread_mutex_unlock(&c->rmu);
    }
    Py_ssize_t n = 0, nat = 0, nblob = 0;
    for (int k = 0; k < NPART; k++) n += part[k].n, nat += part[k].nat, nblob += part[k].nblob;
    PyObject *rows = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Row));
    PyObject *at = PyBytes_FromStringAndSize(NULL, nat * 8), *end = PyBytes_FromStringAndSize(NULL, nat * 8);
    PyObject *blob = PyBytes_FromStringAndSize(NULL, nblob);
    PyObject *out = NULL;
    if (rows && at && end && blob) {
        char *r = PyBytes_AS_STRING(rows), *bl = PyBytes_AS_STRING(blob);
        int64_t *a = (int64_t *)PyBytes_AS_STRING(at), *e = (int64_t *)PyBytes_AS_STRING(end);
        Py_ssize_t n0 = 0, at0 = 0, b0 = 0;
        for (int k = 0; k < NPART; k++) {
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
        for (int k = 1; k < NPART; k++) et_rows_append(&part[0], &part[k]);
        et_rows_append(&part[0], &c->drows);
        et_rows_free(&c->drows);
        c->drows = part[0];
        pthread_mutex_unlock(&c->rmu);
        et_rows_free(&part[1]), et_rows_free(&part[2]);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    for (int k = 0; k < LENT; k++) et_rows_free(&part[k]);
    return out;
}

/* After the final pass at stop: what could still not be resolved (a device error that lasted)
 * keeps its host span, counted as lost, rather than vanishing. */
static PyObject *Core_flush(Core *c, PyObject *unused) {
    et_lock_gil_free(&c->pass_mu);
    int rc = et_take_inbox(c);
    for (Py_ssize_t k = 0; k < c->nmq; k++) { /* marks never done: unreadable */
        MarkQ *q = &c->mq[k];
        for (; q->n; q->n--, q->head++) {
            q->v[q->head]->state = -1;
            et_mark_drop(c, q->v[q->head]);
        }
        q->head = 0;
    }
    if (et_finish_done(c) < 0) rc = -1; /* now every region's marks are settled */
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
                put(&b, flag, sizeof flag - 1) < 0 || et_buf_take(&b, &a) < 0)
                return buf_free(&b), PyErr_NoMemory();
            Row row = {e->key, t->ix, e->h0, end > e->h0 ? end : e->h0, -1, -1, NAN, NAN};
            hlock(c);
            int rc = et_rows_push(&c->hrows, &row, &a);
            hunlock(c);
            args_free(&a);
            if (rc < 0) { /* out of memory: the entries not yet closed stay open */
                memmove(t->open, t->open + i, (size_t)(t->nopen - i) * sizeof(Entry));
                t->nopen -= i;
                return PyErr_NoMemory();
            }
            args_free(&e->args);
            Py_CLEAR(e->extra);
            et_mark_drop(c, e->m);
            e->m = NULL;
            n++;
        }
        t->nopen = 0;
    }
    return PyLong_FromLong(n);
}


static PyObject *Core_activate(Core *c, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    if (on) {
        c->gen = ++et_g.gen;
        c->active = 1;
        Py_XSETREF(et_g.current, (Py_INCREF(c), c));
    } else {
        c->active = 0;
        if (et_g.current == c) Py_CLEAR(et_g.current);
    }
    Py_RETURN_NONE;
}

/* Counters: ({why: regions without a device span}, marks skipped in graph captures, errors of
 * the resolver and the hot path). */
static PyObject *Core_counts(Core *c, PyObject *unused) {
    PyObject *errs = PyList_New(0);
    pthread_mutex_lock(&et_g.errors);
    for (int i = 0; errs && i < c->nerrors; i++) {
        PyObject *s = c->errors[i] ? PyUnicode_FromString(c->errors[i]) : NULL;
        if (!s || PyList_Append(errs, s) < 0) Py_CLEAR(errs);
        Py_XDECREF(s);
    }
    pthread_mutex_unlock(&et_g.errors);
    PyObject *lost = errs ? PyDict_New() : NULL;
    for (int w = 0; lost && w < NWHY; w++) {
        long n = __atomic_load_n(&c->lost[w], __ATOMIC_RELAXED);
        PyObject *v = n ? PyLong_FromLong(n) : NULL;
        if (n && (!v || PyDict_SetItemString(lost, et_why_names[w], v) < 0)) Py_CLEAR(lost);
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
    Py_BEGIN_ALLOW_THREADS et_halt(c);
    Py_END_ALLOW_THREADS
    c->active = 0;
    if (et_g.current == c) Py_CLEAR(et_g.current);
    c->max_events = 0;
    pthread_mutex_lock(&c->pmu);
    for (int d = 0; d < c->ndev; d++) c->pools[d].n = 0;
    pthread_mutex_unlock(&c->pmu);
    Py_RETURN_NONE;
}


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

void et_core_free_state(Core *c) {
    for (Py_ssize_t k = 0; k < c->nthreads; k++) et_free_tstate(c, c->threads[k]);
    free(c->threads);
    c->threads = NULL;
    c->nthreads = 0;
    for (Py_ssize_t i = 0; i < c->ndone; i++) et_done_free(c, &c->done[i]);
    free(c->done);
    c->done = NULL;
    c->ndone = 0;
    for (Py_ssize_t i = 0; i < c->npend; i++) et_done_free(c, &c->pend[i]);
    free(c->pend);
    c->pend = NULL;
    c->npend = c->cappend = 0;
    for (Mark *m = __atomic_exchange_n(&c->inbox, NULL, __ATOMIC_ACQUIRE), *next; m; m = next) {
        next = m->next;
        et_mark_drop(c, m);
    }
    for (Py_ssize_t k = 0; k < c->nmq; k++) {
        for (Py_ssize_t i = 0; i < c->mq[k].n; i++) et_mark_drop(c, c->mq[k].v[c->mq[k].head + i]);
        free(c->mq[k].v);
    }
    free(c->mq);
    c->mq = NULL;
    c->nmq = 0;
    et_rows_free(&c->hrows);
    et_rows_free(&c->drows);
    et_rows_free(&c->jrows);
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
    et_halt(c); /* the native threads must be gone before their memory is */
    et_journal_join(c);
    et_journal_free(c);
    et_core_free_state(c);
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


PyTypeObject et_CoreType = {
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

/* ---- module functions -------------------------------------------------------------------- */

/* bind(**parts): the Python parts the core calls, into et_g (core.h says which is which). Two
 * calls, each at its first moment: regions.py's at `import evtrace` (the name table, args' slow
 * path, the decorator); instrumentation.bind_torch's once torch is imported, which `import
 * evtrace` never does (it costs seconds). A part not given keeps what it was. */
static PyObject *bind(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kws[] = {"name_keys",    "name_key",     "encode", "decorate",     "region_slow",
                          "max_str",      "compiler_globals", "is_compiling", "grad_enabled", "watch",
                          "forward_type", "global_hooks", "frame",  NULL};
    PyObject *v[13] = {NULL};
    Py_ssize_t max_str = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$O!OOOOnO!OOOO!O!O", kws, &PyDict_Type, &v[0], &v[1], &v[2],
                                     &v[3], &v[4], &max_str, &PyDict_Type, &v[6], &v[7], &v[8], &v[9],
                                     &PyType_Type, &v[10], &PyTuple_Type, &v[11], &v[12]))
        return NULL;
    if (v[6] && !et_g.compiling_flag && !(et_g.compiling_flag = PyUnicode_InternFromString("_is_compiling_flag")))
        return NULL;
    PyObject **slot[13] = {&et_g.name_keys,    &et_g.name_key,     &et_g.encode,           &et_g.decorate,
                           &et_g.region_slow,  NULL,               &et_g.compiler_globals, &et_g.is_compiling,
                           &et_g.grad_enabled, &et_g.watch,        &et_g.forward_type,     &et_g.global_hooks,
                           &et_g.frame};
    if (v[6]) Py_CLEAR(et_g.is_compiling); /* two ways to one answer: the last bound is the one */
    if (v[7]) Py_CLEAR(et_g.compiler_globals);
    for (int i = 0; i < 13; i++)
        if (v[i] && slot[i]) Py_XSETREF(*slot[i], (Py_INCREF(v[i]), v[i]));
    if (max_str >= 0) et_g.max_str = max_str;
    Py_RETURN_NONE;
}

/* row_layout() -> (size, [(name, offset, size, kind)]): Row as recorder.LIVE_DTYPE names it, kind
 * "i" (signed integer) or "f" (float) */
static PyObject *row_layout(PyObject *mod, PyObject *unused) {
    static const struct {
        const char *name, *kind;
        size_t off, size;
    } fields[] = {
#define FIELD(py, f) {#py, _Generic(((Row *)0)->f, double: "f", default: "i"), offsetof(Row, f), sizeof(((Row *)0)->f)},
        ROW_FIELDS(FIELD)
#undef FIELD
    };
    size_t n = sizeof fields / sizeof fields[0];
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out && i < n; i++) {
        PyObject *x = Py_BuildValue("(snns)", fields[i].name, (Py_ssize_t)fields[i].off, (Py_ssize_t)fields[i].size,
                                    fields[i].kind);
        if (!x) Py_CLEAR(out);
        else PyList_SET_ITEM(out, (Py_ssize_t)i, x);
    }
    return out ? Py_BuildValue("(nN)", (Py_ssize_t)sizeof(Row), out) : NULL;
}

static PyObject *capture_began(PyObject *mod, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&et_g.calls);
    et_g.capturing++;
    pthread_mutex_unlock(&et_g.calls);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *capture_ended(PyObject *mod, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&et_g.calls);
    if (et_g.capturing > 0) et_g.capturing--;
    pthread_mutex_unlock(&et_g.calls);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* After a fork, in the child: one thread, ours. Locks that a thread of the parent held (the
 * resolver's, mid-pass) would stay held for ever: they start afresh. The child does not record
 * into its parent's session. (Nothing is locked before the fork: the forking thread would hold
 * the locks across GIL switches, and a resolver waiting on them with the GIL would deadlock.) */
static PyObject *after_fork_in_child(PyObject *mod, PyObject *unused) {
    Core *c = et_g.current;
    pthread_mutex_init(&et_g.calls, NULL);
    pthread_mutex_init(&et_g.errors, NULL);
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
            c->j->running = c->j->last_running = 0;
            et_journal_free(c);
        }
        c->hlk = 0;
    }
    et_g.capturing = 0;
    et_tls = NULL;
    et_tls_gen = 0;
    Py_CLEAR(et_g.current);
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
    {"region", (PyCFunction)(void (*)(void))et_region_fn, METH_FASTCALL | METH_KEYWORDS,
     "region(name, /, *, host_only=False, **args)\n--\n\n"
     "A span on the host lane of this thread and, with CUDA, on the current stream.\n\n"
     "``with region(\"step\", batch=3): ...``, ``@region`` (named after the function) or\n"
     "``@region(\"load\")``. Keyword args become slice args in the trace.\n\n"
     "``host_only=True`` records no device span: for host work such as a CPU task, whose\n"
     "event pair would only show the stream idling (or waiting behind earlier work)."},
    {"bind", (PyCFunction)(void (*)(void))bind, METH_VARARGS | METH_KEYWORDS,
     "bind(**parts): the Python parts the core calls (regions.py's at import, torch's once imported)"},
    {"forward", (PyCFunction)(void (*)(void))et_forward_fn, METH_FASTCALL | METH_KEYWORDS,
     "forward(fn, key, bkey, /, *args, **kwargs): an instrumented module's forward as a region"},
    {"forward_here", (PyCFunction)(void (*)(void))et_forward_here_fn, METH_FASTCALL | METH_KEYWORDS,
     "forward(), never through instrumentation.py's Python frame"},
    {"sequential", (PyCFunction)(void (*)(void))et_sequential_fn, METH_FASTCALL,
     "sequential(seq, input): nn.Sequential.forward, its adjacent boundaries sharing events"},
    {"row_layout", row_layout, METH_NOARGS, "row_layout() -> (size, [(name, offset, size, kind)]): the C Row"},
    {"capture_began", capture_began, METH_NOARGS, "a CUDA graph capture begins (waits for the resolver)"},
    {"capture_ended", capture_ended, METH_NOARGS, "a CUDA graph capture ended"},
    {"after_fork_in_child", after_fork_in_child, METH_NOARGS, "fresh locks, no session"},
    {"read_flush", et_read_flush, METH_O, "a journal's flush record, decoded"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "evtrace._core", "evtrace's native core", -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&et_CoreType) < 0 || PyType_Ready(&et_RegionType) < 0) return NULL;
    et_crc_init();
    PyObject *time = PyImport_ImportModule("time");
    PyObject *pc = time ? PyObject_GetAttrString(time, "perf_counter_ns") : NULL;
    PyObject *ok = pc ? check_clock(NULL, pc) : NULL;
    Py_XDECREF(time);
    Py_XDECREF(pc);
    if (!ok) return NULL;
    Py_DECREF(ok);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&et_CoreType) < 0 ||
        PyModule_AddObjectRef(m, "Region", (PyObject *)&et_RegionType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
