/* Region and region() (the `with evtrace.region(...)` object, all in C), and the module forwards
 * that instrumentation.py installs: forward(), sequential(). */
#include "core.h"

/* ---- Region ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *name, *args;
    int32_t key;
    int host_only;
} Region;

static int region_key(PyObject *name, int32_t *key) {
    if (name == Py_None) return *key = -1, 0;
    if (!et_g.name_keys) return PyErr_SetString(PyExc_RuntimeError, "evtrace._core is not bound: import evtrace"), -1;
    PyObject *k = PyDict_GetItemWithError(et_g.name_keys, name);
    if (!k) {
        if (PyErr_Occurred()) return -1;
        k = PyObject_CallOneArg(et_g.name_key, name);
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
    Region *r = PyObject_New(Region, &et_RegionType);
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
    Core *c = et_g.current;
    if (c) {
        if (r->key < 0)
            return PyErr_Format(PyExc_TypeError,
                                "region() needs a name when used with \"with\": with evtrace.region(\"step\"): ...");
        if (et_do_enter(c, (PyObject *)r, 0, r->key, r->args, r->host_only || !c->ndev, 0) < 0) return NULL;
    }
    Py_INCREF(r);
    return (PyObject *)r;
}

static PyObject *Region_exit(Region *r, PyObject *const *a, Py_ssize_t n) {
    Core *c = et_g.current;
    Py_ssize_t at;
    TState *t = c ? et_find_entry(c, (PyObject *)r, 0, &at) : NULL;
    if (t && et_do_exit(c, t, at) < 0) return NULL;
    Py_RETURN_NONE;
}

/* @region("name"): the wrapper is regions.py's */
static PyObject *Region_call(Region *r, PyObject *args, PyObject *kw) {
    PyObject *fn;
    if (kw && PyDict_GET_SIZE(kw)) return PyErr_Format(PyExc_TypeError, "a region decorates one function");
    if (!PyArg_ParseTuple(args, "O", &fn)) return NULL;
    return PyObject_CallFunctionObjArgs(et_g.decorate, (PyObject *)r, fn, NULL);
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

PyTypeObject et_RegionType = {
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
PyObject *et_region_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
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
    PyObject *r = (nk && !kw) ? NULL : PyObject_Call(et_g.region_slow, pos, kw);
    Py_DECREF(pos);
    Py_XDECREF(kw);
    return r;
}

/* ---- forward ----------------------------------------------------------------------------- */

/* Whether torch is tracing Python for a graph (export, AOT). Dynamo never runs forward() while it
 * traces: it inlines forward()'s Python twin instead. torch.compiler's own flag (a dict lookup)
 * where evtrace.private found it, else its public is_compiling() (a call); never an assumed "no". */
static int compiling(void) {
    if (et_g.compiler_globals) {
        PyObject *v = PyDict_GetItemWithError(et_g.compiler_globals, et_g.compiling_flag);
        if (v) return PyObject_IsTrue(v);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "torch.compiler._is_compiling_flag is gone since evtrace bound it");
        return -1;
    }
    if (!et_g.is_compiling) return 0; /* torch not bound: no module is instrumented */
    PyObject *r = PyObject_CallNoArgs(et_g.is_compiling);
    int on = r ? PyObject_IsTrue(r) : -1;
    Py_XDECREF(r);
    return on;
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
    if (!here && et_g.frame && evaluating()) return PyObject_Vectorcall(et_g.frame, a, (size_t)n, kwnames);
    PyObject *fn = a[0];
    Core *c = et_g.current;
    int comp = c && c->active ? compiling() : 1;
    if (comp < 0) return NULL;
    if (comp) return PyObject_Vectorcall(fn, a + 3, n - 3, kwnames);
    int32_t key = (int32_t)PyLong_AsLong(a[1]);
    long bkey = PyLong_AsLong(a[2]);
    if ((key == -1 || bkey == -1) && PyErr_Occurred()) return NULL;
    Py_INCREF(c); /* fn may stop the session */
    uint64_t id = ++c->next_id;
    if (et_do_enter(c, NULL, id, key, NULL, !c->ndev, 0) < 0) {
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
    if (bkey < 0 || !et_g.grad_enabled) return res;
    PyObject *on = PyObject_CallNoArgs(et_g.grad_enabled);
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
    r = PyObject_CallFunctionObjArgs(et_g.watch, a[2], pos, kw, res, NULL);
done:
    Py_XDECREF(pos);
    Py_XDECREF(kw);
    if (!r) Py_CLEAR(res);
    Py_XDECREF(r);
    return res;
}

PyObject *et_forward_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
    return forward_impl(a, nargsf, kwnames, 0);
}

PyObject *et_forward_here_fn(PyObject *mod, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
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
    if (!f || (PyObject *)Py_TYPE(f) != et_g.forward_type) goto out;
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
PyObject *et_sequential_fn(PyObject *mod, PyObject *const *a, Py_ssize_t n) {
    if (n != 2) return PyErr_Format(PyExc_TypeError, "sequential(seq, input)");
    Core *c = et_g.current;
    int share = c && c->active && et_g.forward_type;
    if (share) {
        int comp = compiling();
        if (comp < 0) return NULL;
        share = !comp;
    }
    for (Py_ssize_t i = 0; share && et_g.global_hooks && i < PyTuple_GET_SIZE(et_g.global_hooks); i++) {
        int some = PyObject_IsTrue(PyTuple_GET_ITEM(et_g.global_hooks, i));
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
