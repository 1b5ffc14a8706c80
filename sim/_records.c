/* The recorder's flat logs compiled (optional: sim/metrics/recorder.py holds the pure-Python twin, FlatLog over a
 * list, which reads back the same values).
 *
 * A flat log is a per-request record of numbers, one row after another, written a few values a request and
 * read back only after the run (as float64 rows). The twin keeps the values in a list (each a Python object) and
 * moves them into numpy arrays every 32k values between events (a conversion that cost rag-support 3% of its
 * time); here each value is converted to a double as it is written, into blocks of 32k values allocated as they
 * fill: 8 bytes a value, nothing to move later, and no buffer that grows by copying (a long run's memory would
 * keep the holes such copies leave).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define BLOCK 32768 /* values per block */

typedef struct {
    PyObject_HEAD
    double **blocks;
    Py_ssize_t size, n_blocks, room; /* values written; blocks allocated; block pointers the array can hold */
} FlatLogObject;

static void log_dealloc(FlatLogObject *self) {
    for (Py_ssize_t b = 0; b < self->n_blocks; b++) PyMem_Free(self->blocks[b]);
    PyMem_Free(self->blocks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for `more` values; -1 with an exception set */
static int reserve(FlatLogObject *self, Py_ssize_t more) {
    while (self->size + more > self->n_blocks * BLOCK) {
        if (self->n_blocks == self->room) {
            Py_ssize_t room = self->room ? 2 * self->room : 16;
            double **blocks = PyMem_Realloc(self->blocks, (size_t)room * sizeof(double *));
            if (blocks == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            self->blocks = blocks, self->room = room;
        }
        double *block = PyMem_Malloc(BLOCK * sizeof(double));
        if (block == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->blocks[self->n_blocks++] = block;
    }
    return 0;
}

/* One value, as float(value) gives it (ints and bools included); -1 with an exception set */
static int put(FlatLogObject *self, PyObject *value) {
    double x = PyFloat_AsDouble(value);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    self->blocks[self->size / BLOCK][self->size % BLOCK] = x;
    self->size++;
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

/* Every value written, in order, as the bytes of float64s */
static PyObject *log_tobytes(FlatLogObject *self, PyObject *unused) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, self->size * (Py_ssize_t)sizeof(double));
    if (out == NULL) return NULL;
    char *to = PyBytes_AS_STRING(out);
    for (Py_ssize_t b = 0, left = self->size; left > 0; b++, left -= BLOCK) {
        size_t n = (size_t)(left < BLOCK ? left : BLOCK) * sizeof(double);
        memcpy(to, self->blocks[b], n);
        to += n;
    }
    return out;
}

static PySequenceMethods log_as_sequence = {.sq_length = (lenfunc)log_length};

static PyNumberMethods log_as_number = {.nb_inplace_add = log_inplace_add};

static PyMethodDef log_methods[] = {
    {"append", (PyCFunction)log_append, METH_O, "append(value): one value"},
    {"extend", (PyCFunction)log_extend, METH_O, "extend(row): the row's values, in order"},
    {"tobytes", (PyCFunction)log_tobytes, METH_NOARGS, "tobytes(): every value, in order, as float64 bytes"},
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
        Py_DECREF(&FlatLogType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
