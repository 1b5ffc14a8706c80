/* Compiled kernels of llmsim's hot loops (optional: each has a pure-Python twin that gives the same bits).
 *
 * fifo_slots: FIFO requests on `servers` servers of `slots` slots each, as sim/model/fastpath.py's
 * fifo_slots does it, step for step and operation for operation (the same additions in the same order:
 * the results are equal to the bit). Arrays come in as buffers of doubles (int64 for the servers chosen);
 * the outputs are written in place. Built with -ffp-contract=off: a fused multiply-add would round
 * differently from Python's separate multiply and add.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    double time;
    int64_t order;
    int64_t server;
    int64_t request;
} Departure;

static int earlier(const Departure *a, const Departure *b) {
    return a->time < b->time || (a->time == b->time && a->order < b->order);
}

static void push(Departure *heap, Py_ssize_t *size, Departure item) {
    Py_ssize_t k = (*size)++;
    while (k > 0) {
        Py_ssize_t parent = (k - 1) / 2;
        if (!earlier(&item, &heap[parent])) break;
        heap[k] = heap[parent];
        k = parent;
    }
    heap[k] = item;
}

static Departure pop(Departure *heap, Py_ssize_t *size) {
    Departure top = heap[0];
    Departure last = heap[--(*size)];
    Py_ssize_t k = 0, n = *size;
    while (1) {
        Py_ssize_t child = 2 * k + 1;
        if (child >= n) break;
        if (child + 1 < n && earlier(&heap[child + 1], &heap[child])) child++;
        if (!earlier(&heap[child], &last)) break;
        heap[k] = heap[child];
        k = child;
    }
    if (n > 0) heap[k] = last;
    return top;
}

static int as_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what, Py_ssize_t itemsize) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: items of %zd bytes expected", what, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *fifo_slots(PyObject *self, PyObject *args) {
    PyObject *objs[9];
    long long servers, slots;
    if (!PyArg_ParseTuple(args, "OOOLLOOOOOO", &objs[0], &objs[1], &objs[2], &servers, &slots, &objs[3],
                          &objs[4], &objs[5], &objs[6], &objs[7], &objs[8]))
        return NULL;
    if (servers < 1 || slots < 1) {
        PyErr_SetString(PyExc_ValueError, "servers and slots must be at least 1");
        return NULL;
    }
    /* arrival, service, ttft, samples (in); admit, first, end, replica, sampled (out) */
    static const char *names[9] = {"arrival", "service", "ttft", "samples", "admit", "first", "end", "replica",
                                   "sampled"};
    Py_buffer views[9];
    int got = 0;
    for (; got < 9; got++) {
        if (as_buffer(objs[got], &views[got], got >= 4, names[got], 8) < 0) break;
    }
    PyObject *result = NULL;
    if (got < 9) goto done;
    Py_ssize_t n = views[0].len / 8, m = views[3].len / 8;
    if (views[1].len / 8 != n || views[2].len / 8 != n || views[4].len / 8 != n || views[5].len / 8 != n ||
        views[6].len / 8 != n || views[7].len / 8 != n || views[8].len / 8 != 5 * m) {
        PyErr_SetString(PyExc_ValueError, "fifo_slots: arrays of mismatched lengths");
        goto done;
    }
    const double *arrival = views[0].buf, *service = views[1].buf, *ttft = views[2].buf, *samples = views[3].buf;
    double *admit = views[4].buf, *first = views[5].buf, *end = views[6].buf, *sampled = views[8].buf;
    int64_t *replica = views[7].buf;
    int64_t *load = calloc((size_t)servers, sizeof(int64_t));
    double *last = calloc((size_t)servers, sizeof(double));
    double *busy = calloc((size_t)servers, sizeof(double));
    double *area = calloc((size_t)servers, sizeof(double));
    Py_ssize_t capacity = (Py_ssize_t)(servers * slots < n ? servers * slots : n) + 1;
    Departure *heap = malloc((size_t)capacity * sizeof(Departure));
    if (!load || !last || !busy || !area || !heap) {
        PyErr_NoMemory();
        goto freed;
    }
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t size = 0, head = 0, k = 0, s_next = 0;
    int64_t order = 0;
    double next_sample = m > 0 ? samples[0] : INFINITY;
    while (1) {
        double ta = k < n ? arrival[k] : INFINITY;
        double td = size ? heap[0].time : INFINITY;
        if (next_sample <= ta && next_sample <= td) {
            if (next_sample == INFINITY) break;
            double t = next_sample, totals[4] = {0.0, 0.0, 0.0, 0.0};
            for (int64_t s = 0; s < servers; s++) {
                if (load[s]) {
                    double elapsed = t - last[s];
                    busy[s] += elapsed;
                    area[s] += (double)load[s] * elapsed;
                }
                last[s] = t;
                totals[0] += busy[s];
                totals[1] += area[s];
                totals[2] += area[s] / (double)slots;
                totals[3] += t - 0.0;
            }
            double *row = sampled + 5 * s_next;
            row[0] = totals[0], row[1] = totals[1], row[2] = totals[2], row[3] = totals[3];
            row[4] = (double)(k - head);
            s_next++;
            next_sample = s_next < m ? samples[s_next] : INFINITY;
            continue;
        }
        if (td <= ta) {
            Departure d = pop(heap, &size);
            double t = d.time;
            int64_t s = d.server;
            double elapsed = t - last[s];
            busy[s] += elapsed;
            area[s] += (double)load[s] * elapsed;
            last[s] = t;
            load[s] -= 1;
            end[d.request] = t;
            if (head < k) {
                Py_ssize_t i = head++;
                last[s] = t;
                load[s] += 1;
                admit[i] = t, replica[i] = s, first[i] = t + ttft[i];
                push(heap, &size, (Departure){t + service[i], order++, s, i});
            }
            continue;
        }
        Py_ssize_t i = k++;
        if (head < i) continue;
        int64_t best = -1;
        for (int64_t s = 0; s < servers; s++)
            if ((best < 0 || load[s] < load[best]) && load[s] < slots) best = s;
        if (best < 0) continue;
        if (load[best]) {
            double elapsed = ta - last[best];
            busy[best] += elapsed;
            area[best] += (double)load[best] * elapsed;
        }
        last[best] = ta;
        load[best] += 1;
        head++;
        admit[i] = ta, replica[i] = best, first[i] = ta + ttft[i];
        push(heap, &size, (Departure){ta + service[i], order++, best, i});
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
freed:
    free(load), free(last), free(busy), free(area), free(heap);
done:
    for (int j = 0; j < got; j++) PyBuffer_Release(&views[j]);
    return result;
}

static PyMethodDef methods[] = {
    {"fifo_slots", fifo_slots, METH_VARARGS,
     "fifo_slots(arrival, service, ttft, servers, slots, samples, admit, first, end, replica, sampled): "
     "see sim/model/fastpath.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "llmsim's compiled kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
