/* An engine replica on the event path, compiled (optional: sim/model/serving/engine.py's EngineReplica is its
 * reference and its fallback, and gives the same bits).
 *
 * `Replica` is a line-for-line port of EngineReplica for replicas without slow episodes or stalls: admission,
 * a handshake's delayed join, chunked prefill, the decode heap, skip-ahead over stretches of identical steps,
 * cuts, cancellation (a cancelled sequence leaves at the next boundary), per-step noise, the context and
 * attention terms, KV capacity, the calibrated-range peaks and the time-weighted counters. Each function
 * names its Python original; the arithmetic is the same operations in the same order (built with
 * -ffp-contract=off), so the results are equal to the bit. What stays Python lives in the subclass
 * (engine.CompiledReplica): the cold start, draining, the prefix-block cache.
 *
 * It reads and writes the recorder's columns by request index through the sequence protocol (they grow as
 * requests arrive) and talks to its endpoint as EngineReplica does: `waiting`, `refill(self)`, `on_done(i)`.
 * Its boundaries are events of the model's event core (`call_later`, handed in), dispatched to its own
 * bound methods: a phase costs no Python frame of its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

enum { IDLE = 0, DECODE = 1, PREFILL = 2, MIXED = 3, BOUNDARY = 4 };

typedef struct { int64_t finish, request; } Decoding; /* heap by (finish step, request), as Python's tuples */
typedef struct { int64_t request, left; } Prefilling; /* FIFO of prompts: tokens still to read */

typedef struct {
    PyObject_HEAD
    /* what Python sees (members) */
    PyObject *env, *endpoint, *rec, *retired, *fits, *block_cache;
    Py_ssize_t index, max_batch, capacity, load;
    int64_t kv_used;
    double created;
    char serving, draining;
    /* the recorder's columns and the event core */
    PyObject *prompt, *output, *outcome, *admit_col, *replica_col, *first_col, *end_col;
    PyObject *call_later, *boundary_cb, *wake_cb, *join_cb, *noise_source, *completed;
    /* the step-time model */
    int64_t budget_tokens, kv_capacity, max_stretch, block; /* kv_capacity < 0: none */
    double base_s, decode_s, prefill_s, kv_s, attention_s, base_share_s, decode_work_s, work_scale;
    int simple, track_context, track_peak, noisy;
    int64_t peak[3];
    /* the batch */
    Decoding *decoding;
    Py_ssize_t n_decoding;
    Prefilling *prefilling; /* a ring of max_batch entries */
    Py_ssize_t p_head, p_count;
    int64_t context_base, step, steps, chunk, generation, cancelled;
    int phase;
    double t0, s0, growth, last, busy_time, area, work, work_rate;
    /* the noise window (StepNoise): cum[j] = g[0] + ... + g[j-1] from step `first` on */
    double *cum, *wcum;
    int64_t position, at, first, gsize;
    Py_buffer noise;
    int64_t noise_first;
} Replica;

static PyObject *s_now, *s_value, *s_waiting, *s_refill, *s_on_done, *s_cached_tokens, *s_read, *s_prefix_read;

/* --- the recorder's columns ------------------------------------------------------------------------------ */
static int get_int(PyObject *seq, Py_ssize_t i, int64_t *out) {
    long long x;
    if (PyList_CheckExact(seq) && i >= 0 && i < PyList_GET_SIZE(seq)) { /* most columns read here are lists */
        x = PyLong_AsLongLong(PyList_GET_ITEM(seq, i));
    } else {
        PyObject *v = PySequence_GetItem(seq, i);
        if (v == NULL) return -1;
        x = PyLong_AsLongLong(v);
        Py_DECREF(v);
    }
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

static int get_float(PyObject *seq, Py_ssize_t i, double *out) {
    PyObject *v = PySequence_GetItem(seq, i);
    if (v == NULL) return -1;
    double x = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

static int set_object(PyObject *seq, Py_ssize_t i, PyObject *v) {
    if (v == NULL) return -1;
    int failed = PySequence_SetItem(seq, i, v);
    Py_DECREF(v);
    return failed;
}

static int env_now(Replica *self, double *now) {
    PyObject *v = PyObject_GetAttr(self->env, s_now);
    if (v == NULL) return -1;
    *now = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return *now == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* call_later(env, delay, callback[, value]) through the model's event core */
static int schedule(Replica *self, double delay, PyObject *callback, PyObject *value) {
    PyObject *d = PyFloat_FromDouble(delay);
    if (d == NULL) return -1;
    PyObject *args[4] = {self->env, d, callback, value};
    PyObject *call = PyObject_Vectorcall(self->call_later, args, value != NULL ? 4 : 3, NULL);
    Py_DECREF(d);
    if (call == NULL) return -1;
    Py_DECREF(call);
    return 0;
}

/* --- the batch's containers ------------------------------------------------------------------------------ */
static int decoding_before(const Decoding *a, const Decoding *b) {
    return a->finish < b->finish || (a->finish == b->finish && a->request < b->request);
}

static void decodes_push(Replica *self, Decoding item) {
    Py_ssize_t k = self->n_decoding++;
    while (k > 0) {
        Py_ssize_t parent = (k - 1) / 2;
        if (!decoding_before(&item, &self->decoding[parent])) break;
        self->decoding[k] = self->decoding[parent];
        k = parent;
    }
    self->decoding[k] = item;
}

static void decodes_sift(Replica *self, Py_ssize_t k) {
    Decoding item = self->decoding[k];
    Py_ssize_t n = self->n_decoding;
    while (1) {
        Py_ssize_t child = 2 * k + 1;
        if (child >= n) break;
        if (child + 1 < n && decoding_before(&self->decoding[child + 1], &self->decoding[child])) child++;
        if (!decoding_before(&self->decoding[child], &item)) break;
        self->decoding[k] = self->decoding[child];
        k = child;
    }
    self->decoding[k] = item;
}

static Decoding decodes_pop(Replica *self) {
    Decoding top = self->decoding[0];
    self->decoding[0] = self->decoding[--self->n_decoding];
    if (self->n_decoding > 0) decodes_sift(self, 0);
    return top;
}

static Prefilling *prefilling_at(Replica *self, Py_ssize_t j) {
    return &self->prefilling[(self->p_head + j) % self->max_batch];
}

/* --- EngineReplica's methods ------------------------------------------------------------------------------ */
/* _account */
static void account(Replica *self, double now) {
    if (self->load) {
        double elapsed = now - self->last;
        self->busy_time += elapsed;
        self->area += (double)self->load * elapsed;
        self->work += self->work_rate * elapsed;
    }
    self->last = now;
}

/* _release: request i leaves the batch, its place and KV free */
static int release(Replica *self, Py_ssize_t i) {
    self->load -= 1;
    if (self->kv_capacity >= 0) {
        int64_t prompt, output;
        if (get_int(self->prompt, i, &prompt) < 0 || get_int(self->output, i, &output) < 0) return -1;
        self->kv_used -= prompt + output;
    }
    if (self->load == 0 && !self->serving) { /* drained: only a draining replica completes while not serving */
        PyObject *now = PyObject_GetAttr(self->env, s_now);
        if (now == NULL) return -1;
        Py_XSETREF(self->retired, now);
    }
    return 0;
}

/* _complete */
static int complete(Replica *self, Py_ssize_t i, double now) {
    int64_t outcome;
    if (get_int(self->outcome, i, &outcome) < 0) return -1;
    if (outcome >= 0) { /* cancelled in its last step: its caller has moved on */
        self->cancelled -= 1;
        return release(self, i);
    }
    if (set_object(self->end_col, i, PyFloat_FromDouble(now)) < 0) return -1;
    Py_INCREF(self->completed);
    if (set_object(self->outcome, i, self->completed) < 0) return -1;
    if (release(self, i) < 0) return -1;
    PyObject *on_done = PyObject_GetAttr(self->endpoint, s_on_done);
    if (on_done == NULL) return -1;
    if (on_done != Py_None) {
        PyObject *result = PyObject_CallFunction(on_done, "n", i);
        Py_DECREF(on_done);
        if (result == NULL) return -1;
        Py_DECREF(result);
        return 0;
    }
    Py_DECREF(on_done);
    return 0;
}

static int refill(Replica *self) {
    PyObject *result = PyObject_CallMethodOneArg(self->endpoint, s_refill, (PyObject *)self);
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

/* StepNoise.window: steps start..start+block-1 of the stream, with their running sums */
static int noise_window(Replica *self, int64_t start) {
    if (self->noise.buf == NULL || start + self->block > self->noise_first + self->noise.len / 8) {
        if (self->noise.buf != NULL) PyBuffer_Release(&self->noise), self->noise.buf = NULL;
        PyObject *fresh = PyObject_CallFunction(self->noise_source, "L", (long long)start);
        if (fresh == NULL) return -1;
        int failed = PyObject_GetBuffer(fresh, &self->noise, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT);
        Py_DECREF(fresh); /* the buffer view keeps the array alive */
        if (failed < 0) return -1;
        self->noise_first = start;
        if (self->noise.itemsize != 8 || self->noise.len / 8 < self->block) {
            PyBuffer_Release(&self->noise), self->noise.buf = NULL;
            PyErr_SetString(PyExc_ValueError, "Replica: a noise source must return at least a block of doubles");
            return -1;
        }
    }
    const double *g = (const double *)self->noise.buf + (start - self->noise_first);
    self->cum[0] = 0.0, self->wcum[0] = 0.0;
    for (int64_t j = 0; j < self->block; j++) {
        self->cum[j + 1] = self->cum[j] + g[j];
        self->wcum[j + 1] = self->wcum[j] + (double)j * g[j];
    }
    self->first = start, self->gsize = self->block;
    return 0;
}

/* bisect.bisect_right(a, x, lo, hi) */
static int64_t bisect_right(const double *a, double x, int64_t lo, int64_t hi) {
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (x < a[mid]) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* StepClock.work: the noisy nominal time of the stretch's first m steps */
static double stretch_work(Replica *self, int64_t m, double s0, double d) {
    if (!self->noisy)
        return d == 0.0 ? s0 * (double)m : s0 * (double)m + d * ((double)(m * (m - 1)) / 2.0);
    int64_t a = self->at, b = self->at + m;
    double g = self->cum[b] - self->cum[a];
    if (d == 0.0) return s0 * g;
    return s0 * g + d * (self->wcum[b] - self->wcum[a] - (double)a * g);
}

/* _done_by (with StepClock.done_noisy and done_by, no slow time): steps of the phase in flight done by now */
static int64_t done_by(Replica *self, double now) {
    double elapsed = now - self->t0, s0 = self->s0, d = self->growth;
    int64_t n = self->steps;
    if (!self->noisy) {
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
    int64_t a = self->at;
    int64_t m = bisect_right(self->cum, self->cum[a] + elapsed / s0, a, a + n + 1) - 1 - a;
    if (m > n) m = n;
    if (d == 0.0) return m;
    while (m > 0 && stretch_work(self, m, s0, d) > elapsed) m -= 1;
    return m;
}

/* _cut_after_current_step (with StepClock.cut, no slow time): end the phase at the end of the step in progress */
static int cut_after_current_step(Replica *self, double now) {
    int64_t done, n = self->steps;
    double end, s0 = self->s0, d = self->growth, elapsed = now - self->t0;
    if (self->simple) {
        done = s0 > 0 ? (int64_t)((now - self->t0) / s0) : n - 1;
        end = (double)(done + 1) * s0;
    } else if (n > 1) {
        if (!(s0 > 0)) {
            done = n - 1; /* done_by is n: the cut lands on the last step */
            end = stretch_work(self, done + 1, s0, d);
        } else if (!self->noisy) {
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
            int64_t a = self->at;
            const double *cum = self->cum, *wcum = self->wcum;
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
        return 0;
    }
    if (done + 1 < n) {
        self->steps = done + 1;
        self->generation += 1;
        double wait = self->t0 + end - now;
        PyObject *generation = PyLong_FromLongLong(self->generation);
        if (generation == NULL) return -1;
        int failed = schedule(self, wait > 0.0 ? wait : 0.0, self->boundary_cb, generation);
        Py_DECREF(generation);
        return failed;
    }
    return 0;
}

/* _attention_pairs */
static int attention_pairs(Replica *self, int64_t prefill, double *out) {
    double pairs = 0.0;
    int64_t room = prefill;
    for (Py_ssize_t j = 0; j < self->p_count; j++) {
        Prefilling *entry = prefilling_at(self, j);
        int64_t prompt, chunk = entry->left < room ? entry->left : room;
        if (get_int(self->prompt, entry->request, &prompt) < 0) return -1;
        pairs += (double)chunk * ((double)(prompt - entry->left) + (double)(chunk + 1) / 2.0);
        room -= chunk;
        if (room <= 0) break;
    }
    *out = pairs;
    return 0;
}

/* _start_phase (with _with_attention and _track_peak) */
static int start_phase(Replica *self, double now) {
    Py_ssize_t n_decode = self->n_decoding;
    int64_t prefill;
    if (self->p_count) {
        int64_t budget = self->budget_tokens - n_decode;
        int64_t head_left = prefilling_at(self, 0)->left;
        if (head_left > budget) {
            if (budget <= 0) {
                PyErr_SetString(PyExc_ZeroDivisionError, "Replica: no prefill budget left beside the decoding batch");
                return -1;
            }
            int64_t steps = (head_left - 1) / budget; /* both positive: floor division */
            if (n_decode && self->decoding[0].finish - self->step < steps) steps = self->decoding[0].finish - self->step;
            self->phase = PREFILL, self->steps = steps, self->chunk = budget;
            prefill = budget;
        } else {
            prefill = 0;
            for (Py_ssize_t j = 0; j < self->p_count; j++) {
                prefill += prefilling_at(self, j)->left;
                if (prefill >= budget) {
                    prefill = budget;
                    break;
                }
            }
            self->phase = MIXED, self->steps = 1, self->chunk = prefill;
        }
    } else if (n_decode) {
        self->phase = DECODE, self->steps = self->decoding[0].finish - self->step, self->chunk = 0;
        prefill = 0;
    } else {
        self->phase = IDLE;
        self->work_rate = 0.0;
        return 0;
    }
    double s0 = self->base_s + self->decode_s * (double)n_decode + self->prefill_s * (double)prefill;
    int64_t steps = self->steps;
    double duration;
    if (self->simple) {
        self->s0 = s0;
        self->work_rate =
            s0 > 0 ? (self->prefill_s * (double)prefill + self->decode_work_s * (double)n_decode) / s0 : 0.0;
        duration = (double)steps * s0;
    } else {
        double growth = 0.0;
        if (self->kv_s != 0.0) {
            s0 += self->kv_s * (double)(self->context_base + (int64_t)n_decode * self->step);
            growth = self->kv_s * (double)n_decode;
        }
        if (prefill && self->attention_s != 0.0) {
            Prefilling *head = prefilling_at(self, 0);
            if (self->phase == PREFILL || head->left >= prefill) {
                int64_t prompt;
                if (get_int(self->prompt, head->request, &prompt) < 0) return -1;
                s0 += self->attention_s * (double)prefill * ((double)(prompt - head->left) + (double)(prefill + 1) / 2.0);
                if (self->phase == PREFILL) growth += self->attention_s * (double)prefill * (double)prefill;
            } else {
                double pairs;
                if (attention_pairs(self, prefill, &pairs) < 0) return -1;
                s0 = s0 + self->attention_s * pairs;
            }
        }
        if (steps > self->max_stretch) steps = self->steps = self->max_stretch;
        self->s0 = s0, self->growth = growth;
        if (self->track_peak) {
            if (n_decode > self->peak[0]) self->peak[0] = n_decode;
            if (prefill > self->peak[1]) self->peak[1] = prefill;
            if (n_decode) {
                int64_t context = self->context_base + (int64_t)n_decode * (self->step + steps - 1);
                if (context > self->peak[2]) self->peak[2] = context;
            }
        }
        double grown = growth != 0.0 ? growth * ((double)(steps * (steps - 1)) / 2.0) : 0.0;
        if (!self->noisy) {
            duration = s0 * (double)steps + grown;
        } else {
            int64_t at = self->position - self->first;
            if (at + steps >= self->gsize + 1) {
                if (noise_window(self, self->position) < 0) return -1;
                at = 0;
            }
            self->at = at;
            double g = self->cum[at + steps] - self->cum[at];
            duration = growth != 0.0 ? s0 * g + growth * (self->wcum[at + steps] - self->wcum[at] - (double)at * g)
                                     : s0 * g;
        }
        double work = (s0 - self->base_s + self->base_share_s * (double)n_decode) * (double)steps + grown;
        self->work_rate = duration > 0 ? work * self->work_scale / duration : 0.0;
    }
    self->t0 = now;
    self->generation += 1;
    PyObject *generation = PyLong_FromLongLong(self->generation);
    if (generation == NULL) return -1;
    int failed = schedule(self, duration, self->boundary_cb, generation);
    Py_DECREF(generation);
    return failed;
}

/* _purge: cancelled sequences leave the batch (at a step boundary) */
static int purge(Replica *self) {
    Py_ssize_t kept = 0, n = self->p_count;
    for (Py_ssize_t j = 0; j < n; j++) {
        Prefilling entry = *prefilling_at(self, j);
        int64_t outcome;
        if (get_int(self->outcome, entry.request, &outcome) < 0) return -1;
        if (outcome >= 0) {
            if (release(self, entry.request) < 0) return -1;
        } else {
            *prefilling_at(self, kept++) = entry;
        }
    }
    self->p_count = kept;
    Py_ssize_t k = 0;
    for (Py_ssize_t j = 0; j < self->n_decoding; j++) {
        Decoding entry = self->decoding[j];
        int64_t outcome;
        if (get_int(self->outcome, entry.request, &outcome) < 0) return -1;
        if (outcome >= 0) {
            if (release(self, entry.request) < 0) return -1;
            if (self->track_context) {
                int64_t prompt, output;
                if (get_int(self->prompt, entry.request, &prompt) < 0 || get_int(self->output, entry.request, &output) < 0)
                    return -1;
                self->context_base -= prompt + output - entry.finish;
            }
        } else {
            self->decoding[k++] = entry;
        }
    }
    self->n_decoding = k;
    for (Py_ssize_t j = k / 2 - 1; j >= 0; j--) decodes_sift(self, j); /* heapify */
    self->cancelled = 0;
    return 0;
}

/* _join_now: request i's prompt enters the batch (less what its prefix cache holds) */
static int join_now(Replica *self, Py_ssize_t i, double now) {
    int64_t prompt;
    if (self->block_cache != Py_None) { /* the prefix-block cache (Python): it writes rec.cached_tokens[i] */
        PyObject *index = PyLong_FromSsize_t(i);
        PyObject *result = index != NULL ? PyObject_CallMethodOneArg((PyObject *)self, s_prefix_read, index) : NULL;
        Py_XDECREF(index);
        if (result == NULL) return -1;
        Py_DECREF(result);
    }
    if (get_int(self->prompt, i, &prompt) < 0) return -1;
    PyObject *cached = PyObject_GetAttr(self->rec, s_cached_tokens);
    if (cached == NULL) return -1;
    if (cached != Py_None) {
        PyObject *read = PyObject_GetAttr(cached, s_read);
        Py_DECREF(cached);
        if (read == NULL) return -1;
        Py_ssize_t n = PySequence_Size(read);
        int64_t tokens = 0;
        if (n < 0 || (i < n && get_int(read, i, &tokens) < 0)) {
            Py_DECREF(read);
            return -1;
        }
        Py_DECREF(read);
        if (i < n) prompt = prompt - tokens > 1 ? prompt - tokens : 1; /* the last token yields the first output */
    } else {
        Py_DECREF(cached);
    }
    if (self->p_count >= self->max_batch) {
        PyErr_SetString(PyExc_RuntimeError, "Replica: more prompts than batch places");
        return -1;
    }
    Prefilling *entry = prefilling_at(self, self->p_count++);
    entry->request = i, entry->left = prompt;
    if (self->phase == IDLE) {
        /* start at the end of this instant, so requests arriving together share the first step */
        self->phase = BOUNDARY;
        return schedule(self, 0.0, self->wake_cb, NULL);
    }
    if (self->phase == DECODE) return cut_after_current_step(self, now);
    return 0;
}

/* _finish_prompts: spend the step's prefill chunk FIFO; a finished prompt yields its first token now */
static int finish_prompts(Replica *self, double now, int64_t step) {
    int64_t left = self->chunk;
    while (left > 0) {
        if (self->p_count == 0) {
            PyErr_SetString(PyExc_IndexError, "Replica: a prefill chunk with no prompt to read");
            return -1;
        }
        Prefilling *head = prefilling_at(self, 0);
        if (head->left > left) {
            head->left -= left;
            break;
        }
        left -= head->left;
        int64_t i = head->request, outcome, output;
        self->p_head = (self->p_head + 1) % self->max_batch, self->p_count--;
        if (get_int(self->outcome, i, &outcome) < 0) return -1;
        if (outcome >= 0) { /* cancelled: it leaves now, with no token shown */
            self->cancelled -= 1;
            if (release(self, i) < 0) return -1;
            continue;
        }
        if (set_object(self->first_col, i, PyFloat_FromDouble(now)) < 0) return -1;
        if (get_int(self->output, i, &output) < 0) return -1;
        int64_t remaining = output - 1;
        if (remaining > 0) {
            if (self->n_decoding >= self->max_batch) {
                PyErr_SetString(PyExc_RuntimeError, "Replica: more sequences than batch places");
                return -1;
            }
            decodes_push(self, (Decoding){step + remaining, i});
            if (self->track_context) {
                int64_t prompt;
                if (get_int(self->prompt, i, &prompt) < 0) return -1;
                self->context_base += prompt + 1 - step;
            }
        } else if (complete(self, i, now) < 0) {
            return -1;
        }
    }
    return 0;
}

/* --- Python-facing methods ------------------------------------------------------------------------------ */
static PyObject *Replica_can_admit(Replica *self, PyObject *arg) {
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (self->load >= self->max_batch || !self->serving) Py_RETURN_FALSE;
    if (self->kv_capacity < 0) Py_RETURN_TRUE;
    int64_t prompt, output;
    if (get_int(self->prompt, i, &prompt) < 0 || get_int(self->output, i, &output) < 0) return NULL;
    return PyBool_FromLong(self->kv_used + prompt + output <= self->kv_capacity);
}

static PyObject *Replica_fits_kv(Replica *self, PyObject *arg) {
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    int64_t prompt, output;
    if (get_int(self->prompt, i, &prompt) < 0 || get_int(self->output, i, &output) < 0) return NULL;
    return PyBool_FromLong(self->kv_capacity < 0 || prompt + output <= self->kv_capacity);
}

static PyObject *Replica_admit(Replica *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "admit(i, delay=0.0)");
        return NULL;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(args[0], PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    double delay = nargs == 2 ? PyFloat_AsDouble(args[1]) : 0.0, now;
    if ((delay == -1.0 && PyErr_Occurred()) || env_now(self, &now) < 0) return NULL;
    account(self, now);
    if (set_object(self->admit_col, i, PyFloat_FromDouble(now + delay)) < 0) return NULL;
    if (set_object(self->replica_col, i, PyLong_FromSsize_t(self->index)) < 0) return NULL;
    if (self->kv_capacity >= 0) {
        int64_t prompt, output;
        if (get_int(self->prompt, i, &prompt) < 0 || get_int(self->output, i, &output) < 0) return NULL;
        self->kv_used += prompt + output;
    }
    self->load += 1;
    if (delay > 0) {
        if (schedule(self, delay, self->join_cb, args[0]) < 0) return NULL;
    } else if (join_now(self, i, now) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* _join: a handshake's end */
static PyObject *Replica_join(Replica *self, PyObject *event) {
    PyObject *value = PyObject_GetAttr(event, s_value);
    if (value == NULL) return NULL;
    Py_ssize_t i = PyNumber_AsSsize_t(value, PyExc_IndexError);
    Py_DECREF(value);
    int64_t outcome;
    double now;
    if ((i == -1 && PyErr_Occurred()) || get_int(self->outcome, i, &outcome) < 0) return NULL;
    if (outcome >= 0) Py_RETURN_NONE; /* cancelled during its handshake: its place was freed then */
    if (env_now(self, &now) < 0 || join_now(self, i, now) < 0) return NULL;
    Py_RETURN_NONE;
}

/* _wake */
static PyObject *Replica_wake(Replica *self, PyObject *event) {
    double now;
    if (env_now(self, &now) < 0) return NULL;
    if (self->cancelled) { /* a prompt cancelled the instant it joined */
        account(self, now);
        if (purge(self) < 0 || refill(self) < 0) return NULL;
    }
    if (start_phase(self, now) < 0) return NULL;
    Py_RETURN_NONE;
}

/* _boundary */
static PyObject *Replica_boundary(Replica *self, PyObject *event) {
    PyObject *value = PyObject_GetAttr(event, s_value);
    if (value == NULL) return NULL;
    long long generation = PyLong_AsLongLong(value);
    Py_DECREF(value);
    if (generation == -1 && PyErr_Occurred()) return NULL;
    if (generation != self->generation) Py_RETURN_NONE; /* superseded by a cut */
    double now;
    if (env_now(self, &now) < 0) return NULL;
    account(self, now);
    int phase = self->phase;
    self->phase = BOUNDARY;
    int64_t step = self->step + self->steps;
    self->step = step;
    if (self->noisy) self->position += self->steps; /* the noise of the steps done is spent */
    if (phase == PREFILL) {
        prefilling_at(self, 0)->left -= self->steps * self->chunk;
    } else if (phase == MIXED) {
        if (finish_prompts(self, now, step) < 0) return NULL;
    }
    while (self->n_decoding && self->decoding[0].finish <= step) {
        Decoding done = decodes_pop(self);
        if (self->track_context) {
            int64_t prompt, output;
            if (get_int(self->prompt, done.request, &prompt) < 0 || get_int(self->output, done.request, &output) < 0)
                return NULL;
            self->context_base -= prompt + output - done.finish;
        }
        if (complete(self, done.request, now) < 0) return NULL;
    }
    if (self->cancelled && purge(self) < 0) return NULL;
    PyObject *waiting = PyObject_GetAttr(self->endpoint, s_waiting);
    if (waiting == NULL) return NULL;
    int wait = PyObject_IsTrue(waiting);
    Py_DECREF(waiting);
    if (wait < 0 || (wait && refill(self) < 0)) return NULL;
    if (start_phase(self, now) < 0) return NULL;
    Py_RETURN_NONE;
}

/* counters(now) -> (busy, area, work, held) */
static PyObject *Replica_counters(Replica *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    account(self, now);
    PyObject *until = self->retired != NULL && self->retired != Py_None ? self->retired : arg;
    Py_INCREF(until);
    PyObject *created = PyFloat_FromDouble(self->created);
    PyObject *held = created != NULL ? PyNumber_Subtract(until, created) : NULL;
    Py_DECREF(until);
    Py_XDECREF(created);
    if (held == NULL) return NULL;
    return Py_BuildValue("dddN", self->busy_time, self->area, self->work, held);
}

/* cancel(i, now) -> tokens made: request i stops (its outcome already set by the caller) */
static PyObject *Replica_cancel(Replica *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "cancel(i, now)");
        return NULL;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(args[0], PyExc_IndexError);
    double now = PyFloat_AsDouble(args[1]), admitted, first;
    if ((i == -1 || now == -1.0) && PyErr_Occurred()) return NULL;
    account(self, now);
    if (get_float(self->admit_col, i, &admitted) < 0) return NULL;
    if (admitted > now) { /* still connecting: nothing computed yet */
        if (release(self, i) < 0 || refill(self) < 0) return NULL;
        return PyLong_FromLong(0);
    }
    /* _tokens_made: output tokens produced by now (0 while its prompt is still being read) */
    if (get_float(self->first_col, i, &first) < 0) return NULL;
    long long made = 0;
    if (first == first) {
        int64_t steps = self->step, output;
        if (self->phase == DECODE || self->phase == PREFILL || self->phase == MIXED) steps += done_by(self, now);
        Py_ssize_t j = 0;
        while (j < self->n_decoding && self->decoding[j].request != i) j++;
        if (j == self->n_decoding) {
            PyErr_Format(PyExc_RuntimeError, "Replica: request %zd has a first token but is not decoding", i);
            return NULL;
        }
        if (get_int(self->output, i, &output) < 0) return NULL;
        made = output - (self->decoding[j].finish - steps);
    }
    self->cancelled += 1;
    if ((self->phase == DECODE || self->phase == PREFILL) && cut_after_current_step(self, now) < 0) return NULL;
    return PyLong_FromLongLong(made);
}

static PyObject *Replica_peak(Replica *self, void *closure) {
    return Py_BuildValue("[LLL]", (long long)self->peak[0], (long long)self->peak[1], (long long)self->peak[2]);
}

static PyObject *Replica_kv_capacity(Replica *self, void *closure) {
    if (self->kv_capacity < 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(self->kv_capacity);
}

static PyObject *Replica_phase(Replica *self, void *closure) { return PyLong_FromLong(self->phase); }

/* --- the type ------------------------------------------------------------------------------------------- */
static int Replica_init(Replica *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"env", "endpoint", "recorder", "call_later", "index", "max_batch", "budget_tokens",
                            "kv_capacity", "max_stretch", "block", "base_s", "decode_s", "prefill_s", "kv_s",
                            "attention_s", "base_share_s", "decode_work_s", "work_scale", "noise_source",
                            "track_peak", "block_cache", "serving", "completed", NULL};
    PyObject *env, *endpoint, *rec, *call_later, *noise_source, *block_cache, *completed;
    Py_ssize_t index, max_batch;
    long long budget, kv_capacity, max_stretch, block;
    int track_peak, serving;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOnnLLLLddddddddOpOpO", names, &env, &endpoint, &rec,
                                     &call_later, &index, &max_batch, &budget, &kv_capacity, &max_stretch, &block,
                                     &self->base_s, &self->decode_s, &self->prefill_s, &self->kv_s, &self->attention_s,
                                     &self->base_share_s, &self->decode_work_s, &self->work_scale, &noise_source,
                                     &track_peak, &block_cache, &serving, &completed))
        return -1;
    if (self->decoding != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Replica: initialised twice");
        return -1;
    }
    if (max_batch < 1 || budget < max_batch || block < 2 || max_stretch < 1 || max_stretch > block / 2) {
        PyErr_SetString(PyExc_ValueError, "Replica: parameters out of range");
        return -1;
    }
    double now;
    Py_INCREF(env), self->env = env;
    if (env_now(self, &now) < 0) return -1;
    Py_INCREF(endpoint), self->endpoint = endpoint;
    Py_INCREF(rec), self->rec = rec;
    Py_INCREF(call_later), self->call_later = call_later;
    Py_INCREF(block_cache), self->block_cache = block_cache;
    Py_INCREF(completed), self->completed = completed;
    Py_INCREF(Py_None), self->retired = Py_None;
    Py_INCREF(Py_None), self->fits = Py_None;
    self->noisy = noise_source != Py_None;
    Py_INCREF(noise_source), self->noise_source = noise_source;
    self->index = index, self->max_batch = self->capacity = max_batch;
    self->budget_tokens = budget, self->kv_capacity = kv_capacity, self->max_stretch = max_stretch;
    self->block = block;
    self->track_peak = track_peak;
    self->serving = (char)serving;
    self->created = now;
    self->simple = self->kv_s == 0.0 && self->attention_s == 0.0 && !track_peak && !self->noisy;
    self->track_context = self->kv_s != 0.0 || track_peak;
    static const char *columns[] = {"prompt", "output", "outcome", "admit", "replica", "first_token", "end"};
    PyObject **slots[] = {&self->prompt, &self->output, &self->outcome, &self->admit_col, &self->replica_col,
                          &self->first_col, &self->end_col};
    for (int k = 0; k < 7; k++)
        if ((*slots[k] = PyObject_GetAttrString(rec, columns[k])) == NULL) return -1;
    if (!(self->boundary_cb = PyObject_GetAttrString((PyObject *)self, "_boundary")) ||
        !(self->wake_cb = PyObject_GetAttrString((PyObject *)self, "_wake")) ||
        !(self->join_cb = PyObject_GetAttrString((PyObject *)self, "_join")))
        return -1;
    self->decoding = PyMem_Calloc((size_t)max_batch, sizeof(Decoding));
    self->prefilling = PyMem_Calloc((size_t)max_batch, sizeof(Prefilling));
    if (self->noisy) {
        self->cum = PyMem_Calloc((size_t)block + 1, sizeof(double));
        self->wcum = PyMem_Calloc((size_t)block + 1, sizeof(double));
    }
    if (!self->decoding || !self->prefilling || (self->noisy && (!self->cum || !self->wcum))) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Every object the replica holds, for the collector (its bound methods make a cycle through it). */
#define N_OBJECTS 19
static void objects(Replica *self, PyObject **out[N_OBJECTS]) {
    PyObject **all[N_OBJECTS] = {&self->env, &self->endpoint, &self->rec, &self->retired, &self->fits,
                                 &self->block_cache, &self->prompt, &self->output, &self->outcome, &self->admit_col,
                                 &self->replica_col, &self->first_col, &self->end_col, &self->call_later,
                                 &self->boundary_cb, &self->wake_cb, &self->join_cb, &self->noise_source,
                                 &self->completed};
    memcpy(out, all, sizeof(all));
}

static int Replica_traverse(Replica *self, visitproc visit, void *arg) {
    PyObject **all[N_OBJECTS];
    objects(self, all);
    for (int k = 0; k < N_OBJECTS; k++) Py_VISIT(*all[k]);
    return 0;
}

static int Replica_clear(Replica *self) {
    PyObject **all[N_OBJECTS];
    objects(self, all);
    for (int k = 0; k < N_OBJECTS; k++) Py_CLEAR(*all[k]);
    return 0;
}

static void Replica_dealloc(Replica *self) {
    PyObject_GC_UnTrack(self);
    Replica_clear(self);
    if (self->noise.buf != NULL) PyBuffer_Release(&self->noise);
    PyMem_Free(self->decoding), PyMem_Free(self->prefilling), PyMem_Free(self->cum), PyMem_Free(self->wcum);
    Py_TYPE(self)->tp_free((PyObject *)self); /* a Python subclass's dealloc releases its type itself */
}

static PyMethodDef Replica_methods[] = {
    {"can_admit", (PyCFunction)Replica_can_admit, METH_O, "can_admit(i): a batch place and KV for request i now"},
    {"_fits_kv", (PyCFunction)Replica_fits_kv, METH_O, "_fits_kv(i): request i fits an empty replica's KV cache"},
    {"admit", (PyCFunction)(void (*)(void))Replica_admit, METH_FASTCALL,
     "admit(i, delay=0.0): take request i; its prompt joins after `delay` (a handshake)"},
    {"cancel", (PyCFunction)(void (*)(void))Replica_cancel, METH_FASTCALL,
     "cancel(i, now) -> tokens made: stop running request i"},
    {"counters", (PyCFunction)Replica_counters, METH_O, "counters(now) -> (busy, area, work, held)"},
    {"_join", (PyCFunction)Replica_join, METH_O, "a handshake's end (an event's callback)"},
    {"_wake", (PyCFunction)Replica_wake, METH_O, "the first step after idling (an event's callback)"},
    {"_boundary", (PyCFunction)Replica_boundary, METH_O, "the end of a phase (an event's callback)"},
    {NULL},
};

static PyMemberDef Replica_members[] = {
    {"env", T_OBJECT, offsetof(Replica, env), READONLY, NULL},
    {"endpoint", T_OBJECT, offsetof(Replica, endpoint), READONLY, NULL},
    {"rec", T_OBJECT, offsetof(Replica, rec), READONLY, NULL},
    {"block_cache", T_OBJECT, offsetof(Replica, block_cache), READONLY, NULL},
    {"index", T_PYSSIZET, offsetof(Replica, index), READONLY, NULL},
    {"max_batch", T_PYSSIZET, offsetof(Replica, max_batch), READONLY, NULL},
    {"capacity", T_PYSSIZET, offsetof(Replica, capacity), READONLY, NULL},
    {"load", T_PYSSIZET, offsetof(Replica, load), READONLY, "running sequences"},
    {"kv_used", T_LONGLONG, offsetof(Replica, kv_used), READONLY, NULL},
    {"created", T_DOUBLE, offsetof(Replica, created), READONLY, NULL},
    {"retired", T_OBJECT, offsetof(Replica, retired), 0, "when it retired (None: not)"},
    {"fits", T_OBJECT, offsetof(Replica, fits), 0, "see Server.fits"},
    {"serving", T_BOOL, offsetof(Replica, serving), 0, NULL},
    {"draining", T_BOOL, offsetof(Replica, draining), 0, NULL},
    {"step", T_LONGLONG, offsetof(Replica, step), READONLY, "steps completed"},
    {NULL},
};

static PyGetSetDef Replica_getset[] = {
    {"peak", (getter)Replica_peak, NULL, "the most decoding sequences, prefill tokens and context tokens of a step",
     NULL},
    {"kv_capacity", (getter)Replica_kv_capacity, NULL, "KV cache tokens (None: unbounded)", NULL},
    {"phase", (getter)Replica_phase, NULL, "what the stretch of steps in flight does (engine.py's IDLE...)", NULL},
    {NULL},
};

static PyTypeObject ReplicaType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._engine.Replica",
    .tp_doc = "An engine replica on the event path, compiled: see sim/model/serving/engine.py (CompiledReplica).",
    .tp_basicsize = sizeof(Replica),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Replica_init,
    .tp_dealloc = (destructor)Replica_dealloc,
    .tp_traverse = (traverseproc)Replica_traverse,
    .tp_clear = (inquiry)Replica_clear,
    .tp_methods = Replica_methods,
    .tp_members = Replica_members,
    .tp_getset = Replica_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_engine", "llmsim's event-path engine replica, compiled.",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&ReplicaType) < 0) return NULL;
    if (!(s_now = PyUnicode_InternFromString("_now")) || !(s_value = PyUnicode_InternFromString("value")) || !(s_waiting = PyUnicode_InternFromString("waiting")) ||
        !(s_refill = PyUnicode_InternFromString("refill")) || !(s_on_done = PyUnicode_InternFromString("on_done")) ||
        !(s_cached_tokens = PyUnicode_InternFromString("cached_tokens")) ||
        !(s_read = PyUnicode_InternFromString("read")) || !(s_prefix_read = PyUnicode_InternFromString("_prefix_read")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ReplicaType);
    if (PyModule_AddObject(m, "Replica", (PyObject *)&ReplicaType) < 0) {
        Py_DECREF(&ReplicaType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
