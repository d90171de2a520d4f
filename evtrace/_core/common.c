/* Rows, text buffers and errors: what the hot path, the resolver and the journal all fill. */
#include "core.h"

/* Lock a mutex that a Python-mode resolver may hold while it waits for the GIL. */
void et_lock_gil_free(pthread_mutex_t *mu) {
    if (pthread_mutex_trylock(mu) == 0) return;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(mu);
    Py_END_ALLOW_THREADS
}

void et_add_error(Core *c, const char *msg) {
    pthread_mutex_lock(&et_g.errors);
    if (!c->nerrors || strcmp(c->errors[c->nerrors - 1], msg) != 0) /* a failing pass repeats itself */
        if (c->nerrors < MAX_ERRORS) c->errors[c->nerrors++] = strdup(msg);
    pthread_mutex_unlock(&et_g.errors);
}

/* Append a row and a copy of its args (the caller keeps its own). */
int et_rows_push(Rows *r, const Row *row, const Args *a) {
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

void et_rows_free(Rows *r) {
    free(r->v), free(r->at), free(r->end), free(r->blob);
    memset(r, 0, sizeof *r);
}

/* Append src's rows to dst, with their args (best effort: out of memory, the rest are lost). */
void et_rows_append(Rows *dst, const Rows *src) {
    Py_ssize_t j = 0, from = 0;
    for (Py_ssize_t i = 0; i < src->n; i++) {
        Args a = {NULL, 0};
        if (j < src->nat && src->at[j] == i) a.p = src->blob + from, a.n = src->end[j] - from, from = src->end[j++];
        if (et_rows_push(dst, &src->v[i], &a) < 0) return;
    }
}

int et_reserve(Buf *b, Py_ssize_t more) {
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
int et_buf_take(Buf *b, Args *out) {
    out->n = b->n;
    out->p = NULL;
    if (!b->n) return buf_free(b), 0;
    if (b->p != b->small) return out->p = b->p, 0;
    if (!(out->p = malloc((size_t)b->n))) return -1;
    memcpy(out->p, b->small, (size_t)b->n);
    return 0;
}

/* A native thread of evtrace's, started with every signal blocked: a signal sent to the process
 * must reach a thread that can act on it. Delivered to ours, it would only set Python's flag,
 * and a main thread blocked in sleep() or a read would not wake up for it. */
int et_start_thread(pthread_t *t, void *(*fn)(void *), void *arg, const char *name) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) pthread_setname_np(*t, name); /* as top -H and py-spy show it */
    return rc;
}
