/* The retrieval's compiled parts (optional: sim/model/application/retrieval.py holds their pure-Python twins,
 * Backend, _Job and Retrieval's stage methods, which give the same bits).
 *
 * A retrieval runs stages of parallel hops to FIFO backends, one event per stage: a hop's return time is known
 * when it is submitted (FifoClock), so a stage schedules one callback, for when `need` of its hops are back.
 * Here are the backends' slots (FifoClock), a retrieval's state (Job), the way in through the caches and the
 * embedding, the stage loop and its end (Stages: the base of retrieval.py's CompiledRetrieval, whose Python
 * half keeps the construction, the fresh plans, the metering and the reports) and the embedding service's
 * batches and workers (Batcher).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <structmember.h>

#include "_calls.h"

static PyObject *s_now, *s_value, *s_insert, *s_meter, *s_submit, *s_draw_key, *s_lookup, *s_scoped;
static PyObject *s_fresh_plan, *s_append, *s_popleft;

enum { MISS, HIT, STALE_HIT }; /* caches.py's codes */

/* ---------------------------------------------------------------------------------------------------------
 * FifoClock: Backend.submit, the Kiefer-Wolfowitz step of one FIFO resource with `concurrency` slots (a retrieval
 * backend, a flow's tool; sim/_kernels.c's fifo_slots takes the same step for a whole run): a hop submitted now
 * starts when the earliest slot frees (not before now) and holds it for a latency drawn as it is submitted; its
 * return time is known at once. The slots' free times are a heap kept exactly as heapq.heapreplace keeps it (the
 * same layout, so the Python reports that sum over it add in the same order).
 */
typedef struct {
    PyObject_HEAD
    double *free;        /* heap: when each slot is free */
    Py_ssize_t slots;
    PyObject *latency;   /* latency() -> the next hop's latency */
    Py_ssize_t hops;
    double wait_sum, busy;
} FifoClockObject;

/* heapq's _siftup then _siftdown, for heapreplace at the root */
static void replace_root(double *heap, Py_ssize_t n, double item) {
    Py_ssize_t pos = 0, child = 1;
    while (child < n) {
        if (child + 1 < n && !(heap[child] < heap[child + 1])) child++;
        heap[pos] = heap[child];
        pos = child, child = 2 * pos + 1;
    }
    while (pos > 0) {
        Py_ssize_t parent = (pos - 1) >> 1;
        if (!(item < heap[parent])) break;
        heap[pos] = heap[parent];
        pos = parent;
    }
    heap[pos] = item;
}

static int clock_init(FifoClockObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"free_at", "concurrency", "latency", NULL};
    double free_at;
    Py_ssize_t slots;
    PyObject *latency;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "dnO", names, &free_at, &slots, &latency)) return -1;
    if (slots < 1) {
        PyErr_SetString(PyExc_ValueError, "a FIFO clock needs at least one slot");
        return -1;
    }
    double *heap = PyMem_Realloc(self->free, (size_t)slots * sizeof(double));
    if (heap == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < slots; k++) heap[k] = free_at;
    self->free = heap, self->slots = slots;
    Py_INCREF(latency);
    Py_XSETREF(self->latency, latency);
    self->hops = 0, self->wait_sum = self->busy = 0.0;
    return 0;
}

static int clock_traverse(FifoClockObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->latency);
    return 0;
}

static int clock_clear(FifoClockObject *self) {
    Py_CLEAR(self->latency);
    return 0;
}

static void clock_dealloc(FifoClockObject *self) {
    PyObject_GC_UnTrack(self);
    clock_clear(self);
    PyMem_Free(self->free);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Backend.submit: *end is when a hop submitted now returns; -1 with an exception set */
static int hop_end(FifoClockObject *self, double now, double *end) {
    PyObject *drawn = PyObject_CallNoArgs(self->latency);
    if (drawn == NULL) return -1;
    double latency = PyFloat_AsDouble(drawn);
    Py_DECREF(drawn);
    if (latency == -1.0 && PyErr_Occurred()) return -1;
    double start = self->free[0] > now ? self->free[0] : now;
    *end = start + latency;
    replace_root(self->free, self->slots, *end);
    self->hops += 1;
    self->wait_sum += start - now;
    self->busy += latency;
    return 0;
}

static PyObject *clock_submit(FifoClockObject *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg), end;
    if ((now == -1.0 && PyErr_Occurred()) || hop_end(self, now, &end) < 0) return NULL;
    return PyFloat_FromDouble(end);
}

/* The heap as a list, in its layout order */
static PyObject *clock_free(FifoClockObject *self, void *closure) {
    PyObject *out = PyList_New(self->slots);
    for (Py_ssize_t k = 0; out != NULL && k < self->slots; k++) {
        PyObject *t = PyFloat_FromDouble(self->free[k]);
        if (t == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, k, t);
    }
    return out;
}

static PyMethodDef clock_methods[] = {
    {"submit", (PyCFunction)clock_submit, METH_O, "submit(now) -> when the hop submitted now returns"},
    {NULL},
};

static PyMemberDef clock_members[] = {
    {"hops", T_PYSSIZET, offsetof(FifoClockObject, hops), 0, "hops submitted since the last reset"},
    {"wait_sum", T_DOUBLE, offsetof(FifoClockObject, wait_sum), 0, "their waits for a slot, summed"},
    {"_busy", T_DOUBLE, offsetof(FifoClockObject, busy), 0, "their latencies, summed"},
    {NULL},
};

static PyGetSetDef clock_getset[] = {
    {"_free", (getter)clock_free, NULL, "when each slot is free (a copy of the heap, in its order)", NULL},
    {NULL},
};

static PyTypeObject FifoClockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._retrieval.FifoClock",
    .tp_doc = "FifoClock(free_at, concurrency, latency): a FIFO resource's slots (Backend in retrieval.py)",
    .tp_basicsize = sizeof(FifoClockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)clock_init,
    .tp_traverse = (traverseproc)clock_traverse,
    .tp_clear = (inquiry)clock_clear,
    .tp_dealloc = (destructor)clock_dealloc,
    .tp_methods = clock_methods,
    .tp_members = clock_members,
    .tp_getset = clock_getset,
};


/* ---------------------------------------------------------------------------------------------------------
 * Job: retrieval.py's _Job, one retrieval in flight (carried by the callbacks).
 */
#define NOT_LOOKED_UP -1 /* retrieval.py's NOT_LOOKED_UP: a cache code of a request that never reached the cache */

typedef struct {
    PyObject_HEAD
    Py_ssize_t i, stage;
    PyObject *done, *plan, *stage_s; /* done(i); the stages ((backends, need), ...); each stage's seconds */
    double start, stage_start, emb_join, emb_wait, emb_s;
    int rcode, ecode;
    long long rkey, ekey;
    char escalation;
} JobObject;

/* _Job(i, done, plan, now, escalation): its fields as a new job has them; -1 with an exception set */
static int job_start(JobObject *job, Py_ssize_t i, PyObject *done, PyObject *plan, double now, int escalation) {
    PyObject *stage_s = PyTuple_New(0);
    if (stage_s == NULL) return -1;
    Py_XSETREF(job->done, Py_NewRef(done));
    Py_XSETREF(job->plan, Py_NewRef(plan));
    Py_XSETREF(job->stage_s, stage_s);
    job->i = i, job->start = now, job->escalation = (char)escalation;
    job->stage = 0;
    job->stage_start = job->emb_join = 0.0;
    job->emb_wait = job->emb_s = NAN;
    job->rcode = job->ecode = NOT_LOOKED_UP;
    job->rkey = job->ekey = -1;
    return 0;
}

static int job_init(JobObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"i", "done", "plan", "now", "escalation", NULL};
    Py_ssize_t i;
    PyObject *done, *plan;
    double now;
    int escalation;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOOdp", names, &i, &done, &plan, &now, &escalation)) return -1;
    return job_start(self, i, done, plan, now, escalation);
}

static int job_traverse(JobObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->done);
    Py_VISIT(self->plan);
    Py_VISIT(self->stage_s);
    return 0;
}

static int job_clear(JobObject *self) {
    Py_CLEAR(self->done);
    Py_CLEAR(self->plan);
    Py_CLEAR(self->stage_s);
    return 0;
}

static void job_dealloc(JobObject *self) {
    PyObject_GC_UnTrack(self);
    job_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef job_members[] = {
    {"i", T_PYSSIZET, offsetof(JobObject, i), READONLY, "the request"},
    {"done", T_OBJECT_EX, offsetof(JobObject, done), READONLY, "done(i), called once the retrieval is complete"},
    {"plan", T_OBJECT_EX, offsetof(JobObject, plan), 0, "the stages to run: ((backends, need), ...)"},
    {"start", T_DOUBLE, offsetof(JobObject, start), 0, "when the retrieval started"},
    {"stage", T_PYSSIZET, offsetof(JobObject, stage), 0, "the stage running (or next)"},
    {"stage_start", T_DOUBLE, offsetof(JobObject, stage_start), 0, "when that stage started"},
    {"stage_s", T_OBJECT_EX, offsetof(JobObject, stage_s), 0, "the seconds of each stage run, a tuple"},
    {"emb_join", T_DOUBLE, offsetof(JobObject, emb_join), 0, "when the query joined an embedding batch"},
    {"emb_wait", T_DOUBLE, offsetof(JobObject, emb_wait), 0, "its wait for the batch to start (nan: not embedded)"},
    {"emb_s", T_DOUBLE, offsetof(JobObject, emb_s), 0, "the batch's service time (nan: not embedded)"},
    {"rcode", T_INT, offsetof(JobObject, rcode), 0, "the retrieval cache's code"},
    {"ecode", T_INT, offsetof(JobObject, ecode), 0, "the embedding cache's code"},
    {"rkey", T_LONGLONG, offsetof(JobObject, rkey), 0, "the retrieval-cache key to insert at the end (-1: none)"},
    {"ekey", T_LONGLONG, offsetof(JobObject, ekey), 0, "the embedding-cache key to insert once embedded (-1: none)"},
    {"escalation", T_BOOL, offsetof(JobObject, escalation), READONLY, "whether it is an escalation's"},
    {NULL},
};

static PyTypeObject JobType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._retrieval.Job",
    .tp_doc = "Job(i, done, plan, now, escalation): one retrieval in flight (_Job in retrieval.py)",
    .tp_basicsize = sizeof(JobObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)job_init,
    .tp_traverse = (traverseproc)job_traverse,
    .tp_clear = (inquiry)job_clear,
    .tp_dealloc = (destructor)job_dealloc,
    .tp_members = job_members,
};

/* ---------------------------------------------------------------------------------------------------------
 * Stages: Retrieval's way in (run, retrieve_more, the caches' lookups, _embed, _embedded), _start_stage,
 * _stage_done and _finish. The Python half (CompiledRetrieval) sets the fields below as Retrieval.__init__
 * does, then `_bind(call_later)`.
 */
enum {
    B_STAGE_DONE, B_ANSWERED_FROM_CACHE, B_AFTER_CACHE_MISS, B_AFTER_EMBEDDING_HIT, B_AFTER_EMBEDDING_MISS, N_BOUND
};
static const char *STAGES_BOUND[N_BOUND] = {"_stage_done", "_answered_from_cache", "_after_cache_miss",
                                           "_after_embedding_hit", "_after_embedding_miss"};

typedef struct {
    PyObject_HEAD
    PyObject *env, *cache, *records, *last; /* cache: the retrieval cache or None; records: a list or None */
    PyObject *embedding, *embedding_cache;  /* the embedding service (a Batcher) or None; its cache or None */
    PyObject *hit_s, *miss_s, *ehit_s, *emiss_s; /* the caches' latency samplers (those of absent caches unset) */
    PyObject *plan, *escalation_plan, *fresh; /* the default plans; the backends never cached (a frozenset) */
    PyObject *call_later, *bound[N_BOUND];  /* the event core's call_later; self's callbacks */
    Py_ssize_t started, completed;
    char metered, shared_key;
} StagesObject;

#define STAGES_FIELDS(X)                                                                                    \
    X(env) X(cache) X(records) X(last) X(embedding) X(embedding_cache) X(hit_s) X(miss_s) X(ehit_s) X(emiss_s) \
    X(plan) X(escalation_plan) X(fresh) X(call_later)

static int stages_traverse(StagesObject *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    STAGES_FIELDS(VISIT)
#undef VISIT
    for (int k = 0; k < N_BOUND; k++) Py_VISIT(self->bound[k]);
    return 0;
}

static int stages_clear(StagesObject *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    STAGES_FIELDS(CLEAR)
#undef CLEAR
    for (int k = 0; k < N_BOUND; k++) Py_CLEAR(self->bound[k]);
    return 0;
}

static void stages_dealloc(StagesObject *self) {
    PyObject_GC_UnTrack(self);
    stages_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *stages_bind(StagesObject *self, PyObject *call_later) {
    for (int k = 0; k < N_BOUND; k++) {
        PyObject *bound = PyObject_GetAttrString((PyObject *)self, STAGES_BOUND[k]);
        if (bound == NULL) return NULL;
        Py_XSETREF(self->bound[k], bound);
    }
    Py_INCREF(call_later);
    Py_XSETREF(self->call_later, call_later);
    Py_RETURN_NONE;
}

/* the clock; -1 with an exception set */
static int now_of(StagesObject *self, double *now) {
    if (self->env == NULL || self->call_later == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the retrieval's stages are not bound (_bind)");
        return -1;
    }
    return clock_now(self->env, s_now, now);
}

static int later(StagesObject *self, double delay, int bound, JobObject *job) {
    return schedule(self->call_later, self->env, delay, self->bound[bound], (PyObject *)job);
}

/* tuple + (x,); steals nothing, NULL with an exception set */
static PyObject *appended(PyObject *tuple, double x) {
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    PyObject *out = PyTuple_New(n + 1), *value = PyFloat_FromDouble(x);
    if (out == NULL || value == NULL) {
        Py_XDECREF(out), Py_XDECREF(value);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, k);
        Py_INCREF(item);
        PyTuple_SET_ITEM(out, k, item);
    }
    PyTuple_SET_ITEM(out, n, value);
    return out;
}

/* A hop to backend b (a compiled backend: build_backend makes one where this module is built) submitted at now:
 * *end, when it returns; -1 with an exception set */
static int submit_hop(PyObject *b, double now, double *end) {
    if (!PyObject_TypeCheck(b, &FifoClockType)) {
        PyErr_Format(PyExc_TypeError, "a retrieval backend (sim._retrieval.FifoClock) expected, got %s",
                     Py_TYPE(b)->tp_name);
        return -1;
    }
    return hop_end((FifoClockObject *)b, now, end);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The stage's (backends, need), its backends a tuple; NULL with an exception set */
static PyObject *stage_of(JobObject *job, Py_ssize_t *need) {
    if (!PyTuple_Check(job->plan) || job->stage >= PyTuple_GET_SIZE(job->plan)) {
        PyErr_SetString(PyExc_IndexError, "a retrieval plan is a tuple of stages, and this stage is past its end");
        return NULL;
    }
    PyObject *stage = PyTuple_GET_ITEM(job->plan, job->stage);
    if (!PyTuple_Check(stage) || PyTuple_GET_SIZE(stage) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(stage, 0))) {
        PyErr_SetString(PyExc_TypeError, "a retrieval stage is a (backends tuple, need) pair");
        return NULL;
    }
    *need = PyLong_AsSsize_t(PyTuple_GET_ITEM(stage, 1));
    if (*need == -1 && PyErr_Occurred()) return NULL;
    return PyTuple_GET_ITEM(stage, 0);
}

/* Retrieval._start_stage: submit the stage's hops at once; it is done when `need` of them have returned */
static int start_stage(StagesObject *self, JobObject *job) {
    double now;
    if (now_of(self, &now) < 0) return -1;
    job->stage_start = now;
    Py_ssize_t need;
    PyObject *backends = stage_of(job, &need);
    if (backends == NULL) return -1;
    while (PyTuple_GET_SIZE(backends) == 0) { /* a fresh plan's stage with nothing fresh: from the cache, in no time */
        PyObject *s = appended(job->stage_s, 0.0);
        if (s == NULL) return -1;
        Py_SETREF(job->stage_s, s);
        job->stage += 1;
        if ((backends = stage_of(job, &need)) == NULL) return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(backends);
    double done = now;
    if (need == n) { /* wait for all: the last return */
        for (Py_ssize_t k = 0; k < n; k++) {
            double back;
            if (submit_hop(PyTuple_GET_ITEM(backends, k), now, &back) < 0) return -1;
            if (back > done) done = back;
        }
    } else { /* first_k: the k-th return; the hops left over run on, holding their slots */
        if (need < 1 || need > n) {
            PyErr_SetString(PyExc_ValueError, "a stage waits for between 1 and all of its hops");
            return -1;
        }
        double *back = PyMem_Malloc((size_t)n * sizeof(double));
        if (back == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t k = 0; k < n; k++) {
            if (submit_hop(PyTuple_GET_ITEM(backends, k), now, &back[k]) < 0) {
                PyMem_Free(back);
                return -1;
            }
        }
        qsort(back, (size_t)n, sizeof(double), by_value);
        done = back[need - 1];
        PyMem_Free(back);
    }
    return later(self, done - now, B_STAGE_DONE, job);
}

/* Retrieval._finish: the retrieval cache learns the answer, the row, done(i) */
static int finish(StagesObject *self, JobObject *job) {
    double t;
    if (now_of(self, &t) < 0) return -1;
    PyObject *now = PyFloat_FromDouble(t), *i = PyLong_FromSsize_t(job->i), *key = NULL, *last = NULL;
    int status = -1;
    if (now == NULL || i == NULL) goto done;
    if (job->rkey >= 0 && ((key = PyLong_FromLongLong(job->rkey)) == NULL ||
                           done_with(method(self->cache, s_insert, 3, key, now, i)) < 0))
        goto done;
    self->completed += 1;
    last = Py_BuildValue("(OdOddiiOO)", i, job->start, now, job->emb_wait, job->emb_s, job->rcode, job->ecode,
                         job->stage_s, job->escalation ? Py_True : Py_False);
    if (last == NULL) goto done;
    Py_XSETREF(self->last, Py_NewRef(last));
    if (is_set(self->records) && PyList_Append(self->records, last) < 0) goto done;
    if (self->metered && done_with(method((PyObject *)self, s_meter, 1, (PyObject *)job)) < 0) goto done;
    status = done_with(PyObject_CallOneArg(job->done, i));
done:
    Py_XDECREF(now), Py_XDECREF(i), Py_XDECREF(key), Py_XDECREF(last);
    return status;
}

static JobObject *job_arg(PyObject *job) {
    if (!PyObject_TypeCheck(job, &JobType)) {
        PyErr_Format(PyExc_TypeError, "a retrieval job (sim._retrieval.Job) expected, got %s", Py_TYPE(job)->tp_name);
        return NULL;
    }
    return (JobObject *)job;
}

static PyObject *stages_start_stage(StagesObject *self, PyObject *job) {
    JobObject *j = job_arg(job);
    if (j == NULL || start_stage(self, j) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *stages_finish(StagesObject *self, PyObject *job) {
    JobObject *j = job_arg(job);
    if (j == NULL || finish(self, j) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Retrieval._stage_done: the stage's `need` hops are back */
static PyObject *stages_stage_done(StagesObject *self, PyObject *event) {
    PyObject *value = PyObject_GetAttr(event, s_value), *s = NULL;
    if (value == NULL) return NULL;
    JobObject *job = job_arg(value);
    double now;
    int status = -1;
    if (job != NULL && now_of(self, &now) == 0 && (s = appended(job->stage_s, now - job->stage_start)) != NULL) {
        Py_SETREF(job->stage_s, s);
        job->stage += 1;
        status = job->stage < PyTuple_GET_SIZE(job->plan) ? start_stage(self, job) : finish(self, job);
    }
    Py_DECREF(value);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---- the way in: caches and embedding ---- */

/* A new job: Job(i, done, plan, now, escalation) */
static JobObject *new_job(StagesObject *self, PyObject *i, PyObject *done, PyObject *plan, int escalation) {
    double now;
    Py_ssize_t index = PyLong_AsSsize_t(i);
    if ((index == -1 && PyErr_Occurred()) || now_of(self, &now) < 0) return NULL;
    JobObject *job = PyObject_GC_New(JobObject, &JobType);
    if (job == NULL) return NULL;
    job->done = job->plan = job->stage_s = NULL;
    PyObject_GC_Track(job);
    if (job_start(job, index, done, plan, now, escalation) < 0) Py_CLEAR(job);
    return job;
}

/* embedding.submit(job) */
static int to_embedding(StagesObject *self, JobObject *job) {
    return done_with(method(self->embedding, s_submit, 1, (PyObject *)job));
}

/* Retrieval._embed: the embedding cache, else the embedding service (none: straight to the stages) */
static int embed(StagesObject *self, JobObject *job) {
    if (!is_set(self->embedding)) return start_stage(self, job);
    if (is_set(self->embedding_cache)) {
        double now;
        PyObject *i = PyLong_FromSsize_t(job->i), *key = NULL, *code = NULL, *now_obj = NULL;
        int status = -1;
        if (i == NULL || now_of(self, &now) < 0 || (now_obj = PyFloat_FromDouble(now)) == NULL)
            goto done;
        if (self->shared_key) {
            PyObject *rkey = PyLong_FromLongLong(job->rkey);
            key = rkey != NULL ? method(self->embedding_cache, s_scoped, 2, rkey, i) : NULL;
            Py_XDECREF(rkey);
        } else
            key = method(self->embedding_cache, s_draw_key, 1, i);
        if (key == NULL || (code = method(self->embedding_cache, s_lookup, 3, key, now_obj, i)) == NULL) goto done;
        long c = PyLong_AsLong(code);
        long long k = PyLong_AsLongLong(key);
        if (PyErr_Occurred()) goto done;
        job->ecode = (int)c;
        /* An in-process cache answers at once (latency 0): the request goes on without an event. */
        if (c == HIT || c == STALE_HIT) {
            double wait = draw(self->ehit_s);
            if (wait == -1.0 && PyErr_Occurred()) goto done;
            status = wait > 0 ? later(self, wait, B_AFTER_EMBEDDING_HIT, job) : start_stage(self, job);
            goto done;
        }
        job->ekey = k;
        double wait = draw(self->emiss_s);
        if (wait == -1.0 && PyErr_Occurred()) goto done;
        status = wait > 0 ? later(self, wait, B_AFTER_EMBEDDING_MISS, job) : to_embedding(self, job);
    done:
        Py_XDECREF(i), Py_XDECREF(key), Py_XDECREF(code), Py_XDECREF(now_obj);
        return status;
    }
    return to_embedding(self, job);
}

/* Retrieval.run(i, done, plan=None) */
static PyObject *stages_run(StagesObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) return PyErr_Format(PyExc_TypeError, "run(i, done, plan=None)");
    PyObject *plan = nargs == 3 && args[2] != Py_None ? args[2] : self->plan;
    JobObject *job = new_job(self, args[0], args[1], plan, 0);
    if (job == NULL) return NULL;
    self->started += 1;
    int status = -1;
    PyObject *key = NULL, *code = NULL;
    if (is_set(self->cache)) {
        PyObject *start = PyFloat_FromDouble(job->start);
        if (start != NULL && (key = method(self->cache, s_draw_key, 1, args[0])) != NULL)
            code = method(self->cache, s_lookup, 3, key, start, args[0]);
        Py_XDECREF(start);
        if (code == NULL) goto done;
        long c = PyLong_AsLong(code);
        long long k = PyLong_AsLongLong(key);
        if (PyErr_Occurred()) goto done;
        job->rcode = (int)c;
        if (c == HIT || c == STALE_HIT) {
            int fresh = PyObject_IsTrue(self->fresh);
            if (fresh < 0) goto done;
            if (fresh) { /* the cached context comes back, the live data is fetched anew */
                PyObject *kept = method((PyObject *)self, s_fresh_plan, 1, job->plan);
                if (kept == NULL) goto done;
                Py_SETREF(job->plan, kept);
            }
            double wait = draw(self->hit_s);
            if (!(wait == -1.0 && PyErr_Occurred())) status = later(self, wait, B_ANSWERED_FROM_CACHE, job);
            goto done;
        }
        job->rkey = k;
        double wait = draw(self->miss_s);
        if (!(wait == -1.0 && PyErr_Occurred())) status = later(self, wait, B_AFTER_CACHE_MISS, job);
        goto done;
    }
    status = embed(self, job);
done:
    Py_XDECREF(key), Py_XDECREF(code);
    Py_DECREF(job);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

/* Retrieval.retrieve_more(i, done, plan=None): the escalation stages only (the query is embedded already) */
static PyObject *stages_retrieve_more(StagesObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) return PyErr_Format(PyExc_TypeError, "retrieve_more(i, done, plan=None)");
    PyObject *plan = nargs == 3 && args[2] != Py_None ? args[2] : self->escalation_plan;
    JobObject *job = new_job(self, args[0], args[1], plan, 1);
    if (job == NULL) return NULL;
    self->started += 1;
    int status = start_stage(self, job);
    Py_DECREF(job);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

/* The callbacks after a wait: event.value is the job */
static PyObject *after(StagesObject *self, PyObject *event, int which) {
    PyObject *value = PyObject_GetAttr(event, s_value);
    if (value == NULL) return NULL;
    JobObject *job = job_arg(value);
    int status = -1;
    if (job != NULL) {
        if (which == B_ANSWERED_FROM_CACHE) {
            int fresh = PyObject_IsTrue(job->plan) > 0 ? PyObject_IsTrue(self->fresh) : 0;
            status = fresh < 0 ? -1 : fresh ? start_stage(self, job) : finish(self, job);
        } else if (which == B_AFTER_CACHE_MISS)
            status = embed(self, job);
        else if (which == B_AFTER_EMBEDDING_HIT)
            status = start_stage(self, job);
        else
            status = to_embedding(self, job);
    }
    Py_DECREF(value);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *stages_answered_from_cache(StagesObject *self, PyObject *e) {
    return after(self, e, B_ANSWERED_FROM_CACHE);
}
static PyObject *stages_after_cache_miss(StagesObject *self, PyObject *e) { return after(self, e, B_AFTER_CACHE_MISS); }
static PyObject *stages_after_embedding_hit(StagesObject *self, PyObject *e) {
    return after(self, e, B_AFTER_EMBEDDING_HIT);
}
static PyObject *stages_after_embedding_miss(StagesObject *self, PyObject *e) {
    return after(self, e, B_AFTER_EMBEDDING_MISS);
}

static PyObject *stages_embed(StagesObject *self, PyObject *arg) {
    JobObject *job = job_arg(arg);
    if (job == NULL || embed(self, job) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Retrieval._embedded: the batch is served; the embedding cache learns the query's vector */
static PyObject *stages_embedded(StagesObject *self, PyObject *arg) {
    JobObject *job = job_arg(arg);
    if (job == NULL) return NULL;
    if (job->ekey >= 0) {
        double now;
        if (now_of(self, &now) < 0) return NULL;
        PyObject *key = PyLong_FromLongLong(job->ekey), *t = PyFloat_FromDouble(now), *i = PyLong_FromSsize_t(job->i);
        int failed = key == NULL || t == NULL || i == NULL ||
                     done_with(method(self->embedding_cache, s_insert, 3, key, t, i)) < 0;
        Py_XDECREF(key), Py_XDECREF(t), Py_XDECREF(i);
        if (failed) return NULL;
    }
    if (start_stage(self, job) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef stages_methods[] = {
    {"_bind", (PyCFunction)stages_bind, METH_O, "_bind(call_later): ready to run (after the fields are set)"},
    {"run", (PyCFunction)(void (*)(void))stages_run, METH_FASTCALL, "Retrieval.run"},
    {"retrieve_more", (PyCFunction)(void (*)(void))stages_retrieve_more, METH_FASTCALL, "Retrieval.retrieve_more"},
    {"_answered_from_cache", (PyCFunction)stages_answered_from_cache, METH_O, "Retrieval._answered_from_cache"},
    {"_after_cache_miss", (PyCFunction)stages_after_cache_miss, METH_O, "Retrieval._after_cache_miss"},
    {"_embed", (PyCFunction)stages_embed, METH_O, "Retrieval._embed"},
    {"_after_embedding_hit", (PyCFunction)stages_after_embedding_hit, METH_O, "Retrieval._after_embedding_hit"},
    {"_after_embedding_miss", (PyCFunction)stages_after_embedding_miss, METH_O, "Retrieval._after_embedding_miss"},
    {"_embedded", (PyCFunction)stages_embedded, METH_O, "Retrieval._embedded"},
    {"_start_stage", (PyCFunction)stages_start_stage, METH_O, "Retrieval._start_stage"},
    {"_stage_done", (PyCFunction)stages_stage_done, METH_O, "Retrieval._stage_done"},
    {"_finish", (PyCFunction)stages_finish, METH_O, "Retrieval._finish"},
    {NULL},
};

static PyMemberDef stages_members[] = {
    {"env", T_OBJECT_EX, offsetof(StagesObject, env), 0, "the simulation environment"},
    {"cache", T_OBJECT_EX, offsetof(StagesObject, cache), 0, "the retrieval cache, or None"},
    {"records", T_OBJECT_EX, offsetof(StagesObject, records), 0, "every finished retrieval's row, or None"},
    {"last", T_OBJECT_EX, offsetof(StagesObject, last), 0, "the row of the retrieval finished last"},
    {"embedding", T_OBJECT_EX, offsetof(StagesObject, embedding), 0, "the embedding service, or None"},
    {"embedding_cache", T_OBJECT_EX, offsetof(StagesObject, embedding_cache), 0, "its cache, or None"},
    {"_hit_s", T_OBJECT_EX, offsetof(StagesObject, hit_s), 0, "retrieval-cache hit latencies"},
    {"_miss_s", T_OBJECT_EX, offsetof(StagesObject, miss_s), 0, "retrieval-cache miss latencies"},
    {"_ehit_s", T_OBJECT_EX, offsetof(StagesObject, ehit_s), 0, "embedding-cache hit latencies"},
    {"_emiss_s", T_OBJECT_EX, offsetof(StagesObject, emiss_s), 0, "embedding-cache miss latencies"},
    {"plan", T_OBJECT_EX, offsetof(StagesObject, plan), 0, "the stages a retrieval runs"},
    {"escalation_plan", T_OBJECT_EX, offsetof(StagesObject, escalation_plan), 0, "the stages an escalation runs"},
    {"_fresh", T_OBJECT_EX, offsetof(StagesObject, fresh), 0, "the backends whose output is never cached"},
    {"started", T_PYSSIZET, offsetof(StagesObject, started), 0, "retrievals started (and not reset)"},
    {"completed", T_PYSSIZET, offsetof(StagesObject, completed), 0, "retrievals finished since the last reset"},
    {"metered", T_BOOL, offsetof(StagesObject, metered), 0, "whether each retrieval's usage is metered"},
    {"_shared_key", T_BOOL, offsetof(StagesObject, shared_key), 0, "both caches ask for the query's one key"},
    {NULL},
};

static PyTypeObject StagesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._retrieval.Stages",
    .tp_doc = "The stage loop of a retrieval (the base of CompiledRetrieval in retrieval.py)",
    .tp_basicsize = sizeof(StagesObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    /* tp_new: object's (set at import), which gives a Python subclass's attributes their inline layout
     * (PyType_GenericNew leaves them in a dict that each attribute read searches: 3x slower reads) */
    .tp_traverse = (traverseproc)stages_traverse,
    .tp_clear = (inquiry)stages_clear,
    .tp_dealloc = (destructor)stages_dealloc,
    .tp_methods = stages_methods,
    .tp_members = stages_members,
};

/* ---------------------------------------------------------------------------------------------------------
 * Batcher: EmbeddingService's submit, _timeout, _send, _start and _finish (the base of retrieval.py's
 * CompiledEmbedding, whose Python half keeps the construction and the reports). A batch is a list of jobs.
 */
typedef struct {
    PyObject_HEAD
    PyObject *env, *time, *on_done, *open, *waiting; /* open: the batch taking queries, or None; waiting: a deque */
    PyObject *call_later, *timeout_cb, *finish_cb;
    Py_ssize_t max_batch, workers, busy, batches, queries;
    double max_wait, per_query, area, last, since;
} BatcherObject;

#define BATCHER_FIELDS(X) X(env) X(time) X(on_done) X(open) X(waiting) X(call_later) X(timeout_cb) X(finish_cb)

static int batcher_traverse(BatcherObject *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    BATCHER_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int batcher_clear(BatcherObject *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    BATCHER_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void batcher_dealloc(BatcherObject *self) {
    PyObject_GC_UnTrack(self);
    batcher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *batcher_bind(BatcherObject *self, PyObject *call_later) {
    PyObject *timeout = PyObject_GetAttrString((PyObject *)self, "_timeout");
    PyObject *finish_cb = timeout != NULL ? PyObject_GetAttrString((PyObject *)self, "_finish") : NULL;
    if (finish_cb == NULL) {
        Py_XDECREF(timeout);
        return NULL;
    }
    Py_XSETREF(self->timeout_cb, timeout);
    Py_XSETREF(self->finish_cb, finish_cb);
    Py_XSETREF(self->call_later, Py_NewRef(call_later));
    Py_RETURN_NONE;
}

/* EmbeddingService._start: a worker serves the batch now */
static int batch_start(BatcherObject *self, PyObject *batch) {
    double now;
    if (self->call_later == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the embedding service is not bound (_bind)");
        return -1;
    }
    if (clock_now(self->env, s_now, &now) < 0 || !PyList_Check(batch)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "an embedding batch is a list of jobs");
        return -1;
    }
    self->area += (double)self->busy * (now - self->last); /* _account(now) */
    self->last = now;
    self->busy += 1;
    self->batches += 1;
    Py_ssize_t n = PyList_GET_SIZE(batch);
    self->queries += n;
    double service = draw(self->time);
    if (service == -1.0 && PyErr_Occurred()) return -1;
    service = service + self->per_query * (double)n;
    for (Py_ssize_t k = 0; k < n; k++) {
        JobObject *job = job_arg(PyList_GET_ITEM(batch, k));
        if (job == NULL) return -1;
        job->emb_wait = now - job->emb_join;
        job->emb_s = service;
    }
    return schedule(self->call_later, self->env, service, self->finish_cb, batch);
}

/* EmbeddingService._send: to a free worker, else to the waiting line */
static int batch_send(BatcherObject *self, PyObject *batch) {
    if (self->busy < self->workers) return batch_start(self, batch);
    return done_with(method(self->waiting, s_append, 1, batch));
}

/* EmbeddingService.submit(job): join the open batch (opening one if none) */
static PyObject *batcher_submit(BatcherObject *self, PyObject *arg) {
    JobObject *job = job_arg(arg);
    double now;
    if (job == NULL || clock_now(self->env, s_now, &now) < 0) return NULL;
    job->emb_join = now;
    int status;
    if (!is_set(self->open)) {
        PyObject *batch = PyList_New(1);
        if (batch == NULL) return NULL;
        PyList_SET_ITEM(batch, 0, Py_NewRef(arg));
        if (self->max_batch == 1)
            status = batch_send(self, batch);
        else {
            Py_XSETREF(self->open, Py_NewRef(batch));
            status = schedule(self->call_later, self->env, self->max_wait, self->timeout_cb, batch);
        }
        Py_DECREF(batch);
    } else {
        PyObject *batch = Py_NewRef(self->open);
        status = PyList_Append(batch, arg);
        if (status == 0 && PyList_GET_SIZE(batch) >= self->max_batch) {
            Py_XSETREF(self->open, Py_NewRef(Py_None)); /* its timer finds it no longer open and does nothing */
            status = batch_send(self, batch);
        }
        Py_DECREF(batch);
    }
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

/* EmbeddingService._timeout: the batch's first query has waited max_wait */
static PyObject *batcher_timeout(BatcherObject *self, PyObject *event) {
    PyObject *batch = PyObject_GetAttr(event, s_value);
    if (batch == NULL) return NULL;
    int status = 0;
    if (batch == self->open) {
        Py_XSETREF(self->open, Py_NewRef(Py_None));
        status = batch_send(self, batch);
    }
    Py_DECREF(batch);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

/* EmbeddingService._finish: the batch is served; the next waiting one starts; each query goes on */
static PyObject *batcher_finish(BatcherObject *self, PyObject *event) {
    double now;
    if (clock_now(self->env, s_now, &now) < 0) return NULL;
    self->area += (double)self->busy * (now - self->last); /* _account(now) */
    self->last = now;
    self->busy -= 1;
    int waiting = PyObject_IsTrue(self->waiting);
    if (waiting < 0) return NULL;
    if (waiting) {
        PyObject *next = method(self->waiting, s_popleft, 0);
        int failed = next == NULL || batch_start(self, next) < 0;
        Py_XDECREF(next);
        if (failed) return NULL;
    }
    PyObject *batch = PyObject_GetAttr(event, s_value);
    if (batch == NULL) return NULL;
    if (!PyList_Check(batch)) {
        Py_DECREF(batch);
        PyErr_SetString(PyExc_TypeError, "an embedding batch is a list of jobs");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(batch); k++)
        if (done_with(PyObject_CallOneArg(self->on_done, PyList_GET_ITEM(batch, k))) < 0) {
            Py_DECREF(batch);
            return NULL;
        }
    Py_DECREF(batch);
    Py_RETURN_NONE;
}

static PyMethodDef batcher_methods[] = {
    {"_bind", (PyCFunction)batcher_bind, METH_O, "_bind(call_later): ready to run (after the fields are set)"},
    {"submit", (PyCFunction)batcher_submit, METH_O, "EmbeddingService.submit"},
    {"_timeout", (PyCFunction)batcher_timeout, METH_O, "EmbeddingService._timeout"},
    {"_finish", (PyCFunction)batcher_finish, METH_O, "EmbeddingService._finish"},
    {NULL},
};

#define BO(name, field) {name, T_OBJECT_EX, offsetof(BatcherObject, field), 0, NULL}
#define BN(name, type, field) {name, type, offsetof(BatcherObject, field), 0, NULL}
static PyMemberDef batcher_members[] = {
    BO("env", env), BO("_time", time), BO("_on_done", on_done), BO("_open", open), BO("_waiting", waiting),
    BN("max_batch", T_PYSSIZET, max_batch), BN("workers", T_PYSSIZET, workers), BN("busy", T_PYSSIZET, busy),
    BN("batches", T_PYSSIZET, batches), BN("queries", T_PYSSIZET, queries), BN("max_wait", T_DOUBLE, max_wait),
    BN("per_query", T_DOUBLE, per_query), BN("_area", T_DOUBLE, area), BN("_last", T_DOUBLE, last),
    BN("_since", T_DOUBLE, since),
    {NULL},
};

static PyTypeObject BatcherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._retrieval.Batcher",
    .tp_doc = "An embedding service's batching and workers (the base of CompiledEmbedding in retrieval.py)",
    .tp_basicsize = sizeof(BatcherObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)batcher_traverse,
    .tp_clear = (inquiry)batcher_clear,
    .tp_dealloc = (destructor)batcher_dealloc,
    .tp_methods = batcher_methods,
    .tp_members = batcher_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_retrieval", "llmsim's retrieval stages, compiled.", -1,
                                    NULL};

PyMODINIT_FUNC PyInit__retrieval(void) {
    StagesType.tp_new = BatcherType.tp_new = PyBaseObject_Type.tp_new;
    if (PyType_Ready(&FifoClockType) < 0 || PyType_Ready(&JobType) < 0 || PyType_Ready(&StagesType) < 0 ||
        PyType_Ready(&BatcherType) < 0)
        return NULL;
    if (!(s_now = PyUnicode_InternFromString("_now")) || !(s_value = PyUnicode_InternFromString("value")) ||
        !(s_insert = PyUnicode_InternFromString("insert")) || !(s_meter = PyUnicode_InternFromString("_meter")) ||
        !(s_submit = PyUnicode_InternFromString("submit")) || !(s_draw_key = PyUnicode_InternFromString("draw_key")) ||
        !(s_lookup = PyUnicode_InternFromString("lookup")) || !(s_scoped = PyUnicode_InternFromString("scoped")) ||
        !(s_fresh_plan = PyUnicode_InternFromString("fresh_plan")) ||
        !(s_append = PyUnicode_InternFromString("append")) || !(s_popleft = PyUnicode_InternFromString("popleft")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyTypeObject *types[] = {&FifoClockType, &JobType, &StagesType, &BatcherType};
    const char *names[] = {"FifoClock", "Job", "Stages", "Batcher"};
    if (add_types(m, types, names, 4) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
