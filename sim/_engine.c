/* An engine replica on the event path, compiled (optional: sim/model/serving/engine.py's EngineReplica is its
 * reference and its fallback, and gives the same bits).
 *
 * `Replica` is a line-for-line port of EngineReplica for replicas without slow episodes or stalls: admission,
 * a handshake's delayed join, chunked prefill, the decode heap, skip-ahead over stretches of identical steps,
 * cuts, cancellation (a cancelled sequence leaves at the next boundary), per-step noise, the context and
 * attention terms, KV capacity, the calibrated-range peaks and the time-weighted counters. The batch and its
 * phase planning are the engine core the fast path's kernel runs too (sim/_engine_core.h); here are the
 * admissions, cancellation and the talk with Python. Each function names its Python original; the arithmetic
 * is the same operations in the same order (built with -ffp-contract=off), so the results are equal to the
 * bit. What stays Python lives in the subclass (engine.CompiledReplica): the cold start, draining, the
 * prefix-block cache.
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

static int prompt_of(void *replica, int64_t i, int64_t *out); /* the recorder's prompt tokens of request i */
#define CORE_PROMPT(core, i, out) prompt_of((core)->owner, (i), (out))
#include "_engine_core.h"

typedef struct {
    PyObject_HEAD
    /* what Python sees (members) */
    PyObject *env, *endpoint, *rec, *retired, *fits, *block_cache;
    Py_ssize_t index, capacity;
    double created;
    char serving, draining;
    /* the recorder's columns and the event core */
    PyObject *prompt, *output, *outcome, *admit_col, *replica_col, *first_col, *end_col;
    PyObject *call_later, *boundary_cb, *wake_cb, *join_cb, *noise_source, *completed;
    int64_t cancelled; /* cancelled sequences still in the batch (they leave at the next boundary) */
    Core core;         /* the batch and its phases (sim/_engine_core.h) */
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

static int prompt_of(void *replica, int64_t i, int64_t *out) { return get_int(((Replica *)replica)->prompt, i, out); }

/* _kv_need: request i's prompt + output tokens (its KV at the end, and its context less the steps to go) */
static int kv_need(Replica *self, Py_ssize_t i, int64_t *out) {
    int64_t prompt, output;
    if (get_int(self->prompt, i, &prompt) < 0 || get_int(self->output, i, &output) < 0) return -1;
    *out = prompt + output;
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

/* --- EngineReplica's methods around the core ------------------------------------------------------------ */
/* a phase planned by the core (a boundary after `delay`): its boundary event, under the core's generation */
static int schedule_boundary(Replica *self, double delay) {
    PyObject *generation = PyLong_FromLongLong(self->core.generation);
    if (generation == NULL) return -1;
    int failed = schedule(self, delay, self->boundary_cb, generation);
    Py_DECREF(generation);
    return failed;
}

/* _start_phase */
static int start_phase(Replica *self, double now) {
    double duration;
    int planned = core_start_phase(&self->core, now, &duration);
    return planned <= 0 ? planned : schedule_boundary(self, duration);
}

/* _cut_after_current_step */
static int cut_after_current_step(Replica *self, double now) {
    double delay;
    return core_cut(&self->core, now, &delay) ? schedule_boundary(self, delay) : 0;
}

/* _release: request i leaves the batch, its place and KV free */
static int release(Replica *self, Py_ssize_t i) {
    Core *c = &self->core;
    c->load -= 1;
    int64_t need;
    if (c->kv_capacity >= 0) {
        if (kv_need(self, i, &need) < 0) return -1;
        c->kv_used -= need;
    }
    if (c->load == 0 && !self->serving) { /* drained: only a draining replica completes while not serving */
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
    PyObject *result = on_done != Py_None ? PyObject_CallFunction(on_done, "n", i) : (Py_INCREF(Py_None), Py_None);
    Py_DECREF(on_done);
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

static int refill(Replica *self) {
    PyObject *result = PyObject_CallMethodOneArg(self->endpoint, s_refill, (PyObject *)self);
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

/* _purge: cancelled sequences leave the batch (at a step boundary) */
static int purge(Replica *self) {
    Core *c = &self->core;
    Py_ssize_t kept = 0, n = c->p_count;
    for (Py_ssize_t j = 0; j < n; j++) {
        Prefilling entry = *core_prefilling_at(c, j);
        int64_t outcome;
        if (get_int(self->outcome, entry.request, &outcome) < 0) return -1;
        if (outcome >= 0) {
            if (release(self, entry.request) < 0) return -1;
        } else {
            *core_prefilling_at(c, kept++) = entry;
        }
    }
    c->p_count = kept;
    Py_ssize_t k = 0;
    for (Py_ssize_t j = 0; j < c->n_decoding; j++) {
        Decoding entry = c->decoding[j];
        int64_t outcome, need;
        if (get_int(self->outcome, entry.request, &outcome) < 0) return -1;
        if (outcome < 0) {
            c->decoding[k++] = entry;
            continue;
        }
        if (release(self, entry.request) < 0) return -1;
        if (c->track_context) {
            if (kv_need(self, entry.request, &need) < 0) return -1;
            c->context_base -= need - entry.finish;
        }
    }
    c->n_decoding = k;
    for (Py_ssize_t j = k / 2 - 1; j >= 0; j--) core_decodes_sift(c, j); /* heapify */
    self->cancelled = 0;
    return 0;
}

/* _join_now: request i's prompt enters the batch (less what its prefix cache holds) */
static int join_now(Replica *self, Py_ssize_t i, double now) {
    Core *c = &self->core;
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
    if (c->p_count >= c->max_batch) {
        PyErr_SetString(PyExc_RuntimeError, "Replica: more prompts than batch places");
        return -1;
    }
    Prefilling *entry = core_prefilling_at(c, c->p_count++);
    entry->request = i, entry->left = prompt;
    if (c->phase == IDLE) {
        /* start at the end of this instant, so requests arriving together share the first step */
        c->phase = BOUNDARY;
        return schedule(self, 0.0, self->wake_cb, NULL);
    }
    if (c->phase == DECODE) return cut_after_current_step(self, now);
    return 0;
}

/* _finish_prompts: spend the step's prefill chunk FIFO; a finished prompt yields its first token now */
static int finish_prompts(Replica *self, double now, int64_t step) {
    Core *c = &self->core;
    int64_t left = c->chunk;
    while (left > 0) {
        if (c->p_count == 0) {
            PyErr_SetString(PyExc_IndexError, "Replica: a prefill chunk with no prompt to read");
            return -1;
        }
        Prefilling *head = core_prefilling_at(c, 0);
        if (head->left > left) {
            head->left -= left;
            break;
        }
        left -= head->left;
        int64_t i = head->request, outcome, output;
        c->p_head = (c->p_head + 1) % c->max_batch, c->p_count--;
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
            if (c->n_decoding >= c->max_batch) {
                PyErr_SetString(PyExc_RuntimeError, "Replica: more sequences than batch places");
                return -1;
            }
            core_decodes_push(c, (Decoding){step + remaining, i});
            if (c->track_context) {
                int64_t prompt;
                if (get_int(self->prompt, i, &prompt) < 0) return -1;
                c->context_base += prompt + 1 - step;
            }
        } else if (complete(self, i, now) < 0) {
            return -1;
        }
    }
    return 0;
}

/* --- Python-facing methods ------------------------------------------------------------------------------ */
static PyObject *Replica_can_admit(Replica *self, PyObject *arg) {
    Core *c = &self->core;
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (c->load >= c->max_batch || !self->serving) Py_RETURN_FALSE;
    if (c->kv_capacity < 0) Py_RETURN_TRUE;
    int64_t need;
    if (kv_need(self, i, &need) < 0) return NULL;
    return PyBool_FromLong(c->kv_used + need <= c->kv_capacity);
}

static PyObject *Replica_fits_kv(Replica *self, PyObject *arg) {
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    int64_t need;
    if (kv_need(self, i, &need) < 0) return NULL;
    return PyBool_FromLong(self->core.kv_capacity < 0 || need <= self->core.kv_capacity);
}

static PyObject *Replica_admit(Replica *self, PyObject *const *args, Py_ssize_t nargs) {
    Core *c = &self->core;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "admit(i, delay=0.0)");
        return NULL;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(args[0], PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return NULL;
    double delay = nargs == 2 ? PyFloat_AsDouble(args[1]) : 0.0, now;
    if ((delay == -1.0 && PyErr_Occurred()) || env_now(self, &now) < 0) return NULL;
    core_account(c, now);
    if (set_object(self->admit_col, i, PyFloat_FromDouble(now + delay)) < 0) return NULL;
    if (set_object(self->replica_col, i, PyLong_FromSsize_t(self->index)) < 0) return NULL;
    int64_t need;
    if (c->kv_capacity >= 0) {
        if (kv_need(self, i, &need) < 0) return NULL;
        c->kv_used += need;
    }
    c->load += 1;
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
        core_account(&self->core, now);
        if (purge(self) < 0 || refill(self) < 0) return NULL;
    }
    if (start_phase(self, now) < 0) return NULL;
    Py_RETURN_NONE;
}

/* _boundary */
static PyObject *Replica_boundary(Replica *self, PyObject *event) {
    Core *c = &self->core;
    PyObject *value = PyObject_GetAttr(event, s_value);
    if (value == NULL) return NULL;
    long long generation = PyLong_AsLongLong(value);
    Py_DECREF(value);
    if (generation == -1 && PyErr_Occurred()) return NULL;
    if (generation != c->generation) Py_RETURN_NONE; /* superseded by a cut */
    double now;
    if (env_now(self, &now) < 0) return NULL;
    core_account(c, now);
    int phase = c->phase;
    c->phase = BOUNDARY;
    int64_t step = c->step + c->steps;
    c->step = step;
    if (c->noisy) c->position += c->steps; /* the noise of the steps done is spent */
    if (phase == PREFILL) {
        core_prefilling_at(c, 0)->left -= c->steps * c->chunk;
    } else if (phase == MIXED) {
        if (finish_prompts(self, now, step) < 0) return NULL;
    }
    while (c->n_decoding && c->decoding[0].finish <= step) {
        Decoding done = core_decodes_pop(c);
        int64_t need;
        if (c->track_context) {
            if (kv_need(self, done.request, &need) < 0) return NULL;
            c->context_base -= need - done.finish;
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
    core_account(&self->core, now);
    PyObject *until = self->retired != NULL && self->retired != Py_None ? self->retired : arg;
    Py_INCREF(until);
    PyObject *created = PyFloat_FromDouble(self->created);
    PyObject *held = created != NULL ? PyNumber_Subtract(until, created) : NULL;
    Py_DECREF(until);
    Py_XDECREF(created);
    if (held == NULL) return NULL;
    return Py_BuildValue("dddN", self->core.busy, self->core.area, self->core.work, held);
}

/* cancel(i, now) -> tokens made: request i stops (its outcome already set by the caller) */
static PyObject *Replica_cancel(Replica *self, PyObject *const *args, Py_ssize_t nargs) {
    Core *c = &self->core;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "cancel(i, now)");
        return NULL;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(args[0], PyExc_IndexError);
    double now = PyFloat_AsDouble(args[1]), admitted, first;
    if ((i == -1 || now == -1.0) && PyErr_Occurred()) return NULL;
    core_account(c, now);
    if (get_float(self->admit_col, i, &admitted) < 0) return NULL;
    if (admitted > now) { /* still connecting: nothing computed yet */
        if (release(self, i) < 0 || refill(self) < 0) return NULL;
        return PyLong_FromLong(0);
    }
    /* _tokens_made: output tokens produced by now (0 while its prompt is still being read) */
    if (get_float(self->first_col, i, &first) < 0) return NULL;
    long long made = 0;
    if (first == first) {
        int64_t steps = c->step, output;
        if (c->phase == DECODE || c->phase == PREFILL || c->phase == MIXED) steps += core_done_by(c, now);
        Py_ssize_t j = 0;
        while (j < c->n_decoding && c->decoding[j].request != i) j++;
        if (j == c->n_decoding) {
            PyErr_Format(PyExc_RuntimeError, "Replica: request %zd has a first token but is not decoding", i);
            return NULL;
        }
        if (get_int(self->output, i, &output) < 0) return NULL;
        made = output - (c->decoding[j].finish - steps);
    }
    self->cancelled += 1;
    if ((c->phase == DECODE || c->phase == PREFILL) && cut_after_current_step(self, now) < 0) return NULL;
    return PyLong_FromLongLong(made);
}

static PyObject *Replica_peak(Replica *self, void *closure) {
    int64_t *peak = self->core.peak;
    return Py_BuildValue("[LLL]", (long long)peak[0], (long long)peak[1], (long long)peak[2]);
}

static PyObject *Replica_kv_capacity(Replica *self, void *closure) {
    if (self->core.kv_capacity < 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(self->core.kv_capacity);
}

static PyObject *Replica_phase(Replica *self, void *closure) { return PyLong_FromLong(self->core.phase); }
static PyObject *Replica_load(Replica *self, void *closure) { return PyLong_FromLongLong(self->core.load); }
static PyObject *Replica_max_batch(Replica *self, void *closure) { return PyLong_FromLongLong(self->core.max_batch); }
static PyObject *Replica_step(Replica *self, void *closure) { return PyLong_FromLongLong(self->core.step); }

/* --- the type ------------------------------------------------------------------------------------------- */
static int Replica_init(Replica *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"env", "endpoint", "recorder", "call_later", "index", "max_batch", "budget_tokens",
                            "kv_capacity", "max_stretch", "block", "base_s", "decode_s", "prefill_s", "kv_s",
                            "attention_s", "base_share_s", "decode_work_s", "work_scale", "noise_source",
                            "track_peak", "block_cache", "serving", "completed", NULL};
    PyObject *env, *endpoint, *rec, *call_later, *noise_source, *block_cache, *completed;
    Py_ssize_t index;
    long long max_batch, budget, kv_capacity, max_stretch, block;
    int track_peak, serving;
    Core *c = &self->core;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOnLLLLLddddddddOpOpO", names, &env, &endpoint, &rec,
                                     &call_later, &index, &max_batch, &budget, &kv_capacity, &max_stretch, &block,
                                     &c->base_s, &c->decode_s, &c->prefill_s, &c->kv_s, &c->attention_s,
                                     &c->base_share_s, &c->decode_work_s, &c->work_scale, &noise_source,
                                     &track_peak, &block_cache, &serving, &completed))
        return -1;
    if (c->decoding != NULL) {
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
    Py_INCREF(noise_source), self->noise_source = noise_source;
    self->index = index, self->capacity = (Py_ssize_t)max_batch;
    self->serving = (char)serving;
    self->created = now;
    c->max_batch = max_batch, c->budget_tokens = budget, c->kv_capacity = kv_capacity;
    c->max_stretch = max_stretch, c->block = block;
    c->track_peak = track_peak, c->noisy = noise_source != Py_None;
    c->noise_source = noise_source; /* borrowed: the replica holds it */
    c->owner = self;
    static const char *columns[] = {"prompt", "output", "outcome", "admit", "replica", "first_token", "end"};
    PyObject **slots[] = {&self->prompt, &self->output, &self->outcome, &self->admit_col, &self->replica_col,
                          &self->first_col, &self->end_col};
    for (int k = 0; k < 7; k++)
        if ((*slots[k] = PyObject_GetAttrString(rec, columns[k])) == NULL) return -1;
    if (!(self->boundary_cb = PyObject_GetAttrString((PyObject *)self, "_boundary")) ||
        !(self->wake_cb = PyObject_GetAttrString((PyObject *)self, "_wake")) ||
        !(self->join_cb = PyObject_GetAttrString((PyObject *)self, "_join")))
        return -1;
    return core_alloc(c);
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
    core_free(&self->core);
    Replica_clear(self);
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
    {"env", T_OBJECT_EX, offsetof(Replica, env), READONLY, NULL},
    {"endpoint", T_OBJECT_EX, offsetof(Replica, endpoint), READONLY, NULL},
    {"rec", T_OBJECT_EX, offsetof(Replica, rec), READONLY, NULL},
    {"block_cache", T_OBJECT_EX, offsetof(Replica, block_cache), READONLY, NULL},
    {"index", T_PYSSIZET, offsetof(Replica, index), READONLY, NULL},
    {"capacity", T_PYSSIZET, offsetof(Replica, capacity), READONLY, NULL},
    {"created", T_DOUBLE, offsetof(Replica, created), READONLY, NULL},
    {"retired", T_OBJECT_EX, offsetof(Replica, retired), 0, "when it retired (None: not)"},
    {"fits", T_OBJECT_EX, offsetof(Replica, fits), 0, "see Server.fits"},
    {"serving", T_BOOL, offsetof(Replica, serving), 0, NULL},
    {"draining", T_BOOL, offsetof(Replica, draining), 0, NULL},
    {NULL},
};

static PyGetSetDef Replica_getset[] = {
    {"peak", (getter)Replica_peak, NULL, "the most decoding sequences, prefill tokens and context tokens of a step",
     NULL},
    {"kv_capacity", (getter)Replica_kv_capacity, NULL, "KV cache tokens (None: unbounded)", NULL},
    {"phase", (getter)Replica_phase, NULL, "what the stretch of steps in flight does (engine.py's IDLE...)", NULL},
    {"load", (getter)Replica_load, NULL, "running sequences", NULL},
    {"max_batch", (getter)Replica_max_batch, NULL, "batch places", NULL},
    {"step", (getter)Replica_step, NULL, "steps completed", NULL},
    {NULL},
};

static PyTypeObject ReplicaType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._engine.Replica",
    .tp_doc = "An engine replica on the event path, compiled: see sim/model/serving/engine.py (CompiledReplica).",
    .tp_basicsize = sizeof(Replica),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    /* tp_new: object's (set at import), which gives a Python subclass's attributes their inline layout
     * (PyType_GenericNew leaves them in a dict that each attribute read searches: 3x slower reads) */
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
    ReplicaType.tp_new = PyBaseObject_Type.tp_new;
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
