/* The Chrome JSON reader's scanner (evtrace/formats/chrome_read.py): one pass over a block of the
 * text evtrace's writer lays out (evtrace/formats/chrome.py), in C rather than numpy.
 *
 * scan(data, lo, hi) walks the events in data[lo:hi] (lo: the comma or '[' before the first, hi:
 * the comma or ']' after the last). Each piece of text from one ',{"ph":"' to the next (the first
 * from lo, whatever it holds) is checked byte by byte against the writer's layout of an X event
 * (host or device) or a C event, in the same terms as the numpy path; a piece off the layout is
 * only marked, for orjson. What this cannot judge is left to the caller: whether a name is a JSON
 * string (its distinct spans go back, for orjson) and whether user args are a JSON object (their
 * spans go back). Times are written as µs with three decimals and parsed exactly to integer ns.
 *
 * Returns (pieces, host, device, counter_pids, names), each bytes of native int64 rows:
 *   pieces  [start, kind]        kind: 0 off the layout, 1 host X, 2 device X, 3 C
 *   host    [region, name, pid, tid, ts, dur, piece, args_start, args_end]
 *   device  the same
 *   names   [start, length]      the distinct name texts (quotes included), first seen first
 * name is an index into names; args_start = args_end = -1 where a region has no user args.
 * The GIL is released while scanning: the inflating thread runs meanwhile. Memory comes from
 * PyMem_Raw* (callable without the GIL), so that tracemalloc counts it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIGITS 15 /* before the point: below 2**63 ns, more than any trace holds (as numpy's) */
#define MAX_NAME 4096 /* longer names go through orjson, as in the numpy path */

typedef struct {
    int64_t *v;
    size_t n, cap; /* in int64s */
    int failed;
} Vec;

static int64_t *vec_row(Vec *a, size_t width) {
    if (a->n + width > a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 4096;
        while (cap < a->n + width)
            cap *= 2;
        int64_t *v = PyMem_RawRealloc(a->v, cap * sizeof(int64_t));
        if (!v) {
            a->failed = 1;
            return NULL;
        }
        a->v = v;
        a->cap = cap;
    }
    int64_t *row = a->v + a->n;
    a->n += width;
    return row;
}

/* ---- the distinct names, by their bytes ---- */

typedef struct {
    const char *base;
    Vec spans;        /* [start, length] a name */
    int64_t *slots;   /* name index + 1, 0 empty */
    uint64_t *hashes; /* a slot's name's hash */
    size_t mask;      /* slots - 1 */
    int failed;
} Names;

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h;
}

static int names_grow(Names *t) {
    size_t size = t->mask ? (t->mask + 1) * 2 : 256;
    int64_t *slots = PyMem_RawCalloc(size, sizeof(int64_t));
    uint64_t *hashes = PyMem_RawCalloc(size, sizeof(uint64_t));
    if (!slots || !hashes) {
        PyMem_RawFree(slots);
        PyMem_RawFree(hashes);
        return -1;
    }
    for (size_t i = 0; t->mask && i <= t->mask; i++) {
        if (!t->slots[i])
            continue;
        size_t j = t->hashes[i] & (size - 1);
        while (slots[j])
            j = (j + 1) & (size - 1);
        slots[j] = t->slots[i];
        hashes[j] = t->hashes[i];
    }
    PyMem_RawFree(t->slots);
    PyMem_RawFree(t->hashes);
    t->slots = slots;
    t->hashes = hashes;
    t->mask = size - 1;
    return 0;
}

/* The index of the name data[start, start + n), added if new; -1 when out of memory. */
static int64_t name_index(Names *t, const char *p, size_t n) {
    if (2 * (t->spans.n / 2 + 1) > t->mask && names_grow(t) < 0) /* at most half full */
        return -1;
    uint64_t h = hash_bytes(p, n);
    size_t j = h & t->mask;
    for (; t->slots[j]; j = (j + 1) & t->mask) {
        if (t->hashes[j] != h)
            continue;
        int64_t *s = t->spans.v + 2 * (t->slots[j] - 1);
        if ((size_t)s[1] == n && memcmp(t->base + s[0], p, n) == 0)
            return t->slots[j] - 1;
    }
    int64_t *row = vec_row(&t->spans, 2);
    if (!row)
        return -1;
    row[0] = p - t->base;
    row[1] = (int64_t)n;
    t->slots[j] = (int64_t)(t->spans.n / 2);
    t->hashes[j] = h;
    return t->slots[j] - 1;
}

/* ---- the fields ---- */

typedef struct {
    const char *p, *end; /* the rest of the piece */
    const char *base;    /* data[0]: offsets are from here */
} Cur;

#define LIT(c, s) lit(c, s, sizeof(s) - 1)

static int lit(Cur *c, const char *s, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, s, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

/* A number as the writer writes it: an optional '-', 1..15 digits without a leading zero (but
 * "0"), and with ``decimals`` a '.' and exactly three digits (µs: the value is then in ns). */
static int number(Cur *c, int decimals, int64_t *out) {
    const char *p = c->p, *end = c->end;
    int neg = p < end && *p == '-';
    p += neg;
    const char *s = p;
    int64_t v = 0;
    while (p < end && p - s < MAX_DIGITS + 1 && *p >= '0' && *p <= '9')
        v = v * 10 + (*p++ - '0');
    size_t n = p - s;
    if (n < 1 || n > MAX_DIGITS || (n > 1 && *s == '0'))
        return 0;
    if (decimals) {
        if (end - p < 4 || p[0] != '.')
            return 0;
        for (int k = 1; k <= 3; k++) {
            if (p[k] < '0' || p[k] > '9')
                return 0;
            v = v * 10 + (p[k] - '0');
        }
        p += 4;
    }
    if (p < end && *p >= '0' && *p <= '9') /* more digits than allowed */
        return 0;
    *out = neg ? -v : v;
    c->p = p;
    return 1;
}

/* A JSON string's text, quotes included: to the first unescaped quote (whether the text is a
 * valid string, the caller asks orjson, once a distinct name). */
static int string(Cur *c, const char **start, size_t *n) {
    const char *p = c->p, *end = c->end;
    if (p >= end || *p != '"')
        return 0;
    for (p++; p < end && *p != '"'; p++)
        if (*p == '\\')
            p++;
    if (p >= end)
        return 0;
    *start = c->p;
    *n = p + 1 - c->p;
    c->p = p + 1;
    return *n <= MAX_NAME;
}

/* The args from after ``,"args":{`` to the piece's end: user args (if any, then a comma),
 * "region":N,"host_dur_us":D, with ``dev`` ,"device_dur_us":D,"launch_delay_us":D, then }}.
 * The user args are whatever lies before the comma that leads the fixed part, found from the
 * end by its commas (a user arg may hold commas; the fixed part holds none but its own). */
static int args(Cur *c, int dev, int64_t *region, int64_t *astart, int64_t *aend) {
    const char *p = c->end;
    int commas = dev ? 3 : 1; /* the fixed part's own, after "region":N */
    while (commas >= 0 && p > c->p) {
        p--;
        if (*p == ',')
            commas--;
    }
    int64_t x;
    Cur t = {c->p, c->end, c->base};
    if (commas >= 0) { /* no comma left before the fixed part's: no user args */
        *astart = *aend = -1;
    } else {
        if (p == c->p) /* ",{"  : empty user args are not an object's */
            return 0;
        *astart = c->p - c->base;
        *aend = p - c->base;
        t.p = p + 1;
    }
    if (!LIT(&t, "\"region\":") || !number(&t, 0, region) || !LIT(&t, ",\"host_dur_us\":") ||
        !number(&t, 1, &x))
        return 0;
    if (dev && !(LIT(&t, ",\"device_dur_us\":") && number(&t, 1, &x) &&
                 LIT(&t, ",\"launch_delay_us\":") && number(&t, 1, &x)))
        return 0;
    return LIT(&t, "}}") && t.p == t.end;
}

typedef struct {
    int64_t name, pid, tid, ts, dur, region, astart, aend;
} XEvent;

/* An X event of ``cat`` ("region" or "device") from just after its leading comma. */
static int x_event(Cur *c, int device, Names *names, XEvent *e) {
    const char *prefix = device ? "{\"ph\":\"X\",\"cat\":\"device\",\"name\":"
                                : "{\"ph\":\"X\",\"cat\":\"region\",\"name\":";
    const char *name;
    size_t n;
    int64_t x;
    if (!lit(c, prefix, strlen(prefix)) || !string(c, &name, &n))
        return 0;
    if (!(LIT(c, ",\"pid\":") && number(c, 0, &e->pid) && LIT(c, ",\"tid\":") &&
          number(c, 0, &e->tid) && LIT(c, ",\"ts\":") && number(c, 1, &e->ts) &&
          LIT(c, ",\"dur\":") && number(c, 1, &e->dur)))
        return 0;
    int dev = device;
    if (device) {
        if (!(LIT(c, ",\"bind_id\":") && number(c, 0, &x) && LIT(c, ",\"flow_in\":true")))
            return 0;
    } else if (c->end - c->p >= 7 && memcmp(c->p, ",\"bind_", 7) == 0) { /* with a device span */
        if (!(LIT(c, ",\"bind_id\":") && number(c, 0, &x) && LIT(c, ",\"flow_out\":true")))
            return 0;
        dev = 1;
    }
    if (!LIT(c, ",\"args\":{") || !args(c, dev, &e->region, &e->astart, &e->aend))
        return 0;
    e->name = name_index(names, name, n);
    if (e->name < 0)
        names->failed = 1;
    return e->name >= 0;
}

/* A C event (a counter), from just after its leading comma: its pid. */
static int c_event(Cur *c, int64_t *pid) {
    int64_t x;
    int flight = LIT(c, "{\"ph\":\"C\",\"name\":\"regions in flight\"");
    if (!flight && !LIT(c, "{\"ph\":\"C\",\"name\":\"host lead\""))
        return 0;
    if (!(LIT(c, ",\"pid\":") && number(c, 0, pid) && LIT(c, ",\"tid\":") && number(c, 0, &x) &&
          LIT(c, ",\"ts\":") && number(c, 1, &x)))
        return 0;
    if (flight ? !(LIT(c, ",\"args\":{\"regions\":") && number(c, 0, &x))
               : !(LIT(c, ",\"args\":{\"us\":") && number(c, 1, &x)))
        return 0;
    return LIT(c, "}}") && c->p == c->end;
}

static const char EVENT[] = ",{\"ph\":\"";

/* Where the next piece starts: the next ',{"ph":"' in [p, end), else end. Found by its '{',
 * two an event (its own and its args'), rather than by its ',', about ten an event: a scan of
 * 2M host events took 0.42 s instead of 0.47 (the 2-core CPU, best of 5). */
static const char *next_event(const char *p, const char *end) {
    const char *q = p + 1;
    while (q < end && (q = memchr(q, '{', end - q)) != NULL) {
        if ((size_t)(end - q) >= sizeof(EVENT) - 2 && q[-1] == ',' &&
            memcmp(q, EVENT + 1, sizeof(EVENT) - 2) == 0)
            return q - 1;
        q++;
    }
    return end;
}

static PyObject *as_bytes(Vec *v) {
    return PyBytes_FromStringAndSize((const char *)v->v, (Py_ssize_t)(v->n * sizeof(int64_t)));
}

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer buf;
    Py_ssize_t lo, hi;
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan(data, lo, hi)");
        return NULL;
    }
    lo = PyLong_AsSsize_t(args[1]);
    hi = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (lo < 0 || hi < lo || hi > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "scan: need 0 <= lo <= hi <= len(data)");
        return NULL;
    }
    const char *base = buf.buf, *end = base + hi;
    Vec pieces = {0}, host = {0}, dev = {0}, counters = {0};
    Names names = {.base = base};
    int failed = 0;

    Py_BEGIN_ALLOW_THREADS;
    const char *p = base + lo;
    int64_t piece = 0;
    while (p < end && !failed) {
        const char *next = next_event(p + 1, end);
        Cur c = {p + 1, next, base};
        int64_t kind = 0, *row;
        XEvent e;
        if (next - p > 18 && p[8] == 'X' && (p[18] == 'r' || p[18] == 'd')) {
            int device = p[18] == 'd'; /* ,{"ph":"X","cat":"r... or "d... */
            if (x_event(&c, device, &names, &e)) {
                kind = device ? 2 : 1;
                if ((row = vec_row(device ? &dev : &host, 9))) {
                    int64_t v[9] = {e.region, e.name, e.pid, e.tid, e.ts, e.dur, piece, e.astart, e.aend};
                    memcpy(row, v, sizeof v);
                }
            }
        } else if (next - p > 8 && p[8] == 'C') {
            int64_t pid;
            if (c_event(&c, &pid) && (row = vec_row(&counters, 1))) {
                kind = 3;
                *row = pid;
            }
        }
        if ((row = vec_row(&pieces, 2))) {
            row[0] = p - base;
            row[1] = kind;
        }
        failed = pieces.failed | host.failed | dev.failed | counters.failed | names.failed |
                 names.spans.failed;
        p = next;
        piece++;
    }
    Py_END_ALLOW_THREADS;

    PyObject *out = NULL;
    if (failed)
        PyErr_NoMemory();
    else
        out = Py_BuildValue("(NNNNN)", as_bytes(&pieces), as_bytes(&host), as_bytes(&dev),
                            as_bytes(&counters), as_bytes(&names.spans));
    PyMem_RawFree(pieces.v);
    PyMem_RawFree(host.v);
    PyMem_RawFree(dev.v);
    PyMem_RawFree(counters.v);
    PyMem_RawFree(names.spans.v);
    PyMem_RawFree(names.slots);
    PyMem_RawFree(names.hashes);
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, lo, hi) -> (pieces, host, device, counter_pids, names): the events of "
     "data[lo:hi] on evtrace's layout, as bytes of int64 rows (see evtrace/_scan.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "The Chrome JSON reader's scanner (see evtrace/_scan.c).",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModuleDef_Init(&module); }
