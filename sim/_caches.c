/* The application caches' operations compiled (optional: sim/model/application/caches.py holds the pure-Python
 * twin, Cache, which gives the same bits).
 *
 * CacheCore is the base of caches.py's CompiledCache: draw_key, lookup, insert and their eviction and expiry
 * (_put, _sweep, _remove), on the very OrderedDicts the Python cache keeps (so the order of eviction and expiry,
 * and every entry, are the same), with its counters as C fields. The rest (construction, the warm start,
 * reports) is the Python half's, shared with the twin. Request-level draws (keys, eligibility, data changes)
 * are the twin's samplers, called in the same order. Calls into Python go through sim/_calls.h.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <structmember.h>

#include "_calls.h"

enum { MISS, HIT, STALE_HIT, BYPASS }; /* caches.py's codes */

static PyObject *s_move_to_end, *s_popitem, *s_users, *s_personal, *s_scope_id;

typedef struct {
    PyObject_HEAD
    PyObject *entries;  /* OrderedDict: key -> (inserted at, first data change after, inserting user or -1, personal) */
    PyObject *born;     /* OrderedDict key -> inserted at (LRU with a TTL: the expiry order), or None */
    PyObject *key_draw, *eligible, *change, *audience; /* samplers (eligible, change: or None); who asks, or None */
    double ttl;
    Py_ssize_t capacity; /* -1: unbounded */
    long long universe;
    int scope;
    char lru, leaked;
    Py_ssize_t lookups, hits, stale_hits, misses, bypasses, inserts, evictions, expirations, cross_user_hits, leaks;
} CacheObject;

static int cache_traverse(CacheObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->entries);
    Py_VISIT(self->born);
    Py_VISIT(self->key_draw);
    Py_VISIT(self->eligible);
    Py_VISIT(self->change);
    Py_VISIT(self->audience);
    return 0;
}

static int cache_clear(CacheObject *self) {
    Py_CLEAR(self->entries);
    Py_CLEAR(self->born);
    Py_CLEAR(self->key_draw);
    Py_CLEAR(self->eligible);
    Py_CLEAR(self->change);
    Py_CLEAR(self->audience);
    return 0;
}

static void cache_dealloc(CacheObject *self) {
    PyObject_GC_UnTrack(self);
    cache_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _remove: the key's entry (and its birth under LRU with a TTL) */
static int remove_key(CacheObject *self, PyObject *key) {
    if (PyObject_DelItem(self->entries, key) < 0) return -1;
    return is_set(self->born) ? PyObject_DelItem(self->born, key) : 0;
}

/* _sweep: drop expired entries from the oldest end of the insertion order */
static int sweep(CacheObject *self, double now) {
    int by_born = is_set(self->born);
    PyObject *order = by_born ? self->born : self->entries;
    while (PyDict_GET_SIZE(order) > 0) {
        PyObject *it = PyObject_GetIter(order);
        if (it == NULL) return -1;
        PyObject *key = PyIter_Next(it);
        Py_DECREF(it);
        if (key == NULL) return PyErr_Occurred() ? -1 : 0;
        PyObject *value = PyDict_GetItemWithError(order, key); /* borrowed */
        if (value == NULL) {
            Py_DECREF(key);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "a cache's order and entries disagree");
            return -1;
        }
        double b = PyFloat_AsDouble(by_born ? value : PyTuple_GET_ITEM(value, 0));
        if (b == -1.0 && PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        if (now - b < self->ttl) { /* the very test lookup applies */
            Py_DECREF(key);
            return 0;
        }
        int failed = remove_key(self, key);
        Py_DECREF(key);
        if (failed < 0) return -1;
        self->expirations += 1;
    }
    return 0;
}

/* _put: the entry for key, inserted at now by owner */
static int put(CacheObject *self, PyObject *key, PyObject *now_obj, PyObject *owner, PyObject *personal) {
    double now = PyFloat_AsDouble(now_obj);
    if (now == -1.0 && PyErr_Occurred()) return -1;
    if (self->ttl != INFINITY && sweep(self, now) < 0) return -1;
    int held = PyDict_Contains(self->entries, key);
    if (held < 0) return -1;
    if (held) { /* a second miss answered later: the newer answer replaces the entry */
        if (remove_key(self, key) < 0) return -1;
    } else if (self->capacity >= 0 && PyDict_GET_SIZE(self->entries) >= self->capacity) {
        PyObject *oldest = PyObject_CallMethodOneArg(self->entries, s_popitem, Py_False);
        if (oldest == NULL) return -1;
        int failed = is_set(self->born) ? PyObject_DelItem(self->born, PyTuple_GET_ITEM(oldest, 0)) : 0;
        Py_DECREF(oldest);
        if (failed < 0) return -1;
        self->evictions += 1;
    }
    double change_at = INFINITY;
    if (is_set(self->change)) {
        double wait = draw(self->change);
        if (wait == -1.0 && PyErr_Occurred()) return -1;
        change_at = now + wait;
    }
    PyObject *change_obj = PyFloat_FromDouble(change_at);
    if (change_obj == NULL) return -1;
    PyObject *entry = PyTuple_Pack(4, now_obj, change_obj, owner, personal);
    Py_DECREF(change_obj);
    if (entry == NULL) return -1;
    int failed = PyObject_SetItem(self->entries, key, entry);
    Py_DECREF(entry);
    if (failed < 0) return -1;
    return is_set(self->born) ? PyObject_SetItem(self->born, key, now_obj) : 0;
}

/* audience.users[i], new reference */
static PyObject *user_of(CacheObject *self, Py_ssize_t i) {
    PyObject *users = PyObject_GetAttr(self->audience, s_users);
    if (users == NULL) return NULL;
    PyObject *user = PySequence_GetItem(users, i);
    Py_DECREF(users);
    return user;
}

static PyObject *cache_draw_key(CacheObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t i = -1;
    if (nargs > 1) return PyErr_Format(PyExc_TypeError, "draw_key takes at most 1 argument (%zd given)", nargs);
    if (nargs == 1 && (i = PyLong_AsSsize_t(args[0])) == -1 && PyErr_Occurred()) return NULL;
    PyObject *key = PyObject_CallNoArgs(self->key_draw);
    if (key == NULL) return NULL;
    if (is_set(self->eligible)) { /* drawn even for a bypassing request: its stream stays aligned */
        PyObject *eligible = PyObject_CallNoArgs(self->eligible);
        int yes = eligible != NULL ? PyObject_IsTrue(eligible) : -1;
        Py_XDECREF(eligible);
        if (yes <= 0) {
            Py_DECREF(key);
            if (yes < 0) return NULL;
            self->bypasses += 1;
            return PyLong_FromLong(-1);
        }
    }
    if (!self->scope || i < 0) return key;
    PyObject *scope = PyLong_FromLong(self->scope), *sid = NULL, *offset = NULL, *scoped = NULL;
    PyObject *universe = PyLong_FromLongLong(self->universe);
    if (scope != NULL && universe != NULL && (sid = method(self->audience, s_scope_id, 2, scope, args[0])) != NULL &&
        (offset = PyNumber_Multiply(universe, sid)) != NULL)
        scoped = PyNumber_Add(key, offset);
    Py_XDECREF(scope), Py_XDECREF(sid), Py_XDECREF(universe), Py_XDECREF(offset);
    Py_DECREF(key);
    return scoped;
}

static PyObject *code(int c) { return PyLong_FromLong(c); }

static PyObject *cache_lookup(CacheObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t i = -1;
    if (nargs < 2 || nargs > 3)
        return PyErr_Format(PyExc_TypeError, "lookup takes 2 or 3 arguments (%zd given)", nargs);
    PyObject *key = args[0];
    long long k = PyLong_AsLongLong(key);
    double now = PyFloat_AsDouble(args[1]);
    if ((k == -1 && PyErr_Occurred()) || (now == -1.0 && PyErr_Occurred())) return NULL;
    if (nargs == 3 && (i = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()) return NULL;
    if (k < 0) return code(BYPASS);
    self->lookups += 1;
    PyObject *entry = PyDict_GetItemWithError(self->entries, key); /* borrowed */
    if (entry == NULL) {
        if (PyErr_Occurred()) return NULL;
        self->misses += 1;
        return code(MISS);
    }
    Py_INCREF(entry); /* held across the calls below */
    double born = PyFloat_AsDouble(PyTuple_GET_ITEM(entry, 0));
    double change_at = PyFloat_AsDouble(PyTuple_GET_ITEM(entry, 1));
    long long owner = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 2));
    int personal = PyObject_IsTrue(PyTuple_GET_ITEM(entry, 3));
    Py_DECREF(entry);
    if (PyErr_Occurred()) return NULL;
    if (now - born >= self->ttl) {
        if (remove_key(self, key) < 0) return NULL;
        self->expirations += 1;
        self->misses += 1;
        return code(MISS);
    }
    if (self->lru) {
        PyObject *moved = PyObject_CallMethodOneArg(self->entries, s_move_to_end, key);
        if (moved == NULL) return NULL;
        Py_DECREF(moved);
    }
    self->hits += 1;
    self->leaked = 0;
    if (owner >= 0 && i >= 0) {
        PyObject *user = user_of(self, i);
        if (user == NULL) return NULL;
        long long asker = PyLong_AsLongLong(user);
        Py_DECREF(user);
        if (asker == -1 && PyErr_Occurred()) return NULL;
        if (owner != asker) {
            self->cross_user_hits += 1;
            if (personal) {
                self->leaks += 1;
                self->leaked = 1;
            }
        }
    }
    if (now >= change_at) {
        self->stale_hits += 1;
        return code(STALE_HIT);
    }
    return code(HIT);
}

static PyObject *cache_insert(CacheObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t i = -1;
    if (nargs < 2 || nargs > 3)
        return PyErr_Format(PyExc_TypeError, "insert takes 2 or 3 arguments (%zd given)", nargs);
    long long k = PyLong_AsLongLong(args[0]);
    if (k == -1 && PyErr_Occurred()) return NULL;
    if (nargs == 3 && (i = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()) return NULL;
    if (k < 0) Py_RETURN_NONE;
    self->inserts += 1;
    PyObject *owner, *personal;
    if (i >= 0 && is_set(self->audience)) {
        owner = user_of(self, i);
        personal = owner != NULL ? method(self->audience, s_personal, 1, args[2]) : NULL;
    } else {
        owner = PyLong_FromLong(-1);
        personal = Py_NewRef(Py_False);
    }
    int failed = owner == NULL || personal == NULL || put(self, args[0], args[1], owner, personal) < 0;
    Py_XDECREF(owner), Py_XDECREF(personal);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyObject *cache_put(CacheObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 4) return PyErr_Format(PyExc_TypeError, "_put takes 2 to 4 arguments (%zd given)", nargs);
    PyObject *owner = nargs > 2 ? Py_NewRef(args[2]) : PyLong_FromLong(-1);
    if (owner == NULL) return NULL;
    int failed = put(self, args[0], args[1], owner, nargs > 3 ? args[3] : Py_False) < 0;
    Py_DECREF(owner);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyObject *cache_sweep(CacheObject *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if ((now == -1.0 && PyErr_Occurred()) || sweep(self, now) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *cache_remove(CacheObject *self, PyObject *key) {
    if (remove_key(self, key) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *get_capacity(CacheObject *self, void *closure) {
    if (self->capacity < 0) Py_RETURN_NONE;
    return PyLong_FromSsize_t(self->capacity);
}

static int set_capacity(CacheObject *self, PyObject *value, void *closure) {
    if (value == NULL || value == Py_None) {
        self->capacity = -1;
        return 0;
    }
    Py_ssize_t capacity = PyLong_AsSsize_t(value);
    if (capacity == -1 && PyErr_Occurred()) return -1;
    if (capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "a cache's capacity is at least 0 (None: unbounded)");
        return -1;
    }
    self->capacity = capacity;
    return 0;
}

static PyMethodDef cache_methods[] = {
    {"draw_key", (PyCFunction)(void (*)(void))cache_draw_key, METH_FASTCALL, "Cache.draw_key"},
    {"lookup", (PyCFunction)(void (*)(void))cache_lookup, METH_FASTCALL, "Cache.lookup"},
    {"insert", (PyCFunction)(void (*)(void))cache_insert, METH_FASTCALL, "Cache.insert"},
    {"_put", (PyCFunction)(void (*)(void))cache_put, METH_FASTCALL, "Cache._put"},
    {"_sweep", (PyCFunction)cache_sweep, METH_O, "Cache._sweep"},
    {"_remove", (PyCFunction)cache_remove, METH_O, "Cache._remove"},
    {NULL},
};

#define COUNTER(name, doc) {#name, T_PYSSIZET, offsetof(CacheObject, name), 0, doc}
static PyMemberDef cache_members[] = {
    {"_entries", T_OBJECT_EX, offsetof(CacheObject, entries), 0, "key -> entry, in eviction order"},
    {"_born", T_OBJECT_EX, offsetof(CacheObject, born), 0, "key -> insertion time (LRU with a TTL), or None"},
    {"_key", T_OBJECT_EX, offsetof(CacheObject, key_draw), 0, "the key sampler"},
    {"_eligible", T_OBJECT_EX, offsetof(CacheObject, eligible), 0, "the eligibility sampler, or None"},
    {"_change", T_OBJECT_EX, offsetof(CacheObject, change), 0, "the data-change sampler, or None"},
    {"audience", T_OBJECT_EX, offsetof(CacheObject, audience), 0, "who asks, or None"},
    {"ttl", T_DOUBLE, offsetof(CacheObject, ttl), 0, "seconds an entry lives (inf: forever)"},
    {"_universe", T_LONGLONG, offsetof(CacheObject, universe), 0, "distinct content keys"},
    {"scope", T_INT, offsetof(CacheObject, scope), 0, "the scope's index in SCOPES"},
    {"_lru", T_BOOL, offsetof(CacheObject, lru), 0, "LRU (else FIFO) eviction"},
    {"leaked", T_BOOL, offsetof(CacheObject, leaked), 0, "whether the last hit served another user's personal entry"},
    COUNTER(lookups, "lookups"), COUNTER(hits, "hits (stale ones included)"), COUNTER(stale_hits, "stale hits"),
    COUNTER(misses, "misses"), COUNTER(bypasses, "requests that bypassed the cache"), COUNTER(inserts, "inserts"),
    COUNTER(evictions, "entries evicted for room"), COUNTER(expirations, "entries expired"),
    COUNTER(cross_user_hits, "hits on another user's entry"), COUNTER(leaks, "hits on another user's personal entry"),
    {NULL},
};

static PyGetSetDef cache_getset[] = {
    {"capacity", (getter)get_capacity, (setter)set_capacity, "entries held at most (None: unbounded)", NULL},
    {NULL},
};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sim._caches.CacheCore",
    .tp_doc = "A cache's operations and counters (the base of CompiledCache in caches.py)",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)cache_traverse,
    .tp_clear = (inquiry)cache_clear,
    .tp_dealloc = (destructor)cache_dealloc,
    .tp_methods = cache_methods,
    .tp_members = cache_members,
    .tp_getset = cache_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_caches", "llmsim's caches, compiled.", -1, NULL};

PyMODINIT_FUNC PyInit__caches(void) {
    /* tp_new: object's, which gives a Python subclass's attributes their inline layout (see sim/_retrieval.c) */
    CacheType.tp_new = PyBaseObject_Type.tp_new;
    if (PyType_Ready(&CacheType) < 0) return NULL;
    if (!(s_move_to_end = PyUnicode_InternFromString("move_to_end")) ||
        !(s_popitem = PyUnicode_InternFromString("popitem")) || !(s_users = PyUnicode_InternFromString("users")) ||
        !(s_personal = PyUnicode_InternFromString("personal")) ||
        !(s_scope_id = PyUnicode_InternFromString("scope_id")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&CacheType);
    if (PyModule_AddObject(m, "CacheCore", (PyObject *)&CacheType) < 0) {
        Py_DECREF(&CacheType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
