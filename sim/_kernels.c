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
 * for phase and operation for operation (the same additions and products in the same order: equal to the bit).
 * What the fast path leaves to the event path (cancellation, cold starts, draining, a prefix cache, slow
 * episodes, calibrated-range tracking) is not here. Each function names its Python original.
 */
enum { IDLE = 0, DECODE = 1, PREFILL = 2, MIXED = 3, BOUNDARY = 4 };

typedef struct { int64_t finish, request; } Decoding;   /* heap by (finish step, request), as Python's tuples */
typedef struct { int64_t request, left; } Prefilling;   /* FIFO of prompts: tokens still to read */

typedef struct {
    Decoding *decoding;
    Py_ssize_t n_decoding;
    Prefilling *prefilling;          /* a ring of max_batch entries */
    Py_ssize_t p_head, p_count;
    int64_t context_base, load, kv_used, step, steps, chunk, position, at, first, gsize;
    int phase;
    double t0, s0, growth, last, busy, area, work, work_rate;
    double boundary;                 /* when the phase in flight ends (INFINITY: idle) */
    double *cum, *wcum;              /* the noise window's running sums (StepNoise.cum, .wcum) */
    PyObject *noise_source;          /* noise_source(start) -> the stream's factors from step `start` on */
    Py_buffer noise;                 /* the latest of them: steps noise_first.. of the replica's stream */
    int64_t noise_first;
} Replica;

typedef struct {
    int64_t replicas, max_batch, budget_tokens, kv_capacity, max_stretch, block;
    double base_s, decode_s, prefill_s, kv_s, attention_s, base_share_s, decode_work_s, work_scale;
    int simple, noisy;
    const int64_t *prompt, *output;
    double *admit, *first, *end;
    int64_t *replica;
    int64_t *queue;                  /* waiting requests, FIFO: queue[q_head..q_tail) */
    Py_ssize_t q_head, q_tail;
    int64_t phases;                  /* phases planned (the event path schedules a boundary for each) */
    Replica *r;
} Engine;

static int decoding_before(const Decoding *a, const Decoding *b) {
    return a->finish < b->finish || (a->finish == b->finish && a->request < b->request);
}

DEFINE_HEAP(decodes, Decoding, decoding_before)

static Prefilling *prefilling_at(Engine *e, Replica *rp, Py_ssize_t j) {
    return &rp->prefilling[(rp->p_head + j) % e->max_batch];
}

/* EngineReplica._account */
static void account(Replica *rp, double now) {
    if (rp->load) {
        double elapsed = now - rp->last;
        rp->busy += elapsed;
        rp->area += (double)rp->load * elapsed;
        rp->work += rp->work_rate * elapsed;
    }
    rp->last = now;
}

/* StepNoise.window: steps start..start+block-1 of the stream, with their running sums; -1 on a Python error */
static int noise_window(Engine *e, Replica *rp, int64_t start) {
    if (rp->noise.buf == NULL || start + e->block > rp->noise_first + rp->noise.len / 8) {
        if (rp->noise.buf != NULL) PyBuffer_Release(&rp->noise), rp->noise.buf = NULL;
        PyObject *fresh = PyObject_CallFunction(rp->noise_source, "L", (long long)start);
        if (fresh == NULL) return -1;
        int failed = as_buffer(fresh, &rp->noise, 0, "noise", 8);
        Py_DECREF(fresh);  /* the buffer view keeps the array alive */
        if (failed < 0) return -1;
        rp->noise_first = start;
        if (rp->noise.len / 8 < e->block) {
            PyErr_SetString(PyExc_ValueError, "engine_replicas: a noise source returned less than a block");
            return -1;
        }
    }
    const double *g = (const double *)rp->noise.buf + (start - rp->noise_first);
    rp->cum[0] = 0.0, rp->wcum[0] = 0.0;
    for (int64_t j = 0; j < e->block; j++) {
        rp->cum[j + 1] = rp->cum[j] + g[j];
        rp->wcum[j + 1] = rp->wcum[j] + (double)j * g[j];
    }
    rp->first = start, rp->gsize = e->block;
    return 0;
}

/* EngineReplica._attention_pairs */
static double attention_pairs(Engine *e, Replica *rp, int64_t prefill) {
    double pairs = 0.0;
    int64_t room = prefill;
    for (Py_ssize_t j = 0; j < rp->p_count; j++) {
        Prefilling *entry = prefilling_at(e, rp, j);
        int64_t chunk = entry->left < room ? entry->left : room;
        pairs += (double)chunk * ((double)(e->prompt[entry->request] - entry->left) + (double)(chunk + 1) / 2.0);
        room -= chunk;
        if (room <= 0) break;
    }
    return pairs;
}

/* EngineReplica._start_phase (and _with_attention); -1 on a Python error (from a noise source) */
static int start_phase(Engine *e, Replica *rp, double now) {
    Py_ssize_t n_decode = rp->n_decoding;
    int64_t prefill;
    if (rp->p_count) {
        int64_t budget = e->budget_tokens - n_decode;
        int64_t head_left = prefilling_at(e, rp, 0)->left;
        if (head_left > budget) {
            int64_t steps = (head_left - 1) / budget;
            if (n_decode && rp->decoding[0].finish - rp->step < steps) steps = rp->decoding[0].finish - rp->step;
            rp->phase = PREFILL, rp->steps = steps, rp->chunk = budget;
            prefill = budget;
        } else {
            prefill = 0;
            for (Py_ssize_t j = 0; j < rp->p_count; j++) {
                prefill += prefilling_at(e, rp, j)->left;
                if (prefill >= budget) {
                    prefill = budget;
                    break;
                }
            }
            rp->phase = MIXED, rp->steps = 1, rp->chunk = prefill;
        }
    } else if (n_decode) {
        rp->phase = DECODE, rp->steps = rp->decoding[0].finish - rp->step, rp->chunk = 0;
        prefill = 0;
    } else {
        rp->phase = IDLE;
        rp->work_rate = 0.0;
        rp->boundary = INFINITY;
        return 0;
    }
    double s0 = e->base_s + e->decode_s * (double)n_decode + e->prefill_s * (double)prefill;
    int64_t steps = rp->steps;
    double duration;
    if (e->simple) {
        rp->s0 = s0;
        rp->work_rate = s0 > 0 ? (e->prefill_s * (double)prefill + e->decode_work_s * (double)n_decode) / s0 : 0.0;
        duration = (double)steps * s0;
    } else {
        double growth = 0.0;
        if (e->kv_s != 0.0) {
            s0 += e->kv_s * (double)(rp->context_base + (int64_t)n_decode * rp->step);
            growth = e->kv_s * (double)n_decode;
        }
        if (prefill && e->attention_s != 0.0) {
            Prefilling *head = prefilling_at(e, rp, 0);
            if (rp->phase == PREFILL || head->left >= prefill) {
                s0 += e->attention_s * (double)prefill *
                      ((double)(e->prompt[head->request] - head->left) + (double)(prefill + 1) / 2.0);
                if (rp->phase == PREFILL) growth += e->attention_s * (double)prefill * (double)prefill;
            } else {
                s0 = s0 + e->attention_s * attention_pairs(e, rp, prefill);
            }
        }
        if (steps > e->max_stretch) steps = rp->steps = e->max_stretch;
        rp->s0 = s0, rp->growth = growth;
        double grown = growth != 0.0 ? growth * ((double)(steps * (steps - 1)) / 2.0) : 0.0;
        if (!e->noisy) {
            duration = s0 * (double)steps + grown;
        } else {
            int64_t at = rp->position - rp->first;
            if (at + steps >= rp->gsize + 1) {
                if (noise_window(e, rp, rp->position) < 0) return -1;
                at = 0;
            }
            rp->at = at;
            double g = rp->cum[at + steps] - rp->cum[at];
            duration = growth != 0.0
                ? s0 * g + growth * (rp->wcum[at + steps] - rp->wcum[at] - (double)at * g)
                : s0 * g;
        }
        double work = (s0 - e->base_s + e->base_share_s * (double)n_decode) * (double)steps + grown;
        rp->work_rate = duration > 0 ? work * e->work_scale / duration : 0.0;
    }
    rp->t0 = now;
    rp->boundary = now + duration;
    e->phases++;
    return 0;
}

/* bisect.bisect_right(cum, x, lo, hi) */
static int64_t bisect_right(const double *a, double x, int64_t lo, int64_t hi) {
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (x < a[mid]) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* EngineReplica._cut_after_current_step (with StepClock.cut, no slow time): a prompt joined a decoding batch */
static void cut_after_current_step(Engine *e, Replica *rp, double now) {
    int64_t done, n = rp->steps;
    double end, s0 = rp->s0, d = rp->growth, elapsed = now - rp->t0;
    if (e->simple) {
        done = s0 > 0 ? (int64_t)((now - rp->t0) / s0) : n - 1;
        end = (double)(done + 1) * s0;
    } else if (n > 1) {
        if (!e->noisy) {
            if (d == 0.0) {
                done = (int64_t)(elapsed / s0);
                if (done > n - 1) done = n - 1;
                end = (double)(done + 1) * s0;
            } else {
                double b = s0 - d / 2.0;
                int64_t m = (int64_t)((sqrt(b * b + 2.0 * d * elapsed) - b) / d);
                if (m > n - 1) m = n - 1;
                if (m > 0 && s0 * (double)m + d * ((double)(m * (m - 1)) / 2.0) > elapsed) m -= 1;
                done = m;
                end = s0 * (double)(m + 1) + d * ((double)((m + 1) * m) / 2.0);
            }
        } else {
            int64_t a = rp->at;
            const double *cum = rp->cum, *wcum = rp->wcum;
            int64_t m = bisect_right(cum, cum[a] + elapsed / s0, a, a + n + 1) - 1 - a;
            if (m > n - 1) m = n - 1;
            if (d == 0.0) {
                end = s0 * (cum[a + m + 1] - cum[a]);
            } else {
                while (m > 0 && s0 * (cum[a + m] - cum[a]) +
                                    d * (wcum[a + m] - wcum[a] - (double)a * (cum[a + m] - cum[a])) > elapsed)
                    m -= 1;
                double g = cum[a + m + 1] - cum[a];
                end = s0 * g + d * (wcum[a + m + 1] - wcum[a] - (double)a * g);
            }
            done = m;
        }
    } else {
        return;
    }
    if (done + 1 < n) {
        rp->steps = done + 1;
        double wait = rp->t0 + end - now;
        rp->boundary = now + (wait > 0.0 ? wait : 0.0);
        e->phases++;
    }
}

/* EngineReplica.admit (no handshake) and _join_now (no prefix cache); -1 on a Python error */
static int admit(Engine *e, int64_t index, int64_t i, double now) {
    Replica *rp = &e->r[index];
    account(rp, now);
    e->admit[i] = now;
    e->replica[i] = index;
    if (e->kv_capacity >= 0) rp->kv_used += e->prompt[i] + e->output[i];
    rp->load += 1;
    Prefilling *entry = &rp->prefilling[(rp->p_head + rp->p_count++) % e->max_batch];
    entry->request = i, entry->left = e->prompt[i];
    if (rp->phase == IDLE) {
        /* the event path's _wake, due at this very instant, runs next: nothing else is due then */
        rp->phase = BOUNDARY;
        return start_phase(e, rp, now);
    }
    if (rp->phase == DECODE) cut_after_current_step(e, rp, now);
    return 0;
}

/* EngineReplica.can_admit */
static int can_admit(Engine *e, Replica *rp, int64_t i) {
    if (rp->load >= e->max_batch) return 0;
    return e->kv_capacity < 0 || rp->kv_used + e->prompt[i] + e->output[i] <= e->kv_capacity;
}

/* EngineReplica._complete and _release */
static void complete(Engine *e, Replica *rp, int64_t i, double now) {
    e->end[i] = now;
    rp->load -= 1;
    if (e->kv_capacity >= 0) rp->kv_used -= e->prompt[i] + e->output[i];
}

/* EngineReplica._boundary (with _finish_prompts and the endpoint's refill) */
static int boundary(Engine *e, int64_t index, double now) {
    Replica *rp = &e->r[index];
    account(rp, now);
    int phase = rp->phase;
    rp->phase = BOUNDARY;
    int64_t step = rp->step + rp->steps;
    rp->step = step;
    if (e->noisy) rp->position += rp->steps;
    if (phase == PREFILL) {
        prefilling_at(e, rp, 0)->left -= rp->steps * rp->chunk;
    } else if (phase == MIXED) {
        int64_t left = rp->chunk;
        while (left > 0) {
            Prefilling *entry = prefilling_at(e, rp, 0);
            if (entry->left > left) {
                entry->left -= left;
                break;
            }
            left -= entry->left;
            int64_t i = entry->request;
            rp->p_head = (rp->p_head + 1) % e->max_batch, rp->p_count--;
            e->first[i] = now;
            int64_t remaining = e->output[i] - 1;
            if (remaining > 0) {
                decodes_push(rp->decoding, &rp->n_decoding, (Decoding){step + remaining, i});
                rp->context_base += e->prompt[i] + 1 - step;
            } else {
                complete(e, rp, i, now);
            }
        }
    }
    while (rp->n_decoding && rp->decoding[0].finish <= step) {
        Decoding done = decodes_pop(rp->decoding, &rp->n_decoding);
        rp->context_base -= e->prompt[done.request] + e->output[done.request] - done.finish;
        complete(e, rp, done.request, now);
    }
    while (e->q_head < e->q_tail && can_admit(e, rp, e->queue[e->q_head])) {
        if (admit(e, index, e->queue[e->q_head++], now) < 0) return -1;
    }
    return start_phase(e, rp, now);
}

/* Endpoint.submit (plain: FIFO, nothing held back); -1 on a Python error */
static int submit(Engine *e, int64_t i, double now) {
    if (e->kv_capacity >= 0 && e->prompt[i] + e->output[i] > e->kv_capacity) {
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
    if (!PyArg_ParseTuple(args, "OOOOOLLLLLLddddddddOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4],
                          &e.replicas, &e.max_batch, &e.budget_tokens, &e.kv_capacity, &e.max_stretch, &e.block,
                          &e.base_s, &e.decode_s, &e.prefill_s, &e.kv_s, &e.attention_s, &e.base_share_s,
                          &e.decode_work_s, &e.work_scale, &objs[5], &objs[6], &objs[7], &objs[8], &objs[9]))
        return NULL;
    if (e.replicas < 1 || e.max_batch < 1 || e.budget_tokens < e.max_batch || e.block < 2 || e.max_stretch < 1 ||
        e.max_stretch > e.block / 2 || !(e.base_s > 0)) {
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
    e.noisy = PyList_GET_SIZE(sources) > 0;
    e.simple = e.kv_s == 0.0 && e.attention_s == 0.0 && !e.noisy;
    e.queue = malloc((size_t)(n + 1) * sizeof(int64_t));
    e.r = calloc((size_t)e.replicas, sizeof(Replica));
    int ok = e.queue && e.r;
    for (int64_t s = 0; ok && s < e.replicas; s++) {
        Replica *rp = &e.r[s];
        rp->decoding = malloc((size_t)e.max_batch * sizeof(Decoding));
        rp->prefilling = malloc((size_t)e.max_batch * sizeof(Prefilling));
        rp->cum = calloc((size_t)e.block + 1, sizeof(double));
        rp->wcum = calloc((size_t)e.block + 1, sizeof(double));
        rp->noise_source = e.noisy ? PyList_GET_ITEM(sources, s) : NULL;  /* borrowed: the list holds it */
        rp->boundary = INFINITY;
        ok = rp->decoding && rp->prefilling && rp->cum && rp->wcum;
    }
    if (!ok) {
        PyErr_NoMemory();
        goto freed;
    }
    /* The GIL stays held: a noise source is Python, called now and then (once per few thousand steps). */
    int status = 0;
    Py_ssize_t k = 0, s_next = 0;
    double next_sample = m > 0 ? samples[0] : INFINITY;
    while (status == 0) {
        double ta = k < n ? arrival[k] : INFINITY, tb = INFINITY;
        int64_t b = -1;
        for (int64_t s = 0; s < e.replicas; s++)
            if (e.r[s].boundary < tb) tb = e.r[s].boundary, b = s;
        /* on a tie (probability zero with these arrivals): the sample, then the boundary, then the arrival */
        if (next_sample <= ta && next_sample <= tb) {
            if (next_sample == INFINITY) break;
            double t = next_sample, totals[4] = {0.0, 0.0, 0.0, 0.0};
            for (int64_t s = 0; s < e.replicas; s++) {  /* Endpoint.counters */
                account(&e.r[s], t);
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
    if (status == 0) result = PyLong_FromLongLong((long long)e.phases);
freed:
    for (int64_t s = 0; e.r && s < e.replicas; s++) {
        free(e.r[s].decoding), free(e.r[s].prefilling), free(e.r[s].cum), free(e.r[s].wcum);
        if (e.r[s].noise.buf != NULL) PyBuffer_Release(&e.r[s].noise);
    }
    free(e.r), free(e.queue);
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
