/* The event core compiled (optional: sim/model/events.py holds its pure-Python twin, which gives the same bits).
 *
 * call_later / call_at schedule a Call (a callback and its value) on a SimPy environment's own queue, as
 * (time, NORMAL, event id, call) tuples, exactly as `Environment.schedule` does; run_calls dispatches them
 * until the queue is empty, handing anything else (a SimPy event) to `env.step()`. The queue stays SimPy's
 * list and its entries SimPy's tuples, so `env.run()` and `env.step()` still work on it.
 *
 * Why compiled: a model event costs ~1.4 us in Python (a frame for call_later, a Call, a heap push and pop
 * comparing tuples through the generic rich comparison, the dispatch loop); here the heap compares the tuples'
 * float times and integer ids directly. Event ids are unique, so the order is total: whatever the heap's inner
 * layout, events come out in the order heapq gives them, and the results are the same to the bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>
#include <structmember.h>

#define NORMAL 1 /* simpy.core.NORMAL: sim/model/events.py checks it before using this module */

typedef struct {
    PyObject_HEAD
    PyObject *callbacks; /* [callback]: what Environment.step reads of an event */
    PyObject *value;
} CallObject;

static int call_traverse(CallObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->callbacks);
    Py_VISIT(self->value);
    return 0;
}

static int call_clear(CallObject *self) {
    Py_CLEAR(self->callbacks);
    Py_CLEAR(self->value);
    return 0;
}

static void call_dealloc(CallObject *self) {
    PyObject_GC_UnTrack(self);
    call_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *call_ok(PyObject *self, void *closure) { Py_RETURN_TRUE; } /* a Call never fails */

static PyMemberDef call_members[] = {
    {"callbacks", T_OBJECT_EX, offsetof(CallObject, callbacks), 0, "[callback]: what Environment.step runs"},
    {"value", T_OBJECT_EX, offsetof(CallObject, value), 0, "what the callback reads as call.value"},
    {NULL},
};

static PyGetSetDef call_getset[] = {
    {"_ok", call_ok, NULL, "always True: read by Environment.step", NULL},
    {NULL},
};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._events.Call",
    .tp_doc = "A scheduled callback: exactly what simpy.Environment.step reads of an event.",
    .tp_basicsize = sizeof(CallObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)call_dealloc,
    .tp_traverse = (traverseproc)call_traverse,
    .tp_clear = (inquiry)call_clear,
    .tp_members = call_members,
    .tp_getset = call_getset,
};

static PyObject *s_now, *s_queue, *s_eid, *s_step, *normal;

/* a < b for two queue entries: (time, priority, id, event) compared as tuples are, with the common case
 * (float times, int priorities and ids) read directly; anything else through Python's comparison. */
static int before(PyObject *a, PyObject *b) {
    if (PyTuple_CheckExact(a) && PyTuple_CheckExact(b) && PyTuple_GET_SIZE(a) == 4 && PyTuple_GET_SIZE(b) == 4) {
        PyObject *ta = PyTuple_GET_ITEM(a, 0), *tb = PyTuple_GET_ITEM(b, 0);
        if (PyFloat_CheckExact(ta) && PyFloat_CheckExact(tb)) {
            double x = PyFloat_AS_DOUBLE(ta), y = PyFloat_AS_DOUBLE(tb);
            if (x < y) return 1;
            if (x > y) return 0;
            if (x == y) {
                PyObject *pa = PyTuple_GET_ITEM(a, 1), *pb = PyTuple_GET_ITEM(b, 1);
                PyObject *ia = PyTuple_GET_ITEM(a, 2), *ib = PyTuple_GET_ITEM(b, 2);
                if (PyLong_CheckExact(pa) && PyLong_CheckExact(pb) && PyLong_CheckExact(ia) && PyLong_CheckExact(ib)) {
                    int overflow = 0;
                    long long u = PyLong_AsLongLongAndOverflow(pa, &overflow);
                    long long v = overflow ? 0 : PyLong_AsLongLongAndOverflow(pb, &overflow);
                    long long j = overflow ? 0 : PyLong_AsLongLongAndOverflow(ia, &overflow);
                    long long k = overflow ? 0 : PyLong_AsLongLongAndOverflow(ib, &overflow);
                    if (!overflow) return u < v || (u == v && j < k);
                }
            }
        }
    }
    return PyObject_RichCompareBool(a, b, Py_LT);
}

/* heapq's sift-down (towards the root) from pos, items swapped so that every reference stays owned. */
static int sift_down(PyObject *heap, Py_ssize_t start, Py_ssize_t pos) {
    Py_ssize_t size = PyList_GET_SIZE(heap);
    while (pos > start) {
        Py_ssize_t parent = (pos - 1) >> 1;
        PyObject *item = PyList_GET_ITEM(heap, pos), *above = PyList_GET_ITEM(heap, parent);
        Py_INCREF(item);
        Py_INCREF(above);
        int lt = before(item, above);
        Py_DECREF(above);
        Py_DECREF(item);
        if (lt < 0) return -1;
        if (size != PyList_GET_SIZE(heap)) {
            PyErr_SetString(PyExc_RuntimeError, "the event queue changed size while it was being ordered");
            return -1;
        }
        if (!lt) break;
        item = PyList_GET_ITEM(heap, pos), above = PyList_GET_ITEM(heap, parent);
        PyList_SET_ITEM(heap, parent, item);
        PyList_SET_ITEM(heap, pos, above);
        pos = parent;
    }
    return 0;
}

/* heapq's sift-up: the smaller child climbs until a leaf is reached, then the item sifts down from there. */
static int sift_up(PyObject *heap, Py_ssize_t pos) {
    Py_ssize_t end = PyList_GET_SIZE(heap), start = pos, limit = end >> 1;
    while (pos < limit) {
        Py_ssize_t child = 2 * pos + 1;
        if (child + 1 < end) {
            PyObject *a = PyList_GET_ITEM(heap, child), *b = PyList_GET_ITEM(heap, child + 1);
            Py_INCREF(a);
            Py_INCREF(b);
            int lt = before(a, b);
            Py_DECREF(b);
            Py_DECREF(a);
            if (lt < 0) return -1;
            child += !lt;
            if (end != PyList_GET_SIZE(heap)) {
                PyErr_SetString(PyExc_RuntimeError, "the event queue changed size while it was being ordered");
                return -1;
            }
        }
        PyObject *up = PyList_GET_ITEM(heap, child), *down = PyList_GET_ITEM(heap, pos);
        PyList_SET_ITEM(heap, child, down);
        PyList_SET_ITEM(heap, pos, up);
        pos = child;
    }
    return sift_down(heap, start, pos);
}

static int push(PyObject *heap, PyObject *item) {
    if (PyList_Append(heap, item) < 0) return -1;
    return sift_down(heap, 0, PyList_GET_SIZE(heap) - 1);
}

/* The earliest entry (a new reference), removed; the queue must not be empty. */
static PyObject *pop(PyObject *heap) {
    Py_ssize_t n = PyList_GET_SIZE(heap);
    PyObject *last = PyList_GET_ITEM(heap, n - 1);
    Py_INCREF(last);
    if (PyList_SetSlice(heap, n - 1, n, NULL) < 0) {
        Py_DECREF(last);
        return NULL;
    }
    if (n == 1) return last;
    PyObject *first = PyList_GET_ITEM(heap, 0);
    PyList_SET_ITEM(heap, 0, last); /* the list's reference to first passes to the caller */
    if (sift_up(heap, 0) < 0) {
        Py_DECREF(first);
        return NULL;
    }
    return first;
}

/* Put (t, NORMAL, next id, Call(callback, value)) on env's queue; t is stolen. */
static PyObject *schedule(PyObject *env, PyObject *t, PyObject *callback, PyObject *value) {
    PyObject *queue = NULL, *ids = NULL, *id = NULL, *callbacks = NULL, *entry = NULL;
    CallObject *call = NULL;
    if (!(queue = PyObject_GetAttr(env, s_queue)) || !(ids = PyObject_GetAttr(env, s_eid))) goto fail;
    if (!PyList_Check(queue)) {
        PyErr_SetString(PyExc_TypeError, "env._queue: a list expected");
        goto fail;
    }
    if (!(id = PyIter_Next(ids))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "env._eid ran out");
        goto fail;
    }
    if (!(callbacks = PyList_New(1))) goto fail;
    Py_INCREF(callback);
    PyList_SET_ITEM(callbacks, 0, callback);
    if (!(call = PyObject_GC_New(CallObject, &CallType))) goto fail;
    call->callbacks = callbacks, callbacks = NULL;
    Py_INCREF(value);
    call->value = value;
    PyObject_GC_Track((PyObject *)call);
    if (!(entry = PyTuple_Pack(4, t, normal, id, (PyObject *)call))) goto fail;
    if (push(queue, entry) < 0) goto fail;
    Py_DECREF(entry), Py_DECREF(id), Py_DECREF(ids), Py_DECREF(queue), Py_DECREF(t);
    return (PyObject *)call;
fail:
    Py_XDECREF(entry), Py_XDECREF(call), Py_XDECREF(callbacks), Py_XDECREF(id), Py_XDECREF(ids);
    Py_XDECREF(queue), Py_XDECREF(t);
    return NULL;
}

/* Schedule `callback` after `delay` (env._now + delay, as Python adds them); the new Call, or NULL. */
static PyObject *later(PyObject *env, PyObject *delay, PyObject *callback, PyObject *value) {
    PyObject *now = PyObject_GetAttr(env, s_now);
    if (now == NULL) return NULL;
    PyObject *t;
    if (PyFloat_CheckExact(now) && PyFloat_CheckExact(delay))
        t = PyFloat_FromDouble(PyFloat_AS_DOUBLE(now) + PyFloat_AS_DOUBLE(delay));
    else
        t = PyNumber_Add(now, delay);
    Py_DECREF(now);
    if (t == NULL) return NULL;
    return schedule(env, t, callback, value);
}

static PyObject *call_later(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "call_later(env, delay, callback, value=None)");
        return NULL;
    }
    return later(args[0], args[1], args[2], nargs == 4 ? args[3] : Py_None);
}

static PyObject *call_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "call_at(env, t, callback, value=None)");
        return NULL;
    }
    Py_INCREF(args[1]);
    return schedule(args[0], args[1], args[2], nargs == 4 ? args[3] : Py_None);
}

static PyObject *run_calls(PyObject *self, PyObject *env) {
    PyObject *queue = PyObject_GetAttr(env, s_queue);
    if (queue == NULL) return NULL;
    if (!PyList_Check(queue)) {
        PyErr_SetString(PyExc_TypeError, "env._queue: a list expected");
        goto fail;
    }
    while (PyList_GET_SIZE(queue) > 0) {
        PyObject *head = PyList_GET_ITEM(queue, 0), *result;
        if (PyTuple_Check(head) && PyTuple_GET_SIZE(head) == 4 && Py_IS_TYPE(PyTuple_GET_ITEM(head, 3), &CallType)) {
            PyObject *entry = pop(queue);
            if (entry == NULL) goto fail;
            CallObject *call = (CallObject *)PyTuple_GET_ITEM(entry, 3);
            if (PyObject_SetAttr(env, s_now, PyTuple_GET_ITEM(entry, 0)) < 0) {
                Py_DECREF(entry);
                goto fail;
            }
            if (!PyList_Check(call->callbacks) || PyList_GET_SIZE(call->callbacks) < 1) {
                PyErr_SetString(PyExc_RuntimeError, "a Call without its callback (dispatched twice?)");
                Py_DECREF(entry);
                goto fail;
            }
            PyObject *callback = PyList_GET_ITEM(call->callbacks, 0);
            Py_INCREF(callback);
            result = PyObject_CallOneArg(callback, (PyObject *)call);
            Py_DECREF(callback);
            Py_DECREF(entry);
        } else {
            result = PyObject_CallMethodNoArgs(env, s_step); /* a SimPy event: SimPy runs it */
        }
        if (result == NULL) goto fail;
        Py_DECREF(result);
    }
    Py_DECREF(queue);
    Py_RETURN_NONE;
fail:
    Py_DECREF(queue);
    return NULL;
}

/* --- Timeouts: many time limits that rarely fire, on one scheduled event (events.py's Timeouts, ported) --- */
typedef struct {
    double t;
    PyObject *value;
} Limit;

typedef struct {
    PyObject_HEAD
    PyObject *env, *alive, *fire, *wake; /* wake: the bound method the wake-up event calls */
    Limit *items;                        /* items[head .. head + count): the limits in time order */
    Py_ssize_t head, count, size;
    double armed;                        /* when the wake-up in the environment's queue is due */
} TimeoutsObject;

static double now_of(PyObject *env, int *failed) {
    PyObject *now = PyObject_GetAttr(env, s_now);
    if (now == NULL) return *failed = 1, 0.0;
    double t = PyFloat_AsDouble(now);
    Py_DECREF(now);
    if (t == -1.0 && PyErr_Occurred()) *failed = 1;
    return t;
}

/* _arm: the one wake-up, at t (scheduled as call_later(env, t - now, ...), as the Python does) */
static int timeouts_arm(TimeoutsObject *self, double t) {
    int failed = 0;
    double now = now_of(self->env, &failed);
    if (failed) return -1;
    self->armed = t;
    PyObject *delay = PyFloat_FromDouble(t - now), *value = PyFloat_FromDouble(t), *call = NULL;
    if (delay != NULL && value != NULL) call = later(self->env, delay, self->wake, value);
    Py_XDECREF(delay), Py_XDECREF(value), Py_XDECREF(call);
    return call == NULL ? -1 : 0;
}

static PyObject *timeouts_add(TimeoutsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(delay, value)");
        return NULL;
    }
    int failed = 0;
    double now = now_of(self->env, &failed), delay = PyFloat_AsDouble(args[0]);
    if (failed || (delay == -1.0 && PyErr_Occurred())) return NULL;
    double t = now + delay;
    if (self->head + self->count == self->size) { /* no room at the end: move to the front, or grow */
        if (self->head > self->size / 2) {
            memmove(self->items, self->items + self->head, (size_t)self->count * sizeof(Limit));
        } else {
            Py_ssize_t size = self->size ? 2 * self->size : 64;
            Limit *items = PyMem_Realloc(self->items, (size_t)size * sizeof(Limit));
            if (items == NULL) return PyErr_NoMemory();
            memmove(items, items + self->head, (size_t)self->count * sizeof(Limit));
            self->items = items, self->size = size;
        }
        self->head = 0;
    }
    Limit *q = self->items + self->head;
    Py_ssize_t k = self->count;
    if (k > 0 && q[k - 1].t > t) { /* earlier than the last one: its place, searched from the back (ties keep order) */
        k -= 1;
        while (k > 0 && q[k - 1].t > t) k -= 1;
        memmove(q + k + 1, q + k, (size_t)(self->count - k) * sizeof(Limit));
    }
    Py_INCREF(args[1]);
    q[k] = (Limit){t, args[1]};
    self->count += 1;
    if (t < self->armed && timeouts_arm(self, t) < 0) return NULL;
    Py_RETURN_NONE;
}

/* alive(value) as a truth value; -1 on an error */
static int call_alive(TimeoutsObject *self, PyObject *value) {
    PyObject *result = PyObject_CallOneArg(self->alive, value);
    if (result == NULL) return -1;
    int truth = PyObject_IsTrue(result);
    Py_DECREF(result);
    return truth;
}

static PyObject *timeouts_wake(TimeoutsObject *self, PyObject *event) {
    PyObject *value = PyObject_GetAttrString(event, "value");
    if (value == NULL) return NULL;
    double t = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (t == -1.0 && PyErr_Occurred()) return NULL;
    if (t != self->armed) Py_RETURN_NONE; /* superseded by an earlier wake-up, which re-armed */
    self->armed = INFINITY;
    while (self->count > 0) {
        Limit first = self->items[self->head];
        if (!(first.t <= t)) {
            int alive = call_alive(self, first.value);
            if (alive < 0) return NULL;
            if (alive) break;
        }
        self->head += 1, self->count -= 1; /* popped: its reference is ours now */
        if (first.t <= t) {
            int alive = call_alive(self, first.value);
            PyObject *result = alive > 0 ? PyObject_CallOneArg(self->fire, first.value) : NULL;
            Py_DECREF(first.value);
            if (alive < 0 || (alive > 0 && result == NULL)) return NULL;
            Py_XDECREF(result);
        } else {
            Py_DECREF(first.value);
        }
    }
    if (self->count > 0 && self->items[self->head].t < self->armed &&
        timeouts_arm(self, self->items[self->head].t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int timeouts_init(TimeoutsObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"env", "alive", "fire", NULL};
    PyObject *env, *alive, *fire;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO", names, &env, &alive, &fire)) return -1;
    if (self->wake != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Timeouts: initialised twice");
        return -1;
    }
    Py_INCREF(env), self->env = env;
    Py_INCREF(alive), self->alive = alive;
    Py_INCREF(fire), self->fire = fire;
    self->armed = INFINITY;
    self->wake = PyObject_GetAttrString((PyObject *)self, "_wake");
    return self->wake == NULL ? -1 : 0;
}

static int timeouts_traverse(TimeoutsObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->env);
    Py_VISIT(self->alive);
    Py_VISIT(self->fire);
    Py_VISIT(self->wake);
    for (Py_ssize_t j = 0; j < self->count; j++) Py_VISIT(self->items[self->head + j].value);
    return 0;
}

static int timeouts_clear(TimeoutsObject *self) {
    Py_CLEAR(self->env);
    Py_CLEAR(self->alive);
    Py_CLEAR(self->fire);
    Py_CLEAR(self->wake);
    Py_ssize_t n = self->count;
    self->count = 0;
    for (Py_ssize_t j = 0; j < n; j++) Py_CLEAR(self->items[self->head + j].value);
    return 0;
}

static void timeouts_dealloc(TimeoutsObject *self) {
    PyObject_GC_UnTrack(self);
    timeouts_clear(self);
    PyMem_Free(self->items);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t timeouts_len(TimeoutsObject *self) { return self->count; }

static PyMethodDef timeouts_methods[] = {
    {"add", (PyCFunction)(void (*)(void))timeouts_add, METH_FASTCALL,
     "add(delay, value): fire(value) after `delay` seconds, if alive(value) still holds then"},
    {"_wake", (PyCFunction)timeouts_wake, METH_O, "the wake-up (an event's callback)"},
    {NULL},
};

static PySequenceMethods timeouts_sequence = {.sq_length = (lenfunc)timeouts_len};

static PyTypeObject TimeoutsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._events.Timeouts",
    .tp_doc = "Many time limits that rarely fire, on one scheduled event: see sim/model/events.py.",
    .tp_basicsize = sizeof(TimeoutsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)timeouts_init,
    .tp_dealloc = (destructor)timeouts_dealloc,
    .tp_traverse = (traverseproc)timeouts_traverse,
    .tp_clear = (inquiry)timeouts_clear,
    .tp_methods = timeouts_methods,
    .tp_as_sequence = &timeouts_sequence,
};

static PyMethodDef methods[] = {
    {"call_later", (PyCFunction)(void (*)(void))call_later, METH_FASTCALL,
     "call_later(env, delay, callback, value=None) -> Call: see sim/model/events.py"},
    {"call_at", (PyCFunction)(void (*)(void))call_at, METH_FASTCALL,
     "call_at(env, t, callback, value=None) -> Call: see sim/model/events.py"},
    {"run_calls", run_calls, METH_O, "run_calls(env): dispatch until the queue is empty (see sim/model/events.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_events", "llmsim's event core, compiled.", -1, methods};

PyMODINIT_FUNC PyInit__events(void) {
    if (PyType_Ready(&CallType) < 0 || PyType_Ready(&TimeoutsType) < 0) return NULL;
    if (!(s_now = PyUnicode_InternFromString("_now")) || !(s_queue = PyUnicode_InternFromString("_queue")) ||
        !(s_eid = PyUnicode_InternFromString("_eid")) || !(s_step = PyUnicode_InternFromString("step")) ||
        !(normal = PyLong_FromLong(NORMAL)))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&CallType);
    Py_INCREF(&TimeoutsType);
    if (PyModule_AddObject(m, "Call", (PyObject *)&CallType) < 0 ||
        PyModule_AddObject(m, "Timeouts", (PyObject *)&TimeoutsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
