/* The recorder's flat logs compiled (optional: sim/metrics/recorder.py holds the pure-Python twin, FlatLog over a
 * list, which reads back the same values).
 *
 * A flat log is a per-request record of numbers, one row after another, written a few values a request and
 * read back only after the run (as float64 rows). The twin keeps the values in a list (each a Python object) and
 * moves them into numpy arrays every 32k values between events (a conversion that cost rag-support 3% of its
 * time); here each value is converted to a double as it is written, into a buffer grown by doubling: 8 bytes a
 * value, nothing to move later. numpy reads the buffer (the buffer protocol, format 'd') without a copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    PyObject_HEAD
    double *data;
    Py_ssize_t size, capacity;
    Py_ssize_t exports; /* buffer views handed out: while any lives, the buffer must not move */
} FlatLogObject;

static void log_dealloc(FlatLogObject *self) {
    PyMem_Free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for `more` values (none while viewed); -1 with an exception set */
static int reserve(FlatLogObject *self, Py_ssize_t more) {
    if (self->exports > 0) { /* a view's length (and its shape, &self->size) must hold while it lives */
        PyErr_SetString(PyExc_BufferError, "a flat log cannot be written while a buffer view of it exists");
        return -1;
    }
    if (self->size + more <= self->capacity) return 0;
    Py_ssize_t capacity = self->capacity ? self->capacity : 256;
    while (capacity < self->size + more) capacity *= 2;
    double *data = PyMem_Realloc(self->data, (size_t)capacity * sizeof(double));
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->data = data, self->capacity = capacity;
    return 0;
}

/* One value, as float(value) gives it (ints and bools included); -1 with an exception set */
static int put(FlatLogObject *self, PyObject *value) {
    double x = PyFloat_AsDouble(value);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    self->data[self->size++] = x;
    return 0;
}

static PyObject *log_append(FlatLogObject *self, PyObject *value) {
    if (reserve(self, 1) < 0 || put(self, value) < 0) return NULL;
    Py_RETURN_NONE;
}

/* log += row (a tuple or list, as the model writes; any iterable does) */
static PyObject *log_extend(FlatLogObject *self, PyObject *row) {
    PyObject *seq = PySequence_Fast(row, "a flat log is extended by an iterable of numbers");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t before = self->size;
    if (reserve(self, n) < 0) goto failed;
    for (Py_ssize_t k = 0; k < n; k++)
        if (put(self, items[k]) < 0) goto failed;
    Py_DECREF(seq);
    Py_INCREF(self);
    return (PyObject *)self;
failed:
    self->size = before; /* all of the row or none of it */
    Py_DECREF(seq);
    return NULL;
}

static PyObject *log_inplace_add(PyObject *self, PyObject *row) { return log_extend((FlatLogObject *)self, row); }

static Py_ssize_t log_length(FlatLogObject *self) { return self->size; }

static int log_getbuffer(FlatLogObject *self, Py_buffer *view, int flags) {
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size * (Py_ssize_t)sizeof(double), 1, flags) < 0)
        return -1;
    if (flags & PyBUF_FORMAT) view->format = "d";
    view->itemsize = sizeof(double);
    if (flags & PyBUF_ND) {
        view->ndim = 1;
        view->shape = &self->size;
    }
    if (flags & PyBUF_STRIDES) view->strides = &view->itemsize;
    self->exports++;
    return 0;
}

static void log_releasebuffer(FlatLogObject *self, Py_buffer *view) { self->exports--; }

static PyBufferProcs log_as_buffer = {(getbufferproc)log_getbuffer, (releasebufferproc)log_releasebuffer};

static PySequenceMethods log_as_sequence = {.sq_length = (lenfunc)log_length};

static PyNumberMethods log_as_number = {.nb_inplace_add = log_inplace_add};

static PyMethodDef log_methods[] = {
    {"append", (PyCFunction)log_append, METH_O, "append(value): one value"},
    {"extend", (PyCFunction)log_extend, METH_O, "extend(row): the row's values, in order"},
    {NULL},
};

static PyTypeObject FlatLogType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._records.FlatLog",
    .tp_doc = "A per-request log of numbers, stored as doubles as they are written (sim/metrics/recorder.py).",
    .tp_basicsize = sizeof(FlatLogObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)log_dealloc,
    .tp_methods = log_methods,
    .tp_as_buffer = &log_as_buffer,
    .tp_as_sequence = &log_as_sequence,
    .tp_as_number = &log_as_number,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_records", "llmsim's flat logs, compiled.", -1, NULL};

PyMODINIT_FUNC PyInit__records(void) {
    if (PyType_Ready(&FlatLogType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&FlatLogType);
    if (PyModule_AddObject(m, "FlatLog", (PyObject *)&FlatLogType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
