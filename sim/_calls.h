/* Calling Python from the compiled parts (and making their modules): shared by sim/_lifecycle.c,
 * sim/_retrieval.c and sim/_caches.c (static inline: each takes what it uses).
 *
 * Names are interned once (a C string would be made into a str, and hashed, at every call); calls go through
 * vectorcall, without building an argument tuple.
 */
#ifndef LLMSIM_CALLS_H
#define LLMSIM_CALLS_H
#include <Python.h>
#include <stdarg.h>

/* Whether an optional field is set (neither unset nor None) */
static inline int is_set(PyObject *x) { return x != NULL && x != Py_None; }

/* obj.name(*args): n (at most 7) arguments, each a borrowed PyObject *; a new reference, NULL with an exception */
static inline PyObject *method(PyObject *obj, PyObject *name, Py_ssize_t n, ...) {
    PyObject *args[8];
    va_list ap;
    va_start(ap, n);
    args[0] = obj;
    for (Py_ssize_t k = 0; k < n && k < 7; k++) args[k + 1] = va_arg(ap, PyObject *);
    va_end(ap);
    return PyObject_VectorcallMethod(name, args, (size_t)(n + 1), NULL);
}

/* Drop a call's result: 0, or -1 when it failed */
static inline int done_with(PyObject *result) {
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

/* A sampler's next draw (a float); -1 with an exception set (check PyErr_Occurred) */
static inline double draw(PyObject *sampler) {
    PyObject *x = PyObject_CallNoArgs(sampler);
    if (x == NULL) return -1.0;
    double v = PyFloat_AsDouble(x);
    Py_DECREF(x);
    return v;
}

/* call_later(env, delay, callback, value), the event core's; 0, or -1 with an exception set */
static inline int schedule(PyObject *call_later, PyObject *env, double delay, PyObject *callback, PyObject *value) {
    PyObject *d = PyFloat_FromDouble(delay);
    if (d == NULL) return -1;
    PyObject *args[4] = {env, d, callback, value};
    PyObject *call = PyObject_Vectorcall(call_later, args, 4, NULL);
    Py_DECREF(d);
    return done_with(call);
}

/* env._now as a double; 0, or -1 with an exception set */
static inline int clock_now(PyObject *env, PyObject *now_name, double *now) {
    PyObject *t = PyObject_GetAttr(env, now_name);
    if (t == NULL) return -1;
    *now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return *now == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* The module's types, added under their names; 0, or -1 with an exception set */
static inline int add_types(PyObject *module, PyTypeObject **types, const char **names, int n) {
    for (int k = 0; k < n; k++) {
        Py_INCREF(types[k]);
        if (PyModule_AddObject(module, names[k], (PyObject *)types[k]) < 0) {
            Py_DECREF(types[k]);
            return -1;
        }
    }
    return 0;
}

#endif
