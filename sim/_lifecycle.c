/* A request's way through the pipeline, compiled (optional: sim/model/application/lifecycle.py holds the
 * pure-Python twin, Lifecycle and _Request, which gives the same bits).
 *
 * Request is _Request (its fields C fields); Core is the base of lifecycle.py's CompiledLifecycle and runs the
 * way every request takes: start (routing, time limit, cancellation draw, budget), the output cache, retrieval,
 * model calls, judging and escalation, post-processing and the end with its records. What is rare stays in the
 * Python half and calls back into these methods: failed calls, retries, fallbacks, time limits, structured-output
 * validation. Workloads with flows run the Python Lifecycle whole. The components a request meets (router
 * draws, budget, caches, retrieval, guardrails' caps, endpoints) are the same objects as in Python, called in the
 * same order with the same arguments, so every draw and record is the same.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <structmember.h>

#include "_calls.h"

/* sim/metrics/recorder.py's outcomes and caches.py's cache codes */
enum { COMPLETED, REJECTED, RATE_LIMITED, QUEUE_FULL, EXPIRED, TIMED_OUT, CANCELLED, PARTIAL, TRY_LATER };
enum { MISS, HIT, STALE_HIT, BYPASS };

static PyObject *s_now, *s_value;

/* The names of the methods and attributes the hot path uses, interned once (a C string would be made into one,
 * and hashed, at every call) */
#define NAMES(X)                                                                                                 \
    X(draw) X(append) X(drawn) X(sizes) X(truncated) X(overflow) X(prompt_tokens) \
    X(prefix_tokens) X(output_budget_tokens) X(confidence) X(draw_key) X(lookup) X(leaked)       \
    X(retrieve_more) X(run) X(new) X(spec) X(scope) X(use) X(submit) X(fixes) X(insert) X(last) X(add)
#define DECLARE(name) static PyObject *n_##name;
NAMES(DECLARE)
#undef DECLARE


/* ---------------------------------------------------------------------------------------------------------
 * Request: lifecycle.py's _Request.
 */
typedef struct {
    PyObject_HEAD
    Py_ssize_t i, call;
    double started, cache_s, evaluation_s, post_s, retrieval_s, retry_s, difficulty, confidence;
    long long cache_key, prefix, tokens, cancel_tokens;
    int hops, asked, tier, validations, retries, timeouts, fallback, path, limit, endpoint, tools, hit, more, same;
    char answered, reduced, fixed;
    PyObject *correct, *evidence, *flow;
} RequestObject;

static PyTypeObject RequestType;

static int request_traverse(RequestObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->correct);
    Py_VISIT(self->evidence);
    Py_VISIT(self->flow);
    return 0;
}

static int request_clear(RequestObject *self) {
    Py_CLEAR(self->correct);
    Py_CLEAR(self->evidence);
    Py_CLEAR(self->flow);
    return 0;
}

static void request_dealloc(RequestObject *self) {
    PyObject_GC_UnTrack(self);
    request_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *zero_evidence; /* (0.0, 0.0) */

/* _Request(i, now): its defaults */
static void request_defaults(RequestObject *r, Py_ssize_t i, double now) {
    r->i = i, r->started = now;
    r->call = -1;
    r->cache_s = r->evaluation_s = r->post_s = r->retrieval_s = r->retry_s = 0.0;
    r->difficulty = -1.0, r->confidence = NAN;
    r->cache_key = -1, r->prefix = r->tokens = r->cancel_tokens = 0;
    r->hops = r->asked = r->tier = r->validations = r->retries = r->timeouts = r->fallback = r->path = 0;
    r->limit = r->tools = r->hit = r->more = r->same = 0;
    r->endpoint = -1;
    r->answered = r->reduced = r->fixed = 0;
    Py_XSETREF(r->correct, Py_NewRef(Py_None));
    Py_XSETREF(r->evidence, Py_NewRef(zero_evidence));
    Py_XSETREF(r->flow, Py_NewRef(Py_None));
}

static int request_init(RequestObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"i", "now", NULL};
    Py_ssize_t i;
    double now;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nd", names, &i, &now)) return -1;
    request_defaults(self, i, now);
    return 0;
}

#define R(name, type, doc) {#name, type, offsetof(RequestObject, name), 0, doc}
static PyMemberDef request_members[] = {
    {"i", T_PYSSIZET, offsetof(RequestObject, i), READONLY, "the request's index"},
    R(started, T_DOUBLE, "when it passed the rate limits"),
    R(cache_s, T_DOUBLE, "seconds in the output cache"), R(evaluation_s, T_DOUBLE, "seconds judged"),
    R(post_s, T_DOUBLE, "seconds post-processed"), R(retrieval_s, T_DOUBLE, "seconds retrieving"),
    R(retry_s, T_DOUBLE, "seconds backing off"),
    R(hops, T_INT, "model calls made (a flow's included)"), R(asked, T_INT, "model calls made for the answer"),
    R(tier, T_INT, "router tier of the current (or next) call"), R(difficulty, T_DOUBLE, "drawn at arrival"),
    R(cache_key, T_LONGLONG, "output-cache key to store the answer under (-1: none)"),
    R(prefix, T_LONGLONG, "cacheable prefix tokens"), R(call, T_PYSSIZET, "the call in flight (-1: none)"),
    R(tokens, T_LONGLONG, "prompt + output tokens of the calls made"),
    R(validations, T_INT, "structured-output retries"), R(retries, T_INT, "guardrail retries"),
    R(timeouts, T_INT, "calls stopped by a time limit"), R(fallback, T_INT, "next fallback to try"),
    R(path, T_INT, "ANSWER_PATHS index of the call being made"), R(limit, T_INT, "LIMITS index of a refusal"),
    R(answered, T_BOOL, "some answer is in hand"), R(cancel_tokens, T_LONGLONG, "> 0: the user stops there"),
    R(endpoint, T_INT, "a fallback's endpoint (-1: as routed)"), R(reduced, T_BOOL, "reduced_context is on"),
    R(tools, T_INT, "retrieval hops and tool calls made"),
    R(correct, T_OBJECT_EX, "the router's verdict on the latest answer (None: not judged)"),
    R(evidence, T_OBJECT_EX, "(retrieved, kept) tokens of the evidence section"),
    R(confidence, T_DOUBLE, "the evidence confidence its budget followed"),
    R(hit, T_INT, "the output-cache code of an answer from the cache"), R(more, T_INT, "escalations made"),
    R(same, T_INT, "same-tier retries on the current tier"), R(fixed, T_BOOL, "a same-tier retry fixed it"),
    R(flow, T_OBJECT_EX, "its flow's state (None)"),
    {NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._lifecycle.Request",
    .tp_doc = "Request(i, now): one request's state while it runs (_Request in lifecycle.py)",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)request_init,
    .tp_traverse = (traverseproc)request_traverse,
    .tp_clear = (inquiry)request_clear,
    .tp_dealloc = (destructor)request_dealloc,
    .tp_members = request_members,
};

/* ---------------------------------------------------------------------------------------------------------
 * Core: the Python half sets the object fields as Lifecycle.__init__ does, then `_bind()` reads the rest.
 */
enum { N_COLUMNS = 12 };
typedef struct {
    PyObject_HEAD
    /* set by Lifecycle.__init__ (the same names) */
    PyObject *env, *rec, *calls, *endpoints, *done, *parent, *live, *budgets, *cache, *hit_latency, *miss_latency;
    PyObject *post, *prompt_caches, *router, *retrieval, *validation, *cancel_draw, *read_share, *guard, *quality;
    PyObject *flows;
    double cancel_share;
    char spilling, streaming;
    /* read by _bind */
    PyObject *call_later, *bound[5]; /* _answered_from_cache, _looked_up, _retrieved, _finished, _escalated */
    PyObject *cls, *endpoint, *arrival, *admit, *first_token, *end, *prompt, *output, *user, *feature, *outcome,
        *replica; /* the request columns */
    PyObject *c_admit, *c_replica, *c_outcome, *c_first_token, *c_output, *c_generated, *c_cached_tokens;
    PyObject *budget_log, *cache_code, *cache_leak, *stage_log, *quality_log, *quality_inputs, *guard_log;
    PyObject *validation_retries, *router_endpoints, *router_quality, *evaluation, *escalation, *max_tokens;
    PyObject *reduced_share, *plan, *escalation_plan;
    /* the guardrails' limits and caps (Guardrails' fields): Timeouts, and None or a number each */
    PyObject *deadlines, *call_timeouts, *max_time, *first_timeout, *whole_timeout, *max_hops, *tool_cap;
    /* the router's draws and policy (Routing's fields) */
    PyObject *difficulty_draw, *risky, *noise, *thresholds, *judge;
    PyObject *evidence_index; /* QualityInputs.evidence: the evidence section's index, or None */
    long long extra_context;
    int same_tier_retries, tiers_tried, policy, fixed_tier;
    double false_alarm, detect_bad;
    char bound_ok;
} CoreObject;

enum { FIXED, RISK, THRESHOLD, BY_DIFFICULTY }; /* Routing.policy: fixed, risk, threshold, anything else */
enum { LIMIT_HOPS = 1, LIMIT_TOKENS = 2, LIMIT_TOOL_CALLS = 3 }; /* guardrails.LIMITS indexes */

enum { B_ANSWERED_FROM_CACHE, B_LOOKED_UP, B_RETRIEVED, B_FINISHED, B_ESCALATED };
static const char *BOUND[5] = {"_answered_from_cache", "_looked_up", "_retrieved", "_finished", "_escalated"};

#define FIELDS(X)                                                                                              \
    X(env) X(rec) X(calls) X(endpoints) X(done) X(parent) X(live) X(budgets) X(cache) X(hit_latency)            \
    X(miss_latency) X(post) X(prompt_caches) X(router) X(retrieval) X(validation) X(cancel_draw) X(read_share)  \
    X(guard) X(quality) X(flows) X(call_later) X(cls) X(endpoint) X(arrival) X(admit) X(first_token) X(end)     \
    X(prompt) X(output) X(user) X(feature) X(outcome) X(replica) X(c_admit) X(c_replica) X(c_outcome)           \
    X(c_first_token) X(c_output) X(c_generated) X(c_cached_tokens) X(budget_log) X(cache_code) X(cache_leak)    \
    X(stage_log) X(quality_log) X(quality_inputs) X(guard_log) X(validation_retries) X(router_endpoints)        \
    X(router_quality) X(evaluation) X(escalation) X(max_tokens) X(reduced_share) X(plan) X(escalation_plan)       \
    X(deadlines) X(call_timeouts) X(max_time) X(first_timeout) X(whole_timeout) X(max_hops) X(tool_cap)         \
    X(difficulty_draw) X(risky) X(noise) X(thresholds) X(judge) X(evidence_index)

static int core_traverse(CoreObject *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    FIELDS(VISIT)
#undef VISIT
    for (int k = 0; k < 5; k++) Py_VISIT(self->bound[k]);
    return 0;
}

static int core_clear(CoreObject *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    FIELDS(CLEAR)
#undef CLEAR
    for (int k = 0; k < 5; k++) Py_CLEAR(self->bound[k]);
    return 0;
}

static void core_dealloc(CoreObject *self) {
    PyObject_GC_UnTrack(self);
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* fields[k] = obj.names[k] for each k; 0, or -1 with an exception set */
static int read_fields(PyObject *obj, const char **names, PyObject ***fields, int n) {
    for (int k = 0; k < n; k++) {
        PyObject *value = PyObject_GetAttrString(obj, names[k]);
        if (value == NULL) return -1;
        Py_XSETREF(*fields[k], value);
    }
    return 0;
}

/* an int or float attribute as a C number; 0, or -1 with an exception set */
static int read_ll(PyObject *obj, const char *name, long long *out) {
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL) return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return PyErr_Occurred() ? -1 : 0;
}

static int read_d(PyObject *obj, const char *name, double *out) {
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL) return -1;
    *out = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return PyErr_Occurred() ? -1 : 0;
}

/* the recorders' columns and logs the way writes to */
static int bind_records(CoreObject *self) {
    const char *columns[N_COLUMNS] = {"cls", "endpoint", "arrival", "admit", "first_token", "end", "prompt",
                                      "output", "user", "feature", "outcome", "replica"};
    PyObject **fields[N_COLUMNS] = {&self->cls, &self->endpoint, &self->arrival, &self->admit, &self->first_token,
                                    &self->end, &self->prompt, &self->output, &self->user, &self->feature,
                                    &self->outcome, &self->replica};
    const char *call_columns[7] = {"admit", "replica", "outcome", "first_token", "output", "generated",
                                   "cached_tokens"};
    PyObject **call_fields[7] = {&self->c_admit, &self->c_replica, &self->c_outcome, &self->c_first_token,
                                 &self->c_output, &self->c_generated, &self->c_cached_tokens};
    const char *logs[8] = {"budget", "cache_code", "cache_leak", "stage_log", "quality", "quality_inputs",
                           "guard_log", "validation_retries"};
    PyObject **log_fields[8] = {&self->budget_log, &self->cache_code, &self->cache_leak, &self->stage_log,
                                &self->quality_log, &self->quality_inputs, &self->guard_log,
                                &self->validation_retries};
    return read_fields(self->rec, columns, fields, N_COLUMNS) < 0 ||
                   read_fields(self->calls, call_columns, call_fields, 7) < 0 ||
                   read_fields(self->rec, logs, log_fields, 8) < 0
               ? -1
               : 0;
}

/* Routing's fields */
static int bind_router(CoreObject *self) {
    const char *names[9] = {"endpoints", "quality", "evaluation", "escalation", "difficulty_draw", "risky",
                            "noise", "thresholds", "judge"};
    PyObject **fields[9] = {&self->router_endpoints, &self->router_quality, &self->evaluation, &self->escalation,
                            &self->difficulty_draw, &self->risky, &self->noise, &self->thresholds, &self->judge};
    long long extra, same, tried, fixed;
    if (read_fields(self->router, names, fields, 9) < 0 || read_ll(self->router, "extra_context", &extra) < 0 ||
        read_ll(self->router, "same_tier_retries", &same) < 0 || read_ll(self->router, "tiers_tried", &tried) < 0 ||
        read_ll(self->router, "fixed_tier", &fixed) < 0)
        return -1;
    self->extra_context = extra, self->same_tier_retries = (int)same, self->tiers_tried = (int)tried;
    self->fixed_tier = (int)fixed;
    PyObject *policy = PyObject_GetAttrString(self->router, "policy");
    if (policy == NULL) return -1;
    self->policy = !PyUnicode_CompareWithASCIIString(policy, "fixed")       ? FIXED
                   : !PyUnicode_CompareWithASCIIString(policy, "risk")      ? RISK
                   : !PyUnicode_CompareWithASCIIString(policy, "threshold") ? THRESHOLD
                                                                            : BY_DIFFICULTY;
    Py_DECREF(policy);
    if (!is_set(self->escalation)) return 0;
    return read_d(self->escalation, "false_alarm", &self->false_alarm) < 0 ||
                   read_d(self->escalation, "detect_bad", &self->detect_bad) < 0
               ? -1
               : 0;
}

/* Guardrails' fields and its spec's call timeouts */
static int bind_guard(CoreObject *self) {
    const char *names[7] = {"max_tokens", "reduced_share", "deadlines", "call_timeouts", "max_time", "max_hops",
                            "tool_cap"};
    PyObject **fields[7] = {&self->max_tokens, &self->reduced_share, &self->deadlines, &self->call_timeouts,
                            &self->max_time, &self->max_hops, &self->tool_cap};
    const char *timeouts[2] = {"first_token_timeout_s", "call_timeout_s"};
    PyObject **timeout_fields[2] = {&self->first_timeout, &self->whole_timeout};
    PyObject *spec = PyObject_GetAttrString(self->guard, "spec");
    if (spec == NULL) return -1;
    int status = read_fields(spec, timeouts, timeout_fields, 2);
    Py_DECREF(spec);
    return status < 0 ? -1 : read_fields(self->guard, names, fields, 7);
}

/* _bind(call_later): after Lifecycle.__init__ has set the components, read what the way needs of them */
static PyObject *core_bind(CoreObject *self, PyObject *call_later) {
    Py_XSETREF(self->call_later, Py_NewRef(call_later));
    PyObject **bound[5] = {&self->bound[0], &self->bound[1], &self->bound[2], &self->bound[3], &self->bound[4]};
    const char *plans[2] = {"plan", "escalation_plan"};
    PyObject **plan_fields[2] = {&self->plan, &self->escalation_plan};
    const char *evidence[1] = {"evidence"};
    PyObject **evidence_field[1] = {&self->evidence_index};
    if (read_fields((PyObject *)self, BOUND, bound, 5) < 0 || bind_records(self) < 0 ||
        (is_set(self->router) && bind_router(self) < 0) || (is_set(self->guard) && bind_guard(self) < 0) ||
        (is_set(self->quality) && read_fields(self->quality, evidence, evidence_field, 1) < 0) ||
        (is_set(self->retrieval) && read_fields(self->retrieval, plans, plan_fields, 2) < 0))
        return NULL;
    self->bound_ok = 1;
    Py_RETURN_NONE;
}

/* ---- small helpers: each returns -1 (or NULL) with an exception set ---- */

static int now_of(CoreObject *self, double *now) {
    if (!self->bound_ok) {
        PyErr_SetString(PyExc_RuntimeError, "the compiled lifecycle is not bound (_bind)");
        return -1;
    }
    return clock_now(self->env, s_now, now);
}

static int item_ll(PyObject *seq, Py_ssize_t i, long long *out) {
    PyObject *x = PySequence_GetItem(seq, i);
    if (x == NULL) return -1;
    *out = PyLong_AsLongLong(x);
    Py_DECREF(x);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int item_d(PyObject *seq, Py_ssize_t i, double *out) {
    PyObject *x = PySequence_GetItem(seq, i);
    if (x == NULL) return -1;
    *out = PyFloat_AsDouble(x);
    Py_DECREF(x);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* seq[i] = value (stolen) */
static int set_item(PyObject *seq, Py_ssize_t i, PyObject *value) {
    if (value == NULL) return -1;
    int failed = PySequence_SetItem(seq, i, value);
    Py_DECREF(value);
    return failed;
}

/* log += row (row stolen) */
static int log_row(PyObject *log, PyObject *row) {
    if (row == NULL) return -1;
    PyObject *out = PyNumber_InPlaceAdd(log, row);
    Py_DECREF(row);
    if (out == NULL) return -1;
    Py_DECREF(out);
    return 0;
}

/* call_later(env, delay, bound, r) */
static int later(CoreObject *self, double delay, int bound, PyObject *r) {
    return schedule(self->call_later, self->env, delay, self->bound[bound], r);
}

/* rec.outcome[i] < 0: the request still runs */
static int running(CoreObject *self, Py_ssize_t i) {
    long long outcome;
    if (item_ll(self->outcome, i, &outcome) < 0) return -1;
    return outcome < 0;
}

static RequestObject *request_arg(PyObject *r) {
    if (!PyObject_TypeCheck(r, &RequestType)) {
        PyErr_Format(PyExc_TypeError, "a request (sim._lifecycle.Request) expected, got %s", Py_TYPE(r)->tp_name);
        return NULL;
    }
    return (RequestObject *)r;
}

static RequestObject *event_request(PyObject *event) { /* new reference */
    PyObject *value = PyObject_GetAttr(event, s_value);
    if (value == NULL) return NULL;
    if (request_arg(value) == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    return (RequestObject *)value;
}

/* ---- the guardrails' and the router's small steps (Guardrails and Routing in Python, same arithmetic) ---- */

static int as_ll(PyObject *x, long long *out) { /* x an int */
    *out = PyLong_AsLongLong(x);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* Guardrails.watch_request: the request's time limit, counted from its arrival */
static int watch_request(CoreObject *self, RequestObject *r, double arrival, double now) {
    if (!is_set(self->max_time)) return 0;
    double max_time = PyFloat_AsDouble(self->max_time);
    if (max_time == -1.0 && PyErr_Occurred()) return -1;
    double delay = arrival + max_time - now;
    PyObject *d = PyFloat_FromDouble(delay > 0.0 ? delay : 0.0); /* max(0.0, delay), as Python picks */
    if (d == NULL) return -1;
    int status = done_with(method(self->deadlines, n_add, 2, d, (PyObject *)r));
    Py_DECREF(d);
    return status;
}

/* Guardrails.watch_call: call c's timeouts, from its send now */
static int watch_call(CoreObject *self, RequestObject *r, PyObject *c) {
    PyObject *first = self->first_timeout, *whole = self->whole_timeout, *limit, *flag;
    if (is_set(first)) {
        int earlier = 1;
        if (is_set(whole)) {
            earlier = PyObject_RichCompareBool(first, whole, Py_LT);
            if (earlier < 0) return -1;
        }
        limit = earlier ? first : is_set(whole) ? whole : NULL;
        flag = earlier ? Py_True : Py_False;
    } else {
        limit = is_set(whole) ? whole : NULL;
        flag = Py_False;
    }
    if (limit == NULL) return 0;
    PyObject *value = PyTuple_Pack(3, (PyObject *)r, c, flag);
    if (value == NULL) return -1;
    int status = done_with(method(self->call_timeouts, n_add, 2, limit, value));
    Py_DECREF(value);
    return status;
}

/* Guardrails.allows: whether the caps allow one more call of `tokens` (a refusal noted in r->limit) */
static int allows(CoreObject *self, RequestObject *r, long long tokens) {
    long long cap;
    if (is_set(self->max_hops)) {
        if (as_ll(self->max_hops, &cap) < 0) return -1;
        if (r->hops >= cap) {
            r->limit = LIMIT_HOPS;
            return 0;
        }
    }
    if (is_set(self->max_tokens)) {
        if (as_ll(self->max_tokens, &cap) < 0) return -1;
        if (r->tokens + tokens > cap) {
            r->limit = LIMIT_TOKENS;
            return 0;
        }
    }
    return 1;
}

/* Guardrails.tool_plan: the first stages of a plan that keep r within the tool cap (their hops counted) */
static PyObject *tool_plan(CoreObject *self, RequestObject *r, PyObject *plan) {
    if (!is_set(self->tool_cap)) return Py_NewRef(plan);
    long long cap, used = r->tools;
    if (as_ll(self->tool_cap, &cap) < 0 || !PyTuple_Check(plan)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a retrieval plan is a tuple of stages");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(plan), kept = 0;
    for (; kept < n; kept++) {
        PyObject *stage = PyTuple_GET_ITEM(plan, kept);
        PyObject *hops = PyTuple_Check(stage) && PyTuple_GET_SIZE(stage) > 0 ? PyTuple_GET_ITEM(stage, 0) : NULL;
        Py_ssize_t size = hops != NULL ? PyObject_Size(hops) : -1;
        if (size < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a retrieval stage is a (backends, need) pair");
            return NULL;
        }
        used += size;
        if (used > cap) {
            r->limit = LIMIT_TOOL_CALLS;
            break;
        }
        r->tools = (int)used;
    }
    return PyTuple_GetSlice(plan, 0, kept);
}

/* Routing.first_tier: (the tier of the first call, the difficulty), drawn at arrival */
static int first_tier(CoreObject *self, Py_ssize_t cls, int *tier, double *difficulty) {
    PyObject *sampler = PySequence_GetItem(self->difficulty_draw, cls);
    double d = sampler != NULL ? draw(sampler) : -1.0;
    Py_XDECREF(sampler);
    if (PyErr_Occurred()) return -1;
    d = d < 0.0 ? 0.0 : d > 1.0 ? 1.0 : d;
    *difficulty = d;
    int risky = 0;
    if (self->policy == RISK) {
        PyObject *flag = PySequence_GetItem(self->risky, cls);
        risky = flag != NULL ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        if (risky < 0) return -1;
    }
    if (self->policy == FIXED || (self->policy == RISK && !risky)) {
        *tier = self->fixed_tier;
        return 0;
    }
    if (self->policy == RISK) {
        Py_ssize_t tiers = PyObject_Size(self->router_endpoints);
        if (tiers < 0) return -1;
        *tier = (int)tiers - 1;
        return 0;
    }
    double estimate = d;
    if (self->policy == THRESHOLD) {
        double noise = draw(self->noise);
        if (noise == -1.0 && PyErr_Occurred()) return -1;
        estimate = d + noise;
    }
    *tier = 0;
    Py_ssize_t n = PyTuple_Size(self->thresholds);
    for (Py_ssize_t k = 0; k < n; k++) {
        double t = PyFloat_AsDouble(PyTuple_GET_ITEM(self->thresholds, k));
        if (t == -1.0 && PyErr_Occurred()) return -1;
        *tier += estimate > t;
    }
    return n < 0 ? -1 : 0;
}

/* Routing.flagged: the evaluator flags a bad answer with detect_bad, a good one with false_alarm */
static int flagged(CoreObject *self, int good) {
    double u = draw(self->judge);
    if (u == -1.0 && PyErr_Occurred()) return -1;
    return u < (good ? self->false_alarm : self->detect_bad);
}

/* QualityInputs.evidence_of: (retrieved, kept) tokens of the evidence section; (0.0, 0.0) without one */
static PyObject *evidence_of(CoreObject *self, PyObject *drawn, PyObject *kept) {
    if (!is_set(self->evidence_index)) return Py_BuildValue("(dd)", 0.0, 0.0);
    PyObject *a = PyObject_GetItem(drawn, self->evidence_index), *b = PyObject_GetItem(kept, self->evidence_index);
    PyObject *fa = a != NULL ? PyNumber_Float(a) : NULL, *fb = b != NULL ? PyNumber_Float(b) : NULL;
    PyObject *out = fa != NULL && fb != NULL ? PyTuple_Pack(2, fa, fb) : NULL;
    Py_XDECREF(a), Py_XDECREF(b), Py_XDECREF(fa), Py_XDECREF(fb);
    return out;
}

static int answer(CoreObject *self, RequestObject *r);
static int retrieve(CoreObject *self, RequestObject *r, int more);
static int make_call(CoreObject *self, RequestObject *r);
static int finish(CoreObject *self, RequestObject *r);
static int end(CoreObject *self, RequestObject *r, PyObject *outcome);

/* ---- the way in ---- */

/* The user stops reading part-way (cancel_share of the requests): after what share of the answer */
static int draw_cancel(CoreObject *self, RequestObject *r) {
    double u = draw(self->cancel_draw);
    if (u == -1.0 && PyErr_Occurred()) return -1;
    if (!(u < self->cancel_share)) return 0;
    double read = draw(self->read_share);
    long long output;
    if ((read == -1.0 && PyErr_Occurred()) || item_ll(self->output, r->i, &output) < 0) return -1;
    read = read > 0.0 ? read : 0.0; /* min(1.0, max(0.0, read)), as Python picks */
    read = read < 1.0 ? read : 1.0;
    long long tokens = (long long)ceil(read * (double)output);
    r->cancel_tokens = tokens > 1 ? tokens : 1;
    return 0;
}

/* The prompt the budget builds for class c's request (its row logged): 1 when it overflows the window even
 * trimmed (the request is refused, as a provider would: ended here), 0 to go on, -1 with an exception set */
static int apply_budget(CoreObject *self, RequestObject *r, PyObject *i, Py_ssize_t c) {
    PyObject *budget = PySequence_GetItem(self->budgets, c);
    PyObject *b = budget != NULL ? method(budget, n_draw, 0) : NULL; /* a BudgetResult */
    Py_XDECREF(budget);
    if (b == NULL) return -1;
    PyObject *drawn = PyObject_GetAttr(b, n_drawn), *sizes = PyObject_GetAttr(b, n_sizes);
    PyObject *truncated = PyObject_GetAttr(b, n_truncated), *overflow = PyObject_GetAttr(b, n_overflow);
    PyObject *prompt = PyObject_GetAttr(b, n_prompt_tokens), *prefix = PyObject_GetAttr(b, n_prefix_tokens);
    PyObject *room = PyObject_GetAttr(b, n_output_budget_tokens), *confidence = PyObject_GetAttr(b, n_confidence);
    int status = -1, over;
    long long output, budget_tokens;
    if (!drawn || !sizes || !truncated || !overflow || !prompt || !prefix || !room || !confidence) goto done;
    if (done_with(method(self->budget_log, n_append, 1, i)) < 0 ||
        done_with(method(self->budget_log, n_append, 1, truncated)) < 0 ||
        log_row(self->budget_log, Py_NewRef(drawn)) < 0 || log_row(self->budget_log, Py_NewRef(sizes)) < 0 ||
        (over = PyObject_IsTrue(overflow)) < 0)
        goto done;
    if (over) {
        PyObject *code = PyLong_FromLong(REJECTED);
        status = code == NULL || end(self, r, code) < 0 ? -1 : 1;
        Py_XDECREF(code);
        goto done;
    }
    if (PySequence_SetItem(self->prompt, r->i, prompt) < 0 || as_ll(prefix, &r->prefix) < 0) goto done;
    if (is_set(self->quality)) {
        PyObject *evidence = evidence_of(self, drawn, sizes);
        if (evidence == NULL) goto done;
        Py_XSETREF(r->evidence, evidence);
        if ((r->confidence = PyFloat_AsDouble(confidence)) == -1.0 && PyErr_Occurred()) goto done;
    }
    /* the answer cannot outgrow what the window leaves */
    if (as_ll(room, &budget_tokens) < 0 || item_ll(self->output, r->i, &output) < 0) goto done;
    if (output > budget_tokens &&
        set_item(self->output, r->i, PyLong_FromLongLong(budget_tokens > 1 ? budget_tokens : 1)) < 0)
        goto done;
    status = 0;
done:
    Py_DECREF(b);
    Py_XDECREF(drawn), Py_XDECREF(sizes), Py_XDECREF(truncated), Py_XDECREF(overflow), Py_XDECREF(prompt);
    Py_XDECREF(prefix), Py_XDECREF(room), Py_XDECREF(confidence);
    return status;
}

/* Lifecycle.start */
static PyObject *core_start(CoreObject *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg), c;
    double now, arrival;
    if ((i == -1 && PyErr_Occurred()) || now_of(self, &now) < 0) return NULL;
    RequestObject *r = PyObject_GC_New(RequestObject, &RequestType);
    if (r == NULL) return NULL;
    r->correct = r->evidence = r->flow = NULL;
    request_defaults(r, i, now);
    PyObject_GC_Track(r);
    int status = -1;
    PyObject *cls = NULL;
    if (PyDict_SetItem(self->live, arg, (PyObject *)r) < 0 || (cls = PySequence_GetItem(self->cls, i)) == NULL ||
        ((c = PyLong_AsSsize_t(cls)) == -1 && PyErr_Occurred()))
        goto done;
    /* routed at arrival, in arrival order (common random numbers) */
    if (is_set(self->router) && first_tier(self, c, &r->tier, &r->difficulty) < 0) goto done;
    if (is_set(self->guard) && (item_d(self->arrival, i, &arrival) < 0 || watch_request(self, r, arrival, now) < 0))
        goto done;
    if (self->cancel_share > 0 && draw_cancel(self, r) < 0) goto done;
    status = is_set(self->budgets) ? apply_budget(self, r, arg, c) : 0;
    if (status == 0) status = answer(self, r);
done:
    Py_XDECREF(cls);
    Py_DECREF(r);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

/* Lifecycle._answer: from the output cache, else retrieval and the model */
static int answer(CoreObject *self, RequestObject *r) {
    if (!is_set(self->cache)) return retrieve(self, r, 0);
    double now;
    if (now_of(self, &now) < 0) return -1;
    PyObject *i = PyLong_FromSsize_t(r->i), *key = NULL, *code_obj = NULL, *now_obj = PyFloat_FromDouble(now);
    int status = -1;
    if (i == NULL || now_obj == NULL) goto done;
    if ((key = method(self->cache, n_draw_key, 1, i)) == NULL) goto done;
    if ((code_obj = method(self->cache, n_lookup, 3, key, now_obj, i)) == NULL) goto done;
    if (log_row(self->cache_code, PyTuple_Pack(2, i, code_obj)) < 0) goto done;
    long code = PyLong_AsLong(code_obj);
    long long k = PyLong_AsLongLong(key);
    if (PyErr_Occurred()) goto done;
    if (code == HIT || code == STALE_HIT) {
        PyObject *leaked = PyObject_GetAttr(self->cache, n_leaked);
        int yes = leaked != NULL ? PyObject_IsTrue(leaked) : -1;
        Py_XDECREF(leaked);
        if (yes < 0 || (yes && done_with(method(self->cache_leak, n_append, 1, i)) < 0)) goto done;
        r->hit = (int)code, r->cache_key = k; /* the answer served, and its quality with it */
        r->cache_s = draw(self->hit_latency);
        if (r->cache_s == -1.0 && PyErr_Occurred()) goto done;
        status = later(self, r->cache_s, B_ANSWERED_FROM_CACHE, (PyObject *)r);
        goto done;
    }
    if (k >= 0) { /* a miss: the answer will be cached; the lookup itself took a moment */
        r->cache_key = k;
        r->cache_s = draw(self->miss_latency);
        if (r->cache_s == -1.0 && PyErr_Occurred()) goto done;
        status = later(self, r->cache_s, B_LOOKED_UP, (PyObject *)r);
        goto done;
    }
    status = retrieve(self, r, 0);
done:
    Py_XDECREF(i), Py_XDECREF(key), Py_XDECREF(code_obj), Py_XDECREF(now_obj);
    return status;
}

/* Lifecycle._retrieve: retrieve (more, for an escalation) if the pipeline retrieves, then call the model */
static int retrieve(CoreObject *self, RequestObject *r, int more) {
    if (!is_set(self->retrieval)) return make_call(self, r);
    PyObject *plan = more ? self->escalation_plan : self->plan;
    Py_INCREF(plan);
    if (is_set(self->guard)) {
        PyObject *kept = tool_plan(self, r, plan);
        Py_DECREF(plan);
        if (kept == NULL) return -1;
        plan = kept;
        int any = PyObject_IsTrue(plan);
        if (any <= 0) {
            Py_DECREF(plan);
            return any < 0 ? -1 : make_call(self, r);
        }
    }
    PyObject *i = PyLong_FromSsize_t(r->i);
    int status = i == NULL ? -1 : done_with(method(self->retrieval, more ? n_retrieve_more : n_run, 3, i,
                                                                     self->bound[B_RETRIEVED], plan));
    Py_XDECREF(i);
    Py_DECREF(plan);
    return status;
}

/* ---- model calls ---- */

/* Lifecycle._next_call: (endpoint, prompt, output) of the call the request would make now */
static int next_call(CoreObject *self, RequestObject *r, long long *endpoint, long long *prompt, long long *output) {
    if (item_ll(self->endpoint, r->i, endpoint) < 0 || item_ll(self->prompt, r->i, prompt) < 0 ||
        item_ll(self->output, r->i, output) < 0)
        return -1;
    if (r->reduced) { /* keep the stable prefix; cut what follows to the share */
        PyObject *p = PyObject_CallMethod(self->guard, "reduced_prompt", "LL", *prompt, r->prefix);
        if (p == NULL) return -1;
        *prompt = PyLong_AsLongLong(p);
        Py_DECREF(p);
        if (PyErr_Occurred()) return -1;
    }
    if (is_set(self->router)) {
        if (item_ll(self->router_endpoints, r->tier, endpoint) < 0) return -1;
        *prompt += r->more * self->extra_context; /* each escalation retrieved more context */
    }
    if (r->endpoint >= 0) *endpoint = r->endpoint;
    if (r->cancel_tokens && r->cancel_tokens < *output) *output = r->cancel_tokens;
    return 0;
}

static PyObject *core_next_call(CoreObject *self, PyObject *arg) {
    RequestObject *r = request_arg(arg);
    long long endpoint, prompt, output;
    if (r == NULL || next_call(self, r, &endpoint, &prompt, &output) < 0) return NULL;
    return Py_BuildValue("(LLL)", endpoint, prompt, output);
}

/* Lifecycle._may_call: whether the guardrails' caps allow one more call now (tokens: the call's, or -1) */
static int may_call(CoreObject *self, RequestObject *r, long long tokens) {
    if (!is_set(self->guard)) return 1;
    if (!is_set(self->max_tokens)) tokens = 0;
    else if (tokens < 0) {
        long long endpoint, prompt, output;
        if (next_call(self, r, &endpoint, &prompt, &output) < 0) return -1;
        tokens = prompt + output;
    }
    return allows(self, r, tokens);
}

static PyObject *core_may_call(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) return PyErr_Format(PyExc_TypeError, "_may_call takes 1 or 2 arguments");
    RequestObject *r = request_arg(args[0]);
    if (r == NULL) return NULL;
    long long tokens = -1;
    if (nargs == 2 && is_set(args[1])) { /* the call's (endpoint, prompt, output), already known */
        long long prompt, output;
        if (!PyArg_ParseTuple(args[1], "LLL", &tokens, &prompt, &output)) return NULL;
        tokens = prompt + output;
    }
    int allowed = may_call(self, r, tokens);
    if (allowed < 0) return NULL;
    return PyBool_FromLong(allowed);
}

/* Lifecycle._call */
static int make_call(CoreObject *self, RequestObject *r) {
    long long endpoint, prompt, output;
    if (next_call(self, r, &endpoint, &prompt, &output) < 0) return -1;
    if (r->asked == 0) { /* the first call is over the caps already */
        int allowed = may_call(self, r, prompt + output);
        if (allowed < 0) return -1;
        if (!allowed) {
            /* _fallback(r, REJECTED, deadline=False): a Python method, the rare path */
            return done_with(PyObject_CallMethod((PyObject *)self, "_fallback", "OiO", (PyObject *)r, REJECTED,
                                                 Py_False));
        }
    }
    if (self->spilling) { /* a long queue may send the call to its overflow */
        PyObject *e = PySequence_GetItem(self->endpoints, (Py_ssize_t)endpoint);
        PyObject *dest = e != NULL ? PyObject_CallMethod(e, "destination", NULL) : NULL;
        PyObject *index = dest != NULL ? PyObject_GetAttrString(dest, "index") : NULL;
        Py_XDECREF(e), Py_XDECREF(dest);
        if (index == NULL) return -1;
        endpoint = PyLong_AsLongLong(index);
        Py_DECREF(index);
        if (PyErr_Occurred()) return -1;
    }
    Py_ssize_t i = r->i;
    if (set_item(self->endpoint, i, PyLong_FromLongLong(endpoint)) < 0) return -1;
    r->hops += 1, r->asked += 1, r->tokens += prompt + output;
    double now;
    if (now_of(self, &now) < 0) return -1;
    PyObject *cls = PySequence_GetItem(self->cls, i), *user = PySequence_GetItem(self->user, i);
    PyObject *feature = PySequence_GetItem(self->feature, i), *c = NULL, *now_obj = PyFloat_FromDouble(now);
    PyObject *ep = NULL, *icall = NULL;
    int status = -1;
    if (cls == NULL || user == NULL || feature == NULL || now_obj == NULL) goto done;
    PyObject *e_obj = PyLong_FromLongLong(endpoint), *p_obj = PyLong_FromLongLong(prompt);
    PyObject *o_obj = PyLong_FromLongLong(output);
    if (e_obj != NULL && p_obj != NULL && o_obj != NULL)
        c = method(self->calls, n_new, 7, cls, e_obj, now_obj, p_obj, o_obj, user, feature);
    Py_XDECREF(e_obj), Py_XDECREF(p_obj), Py_XDECREF(o_obj);
    if (c == NULL) goto done;
    if ((r->call = PyLong_AsSsize_t(c)) == -1 && PyErr_Occurred()) goto done;
    if ((icall = PyLong_FromSsize_t(i)) == NULL || done_with(method(self->parent, n_append, 1, icall)) < 0)
        goto done;
    PyObject *cache = PySequence_GetItem(self->prompt_caches, (Py_ssize_t)endpoint);
    if (cache == NULL) goto done;
    if (cache != Py_None) {
        PyObject *spec = PyObject_GetAttr(cache, n_spec);
        PyObject *scope = spec != NULL ? PyObject_GetAttr(spec, n_scope) : NULL;
        Py_XDECREF(spec);
        int by_user = scope != NULL ? PyUnicode_CompareWithASCIIString(scope, "user") == 0 : -1;
        Py_XDECREF(scope);
        PyObject *key = NULL; /* users are >= 0, classes < 0 */
        long long k;
        if (by_user > 0) key = Py_NewRef(user);
        else if (by_user == 0 && item_ll(self->cls, i, &k) == 0) key = PyLong_FromLongLong(-1 - k);
        PyObject *prefix = PyLong_FromLongLong(r->prefix);
        PyObject *used = key != NULL && prefix != NULL ? method(cache, n_use, 3, key, prefix, now_obj) : NULL;
        Py_XDECREF(key), Py_XDECREF(prefix);
        int failed = used == NULL || PyObject_SetItem(self->c_cached_tokens, c, used) < 0;
        Py_XDECREF(used);
        if (failed) {
            Py_DECREF(cache);
            goto done;
        }
    }
    Py_DECREF(cache);
    if (is_set(self->guard) && watch_call(self, r, c) < 0) goto done;
    if ((ep = PySequence_GetItem(self->endpoints, (Py_ssize_t)endpoint)) == NULL) goto done;
    status = done_with(method(ep, n_submit, 1, c));
done:
    Py_XDECREF(cls), Py_XDECREF(user), Py_XDECREF(feature), Py_XDECREF(c), Py_XDECREF(now_obj), Py_XDECREF(ep);
    Py_XDECREF(icall);
    return status;
}

/* ---- the way out ---- */

/* Lifecycle._judge: (wait, escalate?) */
static int judge(CoreObject *self, RequestObject *r, double *wait, int *again) {
    double quality;
    if (item_d(self->router_quality, r->tier, &quality) < 0) return -1;
    int good = r->fixed || r->difficulty < quality;
    Py_XSETREF(r->correct, PyBool_FromLong(good));
    int same = 0;
    *wait = 0.0, *again = 0;
    if (is_set(self->escalation)) {
        *wait = draw(self->evaluation);
        if (*wait == -1.0 && PyErr_Occurred()) return -1;
        r->evaluation_s += *wait;
        same = r->same < self->same_tier_retries; /* retrieve more or rerank before a stronger tier */
        if (r->path == 0 && (same || r->tier + 1 < self->tiers_tried) && (*again = flagged(self, good)) < 0)
            return -1;
    }
    if (*again) {
        int tier = r->tier, same_before = r->same;
        if (same) r->same += 1;
        else r->tier += 1, r->same = 0;
        r->more += 1;
        int allowed = may_call(self, r, -1);
        if (allowed < 0) return -1;
        if (allowed) {
            if (same && !good) {
                PyObject *fixes = method(self->router, n_fixes, 0);
                int yes = fixes != NULL ? PyObject_IsTrue(fixes) : -1;
                Py_XDECREF(fixes);
                if (yes < 0) return -1;
                if (yes) r->fixed = 1;
            }
            return 0;
        }
        r->tier = tier, r->same = same_before, r->more -= 1;
        *again = 0;
    }
    return log_row(self->quality_log, Py_BuildValue("(nOi)", r->i, good ? Py_True : Py_False, r->hops));
}

/* Lifecycle.call_done: a model call ended */
static PyObject *core_call_done(CoreObject *self, PyObject *arg) {
    Py_ssize_t c = PyLong_AsSsize_t(arg);
    long long i;
    if ((c == -1 && PyErr_Occurred()) || item_ll(self->parent, c, &i) < 0) return NULL;
    PyObject *key = PyLong_FromLongLong(i);
    if (key == NULL) return NULL;
    PyObject *found = PyDict_GetItemWithError(self->live, key);
    if (found == NULL) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
        Py_DECREF(key);
        return NULL;
    }
    Py_DECREF(key);
    RequestObject *r = request_arg(found);
    if (r == NULL) return NULL;
    Py_INCREF(r);
    PyObject *result = NULL, *outcome = NULL;
    r->call = -1;
    if (set_item(self->admit, i, PySequence_GetItem(self->c_admit, c)) < 0 ||
        set_item(self->replica, i, PySequence_GetItem(self->c_replica, c)) < 0 ||
        (outcome = PySequence_GetItem(self->c_outcome, c)) == NULL)
        goto done;
    long code = PyLong_AsLong(outcome);
    if (code == -1 && PyErr_Occurred()) goto done;
    if (code != COMPLETED) {
        result = PyObject_CallMethod((PyObject *)self, "_failed", "OO", (PyObject *)r, outcome);
        goto done;
    }
    if (set_item(self->first_token, i, PySequence_GetItem(self->c_first_token, c)) < 0) goto done;
    if (r->cancel_tokens) { /* the user read what they wanted and stopped the stream there */
        PyObject *cancelled = PyLong_FromLong(CANCELLED), *output = PySequence_GetItem(self->c_output, c);
        int failed = cancelled == NULL || output == NULL || PySequence_SetItem(self->c_outcome, c, cancelled) < 0 ||
                     PyObject_SetItem(self->c_generated, arg, output) < 0 ||
                     PySequence_SetItem(self->output, i, output) < 0 || end(self, r, cancelled) < 0;
        Py_XDECREF(cancelled), Py_XDECREF(output);
        if (!failed) result = Py_NewRef(Py_None);
        goto done;
    }
    r->answered = 1;
    if (is_set(self->validation)) { /* the answer failed validation: ask again, without streaming */
        PyObject *invalid = PyObject_CallMethod((PyObject *)self, "_invalid", "O", (PyObject *)r);
        int yes = invalid != NULL ? PyObject_IsTrue(invalid) : -1;
        Py_XDECREF(invalid);
        if (yes > 0) yes = may_call(self, r, -1);
        if (yes < 0) goto done;
        if (yes) {
            r->validations += 1;
            if (make_call(self, r) == 0) result = Py_NewRef(Py_None);
            goto done;
        }
    }
    double wait = 0.0;
    if (is_set(self->router)) {
        int again;
        if (judge(self, r, &wait, &again) < 0) goto done;
        if (again) {
            if (later(self, wait, B_ESCALATED, (PyObject *)r) == 0) result = Py_NewRef(Py_None);
            goto done;
        }
    }
    if (is_set(self->post)) {
        r->post_s = draw(self->post);
        if (r->post_s == -1.0 && PyErr_Occurred()) goto done;
        wait += r->post_s;
    }
    /* evaluation and post-processing, one after the other: one wait */
    if ((wait > 0 ? later(self, wait, B_FINISHED, (PyObject *)r) : finish(self, r)) == 0) result = Py_NewRef(Py_None);
done:
    Py_XDECREF(outcome);
    Py_DECREF(r);
    return result;
}

/* Lifecycle._finish: the final answer is in and post-processed: cache it, end */
static int finish(CoreObject *self, RequestObject *r) {
    if (r->cache_key >= 0) {
        double now;
        if (now_of(self, &now) < 0) return -1;
        PyObject *key = PyLong_FromLongLong(r->cache_key), *t = PyFloat_FromDouble(now);
        PyObject *i = PyLong_FromSsize_t(r->i);
        int failed = key == NULL || t == NULL || i == NULL ||
                     done_with(method(self->cache, n_insert, 3, key, t, i)) < 0;
        Py_XDECREF(key), Py_XDECREF(t), Py_XDECREF(i);
        if (failed) return -1;
    }
    PyObject *code = PyLong_FromLong(COMPLETED);
    int status = code == NULL ? -1 : end(self, r, code);
    Py_XDECREF(code);
    return status;
}

/* Lifecycle._end */
static int end(CoreObject *self, RequestObject *r, PyObject *outcome_obj) {
    Py_ssize_t i = r->i;
    long outcome = PyLong_AsLong(outcome_obj);
    double now, arrival;
    if ((outcome == -1 && PyErr_Occurred()) || now_of(self, &now) < 0) return -1;
    PyObject *key = PyLong_FromSsize_t(i);
    if (key == NULL) return -1;
    Py_INCREF(r); /* the live dict may hold its last reference */
    int status = -1;
    if (PyDict_DelItem(self->live, key) < 0) goto done;
    if (PySequence_SetItem(self->outcome, i, outcome_obj) < 0 || set_item(self->end, i, PyFloat_FromDouble(now)) < 0)
        goto done;
    if (outcome == COMPLETED && (!self->streaming || r->validations)) {
        if (set_item(self->first_token, i, PyFloat_FromDouble(now)) < 0) goto done; /* nothing shows before */
    } else if (outcome == PARTIAL) {
        double first;
        if (item_d(self->first_token, i, &first) < 0) goto done;
        if (first != first && set_item(self->first_token, i, PyFloat_FromDouble(now)) < 0) goto done;
    }
    if (item_d(self->arrival, i, &arrival) < 0) goto done;
    if (log_row(self->stage_log, Py_BuildValue("(ndddddd)", i, r->started - arrival, r->cache_s, r->evaluation_s,
                                               r->post_s, r->retrieval_s, r->retry_s)) < 0)
        goto done;
    if (r->validations) {
        PyObject *n = PyLong_FromLong(r->validations);
        int failed = n == NULL || PyObject_SetItem(self->validation_retries, key, n) < 0;
        Py_XDECREF(n);
        if (failed) goto done;
    }
    if (is_set(self->guard) && (r->retries || r->timeouts || r->path || r->limit)) { /* Guardrails.log */
        PyObject *row = Py_BuildValue("(niiii)", i, r->retries, r->timeouts, r->path, r->limit);
        int failed = row == NULL || PyList_Append(self->guard_log, row) < 0;
        Py_XDECREF(row);
        if (failed) goto done;
    }
    if (is_set(self->quality)) { /* Lifecycle._score: what the answer's quality depends on */
        long long extra = is_set(self->router) ? r->more * self->extra_context : 0;
        long correct = r->correct == Py_None ? -1 : PyObject_IsTrue(r->correct);
        PyObject *evidence = r->evidence;
        if (!PyTuple_Check(evidence) || PyTuple_GET_SIZE(evidence) != 2) {
            PyErr_SetString(PyExc_TypeError, "a request's evidence is a (retrieved, kept) pair");
            goto done;
        }
        PyObject *reduced = r->reduced ? Py_NewRef(self->reduced_share) : PyLong_FromLong(-1);
        int failed = reduced == NULL || log_row(self->quality_inputs, Py_BuildValue(
            "(nlOOLOOiLd)", i, correct, PyTuple_GET_ITEM(evidence, 0), PyTuple_GET_ITEM(evidence, 1), extra, reduced,
            outcome_obj, r->hit, r->cache_key, r->confidence)) < 0;
        Py_XDECREF(reduced);
        if (failed) goto done;
    }
    status = done_with(PyObject_CallOneArg(self->done, key));
done:
    Py_DECREF(key);
    Py_DECREF(r);
    return status;
}

/* ---- callbacks and the methods the Python half calls ---- */

/* Lifecycle._looked_up, _escalated, _finished, _answered_from_cache: after a wait, if the request still runs */
static PyObject *after_wait(CoreObject *self, PyObject *event, int which) {
    RequestObject *r = event_request(event);
    if (r == NULL) return NULL;
    int status = running(self, r->i);
    if (status > 0) {
        if (which == B_LOOKED_UP) status = retrieve(self, r, 0);
        else if (which == B_ESCALATED) status = retrieve(self, r, 1);
        else if (which == B_FINISHED) status = finish(self, r);
        else { /* answered from the cache */
            double now;
            status = now_of(self, &now);
            if (status == 0 && (set_item(self->admit, r->i, PyFloat_FromDouble(now)) < 0 ||
                                set_item(self->first_token, r->i, PyFloat_FromDouble(now)) < 0))
                status = -1;
            if (status == 0) {
                PyObject *code = PyLong_FromLong(COMPLETED);
                status = code == NULL ? -1 : end(self, r, code);
                Py_XDECREF(code);
            }
        }
    }
    Py_DECREF(r);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_looked_up(CoreObject *self, PyObject *event) { return after_wait(self, event, B_LOOKED_UP); }
static PyObject *core_escalated(CoreObject *self, PyObject *event) { return after_wait(self, event, B_ESCALATED); }
static PyObject *core_finished(CoreObject *self, PyObject *event) { return after_wait(self, event, B_FINISHED); }
static PyObject *core_answered_from_cache(CoreObject *self, PyObject *event) {
    return after_wait(self, event, B_ANSWERED_FROM_CACHE);
}

/* Lifecycle._retrieved: the retrieval is complete (the request may have been stopped meanwhile) */
static PyObject *core_retrieved(CoreObject *self, PyObject *arg) {
    PyObject *found = PyDict_GetItemWithError(self->live, arg);
    if (found == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    RequestObject *r = request_arg(found);
    if (r == NULL) return NULL;
    PyObject *record = PyObject_GetAttr(self->retrieval, n_last); /* request i's, inside done */
    if (record == NULL) return NULL;
    double start = PyFloat_AsDouble(PyTuple_GetItem(record, 1)), stop = PyFloat_AsDouble(PyTuple_GetItem(record, 2));
    Py_DECREF(record);
    if (PyErr_Occurred()) return NULL;
    r->retrieval_s += stop - start;
    Py_INCREF(r);
    int status = make_call(self, r);
    Py_DECREF(r);
    if (status < 0) return NULL;
    Py_RETURN_NONE;
}

#define WITH_REQUEST(name, body)                                        \
    static PyObject *name(CoreObject *self, PyObject *arg) {            \
        RequestObject *r = request_arg(arg);                            \
        if (r == NULL || (body) < 0) return NULL;                       \
        Py_RETURN_NONE;                                                 \
    }
WITH_REQUEST(core_answer, answer(self, r))
WITH_REQUEST(core_call, make_call(self, r))
WITH_REQUEST(core_finish, finish(self, r))

static PyObject *core_retrieve(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RequestObject *r = nargs == 2 ? request_arg(args[0]) : NULL;
    if (nargs != 2) PyErr_SetString(PyExc_TypeError, "_retrieve(r, more)");
    int more = r != NULL ? PyObject_IsTrue(args[1]) : -1;
    if (more < 0 || retrieve(self, r, more) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_end(CoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    RequestObject *r = nargs == 2 ? request_arg(args[0]) : NULL;
    if (nargs != 2) PyErr_SetString(PyExc_TypeError, "_end(r, outcome)");
    if (r == NULL || end(self, r, args[1]) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"_bind", (PyCFunction)core_bind, METH_O, "_bind(call_later): ready to run (after Lifecycle.__init__)"},
    {"start", (PyCFunction)core_start, METH_O, "Lifecycle.start"},
    {"_answer", (PyCFunction)core_answer, METH_O, "Lifecycle._answer"},
    {"_looked_up", (PyCFunction)core_looked_up, METH_O, "Lifecycle._looked_up"},
    {"_retrieve", (PyCFunction)(void (*)(void))core_retrieve, METH_FASTCALL, "Lifecycle._retrieve"},
    {"_retrieved", (PyCFunction)core_retrieved, METH_O, "Lifecycle._retrieved"},
    {"_next_call", (PyCFunction)core_next_call, METH_O, "Lifecycle._next_call"},
    {"_may_call", (PyCFunction)(void (*)(void))core_may_call, METH_FASTCALL, "Lifecycle._may_call"},
    {"_call", (PyCFunction)core_call, METH_O, "Lifecycle._call"},
    {"call_done", (PyCFunction)core_call_done, METH_O, "Lifecycle.call_done"},
    {"_escalated", (PyCFunction)core_escalated, METH_O, "Lifecycle._escalated"},
    {"_finished", (PyCFunction)core_finished, METH_O, "Lifecycle._finished"},
    {"_finish", (PyCFunction)core_finish, METH_O, "Lifecycle._finish"},
    {"_answered_from_cache", (PyCFunction)core_answered_from_cache, METH_O, "Lifecycle._answered_from_cache"},
    {"_end", (PyCFunction)(void (*)(void))core_end, METH_FASTCALL, "Lifecycle._end"},
    {NULL},
};

#define O(name) {#name, T_OBJECT_EX, offsetof(CoreObject, name), 0, NULL}
static PyMemberDef core_members[] = {
    O(env), O(rec), O(calls), O(endpoints), O(done), O(parent), O(live), O(budgets), O(cache), O(hit_latency),
    O(miss_latency), O(post), O(prompt_caches), O(router), O(retrieval), O(validation), O(cancel_draw),
    O(read_share), O(guard), O(quality), O(flows),
    {"cancel_share", T_DOUBLE, offsetof(CoreObject, cancel_share), 0, NULL},
    {"spilling", T_BOOL, offsetof(CoreObject, spilling), 0, NULL},
    {"streaming", T_BOOL, offsetof(CoreObject, streaming), 0, NULL},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._lifecycle.Core",
    .tp_doc = "The way every request takes (the base of CompiledLifecycle in lifecycle.py)",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_members = core_members,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lifecycle", "llmsim's request lifecycle, compiled.", -1,
                                    NULL};

PyMODINIT_FUNC PyInit__lifecycle(void) {
    /* tp_new: object's, which gives a Python subclass's attributes their inline layout (see sim/_retrieval.c) */
    CoreType.tp_new = PyBaseObject_Type.tp_new;
    if (PyType_Ready(&RequestType) < 0 || PyType_Ready(&CoreType) < 0) return NULL;
    if (!(s_now = PyUnicode_InternFromString("_now")) || !(s_value = PyUnicode_InternFromString("value")) ||
        !(zero_evidence = Py_BuildValue("(dd)", 0.0, 0.0)))
        return NULL;
#define INTERN(name) if (!(n_##name = PyUnicode_InternFromString(#name))) return NULL;
    NAMES(INTERN)
#undef INTERN
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyTypeObject *types[] = {&RequestType, &CoreType};
    const char *names[] = {"Request", "Core"};
    if (add_types(m, types, names, 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
