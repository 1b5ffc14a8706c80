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

/* A binary min-heap of TYPE in an array, ordered by BEFORE(&a, &b): NAME_push and NAME_pop, which keep the
 * heap's size in *size (heapq's algorithm, so ties come out as Python's heapq gives them). */
#define DEFINE_HEAP(NAME, TYPE, BEFORE)                                          \
    static void NAME##_push(TYPE *heap, Py_ssize_t *size, TYPE item) {           \
        Py_ssize_t k = (*size)++;                                                \
        while (k > 0) {                                                          \
            Py_ssize_t parent = (k - 1) / 2;                                     \
            if (!BEFORE(&item, &heap[parent])) break;                            \
            heap[k] = heap[parent];                                              \
            k = parent;                                                          \
        }                                                                        \
        heap[k] = item;                                                          \
    }                                                                            \
    static TYPE NAME##_pop(TYPE *heap, Py_ssize_t *size) {                       \
        TYPE top = heap[0], last = heap[--(*size)];                              \
        Py_ssize_t k = 0, n = *size;                                             \
        while (1) {                                                              \
            Py_ssize_t child = 2 * k + 1;                                        \
            if (child >= n) break;                                               \
            if (child + 1 < n && BEFORE(&heap[child + 1], &heap[child])) child++; \
            if (!BEFORE(&heap[child], &last)) break;                             \
            heap[k] = heap[child];                                               \
            k = child;                                                           \
        }                                                                        \
        if (n > 0) heap[k] = last;                                               \
        return top;                                                              \
    }

DEFINE_HEAP(departures, Departure, earlier)

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
            Departure d = departures_pop(heap, &size);
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
                departures_push(heap, &size, (Departure){t + service[i], order++, s, i});
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
        departures_push(heap, &size, (Departure){ta + service[i], order++, best, i});
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

/* ---------------------------------------------------------------------------------------------------------
 * engine_replicas: open-loop requests on `replicas` iteration-level engine replicas behind one plain FIFO queue,
 * as sim/model/serving/engine.py's EngineReplica and endpoint.py's Endpoint run them on the event path, phase
 * for phase and operation for operation (equal to the bit). The replicas' batches and phases are the engine
 * core the event path's compiled replica runs too (sim/_engine_core.h); the admissions, the queue and the
 * clock are this loop's. What the fast path leaves to the event path (cancellation, cold starts, draining, a
 * prefix cache, slow episodes, calibrated-range tracking) is not here.
 */
static int prompt_of(void *engine, int64_t i, int64_t *out);
#define CORE_PROMPT(core, i, out) prompt_of((core)->owner, (i), (out))
#include "_engine_core.h"

typedef struct {
    int64_t replicas;
    const int64_t *prompt, *output;
    double *admit, *first, *end;
    int64_t *replica;
    int64_t *queue;   /* waiting requests, FIFO: queue[q_head..q_tail) */
    Py_ssize_t q_head, q_tail;
    Core *r;          /* each replica's batch and phases */
    double *boundary; /* when each replica's phase in flight ends (INFINITY: idle) */
} Engine;

static int prompt_of(void *engine, int64_t i, int64_t *out) {
    *out = ((Engine *)engine)->prompt[i];
    return 0;
}

/* EngineReplica._start_phase: the replica's next boundary */
static int start_phase(Engine *e, int64_t index, double now) {
    double duration;
    int planned = core_start_phase(&e->r[index], now, &duration);
    if (planned < 0) return -1;
    e->boundary[index] = planned ? now + duration : INFINITY;
    return 0;
}

/* EngineReplica.admit (no handshake) and _join_now (no prefix cache); -1 on a Python error */
static int admit(Engine *e, int64_t index, int64_t i, double now) {
    Core *c = &e->r[index];
    core_account(c, now);
    e->admit[i] = now;
    e->replica[i] = index;
    if (c->kv_capacity >= 0) c->kv_used += e->prompt[i] + e->output[i];
    c->load += 1;
    Prefilling *entry = core_prefilling_at(c, c->p_count++);
    entry->request = i, entry->left = e->prompt[i];
    if (c->phase == IDLE) {
        /* the event path's _wake, due at this very instant, runs next: nothing else is due then */
        c->phase = BOUNDARY;
        return start_phase(e, index, now);
    }
    double delay;
    if (c->phase == DECODE && core_cut(c, now, &delay)) e->boundary[index] = now + delay;
    return 0;
}

/* EngineReplica.can_admit */
static int can_admit(Engine *e, Core *c, int64_t i) {
    if (c->load >= c->max_batch) return 0;
    return c->kv_capacity < 0 || c->kv_used + e->prompt[i] + e->output[i] <= c->kv_capacity;
}

/* EngineReplica._complete and _release */
static void complete(Engine *e, Core *c, int64_t i, double now) {
    e->end[i] = now;
    c->load -= 1;
    if (c->kv_capacity >= 0) c->kv_used -= e->prompt[i] + e->output[i];
}

/* EngineReplica._boundary (with _finish_prompts and the endpoint's refill) */
static int boundary(Engine *e, int64_t index, double now) {
    Core *c = &e->r[index];
    core_account(c, now);
    int phase = c->phase;
    c->phase = BOUNDARY;
    int64_t step = c->step + c->steps;
    c->step = step;
    if (c->noisy) c->position += c->steps;
    if (phase == PREFILL) {
        core_prefilling_at(c, 0)->left -= c->steps * c->chunk;
    } else if (phase == MIXED) {
        int64_t left = c->chunk;
        while (left > 0) {
            Prefilling *entry = core_prefilling_at(c, 0);
            if (entry->left > left) {
                entry->left -= left;
                break;
            }
            left -= entry->left;
            int64_t i = entry->request;
            c->p_head = (c->p_head + 1) % c->max_batch, c->p_count--;
            e->first[i] = now;
            int64_t remaining = e->output[i] - 1;
            if (remaining > 0) {
                core_decodes_push(c, (Decoding){step + remaining, i});
                c->context_base += e->prompt[i] + 1 - step;
            } else {
                complete(e, c, i, now);
            }
        }
    }
    while (c->n_decoding && c->decoding[0].finish <= step) {
        Decoding done = core_decodes_pop(c);
        c->context_base -= e->prompt[done.request] + e->output[done.request] - done.finish;
        complete(e, c, done.request, now);
    }
    while (e->q_head < e->q_tail && can_admit(e, c, e->queue[e->q_head])) {
        if (admit(e, index, e->queue[e->q_head++], now) < 0) return -1;
    }
    return start_phase(e, index, now);
}

/* Endpoint.submit (plain: FIFO, nothing held back); -1 on a Python error */
static int submit(Engine *e, int64_t i, double now) {
    int64_t kv_capacity = e->r[0].kv_capacity;
    if (kv_capacity >= 0 && e->prompt[i] + e->output[i] > kv_capacity) {
        e->end[i] = now;  /* rejected: it can never fit the KV cache */
        return 0;
    }
    if (e->q_head == e->q_tail) {
        int64_t best = -1;
        for (int64_t s = 0; s < e->replicas; s++)
            if ((best < 0 || e->r[s].load < e->r[best].load) && can_admit(e, &e->r[s], i)) best = s;
        if (best >= 0) return admit(e, best, i, now);
    }
    e->queue[e->q_tail++] = i;
    return 0;
}

static PyObject *engine_replicas(PyObject *self, PyObject *args) {
    /* arrival, prompt, output, samples (in); noise sources (a list: a callable per replica, or empty: no noise);
     * admit, first, end, replica, sampled (out) */
    PyObject *objs[10];
    Engine e = {0};
    Core p = {0}; /* the parameters every replica shares */
    if (!PyArg_ParseTuple(args, "OOOOOLLLLLLddddddddOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4],
                          &e.replicas, &p.max_batch, &p.budget_tokens, &p.kv_capacity, &p.max_stretch, &p.block,
                          &p.base_s, &p.decode_s, &p.prefill_s, &p.kv_s, &p.attention_s, &p.base_share_s,
                          &p.decode_work_s, &p.work_scale, &objs[5], &objs[6], &objs[7], &objs[8], &objs[9]))
        return NULL;
    if (e.replicas < 1 || p.max_batch < 1 || p.budget_tokens < p.max_batch || p.block < 2 || p.max_stretch < 1 ||
        p.max_stretch > p.block / 2 || !(p.base_s > 0)) {
        PyErr_SetString(PyExc_ValueError, "engine_replicas: parameters out of range");
        return NULL;
    }
    static const char *names[10] = {"arrival", "prompt", "output", "samples", "noise", "admit", "first", "end",
                                    "replica", "sampled"};
    Py_buffer views[10];
    int got = 0;
    for (; got < 10; got++) {
        if (got == 4) continue;  /* the noise sources: a list, not a buffer */
        if (as_buffer(objs[got], &views[got], got >= 5, names[got], 8) < 0) break;
    }
    PyObject *result = NULL;
    if (got < 10) goto done;
    Py_ssize_t n = views[0].len / 8, m = views[3].len / 8;
    PyObject *sources = objs[4];
    if (!PyList_Check(sources) || (PyList_GET_SIZE(sources) != 0 && PyList_GET_SIZE(sources) != e.replicas)) {
        PyErr_SetString(PyExc_TypeError, "engine_replicas: noise sources: a list of one callable per replica, or []");
        goto done;
    }
    if (views[1].len / 8 != n || views[2].len / 8 != n || views[5].len / 8 != n || views[6].len / 8 != n ||
        views[7].len / 8 != n || views[8].len / 8 != n || views[9].len / 8 != 5 * m) {
        PyErr_SetString(PyExc_ValueError, "engine_replicas: arrays of mismatched lengths");
        goto done;
    }
    const double *arrival = views[0].buf, *samples = views[3].buf;
    double *sampled = views[9].buf;
    e.prompt = views[1].buf, e.output = views[2].buf;
    e.admit = views[5].buf, e.first = views[6].buf, e.end = views[7].buf, e.replica = views[8].buf;
    p.noisy = PyList_GET_SIZE(sources) > 0;
    e.queue = malloc((size_t)(n + 1) * sizeof(int64_t));
    e.r = calloc((size_t)e.replicas, sizeof(Core));
    e.boundary = malloc((size_t)e.replicas * sizeof(double));
    int ok = e.queue && e.r && e.boundary;
    if (!ok) PyErr_NoMemory();
    for (int64_t s = 0; ok && s < e.replicas; s++) {
        e.r[s] = p;
        e.r[s].owner = &e;
        e.r[s].noise_source = p.noisy ? PyList_GET_ITEM(sources, s) : NULL;  /* borrowed: the list holds it */
        e.boundary[s] = INFINITY;
        ok = core_alloc(&e.r[s]) == 0;
    }
    if (!ok) goto freed;
    /* The GIL stays held: a noise source is Python, called now and then (once per few thousand steps). */
    int status = 0;
    Py_ssize_t k = 0, s_next = 0;
    double next_sample = m > 0 ? samples[0] : INFINITY;
    while (status == 0) {
        double ta = k < n ? arrival[k] : INFINITY, tb = INFINITY;
        int64_t b = -1;
        for (int64_t s = 0; s < e.replicas; s++)
            if (e.boundary[s] < tb) tb = e.boundary[s], b = s;
        /* on a tie (probability zero with these arrivals): the sample, then the boundary, then the arrival */
        if (next_sample <= ta && next_sample <= tb) {
            if (next_sample == INFINITY) break;
            double t = next_sample, totals[4] = {0.0, 0.0, 0.0, 0.0};
            for (int64_t s = 0; s < e.replicas; s++) {  /* Endpoint.counters */
                core_account(&e.r[s], t);
                totals[0] += e.r[s].busy;
                totals[1] += e.r[s].area;
                totals[2] += e.r[s].work;
                totals[3] += t - 0.0;
            }
            double *row = sampled + 5 * s_next;
            row[0] = totals[0], row[1] = totals[1], row[2] = totals[2], row[3] = totals[3];
            row[4] = (double)(e.q_tail - e.q_head);
            s_next++;
            next_sample = s_next < m ? samples[s_next] : INFINITY;
        } else if (tb <= ta) {
            status = boundary(&e, b, tb);
        } else {
            status = submit(&e, k, ta);
            k++;
        }
    }
    if (status == 0) {
        int64_t phases = 0;  /* the event path schedules a boundary for each phase planned (and each cut) */
        for (int64_t s = 0; s < e.replicas; s++) phases += e.r[s].generation;
        result = PyLong_FromLongLong((long long)phases);
    }
freed:
    for (int64_t s = 0; e.r && s < e.replicas; s++) core_free(&e.r[s]);
    free(e.r), free(e.queue), free(e.boundary);
done:
    for (int j = 0; j < got; j++)
        if (j != 4) PyBuffer_Release(&views[j]);
    return result;
}

static PyMethodDef methods[] = {
    {"fifo_slots", fifo_slots, METH_VARARGS,
     "fifo_slots(arrival, service, ttft, servers, slots, samples, admit, first, end, replica, sampled): "
     "see sim/model/fastpath.py"},
    {"engine_replicas", engine_replicas, METH_VARARGS,
     "engine_replicas(arrival, prompt, output, samples, noise, replicas, max_batch, budget_tokens, kv_capacity, "
     "max_stretch, block, base_s, decode_s, prefill_s, kv_s, attention_s, base_share_s, decode_work_s, work_scale, "
     "admit, first, end, replica, sampled) -> phases planned: see sim/model/fastpath.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "llmsim's compiled kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
