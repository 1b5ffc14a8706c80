/* One engine replica's batch and its phase planning: the part of sim/model/serving/engine.py's EngineReplica that
 * the fast path's kernel (sim/_kernels.c, engine_replicas) and the event path's compiled replica (sim/_engine.c,
 * Replica) share. Each function names its Python original and does the same operations in the same order (built
 * with -ffp-contract=off), so both give the Python engine's results to the bit.
 *
 * The includer defines CORE_PROMPT(core, i, out) before including this file: request i's prompt tokens into
 * *out, evaluating to 0 (or -1 with a Python error set). Planning a phase or a cut bumps `generation` and hands
 * back when the phase ends; the includer makes that a boundary (an event, or its own loop's next time).
 */
#ifndef LLMSIM_ENGINE_CORE_H
#define LLMSIM_ENGINE_CORE_H

#include <Python.h>
#include <math.h>
#include <stdint.h>

enum { IDLE = 0, DECODE = 1, PREFILL = 2, MIXED = 3, BOUNDARY = 4 };

typedef struct { int64_t finish, request; } Decoding; /* heap by (finish step, request), as Python's tuples */
typedef struct { int64_t request, left; } Prefilling; /* FIFO of prompts: tokens still to read */

typedef struct {
    /* the step-time model */
    int64_t max_batch, budget_tokens, kv_capacity, max_stretch, block; /* kv_capacity < 0: none */
    double base_s, decode_s, prefill_s, kv_s, attention_s, base_share_s, decode_work_s, work_scale;
    int simple, track_context, track_peak, noisy;
    /* the batch */
    Decoding *decoding;
    Py_ssize_t n_decoding;
    Prefilling *prefilling; /* a ring of max_batch entries */
    Py_ssize_t p_head, p_count;
    int64_t load, kv_used, context_base, step, steps, chunk, generation;
    int64_t peak[3]; /* the most decoding sequences, prefill tokens and context tokens of a step */
    int phase;
    double t0, s0, growth, last, busy, area, work, work_rate;
    /* the noise window (StepNoise): cum[j] = g[0] + ... + g[j-1] from step `first` on */
    double *cum, *wcum;
    int64_t position, at, first, gsize;
    PyObject *noise_source; /* noise_source(start) -> the stream's factors from step `start` on (borrowed) */
    Py_buffer noise;        /* the latest of them: steps noise_first.. of the replica's stream */
    int64_t noise_first;
    void *owner;            /* the includer's, for CORE_PROMPT */
} Core;

/* The core's arrays; -1 (memory error set) when they cannot be had. The parameters are set by the caller. */
static inline int core_alloc(Core *c) {
    c->decoding = PyMem_Calloc((size_t)c->max_batch, sizeof(Decoding));
    c->prefilling = PyMem_Calloc((size_t)c->max_batch, sizeof(Prefilling));
    if (c->noisy) {
        c->cum = PyMem_Calloc((size_t)c->block + 1, sizeof(double));
        c->wcum = PyMem_Calloc((size_t)c->block + 1, sizeof(double));
    }
    if (!c->decoding || !c->prefilling || (c->noisy && (!c->cum || !c->wcum))) {
        PyErr_NoMemory();
        return -1;
    }
    c->simple = c->kv_s == 0.0 && c->attention_s == 0.0 && !c->track_peak && !c->noisy;
    c->track_context = c->kv_s != 0.0 || c->track_peak;
    return 0;
}

static inline void core_free(Core *c) {
    if (c->noise.buf != NULL) PyBuffer_Release(&c->noise), c->noise.buf = NULL;
    PyMem_Free(c->decoding), PyMem_Free(c->prefilling), PyMem_Free(c->cum), PyMem_Free(c->wcum);
    c->decoding = NULL, c->prefilling = NULL, c->cum = NULL, c->wcum = NULL;
}

static inline int decoding_before(const Decoding *a, const Decoding *b) {
    return a->finish < b->finish || (a->finish == b->finish && a->request < b->request);
}

static inline void core_decodes_push(Core *c, Decoding item) {
    Py_ssize_t k = c->n_decoding++;
    while (k > 0) {
        Py_ssize_t parent = (k - 1) / 2;
        if (!decoding_before(&item, &c->decoding[parent])) break;
        c->decoding[k] = c->decoding[parent];
        k = parent;
    }
    c->decoding[k] = item;
}

static inline void core_decodes_sift(Core *c, Py_ssize_t k) {
    Decoding item = c->decoding[k];
    Py_ssize_t n = c->n_decoding;
    while (1) {
        Py_ssize_t child = 2 * k + 1;
        if (child >= n) break;
        if (child + 1 < n && decoding_before(&c->decoding[child + 1], &c->decoding[child])) child++;
        if (!decoding_before(&c->decoding[child], &item)) break;
        c->decoding[k] = c->decoding[child];
        k = child;
    }
    c->decoding[k] = item;
}

static inline Decoding core_decodes_pop(Core *c) {
    Decoding top = c->decoding[0];
    c->decoding[0] = c->decoding[--c->n_decoding];
    if (c->n_decoding > 0) core_decodes_sift(c, 0);
    return top;
}

static inline Prefilling *core_prefilling_at(Core *c, Py_ssize_t j) { return &c->prefilling[(c->p_head + j) % c->max_batch]; }

/* _account */
static inline void core_account(Core *c, double now) {
    if (c->load) {
        double elapsed = now - c->last;
        c->busy += elapsed;
        c->area += (double)c->load * elapsed;
        c->work += c->work_rate * elapsed;
    }
    c->last = now;
}

/* StepNoise.window: steps start..start+block-1 of the stream, with their running sums */
static inline int core_noise_window(Core *c, int64_t start) {
    if (c->noise.buf == NULL || start + c->block > c->noise_first + c->noise.len / 8) {
        if (c->noise.buf != NULL) PyBuffer_Release(&c->noise), c->noise.buf = NULL;
        PyObject *fresh = PyObject_CallFunction(c->noise_source, "L", (long long)start);
        if (fresh == NULL) return -1;
        int failed = PyObject_GetBuffer(fresh, &c->noise, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
        Py_DECREF(fresh); /* the buffer view keeps the array alive */
        if (failed < 0) return -1;
        c->noise_first = start;
        if (c->noise.itemsize != 8 || c->noise.len / 8 < c->block) {
            PyBuffer_Release(&c->noise), c->noise.buf = NULL;
            PyErr_SetString(PyExc_ValueError, "a noise source must return at least a block of doubles");
            return -1;
        }
    }
    const double *g = (const double *)c->noise.buf + (start - c->noise_first);
    c->cum[0] = 0.0, c->wcum[0] = 0.0;
    for (int64_t j = 0; j < c->block; j++) {
        c->cum[j + 1] = c->cum[j] + g[j];
        c->wcum[j + 1] = c->wcum[j] + (double)j * g[j];
    }
    c->first = start, c->gsize = c->block;
    return 0;
}

/* bisect.bisect_right(a, x, lo, hi) */
static inline int64_t core_bisect_right(const double *a, double x, int64_t lo, int64_t hi) {
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (x < a[mid]) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* StepClock.work: the noisy nominal time of the stretch's first m steps */
static inline double core_stretch_work(Core *c, int64_t m, double s0, double d) {
    if (!c->noisy) return d == 0.0 ? s0 * (double)m : s0 * (double)m + d * ((double)(m * (m - 1)) / 2.0);
    int64_t a = c->at, b = c->at + m;
    double g = c->cum[b] - c->cum[a];
    if (d == 0.0) return s0 * g;
    return s0 * g + d * (c->wcum[b] - c->wcum[a] - (double)a * g);
}

/* _done_by (with StepClock.done_noisy and done_by, no slow time): steps of the phase in flight done by now */
static inline int64_t core_done_by(Core *c, double now) {
    double elapsed = now - c->t0, s0 = c->s0, d = c->growth;
    int64_t n = c->steps;
    if (!c->noisy) {
        if (d == 0.0) {
            if (!(s0 > 0)) return n;
            int64_t m = (int64_t)(elapsed / s0);
            return m < n ? m : n;
        }
        double b = s0 - d / 2.0;
        int64_t m = (int64_t)((sqrt(b * b + 2.0 * d * elapsed) - b) / d);
        if (m > n) m = n;
        if (m > 0 && s0 * (double)m + d * ((double)(m * (m - 1)) / 2.0) > elapsed) m -= 1;
        return m;
    }
    if (!(s0 > 0)) return n;
    int64_t a = c->at;
    int64_t m = core_bisect_right(c->cum, c->cum[a] + elapsed / s0, a, a + n + 1) - 1 - a;
    if (m > n) m = n;
    if (d == 0.0) return m;
    while (m > 0 && core_stretch_work(c, m, s0, d) > elapsed) m -= 1;
    return m;
}

/* _cut_after_current_step (with StepClock.cut, no slow time): end the phase at the end of the step in progress.
 * 1 when the phase was cut (its end is now + *delay, under a new generation), else 0. */
static inline int core_cut(Core *c, double now, double *delay) {
    int64_t done, n = c->steps;
    double end, s0 = c->s0, d = c->growth, elapsed = now - c->t0;
    if (c->simple) {
        done = s0 > 0 ? (int64_t)((now - c->t0) / s0) : n - 1;
        end = (double)(done + 1) * s0;
    } else if (n > 1) {
        if (!(s0 > 0)) {
            done = n - 1; /* done_by is n: the cut lands on the last step */
            end = core_stretch_work(c, done + 1, s0, d);
        } else if (!c->noisy) {
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
            int64_t a = c->at;
            const double *cum = c->cum, *wcum = c->wcum;
            int64_t m = core_bisect_right(cum, cum[a] + elapsed / s0, a, a + n + 1) - 1 - a;
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
        return 0;
    }
    if (done + 1 >= n) return 0;
    c->steps = done + 1;
    c->generation += 1;
    double wait = c->t0 + end - now;
    *delay = wait > 0.0 ? wait : 0.0;
    return 1;
}

/* _attention_pairs */
static inline int core_attention_pairs(Core *c, int64_t prefill, double *out) {
    double pairs = 0.0;
    int64_t room = prefill;
    for (Py_ssize_t j = 0; j < c->p_count; j++) {
        Prefilling *entry = core_prefilling_at(c, j);
        int64_t prompt, chunk = entry->left < room ? entry->left : room;
        if (CORE_PROMPT(c, entry->request, &prompt) < 0) return -1;
        pairs += (double)chunk * ((double)(prompt - entry->left) + (double)(chunk + 1) / 2.0);
        room -= chunk;
        if (room <= 0) break;
    }
    *out = pairs;
    return 0;
}

/* _start_phase (with _with_attention and _track_peak): 1 when a phase is planned (its end is now + *duration,
 * under a new generation), 0 when the replica goes idle, -1 on an error. */
static inline int core_start_phase(Core *c, double now, double *duration) {
    Py_ssize_t n_decode = c->n_decoding;
    int64_t prefill;
    if (c->p_count) {
        int64_t budget = c->budget_tokens - n_decode;
        int64_t head_left = core_prefilling_at(c, 0)->left;
        if (head_left > budget) {
            if (budget <= 0) {
                PyErr_SetString(PyExc_ZeroDivisionError, "no prefill budget left beside the decoding batch");
                return -1;
            }
            int64_t steps = (head_left - 1) / budget; /* both positive: floor division */
            if (n_decode && c->decoding[0].finish - c->step < steps) steps = c->decoding[0].finish - c->step;
            c->phase = PREFILL, c->steps = steps, c->chunk = budget;
            prefill = budget;
        } else {
            prefill = 0;
            for (Py_ssize_t j = 0; j < c->p_count; j++) {
                prefill += core_prefilling_at(c, j)->left;
                if (prefill >= budget) {
                    prefill = budget;
                    break;
                }
            }
            c->phase = MIXED, c->steps = 1, c->chunk = prefill;
        }
    } else if (n_decode) {
        c->phase = DECODE, c->steps = c->decoding[0].finish - c->step, c->chunk = 0;
        prefill = 0;
    } else {
        c->phase = IDLE;
        c->work_rate = 0.0;
        return 0;
    }
    double s0 = c->base_s + c->decode_s * (double)n_decode + c->prefill_s * (double)prefill;
    int64_t steps = c->steps;
    if (c->simple) {
        c->s0 = s0;
        c->work_rate = s0 > 0 ? (c->prefill_s * (double)prefill + c->decode_work_s * (double)n_decode) / s0 : 0.0;
        *duration = (double)steps * s0;
    } else {
        double growth = 0.0;
        if (c->kv_s != 0.0) {
            s0 += c->kv_s * (double)(c->context_base + (int64_t)n_decode * c->step);
            growth = c->kv_s * (double)n_decode;
        }
        if (prefill && c->attention_s != 0.0) {
            Prefilling *head = core_prefilling_at(c, 0);
            if (c->phase == PREFILL || head->left >= prefill) {
                int64_t prompt;
                if (CORE_PROMPT(c, head->request, &prompt) < 0) return -1;
                s0 += c->attention_s * (double)prefill * ((double)(prompt - head->left) + (double)(prefill + 1) / 2.0);
                if (c->phase == PREFILL) growth += c->attention_s * (double)prefill * (double)prefill;
            } else {
                double pairs;
                if (core_attention_pairs(c, prefill, &pairs) < 0) return -1;
                s0 = s0 + c->attention_s * pairs;
            }
        }
        if (steps > c->max_stretch) steps = c->steps = c->max_stretch;
        c->s0 = s0, c->growth = growth;
        if (c->track_peak) {
            if (n_decode > c->peak[0]) c->peak[0] = n_decode;
            if (prefill > c->peak[1]) c->peak[1] = prefill;
            if (n_decode) {
                int64_t context = c->context_base + (int64_t)n_decode * (c->step + steps - 1);
                if (context > c->peak[2]) c->peak[2] = context;
            }
        }
        double grown = growth != 0.0 ? growth * ((double)(steps * (steps - 1)) / 2.0) : 0.0;
        if (!c->noisy) {
            *duration = s0 * (double)steps + grown;
        } else {
            int64_t at = c->position - c->first;
            if (at + steps >= c->gsize + 1) {
                if (core_noise_window(c, c->position) < 0) return -1;
                at = 0;
            }
            c->at = at;
            double g = c->cum[at + steps] - c->cum[at];
            *duration = growth != 0.0 ? s0 * g + growth * (c->wcum[at + steps] - c->wcum[at] - (double)at * g)
                                      : s0 * g;
        }
        double work = (s0 - c->base_s + c->base_share_s * (double)n_decode) * (double)steps + grown;
        c->work_rate = *duration > 0 ? work * c->work_scale / *duration : 0.0;
    }
    c->t0 = now;
    c->generation += 1;
    return 1;
}

#endif
