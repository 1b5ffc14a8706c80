/* The retrieval's compiled parts (optional: sim/model/application/retrieval.py holds their pure-Python twins,
 * Backend, _Job and Retrieval's stage methods, which give the same bits).
 *
 * A retrieval runs stages of parallel hops to FIFO backends, one event per stage: a hop's return time is known
 * when it is submitted (FifoClock), so a stage schedules one callback, for when `need` of its hops are back.
 * Here are the backends' slots, a retrieval's state (Job) and the stage loop with its end (Stages: the base of
 * retrieval.py's CompiledRetrieval, whose Python half keeps the caches, the embedding and the reports).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <structmember.h>

static PyObject *s_now, *s_value, *s_insert, *s_meter, *s_stage_done, *s_submit;

/* ---------------------------------------------------------------------------------------------------------
 * FifoClock: Backend.submit, the Kiefer-Wolfowitz step of one FIFO resource with `concurrency` slots (a retrieval
 * backend, a flow's tool; sim/_kernels.c's fifo_slots takes the same step for a whole run): a hop submitted now starts when the earliest slot frees (not before
 * now) and holds it for a latency drawn as it is submitted; its return time is known at once. The slots' free
 * times are a heap kept exactly as heapq.heapreplace keeps it (the same layout, so the Python reports that sum
 * over it add in the same order).
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

static int job_init(JobObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"i", "done", "plan", "now", "escalation", NULL};
    PyObject *done, *plan;
    int escalation;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOOdp", names, &self->i, &done, &plan, &self->start,
                                     &escalation))
        return -1;
    Py_INCREF(done);
    Py_XSETREF(self->done, done);
    Py_INCREF(plan);
    Py_XSETREF(self->plan, plan);
    Py_XSETREF(self->stage_s, PyTuple_New(0));
    if (self->stage_s == NULL) return -1;
    self->escalation = (char)escalation;
    self->stage = 0;
    self->stage_start = self->emb_join = 0.0;
    self->emb_wait = self->emb_s = NAN;
    self->rcode = self->ecode = NOT_LOOKED_UP;
    self->rkey = self->ekey = -1;
    return 0;
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
 * Stages: Retrieval._start_stage, _stage_done and _finish. The Python half (CompiledRetrieval) sets the fields
 * below as Retrieval.__init__ does, then `_bind(call_later)`.
 */
typedef struct {
    PyObject_HEAD
    PyObject *env, *cache, *records, *last; /* cache: the retrieval cache or None; records: a list or None */
    PyObject *call_later, *stage_done;      /* the event core's call_later; self._stage_done */
    Py_ssize_t completed;
    char metered;
} StagesObject;

static int stages_traverse(StagesObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->env);
    Py_VISIT(self->cache);
    Py_VISIT(self->records);
    Py_VISIT(self->last);
    Py_VISIT(self->call_later);
    Py_VISIT(self->stage_done);
    return 0;
}

static int stages_clear(StagesObject *self) {
    Py_CLEAR(self->env);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->records);
    Py_CLEAR(self->last);
    Py_CLEAR(self->call_later);
    Py_CLEAR(self->stage_done);
    return 0;
}

static void stages_dealloc(StagesObject *self) {
    PyObject_GC_UnTrack(self);
    stages_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *stages_bind(StagesObject *self, PyObject *call_later) {
    PyObject *bound = PyObject_GetAttr((PyObject *)self, s_stage_done);
    if (bound == NULL) return NULL;
    Py_XSETREF(self->stage_done, bound);
    Py_INCREF(call_later);
    Py_XSETREF(self->call_later, call_later);
    Py_RETURN_NONE;
}

/* the clock; NULL with an exception set */
static PyObject *now_of(StagesObject *self) {
    if (self->env == NULL || self->stage_done == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the retrieval's stages are not bound (_bind)");
        return NULL;
    }
    return PyObject_GetAttr(self->env, s_now);
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

/* A hop to backend b submitted at now: *end, when it returns; -1 with an exception set */
static int submit_hop(PyObject *b, double now, double *end) {
    if (PyObject_TypeCheck(b, &FifoClockType)) return hop_end((FifoClockObject *)b, now, end);
    PyObject *arg = PyFloat_FromDouble(now);
    if (arg == NULL) return -1;
    PyObject *back = PyObject_CallMethodOneArg(b, s_submit, arg); /* any object with Backend's submit */
    Py_DECREF(arg);
    if (back == NULL) return -1;
    *end = PyFloat_AsDouble(back);
    Py_DECREF(back);
    return *end == -1.0 && PyErr_Occurred() ? -1 : 0;
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
    PyObject *now_obj = now_of(self);
    if (now_obj == NULL) return -1;
    double now = PyFloat_AsDouble(now_obj);
    Py_DECREF(now_obj);
    if (now == -1.0 && PyErr_Occurred()) return -1;
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
    PyObject *delay = PyFloat_FromDouble(done - now);
    if (delay == NULL) return -1;
    PyObject *args[4] = {self->env, delay, self->stage_done, (PyObject *)job};
    PyObject *call = PyObject_Vectorcall(self->call_later, args, 4, NULL);
    Py_DECREF(delay);
    if (call == NULL) return -1;
    Py_DECREF(call);
    return 0;
}

/* Retrieval._finish: the retrieval cache learns the answer, the row, done(i) */
static int finish(StagesObject *self, JobObject *job) {
    PyObject *now = now_of(self), *i = PyLong_FromSsize_t(job->i), *result = NULL;
    if (now == NULL || i == NULL) goto failed;
    if (job->rkey >= 0) {
        PyObject *key = PyLong_FromLongLong(job->rkey);
        if (key == NULL) goto failed;
        PyObject *args[4] = {self->cache, key, now, i};
        result = PyObject_VectorcallMethod(s_insert, args, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(key);
        if (result == NULL) goto failed;
        Py_DECREF(result);
    }
    self->completed += 1;
    PyObject *last = Py_BuildValue("(OdOddiiOO)", i, job->start, now, job->emb_wait, job->emb_s, job->rcode,
                                   job->ecode, job->stage_s, job->escalation ? Py_True : Py_False);
    if (last == NULL) goto failed;
    Py_XSETREF(self->last, last);
    if (self->records != NULL && self->records != Py_None && PyList_Append(self->records, last) < 0) goto failed;
    if (self->metered) {
        if ((result = PyObject_CallMethodOneArg((PyObject *)self, s_meter, (PyObject *)job)) == NULL) goto failed;
        Py_DECREF(result);
    }
    if ((result = PyObject_CallOneArg(job->done, i)) == NULL) goto failed;
    Py_DECREF(result);
    Py_DECREF(now), Py_DECREF(i);
    return 0;
failed:
    Py_XDECREF(now), Py_XDECREF(i);
    return -1;
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
    PyObject *value = PyObject_GetAttr(event, s_value), *now_obj = NULL;
    if (value == NULL) return NULL;
    JobObject *job = job_arg(value);
    if (job == NULL || (now_obj = now_of(self)) == NULL) goto failed;
    double now = PyFloat_AsDouble(now_obj);
    if (now == -1.0 && PyErr_Occurred()) goto failed;
    PyObject *s = appended(job->stage_s, now - job->stage_start);
    if (s == NULL) goto failed;
    Py_SETREF(job->stage_s, s);
    job->stage += 1;
    if ((job->stage < PyTuple_GET_SIZE(job->plan) ? start_stage(self, job) : finish(self, job)) < 0) goto failed;
    Py_DECREF(value), Py_DECREF(now_obj);
    Py_RETURN_NONE;
failed:
    Py_DECREF(value), Py_XDECREF(now_obj);
    return NULL;
}

static PyMethodDef stages_methods[] = {
    {"_bind", (PyCFunction)stages_bind, METH_O, "_bind(call_later): ready to run (after the fields are set)"},
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
    {"completed", T_PYSSIZET, offsetof(StagesObject, completed), 0, "retrievals finished since the last reset"},
    {"metered", T_BOOL, offsetof(StagesObject, metered), 0, "whether each retrieval's usage is metered"},
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

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_retrieval", "llmsim's retrieval stages, compiled.", -1,
                                    NULL};

PyMODINIT_FUNC PyInit__retrieval(void) {
    StagesType.tp_new = PyBaseObject_Type.tp_new;
    if (PyType_Ready(&FifoClockType) < 0 || PyType_Ready(&JobType) < 0 || PyType_Ready(&StagesType) < 0) return NULL;
    if (!(s_now = PyUnicode_InternFromString("_now")) || !(s_value = PyUnicode_InternFromString("value")) ||
        !(s_insert = PyUnicode_InternFromString("insert")) || !(s_meter = PyUnicode_InternFromString("_meter")) ||
        !(s_stage_done = PyUnicode_InternFromString("_stage_done")) ||
        !(s_submit = PyUnicode_InternFromString("submit")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyTypeObject *types[] = {&FifoClockType, &JobType, &StagesType};
    const char *names[] = {"FifoClock", "Job", "Stages"};
    for (int k = 0; k < 3; k++) {
        Py_INCREF(types[k]);
        if (PyModule_AddObject(m, names[k], (PyObject *)types[k]) < 0) {
            Py_DECREF(types[k]);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
