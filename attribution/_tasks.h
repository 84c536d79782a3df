/* Task registration in C: the task factory, the call_soon hook and seeing tasks end.
 *
 * Included by _core.c (it uses S, tls, TagType and the task table).  Everything a loop does
 * per task runs here without a Python frame and without creating a garbage-collected
 * object per task: a profiler that adds GC-tracked records per task makes the collector
 * itself the bottleneck of a task-heavy program (measured: 40% of a 56k-task tree run).
 *
 *  TaskFactory   the factory installed on an instrumented loop.  Per task: copy (or take)
 *                the context, read the parent's Tag (and the labels, once labels() is in
 *                use) and set the new Tag in it (in the copy's variable mapping directly,
 *                see fresh_context_set; a context given with context= is entered), fill the
 *                task's slot in S.tasks, make the task (asyncio's Task, or the user's
 *                factory inside the tagged context), and watch its end.
 *  CallSoon      an instrumented loop's ``call_soon`` (on the loop class, in front of the
 *                class's own).  It runs our done callback inline (it only reads
 *                the task's state: scheduling it as a loop callback would cost a Handle and
 *                a loop turn per task), and adopts tasks we did not see being made (built
 *                with ``asyncio.Task(coro)`` directly, or existing before instrumentation)
 *                on their first scheduled step.  It is a method descriptor, so asyncio's C
 *                futures and Python callers reach it without a bound-method object.
 *  task_done     a task's end: finish time, final state and name.  Reached from the
 *                running-task watcher (3.12+, C Tasks: tasks_watcher) or from the done
 *                callback (3.11, other task types).  Finished tasks wait in S.finished;
 *                the next task creation runs the tracker's fold hook when enough of them
 *                wait (never inside asyncio's callback scheduling).
 *  HandOver      an instrumented loop's ``run_in_executor`` / ``call_soon_threadsafe``:
 *                work sent to another thread is wrapped in a Handed carrying the task id.
 *  ExceptionHook an instrumented loop's ``call_exception_handler``: a task destroyed while
 *                pending ends its record there, while its name can still be read.
 *
 * A task's record lives in its S.tasks slot until the tracker folds it (core_fold, release_task_slot).
 * Task objects are never strongly referenced: the slot keeps id(task) only to find the
 * record from the watcher, the done callback and call_soon, through S.obj_index, for tasks
 * not finished yet (and a weak reference waits for the late name of a 3.12 eager task
 * that code other than asyncio's own made: see late_name_known).
 */

#define NAMERS_MAX 8
#define NAMER_NEVER (-1)   /* names no task it makes */
#define NAMER_THROUGH (-2) /* returns the task to its caller, who may name it */
#define NAMER_UNUSABLE (-3) /* configure: an entry that is not one of the above */

/* Settings that outlive a profiler run. */
static struct {
    PyObject *labels_var;      /* the _LABELS ContextVar (strong) */
    int labels_used;           /* labels() has been entered: new tasks read _LABELS */
    PyObject *task_type;       /* asyncio.Task (strong) */
    PyObject *fut_type, *fut_add_done; /* a Future class and its add_done_callback (strong) */
    PyObject *done_cb;         /* our task_done function object (strong) */
    PyTypeObject *step_type;   /* _asyncio's TaskStepMethWrapper, learnt on first sight */
    int step_direct;           /* its task is read from its first slot: 0 unknown, 1 yes, -1 no */
    PyObject *fold_hook;       /* callable(), or NULL */
    uint64_t fold_at;          /* call fold_hook when this many finished tasks wait */
    int folding;               /* fold_hook is running */
    int defer_fold;            /* a task ending now waits for a fold pass (see core_task_done) */
    uint32_t next_tid;         /* task ids are never reused, even across runs */
    int tids_wrapped;          /* 2^31 ids were handed out: an id may still be in use */
    PyObject *s_qualname, *s_self, *s_get_name, *s_set_name, *s_state, *s_exception, *s_cancelled,
        *s_add_done_callback, *s_get_coro, *s_get_context, *s_done, *s_eager_start, *s_name,
        *s_loop, *s_context, *s_check_closed, *s_closed, *s_decimal_module, *s_base_events_module,
        *s_message, *s_task, *s_destroyed_pending;
    PyObject *kw_context;      /* ("context",) */
    PyObject *kw_loop_context; /* ("loop", "context") */
    PyObject *kw_loop_context_name; /* ("loop", "context", "name") */
    /* Where a C Task keeps its name (see task_name_of): 0 still learning, -1 unknown. */
    Py_ssize_t name_off, name_candidate;
    int name_hits;
    /* Where it keeps its state (see c_task_state): the offset once known, 0 while
     * learning, -1 unknown; the int slots still in the running, and the states seen. */
    Py_ssize_t state_off;
    uint64_t state_cands;
    uint32_t state_seen[3];
    /* 3.12+: ends of C Tasks seen through _asyncio's running-task dict (see tasks_watcher) */
    int watcher;               /* dict watcher id + 1; 0 none */
    PyObject *watched;         /* _asyncio._current_tasks while watched (strong), else NULL */
    uint32_t watch_gen;        /* bumped when what threads remember of it (tls.step_*) is void */
    PyObject *current_tasks;   /* _asyncio._current_tasks (strong; every version), or NULL */
    getter state_get;          /* the C Task's _state getter, NULL if not found */
    void *state_closure;
    getter exc_get;            /* its _exception getter, NULL if not found */
    void *exc_closure;
    PyObject *st_pending, *st_finished, *st_cancelled; /* what state_get returns (strong) */
    /* 3.12: asyncio's functions that make tasks through the loop, and what they do about
     * the name afterwards (see late_name_known): their code (strong), and the slot of
     * their local `name` among the frame's locals, or NAMER_* */
    PyObject *namer_code[NAMERS_MAX];
    Py_ssize_t namer_slot[NAMERS_MAX];
    int nnamers;
} G;

typedef struct {
    PyObject_HEAD
    PyObject *user_factory; /* NULL: none */
    int forwards_context;   /* the user's factory is asyncio's own eager one (hands context=
                             * to the Task as is) */
    uint32_t serial;        /* the loop's serial number */
    vectorcallfunc vectorcall;
} FactoryObject;

/* The living target of a weak reference, as a new reference; NULL (no error) if dead
 * (3.13 deprecates PyWeakref_GetObject). */
static PyObject *weak_target(PyObject *ref) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *target = NULL;
    if (PyWeakref_GetRef(ref, &target) < 0) PyErr_Clear();
    return target;
#else
    PyObject *target = PyWeakref_GetObject(ref);
    if (target == NULL) PyErr_Clear();
    return target != NULL && target != Py_None ? Py_NewRef(target) : NULL;
#endif
}

typedef struct {
    PyObject_HEAD
    PyObject *orig;         /* the loop class's own call_soon */
    PyObject *where;        /* (weak reference to the class it was put on, name), or NULL */
    PyObject *weaklist;
    vectorcallfunc vectorcall;
} CallSoonObject;

static PyTypeObject FactoryType, CallSoonType, ExceptionHookType;

/* ---- instrumented loops -------------------------------------------------------------- */
/* Our methods sit on loop *classes* (instance attributes would cost every method call on
 * the loop its specialised fast path: see loop_hooks/instrument.py), so each call first
 * asks whether its loop is one of ours.  Few loops are instrumented at a time: a short
 * array, searched linearly.  An entry holds the loop's factory (strong) and leaves when
 * the loop is uninstrumented or dies (a weakref callback in instrument.py). */
typedef struct {
    uintptr_t loop;
    FactoryObject *factory;
    int propagate; /* carry work to thread pools / from other threads */
    int default_pool; /* its default executor is a thread pool (as far as set_default_executor told) */
} loop_entry_t;

static struct {
    loop_entry_t *v;
    uint32_t n, cap;
} LR;

static inline loop_entry_t *loop_entry(PyObject *loop) {
    for (uint32_t i = 0; i < LR.n; i++) {
        if (LR.v[i].loop == (uintptr_t)loop) return &LR.v[i];
    }
    return NULL;
}

/* Is the keyword name `key` (a str from kwnames) "context"?  Most callers pass the interned
 * string, but 3.12's C Task passes one of its own (made by _asyncio's module state) to
 * call_soon on every step, where the identity test failed and strings were compared
 * (~100 instructions a task on a gather tree).  The last such string seen (strong, so
 * its address names it alone) is a second identity. */
static PyObject *context_kw_alias;

static inline int kw_is_context(PyObject *key) {
    if (key == G.s_context || key == context_kw_alias) return 1;
    if (PyUnicode_Compare(key, G.s_context) != 0) return 0;
    if (PyUnicode_CheckExact(key)) Py_XSETREF(context_kw_alias, Py_NewRef(key));
    return 1;
}

static inline int task_registered(uint32_t tid, uint32_t *ti) {
    return tid && tid_get(tid, ti);
}

/* The code object of a coroutine (a new reference), or NULL: tells apart coroutine
 * functions of one qualified name (a `worker` in two modules) for grouping. */
static PyObject *code_of(PyObject *coro) {
#if PY_VERSION_HEX < 0x030E0000
    if (coro != NULL && PyCoro_CheckExact(coro)) {
#if PY_VERSION_HEX >= 0x030C0000
        return (PyObject *)PyGen_GetCode((PyGenObject *)coro); /* (a coroutine is laid out as one) */
#else
        return Py_XNewRef((PyObject *)((PyCoroObject *)coro)->cr_code);
#endif
    }
#endif
    return NULL;
}

static PyObject *qualname_of(PyObject *coro) {
    if (coro == NULL || coro == Py_None) return NULL;
#if PY_VERSION_HEX < 0x030E0000 /* 3.14 moves PyCoroObject into an internal header */
    if (PyCoro_CheckExact(coro)) { /* the field __qualname__ reads, without the lookup */
        PyObject *q = ((PyCoroObject *)coro)->cr_qualname;
        if (q != NULL && PyUnicode_Check(q)) return Py_NewRef(q);
    }
#endif
    PyObject *q = PyObject_GetAttr(coro, G.s_qualname);
    if (q != NULL && PyUnicode_Check(q)) return q;
    Py_XDECREF(q);
    PyErr_Clear();
    q = PyObject_GetAttr((PyObject *)Py_TYPE(coro), G.s_qualname);
    if (q != NULL && PyUnicode_Check(q)) return q;
    Py_XDECREF(q);
    PyErr_Clear();
    return NULL;
}

/* ---- tagging a fresh context ----------------------------------------------------------
 * A context the factory has just copied from the running one is tagged by updating its
 * variable mapping directly: one HAMT insertion through the HAMT type's own `set` method,
 * the new mapping put in the context (no one else has seen it yet).  The documented way,
 * PyContext_Enter + PyContextVar_Set + PyContext_Exit, costs ~900 instructions more a
 * task (callgrind, 3.12): a Token object made and destroyed, a lookup of the old value
 * for it, and two context switches that void every ContextVar's cache, so the reads of the
 * parent's tag and labels miss it too.  Here they are read in the running context, where
 * the copy's values are the same, usually from the cache.  The HAMT type is not exported:
 * it is found from an empty context; anything unexpected (another type, a missing method,
 * an entered context) keeps the documented way. */
#define Py_BUILD_CORE 1
#include "internal/pycore_context.h"
#undef Py_BUILD_CORE

/* The variable mapping a context holds now (borrowed, compared only). */
static PyObject *context_vars(PyObject *ctx) { return (PyObject *)((PyContext *)ctx)->ctx_vars; }

static struct {
    PyTypeObject *type; /* CPython's HAMT type (borrowed: static type) */
    PyCFunction set;    /* its set(key, value) -> new mapping, METH_VARARGS */
    PyObject *args;     /* a 2-tuple of ours (untracked), filled with borrowed items per call */
    int known;          /* 1 learnt, -1 not available */
    PyTypeObject *bitmap_type; /* its bitmap node type (borrowed: static type) */
    int direct;         /* 1: hamt_set_direct passed its check (hamt_learn), else -1 */
} HAMT;

/* A HAMT node of the bitmap kind as CPython lays it out (Python/hamt.c, unchanged from
 * 3.7 to 3.13): which of the 32 slots of its level are used, and a (key, value) pair for
 * each, or (NULL, deeper node).  The mapping's hash of a key is its hash folded to 32 bits;
 * the first level uses its low 5 bits. */
typedef struct {
    PyObject_VAR_HEAD
    uint32_t b_bitmap;
    PyObject *b_array[1];
} ms_hamt_bitmap_t;

/* The mapping's hash of key (hamt.c folds the object's hash to 32 bits, -1 made -2): 1,
 * or 0 if key cannot be hashed (the error cleared). */
static inline int hamt_hash32(PyObject *key, uint32_t *out) {
    Py_hash_t h = PyObject_Hash(key);
    if (h == -1) {
        PyErr_Clear();
        return 0;
    }
    int32_t x = (int32_t)(h & 0xffffffff) ^ (int32_t)((uint64_t)h >> 32);
    *out = (uint32_t)(x == -1 ? -2 : x);
    return 1;
}

/* Where the pair of the key whose bit at this level is `bit` is (or would go) in b_array. */
static inline Py_ssize_t bitmap_pair_at(const ms_hamt_bitmap_t *b, uint32_t bit) {
    return 2 * (Py_ssize_t)__builtin_popcount(b->b_bitmap & (bit - 1));
}

/* old with var set to value, made here when the root of old is a bitmap node whose slot
 * for var at the first level is free (and the node holds fewer than 16 pairs: CPython
 * makes an array node of the 17th) or holds var itself: a copy of the root with the pair
 * put in, and a mapping over it.  This is what HAMT.set does in those cases, without the
 * argument tuple, the recursion and the general paths (callgrind, full-size eager
 * TaskGroup tree: ~740 instructions a task through set, GC allocations included).  With
 * track 0 the two new objects are left out of the collector's lists (the caller knows
 * they pass: tag_into_passed).  Returns a new reference; NULL with *other set when the
 * case is another one (nothing made, no error), NULL with an exception set on failure. */
static PyObject *hamt_set_direct(PyHamtObject *old, PyObject *var, PyObject *value, int track, int *other) {
    ms_hamt_bitmap_t *b = (ms_hamt_bitmap_t *)old->h_root;
    *other = 1;
    uint32_t h;
    if (b == NULL || Py_TYPE(b) != HAMT.bitmap_type || !hamt_hash32(var, &h)) return NULL;
    uint32_t bit = (uint32_t)1 << (h & 0x1f);
    Py_ssize_t k = bitmap_pair_at(b, bit), n = Py_SIZE(b);
    int replace = (b->b_bitmap & bit) != 0;
    if (replace ? b->b_array[k] != var : n >= 32) return NULL;
    *other = 0;
    Py_ssize_t size = replace ? n : n + 2;
    ms_hamt_bitmap_t *nb = PyObject_GC_NewVar(ms_hamt_bitmap_t, HAMT.bitmap_type, size);
    if (nb == NULL) return NULL;
    for (Py_ssize_t i = 0; i < k; i++) nb->b_array[i] = Py_XNewRef(b->b_array[i]);
    nb->b_array[k] = Py_NewRef(var);
    nb->b_array[k + 1] = Py_NewRef(value);
    for (Py_ssize_t i = k + 2; i < size; i++) nb->b_array[i] = Py_XNewRef(b->b_array[replace ? i : i - 2]);
    nb->b_bitmap = b->b_bitmap | bit;
    if (track) PyObject_GC_Track((PyObject *)nb);
    PyHamtObject *nv = PyObject_GC_New(PyHamtObject, HAMT.type);
    if (nv == NULL) {
        Py_DECREF(nb);
        return NULL;
    }
    nv->h_root = (PyHamtNode *)nb;
    nv->h_weakreflist = NULL;
    nv->h_count = old->h_count + (replace ? 0 : 1);
    if (track) PyObject_GC_Track((PyObject *)nv);
    return (PyObject *)nv;
}

static PyObject *hamt_set_by_method(PyObject *vars, PyObject *var, PyObject *value);

/* Before it is used, hamt_set_direct must give the mappings HAMT.set gives: 40 variables
 * put in one by one from the empty mapping (the later ones also deeper, or past 16 pairs:
 * set does those), then each set again, read back after every step through the mapping's
 * own len() and [] (which do not know who made it). */
static int hamt_direct_check(PyObject *empty) {
    enum { NV = 40 };
    PyObject *vars[NV] = {NULL}, *a = Py_NewRef(empty), *d = Py_NewRef(empty);
    int ok = 1, direct_used = 0;
    for (int i = 0; i < NV && ok; i++) {
        char name[32];
        snprintf(name, sizeof name, "memscope_probe_%d", i);
        if ((vars[i] = PyContextVar_New(name, NULL)) == NULL) ok = 0;
    }
    for (int step = 0; step < 2 * NV && ok; step++) {
        PyObject *var = vars[step % NV], *value = PyLong_FromLong(step);
        PyObject *na = value ? hamt_set_by_method(a, var, value) : NULL, *nd = NULL;
        int other = 1;
        if (na != NULL) nd = hamt_set_direct((PyHamtObject *)d, var, value, 1, &other);
        if (nd == NULL && !other) ok = 0;
        else if (nd != NULL) direct_used++;
        else if (na != NULL) nd = hamt_set_by_method(d, var, value);
        Py_XDECREF(value);
        Py_SETREF(a, na);
        Py_SETREF(d, nd);
        if (a == NULL || d == NULL || PyObject_Length(a) != PyObject_Length(d)) {
            ok = 0;
            break;
        }
        for (int j = 0; j < NV && j <= step && ok; j++) {
            PyObject *x = PyObject_GetItem(a, vars[j]), *y = PyObject_GetItem(d, vars[j]);
            ok = x != NULL && x == y;
            Py_XDECREF(x);
            Py_XDECREF(y);
        }
    }
    Py_XDECREF(a);
    Py_XDECREF(d);
    for (int i = 0; i < NV; i++) Py_XDECREF(vars[i]);
    PyErr_Clear();
    return ok && direct_used > 0;
}

static void hamt_learn(void) {
    HAMT.known = -1;
    HAMT.direct = -1;
    PyObject *c = PyContext_New();
    if (c == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *empty = (PyObject *)((PyContext *)c)->ctx_vars;
    PyTypeObject *tp = Py_TYPE(empty);
    for (PyMethodDef *m = tp->tp_methods; m != NULL && m->ml_name != NULL; m++) {
        if (strcmp(m->ml_name, "set") == 0 && (m->ml_flags & (METH_VARARGS | METH_KEYWORDS | METH_FASTCALL |
                                                              METH_O | METH_NOARGS)) == METH_VARARGS) {
            if ((HAMT.args = PyTuple_New(2)) == NULL) {
                PyErr_Clear();
                break;
            }
            PyObject_GC_UnTrack(HAMT.args);
            HAMT.type = tp;
            HAMT.set = m->ml_meth;
            HAMT.known = 1;
            break;
        }
    }
#if PY_VERSION_HEX < 0x030E0000 /* the layout above is known up to 3.13 */
    PyObject *root = HAMT.known > 0 ? (PyObject *)((PyHamtObject *)empty)->h_root : NULL;
    if (root != NULL && strcmp(Py_TYPE(root)->tp_name, "hamt_bitmap_node") == 0 &&
        Py_TYPE(root)->tp_basicsize == (Py_ssize_t)offsetof(ms_hamt_bitmap_t, b_array) &&
        Py_TYPE(root)->tp_itemsize == (Py_ssize_t)sizeof(PyObject *) && Py_SIZE(root) == 0) {
        HAMT.bitmap_type = Py_TYPE(root);
        if (hamt_direct_check(empty)) HAMT.direct = 1;
    }
#endif
    Py_DECREF(c);
}

/* _decimal.Context, once _decimal is imported (borrowed after the first lookup: we keep a
 * reference), else NULL.  Only looked up, never imported. */
static PyTypeObject *decimal_context_type(void) {
    static PyObject *type;
    if (type != NULL) return (PyTypeObject *)type;
    PyObject *mod = PyImport_GetModule(G.s_decimal_module);
    if (mod == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *t = PyObject_GetAttrString(mod, "Context");
    Py_DECREF(mod);
    if (t == NULL || !PyType_Check(t)) {
        Py_XDECREF(t);
        PyErr_Clear();
        return NULL;
    }
    type = t;
    return (PyTypeObject *)type;
}

static int is_hamt_node(PyObject *o) {
    const char *n = Py_TYPE(o)->tp_name;
    return strcmp(n, "hamt_bitmap_node") == 0 || strcmp(n, "hamt_array_node") == 0 ||
           strcmp(n, "hamt_collision_node") == 0;
}

/* The mapping made for a task's tag is two more objects the garbage collector tracks (the
 * mapping and its root node) for as long as the task lives, where a plain task's context
 * shares its parent's: every collection passes over them.  They leave the collector's
 * lists when they can never be part of a reference cycle, which holds when nothing they
 * refer to can refer back: every key a ContextVar whose default is not a container (or one
 * of ours), every value an object of a type the collector does not track (str, int,
 * None, our Tag, ...), an untracked tuple (immutable, holding only such objects) or a
 * decimal context (_decimal's own type), at every level of the mapping.  CPython untracks
 * tuples and dicts on the same reasoning.  A context holding anything else keeps its
 * mapping tracked (a cycle through it must stay collectable: tests/test_collector.py). */
static int acyclic_item(PyObject *o, void *arg) {
    int depth = (int)(intptr_t)arg;
    if (!PyObject_IS_GC(o)) return 0;
    if (PyContextVar_CheckExact(o)) {
        if (o == S.tag_var || o == G.labels_var) return 0; /* defaults: none / our empty proxy */
        PyObject *d = ((PyContextVar *)o)->var_default;
        return d != NULL && PyObject_IS_GC(d);
    }
    if (PyTuple_CheckExact(o) && !PyObject_GC_IsTracked(o)) return 0;
    /* a lower level of the mapping (keys whose hashes share their first bits): its
     * contents must pass too (nodes only point down; the mapping is at most 7 deep) */
    if (is_hamt_node(o))
        return depth < 8 ? Py_TYPE(o)->tp_traverse(o, acyclic_item, (void *)(intptr_t)(depth + 1)) : 1;
    /* decimal's context (a collected type from 3.13; any program doing Decimal arithmetic
     * has one in its contexts): the type itself, not a subclass, holds only numbers,
     * strings and its two maps of signal flags, whatever is assigned to it.  The name
     * only picks the candidates (a class can be given any name): the type must be
     * _decimal's own. */
    if (strcmp(Py_TYPE(o)->tp_name, "decimal.Context") == 0 && Py_TYPE(o) == decimal_context_type()) return 0;
    return 1; /* may refer back: stop */
}

/* An untracked old mapping is one of ours that passed (mappings never change, nor do the
 * reasons their contents passed), and if the insertion sets our variable to a Tag, the new
 * one differs from it only there: it passes too, with no traversal.  That is the usual
 * case, a task made by a task whose context holds nothing but its own tag (~150
 * instructions a task). */
static int tag_into_passed(PyHamtObject *old, PyObject *var, PyObject *value) {
    PyObject *old_root = (PyObject *)old->h_root;
    return var == S.tag_var && Py_IS_TYPE(value, &TagType) && old_root != NULL &&
           !PyObject_GC_IsTracked((PyObject *)old) && !PyObject_GC_IsTracked(old_root);
}

/* The objects an insertion of var made are the new mapping and the nodes on var's way down
 * from its new root: CPython copies that way, and where var's slot at a level held another
 * key whose hash agrees there, the two go one level down into a node of their own (a
 * context holding decimal's variable and ours: ~1 process in 25, by where the variables
 * happen to be allocated, as a ContextVar's hash comes from its address).  Each such node
 * is held only by the node above it.  Untrack them, the root first, down through bitmap
 * nodes to var's own pair; returns how many were untracked. */
static int hamt_untrack_path(PyObject *root, PyObject *var) {
    uint32_t h;
    int n = 0;
    if (!hamt_hash32(var, &h)) h = 0; /* (cannot fail: a ContextVar's hash) */
    for (int level = 0; root != NULL && level < 7; level++) {
        if (Py_REFCNT(root) != 1 || !PyObject_GC_IsTracked(root)) break;
        PyObject_GC_UnTrack(root);
        n++;
        if (HAMT.bitmap_type == NULL || Py_TYPE(root) != HAMT.bitmap_type) break;
        const ms_hamt_bitmap_t *b = (const ms_hamt_bitmap_t *)root;
        uint32_t bit = (uint32_t)1 << ((h >> (5 * level)) & 0x1f);
        if (!(b->b_bitmap & bit)) break;
        Py_ssize_t i = bitmap_pair_at(b, bit);
        if (b->b_array[i] != NULL) break; /* var's pair (or another key's: done either way) */
        root = b->b_array[i + 1];
    }
    return n;
}

/* passed: tag_into_passed said so of this insertion.  Returns how many objects were taken
 * off the collector's lists (the mapping and the new nodes under it), 0 if none. */
static int hamt_untrack_if_acyclic(PyHamtObject *nv, PyHamtObject *old, PyObject *var, int passed) {
    PyObject *root = (PyObject *)nv->h_root, *old_root = (PyObject *)old->h_root;
    /* only what this insertion made: a new mapping whose new root no one else holds */
    if (nv == old || root == NULL || old_root == root || Py_REFCNT(nv) != 1 || Py_REFCNT(root) != 1)
        return 0;
    if (!PyObject_GC_IsTracked((PyObject *)nv) || !PyObject_GC_IsTracked(root)) return 0;
    traverseproc trav = Py_TYPE(root)->tp_traverse;
    if (!passed && (trav == NULL || trav(root, acyclic_item, (void *)(intptr_t)1) != 0)) return 0;
    int n = hamt_untrack_path(root, var);
    PyObject_GC_UnTrack((PyObject *)nv);
    return n + 1; /* the caller may take them off the collector's count (gc_uncount) */
}

/* vars.set(var, value) through the HAMT type's own method: a new reference, or NULL (with
 * an exception set, or none if our argument tuple is in use, which cannot happen).  set()
 * only unpacks its arguments (no Python code runs in it: ContextVar keys hash and compare
 * in C), so one tuple of ours serves every call, its items lent for the call (a tuple made
 * and freed per task: ~300 instructions). */
static PyObject *hamt_set_by_method(PyObject *vars, PyObject *var, PyObject *value) {
    PyObject *args = HAMT.args;
    if (Py_REFCNT(args) != 1 || PyTuple_GET_ITEM(args, 0) != NULL) return NULL;
    PyTuple_SET_ITEM(args, 0, var);
    PyTuple_SET_ITEM(args, 1, value);
    PyObject *nv = HAMT.set(vars, args);
    PyTuple_SET_ITEM(args, 0, NULL);
    PyTuple_SET_ITEM(args, 1, NULL);
    return nv;
}

/* ctx's mapping, if it may be replaced here (no one has entered ctx, and the mapping is
 * of the HAMT type learnt), else NULL. */
static inline PyHamtObject *fresh_context_vars(const PyContext *c) {
    PyHamtObject *vars = c->ctx_vars;
    return !c->ctx_entered && vars != NULL && Py_TYPE(vars) == HAMT.type ? vars : NULL;
}

/* Set var = value in ctx, a context no one has entered or seen.  Returns 0, or 2 or more:
 * the new mapping and the new nodes under it are untracked, so many objects; -1 with an
 * exception set, or 1: not possible this way (nothing changed). */
static int fresh_context_set(PyObject *ctx, PyObject *var, PyObject *value) {
    if (MS_UNLIKELY(HAMT.known == 0)) hamt_learn();
    PyContext *c = (PyContext *)ctx;
    PyObject *vars = (PyObject *)fresh_context_vars(c);
    if (HAMT.known < 0 || vars == NULL) return 1;
    PyObject *nv = NULL;
    int other = 1, passes = tag_into_passed((PyHamtObject *)vars, var, value);
    if (HAMT.direct > 0) {
        /* what passes is made untracked here rather than tracked and then untracked */
        nv = hamt_set_direct((PyHamtObject *)vars, var, value, !passes, &other);
        if (nv == NULL && !other) return -1;
        if (nv != NULL && passes) {
            c->ctx_vars = (PyHamtObject *)nv;
            Py_DECREF(vars);
            return 2;
        }
    }
    if (nv == NULL && (nv = hamt_set_by_method(vars, var, value)) == NULL) return PyErr_Occurred() ? -1 : 1;
    if (Py_TYPE(nv) != HAMT.type) {
        Py_DECREF(nv);
        HAMT.known = -1;
        return 1;
    }
    int untracked = hamt_untrack_if_acyclic((PyHamtObject *)nv, (PyHamtObject *)vars, var, passes);
    c->ctx_vars = (PyHamtObject *)nv;
    Py_DECREF(vars);
    return untracked; /* (0, or 2 and more) */
}

/* ---- reusing a tag mapping whose task is gone --------------------------------------
 * A task's mapping is its parent's with our variable set to the task's Tag.  Siblings'
 * mappings are therefore the same but for the Tag, which is ours and may be given another
 * task's id.  So the last few made are kept here (a reference each), and once one is held
 * by nothing else (its task and every copy of its context are gone: the mapping, its root
 * node and the Tag each have one reference left), a task made in a context whose mapping
 * holds the same keys and values but for our Tag gets it, its Tag renumbered, instead of
 * a new mapping, root node and Tag built now and freed when the task goes.  On an eager
 * task tree nearly every task reuses one (callgrind, eager TaskGroup tree: ~800
 * instructions a task less in sampled mode, ~900 in exact).  A kept mapping holds what
 * its task's context held, so only a mapping whose every other value is one whose
 * lifetime no program can see is kept: None, a bool, an int, a float, a short str or
 * bytes, a decimal context (none of them can be weakly referenced or has a finaliser),
 * or ours.  Neither can a context be read while its Tag is renumbered: nothing but us
 * holds the mapping.  The GIL guards the pool. */
#define KEPT_LEN 32    /* a power of 2 */
#define KEPT_PROBES 6 /* kept mappings looked at per task: the two newest (a task */
                      /* awaited as it is made is freed just after the next one is */
                      /* made), then four in turn from where the last search ended (a */
                      /* task that holds its children's Tasks holds their mappings) */
#define KEPT_IDLE 32  /* after this many searches in a row found none free (a tree of */
                      /* pending tasks), only every 8th task searches and keeps its */
                      /* mapping: ~120 instructions a task for nothing (callgrind) */
static struct {
    PyHamtObject *vars[KEPT_LEN]; /* owned; NULL: free slot */
    TagObject *tag[KEPT_LEN];     /* borrowed: the Tag vars holds */
    unsigned put;                 /* where the next one goes (the oldest is let go) */
    unsigned look;                /* where the next search starts */
    unsigned misses;              /* searches in a row that found none free */
    unsigned skipped;             /* tasks that did not search, once idle */
    PyObject *tag_var;            /* borrowed, compared only: the variable tag_hash is of */
    uint32_t tag_hash;            /* its hash as the mapping folds it */
} KEPT;

/* Our variable's hash as the mapping folds it, in KEPT.tag_hash: 1, or 0 if it cannot be
 * had.  (A ContextVar's hash is computed when it is made: no code runs, nothing fails.) */
static inline int tag_hash_ready(void) {
    if (MS_UNLIKELY(KEPT.tag_var != S.tag_var)) {
        if (!hamt_hash32(S.tag_var, &KEPT.tag_hash)) return 0;
        KEPT.tag_var = S.tag_var;
    }
    return 1;
}

/* Our variable's pair in mapping m, looked for in its first `levels` levels as the HAMT's
 * own lookup looks (a bitmap node's slot for the key's bits at that level holds the key and
 * its value, or no key and a deeper node; any other key there means ours is absent): 1 with
 * the bitmap node that holds it (*node), the key's index in its b_array (*at) and the
 * node's level (*level, 0 the root); 0 not in m; -1 not known so (an array node, which
 * CPython makes of a level with 17 slots in use, a collision node, or deeper than
 * `levels`).  KEPT.tag_hash must be ready (tag_hash_ready). */
static MS_HOT int tag_pair(const PyHamtObject *m, unsigned levels, const ms_hamt_bitmap_t **node, Py_ssize_t *at,
                           unsigned *level) {
    const ms_hamt_bitmap_t *b = (const ms_hamt_bitmap_t *)m->h_root;
    for (unsigned lv = 0; lv < levels; lv++) {
        if (b == NULL || Py_TYPE(b) != HAMT.bitmap_type) return -1;
        uint32_t bit = (uint32_t)1 << ((KEPT.tag_hash >> (5 * lv)) & 0x1f);
        if (!(b->b_bitmap & bit)) return 0;
        Py_ssize_t i = bitmap_pair_at(b, bit);
        PyObject *key = b->b_array[i];
        if (key == S.tag_var) {
            *node = b;
            *at = i;
            *level = lv;
            return 1;
        }
        if (key != NULL) return 0;
        b = (const ms_hamt_bitmap_t *)b->b_array[i + 1]; /* a deeper node */
    }
    return -1;
}

/* Where our variable's key is in mapping v: in its root, a bitmap node, at b_array[*k]
 * (*k2 -1), or, where another variable has its place there, one level down, in the bitmap
 * node at root->b_array[*k + 1], at b_array[*k2].  0: not found so (then nothing is kept
 * or reused: a task made outside any task, a context of 16 variables or more, ...). */
static inline int tag_place(const PyHamtObject *v, Py_ssize_t *k, Py_ssize_t *k2) {
    const ms_hamt_bitmap_t *node;
    Py_ssize_t at;
    unsigned level;
    if (!tag_hash_ready() || tag_pair(v, 2, &node, &at, &level) <= 0) return 0;
    if (level == 0) {
        *k = at;
        *k2 = -1;
    } else {
        *k = bitmap_pair_at((const ms_hamt_bitmap_t *)v->h_root, (uint32_t)1 << (KEPT.tag_hash & 0x1f));
        *k2 = at;
    }
    return 1;
}

/* Our variable's value in context ctx's mapping, read from its nodes (tag_pair): 1 with *v
 * (borrowed), 0 not there, -1 not known so, for PyContextVar_Get to answer: a mapping of
 * another shape, nothing learnt yet, or a variable with a default (its value where the
 * mapping has none; ours has none).  The hooks ask after every context switch: the
 * variable's own cache misses then, and its lookup took ~90 instructions (callgrind,
 * loopback server, 8 a request).  (A HAMT has 7 levels of bitmap nodes at most.) */
static MS_HOT int tag_in_context(PyObject *ctx, PyObject **v) {
    if (HAMT.bitmap_type == NULL || ((PyContextVar *)S.tag_var)->var_default != NULL) return -1;
    if (ctx == NULL) return 0; /* (no context made in this thread yet) */
    const PyHamtObject *m = ((PyContext *)ctx)->ctx_vars;
    if (m == NULL || Py_TYPE(m) != HAMT.type || !tag_hash_ready()) return -1;
    const ms_hamt_bitmap_t *node;
    Py_ssize_t at;
    unsigned level;
    int found = tag_pair(m, 7, &node, &at, &level);
    if (found > 0) *v = node->b_array[at + 1];
    return found;
}

/* Do bitmap nodes a and b hold the same but at b_array[skip]? */
static inline int same_but(const ms_hamt_bitmap_t *a, const ms_hamt_bitmap_t *b, Py_ssize_t skip) {
    Py_ssize_t n = Py_SIZE(b);
    if (Py_TYPE(a) != Py_TYPE(b) || a->b_bitmap != b->b_bitmap || Py_SIZE(a) != n) return 0;
    for (Py_ssize_t d = 0; d < n; d++)
        if (a->b_array[d] != b->b_array[d] && d != skip) return 0;
    return 1;
}

/* May a kept mapping hold o (alive for longer than the program would keep it)? */
static int lifetime_unseen(PyObject *o) {
    if (o == Py_None || PyBool_Check(o) || PyLong_CheckExact(o) || PyFloat_CheckExact(o) || Py_IS_TYPE(o, &TagType))
        return 1;
    if (PyUnicode_CheckExact(o)) return PyUnicode_GET_LENGTH(o) <= 256;
    if (PyBytes_CheckExact(o)) return PyBytes_GET_SIZE(o) <= 1024;
    return strcmp(Py_TYPE(o)->tp_name, "decimal.Context") == 0 && Py_TYPE(o) == decimal_context_type();
}

/* ctx (fresh, not entered) is given a kept mapping no one else holds that differs from its
 * own only in the Tag: that Tag (a new reference) is returned, to be renumbered.  NULL:
 * none (nothing changed); *keep says whether the mapping made for ctx instead may be
 * kept (kept_mapping_put). */
static TagObject *kept_mapping_take(PyObject *ctx, int *keep) {
    *keep = 0;
#ifndef Py_GIL_DISABLED
    if (KEPT.misses >= KEPT_IDLE && (++KEPT.skipped & 7) != 0) return NULL;
    PyContext *c = (PyContext *)ctx;
    PyHamtObject *v = fresh_context_vars(c);
    if (HAMT.direct <= 0 || v == NULL) return NULL;
    Py_ssize_t k, k2;
    if (!tag_place(v, &k, &k2)) return NULL;
    *keep = 1;
    const ms_hamt_bitmap_t *b = (const ms_hamt_bitmap_t *)v->h_root;
    for (unsigned i = 0; i < KEPT_PROBES; i++) {
        /* the two newest, then the others in turn */
        unsigned j = (i < 2 ? KEPT.put - 1 - i : KEPT.look + i - 2) % KEPT_LEN;
        PyHamtObject *m = KEPT.vars[j];
        if (m == NULL || Py_REFCNT(m) != 1 || Py_REFCNT(m->h_root) != 1 || Py_REFCNT(KEPT.tag[j]) != 1) continue;
        const ms_hamt_bitmap_t *mb = (const ms_hamt_bitmap_t *)m->h_root;
        if (!same_but(mb, b, k + 1)) continue;
        if (k2 >= 0) { /* and the deeper node that holds the Tag, only ours too */
            const ms_hamt_bitmap_t *ms_ = (const ms_hamt_bitmap_t *)mb->b_array[k + 1];
            if (Py_REFCNT(ms_) != 1 || !same_but(ms_, (const ms_hamt_bitmap_t *)b->b_array[k + 1], k2 + 1)) continue;
        }
        if (i >= 2) KEPT.look = j + 1;
        KEPT.misses = 0;
        c->ctx_vars = (PyHamtObject *)Py_NewRef(m);
        Py_DECREF(v);
        return (TagObject *)Py_NewRef(KEPT.tag[j]);
    }
    KEPT.look += KEPT_PROBES - 2;
    KEPT.misses++;
#else
    (void)ctx;
#endif
    return NULL;
}

/* Keep m, a mapping just made (untracked) with tag in it, if what else it holds may be kept. */
static void kept_mapping_put(PyHamtObject *m, TagObject *tag) {
    Py_ssize_t k, k2;
    if (!tag_place(m, &k, &k2)) return;
    const ms_hamt_bitmap_t *b = (const ms_hamt_bitmap_t *)m->h_root;
    for (int level = 0; level < (k2 >= 0 ? 2 : 1); level++) {
        if (level == 1) b = (const ms_hamt_bitmap_t *)b->b_array[k + 1];
        for (Py_ssize_t i = 0; i < Py_SIZE(b); i += 2) {
            PyObject *key = b->b_array[i];
            if (key == S.tag_var || (level == 0 && k2 >= 0 && i == k)) continue; /* ours, or the way to it */
            if (key == NULL || !lifetime_unseen(b->b_array[i + 1])) return;    /* (other deeper nodes not looked into) */
        }
    }
    unsigned j = KEPT.put++ % KEPT_LEN;
    PyHamtObject *old = KEPT.vars[j];
    KEPT.vars[j] = (PyHamtObject *)Py_NewRef(m);
    KEPT.tag[j] = tag;
    Py_XDECREF(old); /* freed here if nothing else holds it */
}

static void kept_mappings_clear(void) {
    for (unsigned j = 0; j < KEPT_LEN; j++) {
        KEPT.tag[j] = NULL;
        Py_CLEAR(KEPT.vars[j]);
    }
    KEPT.put = KEPT.look = KEPT.misses = KEPT.skipped = 0;
    KEPT.tag_var = NULL;
}

/* ---- contexts shared by tasks ---------------------------------------------------------
 * A task runs in a copy of its creator's context, with its Tag in it, so the Tag found in
 * the running context names the running task.  Not so when tasks share one context (the
 * program passed one Context to several create_task calls, or a task's own running
 * context to a task it creates): the context holds one Tag, the latest one's.  Such a Tag
 * is marked shared (register_task), and there the running task is looked up instead: the
 * task _asyncio has as running whose context is the running one (a context is entered
 * by one thread at a time, so that is this thread's task).  On 3.12+ the running-task
 * watcher has it at hand (tls.step_task) and tells us when it changes (so the answer is
 * cached like any other); elsewhere (3.11) the running tasks are scanned at every
 * allocation made in such a context.  With no task of it running (a callback scheduled
 * in it), the bytes go to the task the Tag names. */
static inline uint32_t tid_running_in(PyObject *task, PyThreadState *ts) {
    uint32_t tid, ti;
    if (task == NULL || !u64map_get(&S.obj_index, (uint64_t)(uintptr_t)task, &tid) || !task_registered(tid, &ti))
        return 0;
    return S.tasks[ti].ctx == (uintptr_t)ts->context ? tid : 0;
}

/* No task of a shared context runs it here: work handed over to this thread (a copy of
 * the context, e.g. asyncio.to_thread's) is the handing task's, which the hand-over names
 * where the Tag cannot (it is the newest sharer's); else the task the Tag names.  (The
 * answer moves with the hand-over: set_handover drops the cached one.) */
static inline uint32_t shared_fallback(const tls_t *t, const TagObject *tag) {
    return t->handover ? t->handover : tag->tid;
}

__attribute__((noinline)) static uint32_t shared_tid(const TagObject *tag, PyThreadState *ts, int *cacheable) {
    tls_t *t = &tls;
    uint32_t tid = 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (G.watched != NULL) {
        tid = tid_running_in(t->step_gen == G.watch_gen ? t->step_task : NULL, ts);
        return tid ? tid : shared_fallback(t, tag);
    }
#endif
    *cacheable = 0;
    if (G.current_tasks != NULL) {
        Py_ssize_t pos = 0;
        PyObject *loop, *task;
        while (tid == 0 && PyDict_Next(G.current_tasks, &pos, &loop, &task)) tid = tid_running_in(task, ts);
    }
    return tid ? tid : shared_fallback(t, tag);
}

/* How register_task's ctx came: */
enum {
    CTX_COPIED,  /* the factory copied it from the running context just now */
    CTX_GIVEN,   /* the caller's context= argument */
    CTX_ADOPTED, /* the context of a task we did not see being made */
};

/* The id the next task will get (ids are 31-bit, the top bit naming groups' sites, and
 * never 0: after the last comes 1). */
static uint32_t tasks_next_tid(void) {
    uint32_t next = G.next_tid + 1;
    return (next & GROUP_SITE_BIT) || next == 0 ? 1 : next;
}

/* Whether task id tid was handed out in this session: a Tag left in a context by an earlier
 * session (a task that outlived its profiler, and is profiled again) names a task this
 * session has no record of, and is no parent of its tasks. */
static inline int tid_this_session(uint32_t tid) {
    if (tid == 0 || S.first_tid == 0) return 0;
    if (tasks_next_tid() == S.first_tid) return 0; /* none handed out yet */
    if (G.next_tid >= S.first_tid) return tid >= S.first_tid && tid <= G.next_tid;
    return tid >= S.first_tid || tid <= G.next_tid; /* the ids wrapped meanwhile */
}

/* Make a record for a task about to run in `ctx` (a context not entered right now; NULL:
 * the running context, for a task tagging itself) and put its Tag into that context.
 * *out is the new task id, or 0 when the context cannot be tagged (it is running: the
 * caller passed its own) or nothing is being recorded.  Returns -1 with an exception set
 * on failure.  Our own allocations here are not recorded. */
static int register_task(PyObject *ctx, int how, uint32_t flags, uint32_t serial, PyObject *coro,
                         uint32_t *out, TagObject **tag_out) {
    *out = 0;
    if (tag_out != NULL) *tag_out = NULL;
    if (!S.active || S.tag_var == NULL) return 0;
    tls_t *t = &tls;
    if (t->session != S.session) tls_enter_session(t);
    int g = t->guard;
    t->guard = 1;
    uint32_t tid, unused;
    do { /* after a wrap, skip the ids still in use */
        tid = tasks_next_tid();
        if (tid <= G.next_tid) G.tids_wrapped = 1;
        G.next_tid = tid;
    } while (G.tids_wrapped && task_registered(tid, &unused));
    int keep = 0;
    TagObject *tag = ctx != NULL && how == CTX_COPIED ? kept_mapping_take(ctx, &keep) : NULL;
    int reused = tag != NULL;
    if (reused) S.mappings_reused++;
    else tag = tag_alloc();
    if (tag == NULL) goto error;
    tag->tid = tid;
    tag->ti = 0; /* known once the record is made, below */
    tag->cell = 0;
    tag->shared = 0;
    tag->up = 0;
    /* a fresh copy holds what the running context holds: read there, and tag it directly */
    int enter = ctx != NULL && how != CTX_COPIED;
    if (enter && PyContext_Enter(ctx) < 0) {
        Py_CLEAR(tag);
        if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) goto error;
        PyErr_Clear();
        PyThreadState *ts = tstate_unchecked();
        if (ts == NULL || ts->context != ctx) { /* running in another thread: cannot be told apart */
            t->guard = g;
            return 0;
        }
        /* The running context itself, given to a task made here: the running task's Tag
         * stays in it, now shared (with the new task, which gets no Tag of its own). */
        enter = 0;
    }
    /* the parent: the tag where we read (context_tid: the hooks' cached answer when it
     * holds), else the task whose work this thread is doing for it (a callback handed over
     * by call_soon_threadsafe from a run_in_executor job, whose thread has no copy of the
     * task's context: asyncio.run_coroutine_threadsafe there); the labels, once labels()
     * (their only setter) has been used */
    uint32_t parent = context_tid();
    if (parent == 0) parent = t->handover;
    if (!tid_this_session(parent)) parent = 0; /* an earlier session's Tag: no parent here */
    uint32_t parent_up = parent != 0 && t->ctx_tag != NULL && t->ctx_tag->tid == parent ? t->ctx_tag->up : 0;
    int was_shared = parent != 0 && t->ctx_tag != NULL && t->ctx_tag->tid == parent && t->ctx_tag->shared;
    PyObject *labels = NULL;
    if (G.labels_used && G.labels_var != NULL && PyContextVar_Get(G.labels_var, NULL, &labels) < 0) {
        PyErr_Clear();
        labels = NULL;
    }
    if (tag == NULL && parent != 0 && t->ctx_tag != NULL && t->ctx_tag->tid == parent && !t->ctx_tag->shared) {
        t->ctx_tag->shared = 1;
        t->ctx_seen = NULL; /* the cached answers for this context were the Tag's */
        t->fast_ctx = FAST_NONE;
    }
    int rc = reused || tag == NULL ? 0 : 1, uncounted = 0;
    if (ctx != NULL && !enter && rc) {
        int raw_before = S.own_raw_now; /* (a collection in there may make a task) */
        S.own_raw_now = S.eager_score <= 0; /* see own_raw */
        rc = fresh_context_set(ctx, S.tag_var, (PyObject *)tag);
        S.own_raw_now = raw_before;
        if (rc >= 2) {
            uncounted = gc_uncount(rc);
            rc = 0;
            if (keep) kept_mapping_put((PyHamtObject *)context_vars(ctx), tag);
        }
        if (rc > 0 && PyContext_Enter(ctx) == 0) enter = 1; /* the documented way after all */
        else if (rc > 0) rc = -1;
    }
    if (rc > 0) {
        PyObject *token = PyContextVar_Set(S.tag_var, (PyObject *)tag);
        rc = token == NULL ? -1 : 0;
        Py_XDECREF(token);
        if (ctx == NULL) { /* set in the running context: ContextVar.set does not bump context_ver */
            t->ctx_seen = NULL;
            t->fast_ctx = FAST_NONE;
        }
    }
    if (enter && PyContext_Exit(ctx) < 0) PyErr_Clear();
    if (rc < 0) {
        Py_XDECREF(tag);
        Py_XDECREF(labels);
        goto error;
    }

    uint32_t pti = 0;
    if (parent && task_registered(parent, &pti) && how == CTX_GIVEN && tag != NULL && S.tasks[pti].ctx == (uintptr_t)ctx) {
        /* One context handed to several create_task calls (asyncio.Runner does this): the
         * tag in it is an earlier sibling's, so the parent is that sibling's parent; if
         * that sibling still runs, the two share the context (see shared_tid). */
        if (S.tasks[pti].state == TS_PENDING || was_shared) tag->shared = 1; /* (an older one may still run) */
        parent = S.tasks[pti].parent;
        if (!task_registered(parent, &pti)) pti = 0;
    }
    if (labels != NULL) {
        Py_ssize_t n = PyObject_Length(labels);
        if (n <= 0) {
            PyErr_Clear();
            Py_CLEAR(labels);
        }
    }
    /* Before taking a pointer into S.tasks: reading __qualname__ can run Python code,
     * which can make tasks and move the array. */
    PyObject *qualname = qualname_of(coro);
    PyObject *code = code_of(coro);
    uint32_t slot = thread_slot(t);
    uint32_t ti = task_info_for(tid, slot, 1);
    if (ti == 0) { /* no memory for the record: the task runs, its bytes go unattributed */
        if (uncounted) gc_count_add(uncounted);
        Py_XDECREF(tag);
        Py_XDECREF(labels);
        Py_XDECREF(qualname);
        Py_XDECREF(code);
        t->guard = g;
        return 0;
    }
    if (tag != NULL) {
        tag->ti = ti;
        Py_DECREF(tag); /* the context holds it */
    }
    task_info_t *r = &S.tasks[ti];
    r->parent = parent;
    link_record(ti, parent, parent_up);
    if (tag != NULL) tag->up = r->up ? S.tasks[r->up].tid : 0; /* (the context still holds the tag) */
    r->thread_ident = PyThread_get_thread_ident();
    r->flags = TF_REGISTERED | flags | ((uint32_t)uncounted << TF_UNCOUNTED_SHIFT);
    if (pti && S.tasks[pti].thread_ident != r->thread_ident) r->flags |= TF_CROSS_PARENT;
    r->loop_serial = serial;
    r->state = TS_PENDING;
    r->created_ns = now_ns();
    r->ctx = (uintptr_t)ctx;
    r->labels = labels;
    r->coro = qualname;
    r->code = code;
    S.records++;
    S.pending++;
    t->guard = g;
    *out = tid;
    if (tag_out != NULL) *tag_out = tag; /* borrowed: the context holds it */
    return 0;
error:
    t->guard = g;
    return -1;
}

static void disown_block(void *p);

/* An empty context per thread for our done callbacks (a context can be entered by one
 * thread at a time; the callback normally runs inline and never enters it).  It is ours
 * for good, and CPython may hand it a block from its free list of contexts, where a
 * finished task's context waits still charged to that task (no allocator call takes a
 * block off a free list): that block is credited to its owner as freed now, or the task
 * held it "live" for good (64 bytes; it never folded). */
static PyObject *callback_context(void) {
    tls_t *t = &tls;
    if (t->empty_ctx == NULL) {
        t->empty_ctx = PyContext_New();
#ifndef Py_GIL_DISABLED
        /* a context's block starts at its GC header (two words, no other pre-header) */
        if (t->empty_ctx != NULL) disown_block((char *)t->empty_ctx - 2 * sizeof(void *));
#endif
    }
    return t->empty_ctx;
}

/* stacks_settle in no task's context and with no hand-over: what it frees was nobody's
 * doing, not a free by the task that happens to be running (cross_task_frees).  Where the
 * empty context cannot be entered (it is already, in our done callback), as it is. */
static int settle_as_nobody(void) {
    tls_t *t = &tls;
    PyObject *ctx = callback_context();
    int entered = ctx != NULL && PyContext_Enter(ctx) == 0;
    if (!entered) PyErr_Clear();
    uint32_t handover = t->handover;
    set_handover(t, 0);
    int n = stacks_settle();
    set_handover(t, handover);
    if (entered) {
        PyObject *exc = PyErr_GetRaisedException_compat();
        if (PyContext_Exit(ctx) < 0) PyErr_Clear();
        PyErr_SetRaisedException_compat(exc);
    }
    return n;
}

static void queue_finished(uint32_t tid) {
    if (grow_array((void **)&S.finished, &S.capfinished, sizeof(uint32_t), S.nfinished + 1) == 0)
        S.finished[S.nfinished++] = tid;
}

/* The most folded tasks that may wait for a fold call (~2.5 MB); past it they queue. */
#define EARLY_MAX 65536u
/* A fold call is due (maybe_fold) once this many wait, even if no pass is. */
#define EARLY_BATCH 4096u

/* Fold record tid (slot ti, just finished) now, if the last fold pass found more finished
 * tasks than it keeps and kept none that allocated less: a pass would fold it first (it
 * holds nothing live, allocated no more than any task kept, and among equals the newer
 * task folds first), so it goes while its record and cells are still in the cache.  A pass
 * instead looks every waiting task up again, kept ones included: on a tree of 168,000
 * eager tasks ~10% of exact mode's run, most of it cache misses.  The record is released
 * here; its group learns of it at the next fold call (a snapshot makes one).  Nothing
 * here runs Python code: the coroutine name and the labels are kept, not freed. */
static int fold_at_finish(uint32_t tid, uint32_t ti) {
    int64_t ab, le;
    double na;
    task_totals(ti, &ab, &na, &le);
    if (le != 0 || ab > S.fold_floor || S.nearly >= EARLY_MAX ||
        grow_array((void **)&S.early, &S.capearly, sizeof(folded_early_t), S.nearly + 1) < 0)
        return 0;
    task_info_t *r = &S.tasks[ti];
    folded_early_t *e = &S.early[S.nearly];
    e->coro = Py_XNewRef(r->coro);
    e->code = Py_XNewRef(r->code);
    e->labels = Py_XNewRef(r->labels);
    e->alloc_bytes = ab;
    e->allocs = na;
    e->tid = tid;
    e->sites = (r->flags & TF_SITES) != 0;
    S.nearly++;
    release_slot(tid, ti, 1, ab, na);
    return 1;
}

/* Record tid (slot ti) ends now: it is folded at once (fold_at_finish) or waits in
 * S.finished to be folded.  Either way the caller must not use ti afterwards. */
static void finish_record(uint32_t tid, uint32_t ti) {
    gc_recount(&S.tasks[ti]);
    S.tasks[ti].flags |= TF_FINISHED;
    S.tasks[ti].finished_ns = now_ns();
    S.pending--;
    if (S.fold_armed && !G.defer_fold && fold_at_finish(tid, ti)) return;
    queue_finished(tid);
}

/* Link record tid (slot ti) to its task object, and (index) map task -> tid.  If the
 * address still names an unfinished record, that task object is gone (it was destroyed
 * while pending: its done callback never ran), so its record ends now, still "pending",
 * and becomes foldable.  A task that has already ended is not indexed: only the ends of
 * unfinished tasks are looked up by address (every S.obj_index removal is for a record
 * not finished). */
static void note_object(uint32_t tid, uint32_t ti, PyObject *task, int index) {
    uint32_t old, oti;
    uint64_t key = (uint64_t)(uintptr_t)task;
    if (u64map_get(&S.obj_index, key, &old) && old != tid && task_registered(old, &oti) &&
        !(S.tasks[oti].flags & TF_FINISHED)) {
        finish_record(old, oti);
        if (!index) u64map_del(&S.obj_index, key);
    }
    S.tasks[ti].obj = (uintptr_t)task;
    if (index) (void)u64map_put(&S.obj_index, key, tid);
}

#if PY_VERSION_HEX >= 0x030C0000 /* (eager tasks: 3.12+) */
#define MS_LATE_NAMES 1 /* see late_name_watch */
static void late_name_watch(uint32_t tid, PyObject *task);
static int late_name_known(uint32_t tid, PyObject *task);
#endif

/* A C Task (asyncio.Task exactly) whose _state getter we hold: its state is read from C
 * (c_task_state), on every Python. */
static inline int c_task(PyObject *task) {
    return G.state_get != NULL && Py_TYPE(task) == (PyTypeObject *)G.task_type;
}

/* A C Task whose end the running-task watcher sees (3.12+). */
static inline int watched_task(PyObject *task) {
    return G.watched != NULL && c_task(task);
}

/* TS_DONE, or TS_FAILED for a finished task whose _exception is set (read _exception, not
 * exception(): that would mark it retrieved; through the C getter for a c_task()). */
static uint32_t done_code(PyObject *task) {
    uint32_t st = TS_DONE;
    PyObject *e = c_task(task) && G.exc_get != NULL ? G.exc_get(task, G.exc_closure)
                                                     : PyObject_GetAttr(task, G.s_exception);
    if (e == NULL) PyErr_Clear();
    else if (e != Py_None) st = TS_FAILED;
    Py_XDECREF(e);
    return st;
}

/* TS_* of a task whose Task._state is the str s (borrowed).  The strings are compared by
 * identity with those seen before (the C getter returns one of three interned strings),
 * by value the first time. */
static uint32_t state_code(PyObject *task, PyObject *s) {
    uint32_t st;
    if (s == G.st_pending) {
        st = TS_PENDING;
    } else if (s == G.st_finished) {
        st = TS_DONE;
    } else if (s == G.st_cancelled) {
        st = TS_CANCELLED;
    } else if (PyUnicode_CompareWithASCIIString(s, "PENDING") == 0) {
        st = TS_PENDING;
        Py_XSETREF(G.st_pending, Py_NewRef(s));
    } else if (PyUnicode_CompareWithASCIIString(s, "CANCELLED") == 0) {
        st = TS_CANCELLED;
        Py_XSETREF(G.st_cancelled, Py_NewRef(s));
    } else if (PyUnicode_CompareWithASCIIString(s, "FINISHED") == 0) {
        st = TS_DONE;
        Py_XSETREF(G.st_finished, Py_NewRef(s));
    } else {
        st = TS_DONE;
    }
    return st == TS_DONE ? done_code(task) : st;
}

/* The C Task's state is an int of its struct (_asynciomodule.c's fut_state: pending 0,
 * cancelled 1, finished 2, in 3.11 to 3.13).  Its offset is learnt from what the _state
 * getter says: of the int-sized slots after the object header, the one that held the
 * getter's state, as that number, every time, over at least STATE_LEARN tasks, pending and
 * finished ones among them.  If no slot fits, or several still do after STATE_LEARN_MAX
 * finished tasks, the getter stays. */
#define STATE_LEARN 16
#define STATE_LEARN_MAX 4096
#define STATE_SLOTS 64

static void learn_state_offset(PyObject *task, PyObject *s) {
    int32_t code = s == G.st_pending ? 0 : s == G.st_cancelled ? 1 : s == G.st_finished ? 2 : -1;
    if (code < 0) return;
    Py_ssize_t first = (Py_ssize_t)sizeof(PyObject), size = ((PyTypeObject *)G.task_type)->tp_basicsize;
    uint64_t c = G.state_cands;
    if (G.state_seen[0] + G.state_seen[1] + G.state_seen[2] == 0) {
        for (int i = 0; i < STATE_SLOTS && first + 4 * (Py_ssize_t)i + 4 <= size; i++) c |= UINT64_C(1) << i;
    }
    /* task may be one of the Futures of learn_states_from_futures: a Task's first part */
    Py_ssize_t limit = Py_TYPE(task)->tp_basicsize;
    for (uint64_t m = c; m != 0; m &= m - 1) { /* the slots still in the running */
        int i = __builtin_ctzll(m);
        Py_ssize_t at = first + 4 * (Py_ssize_t)i;
        if (at + 4 > limit || *(int32_t *)((char *)task + at) != code) c &= ~(UINT64_C(1) << i);
    }
    G.state_cands = c;
    G.state_seen[code]++;
    if (c == 0 || G.state_seen[2] > STATE_LEARN_MAX) {
        G.state_off = -1;
    } else if ((c & (c - 1)) == 0 && G.state_seen[0] && G.state_seen[2] &&
               G.state_seen[0] + G.state_seen[1] + G.state_seen[2] >= STATE_LEARN) {
        G.state_off = first + 4 * (Py_ssize_t)__builtin_ctzll(c);
    }
}

/* A C Task's state int, at the offset learnt (only while G.state_off > 0). */
static inline int32_t state_slot(PyObject *task) { return *(int32_t *)((char *)task + G.state_off); }

/* The state of a c_task(): from its struct once the offset is known (the getter
 * finds asyncio's module state on every call: ~150 instructions a task, at each of its
 * steps' ends), else from the C getter of Task._state called directly (an attribute
 * lookup and string comparisons cost ~400). */
static uint32_t c_task_state(PyObject *task) {
    if (G.state_off > 0) {
        int32_t v = state_slot(task);
        if (v == 0) return TS_PENDING;
        if (v == 1) return TS_CANCELLED;
        return done_code(task);
    }
    PyObject *s = G.state_get(task, G.state_closure);
    if (s == NULL) {
        PyErr_Clear();
        return TS_PENDING;
    }
    uint32_t st = PyUnicode_Check(s) ? state_code(task, s) : TS_DONE;
    if (G.state_off == 0) learn_state_offset(task, s);
    Py_DECREF(s);
    return st;
}

/* Learning from tasks alone needs a finished one, and in a program that makes its tasks
 * breadth first (a gather tree) none finishes before the last is made: every task until
 * then went the getter's way (~400 instructions each).  So when a loop is instrumented,
 * three Futures of its own (asyncio.Task's base type, whose struct is a Task's first
 * part) are seen pending, finished and cancelled first; the tasks that follow confirm. */
static void learn_states_from_futures(PyObject *loop) {
    PyTypeObject *task_type = (PyTypeObject *)G.task_type;
    PyTypeObject *fut_type = task_type != NULL ? task_type->tp_base : NULL;
    if (G.state_off != 0 || G.state_get == NULL || fut_type == NULL ||
        G.state_seen[0] + G.state_seen[1] + G.state_seen[2] != 0 || fut_type->tp_basicsize > task_type->tp_basicsize)
        return;
    int g = tls.guard;
    tls.guard = 1; /* our objects, not the program's */
    PyObject *exc = PyErr_GetRaisedException_compat();
    PyObject *futs[3] = {NULL, NULL, NULL};
    PyObject *kw = Py_BuildValue("{s:O}", "loop", loop), *empty = PyTuple_New(0);
    int ok = kw != NULL && empty != NULL;
    for (int i = 0; ok && i < 3; i++) {
        futs[i] = PyObject_Call((PyObject *)fut_type, empty, kw);
        ok = futs[i] != NULL && Py_TYPE(futs[i]) == fut_type;
    }
    PyObject *r = NULL;
    if (ok) ok = (r = PyObject_CallMethod(futs[1], "set_result", "O", Py_None)) != NULL;
    Py_XDECREF(r);
    if (ok) ok = (r = PyObject_CallMethod(futs[2], "cancel", NULL)) != NULL;
    Py_XDECREF(r);
    for (int i = 0; ok && i < 3; i++) {
        PyObject *s = G.state_get(futs[i], G.state_closure);
        if (s == NULL) break;
        if (PyUnicode_Check(s)) {
            (void)state_code(futs[i], s); /* learns the three strings */
            learn_state_offset(futs[i], s);
        }
        Py_DECREF(s);
    }
    for (int i = 0; i < 3; i++) Py_XDECREF(futs[i]);
    Py_XDECREF(kw);
    Py_XDECREF(empty);
    PyErr_Clear();
    PyErr_SetRaisedException_compat(exc);
    tls.guard = g;
}

#define TS_UNREAD UINT32_MAX /* end_task: read the state */
static void end_task(PyObject *task, uint32_t state);
static void end_record(uint32_t tid, uint32_t ti, PyObject *task, uint32_t state);


/* PyErr_Clear(), but from 3.12 only if an error is set, found in the thread state we read
 * without a call (PyErr_Clear finds it again through libpython's TLS: ~40 instructions). */
static inline void clear_error_quick(void) {
#if PY_VERSION_HEX >= 0x030C0000
    PyThreadState *ts = tstate_unchecked();
    if (ts != NULL && ts->current_exception == NULL) return;
#endif
    PyErr_Clear();
}

/* The add_done_callback of the Future class a task is made on (asyncio's C Future, the
 * class asyncio.Task is made on, or the pure-Python one), borrowed; NULL if neither (then
 * the task's own is looked up).  Ours goes on through it, not through a lookup on the
 * task: a subclass's override of add_done_callback is the program's code, to run for the
 * program's callbacks only (CPython's test_subclasses_ctask_cfuture counts its calls). */
static PyObject *base_add_done_callback(PyObject *task) {
    PyTypeObject *want = G.task_type != NULL ? ((PyTypeObject *)G.task_type)->tp_base : NULL;
    if (want == NULL || !PyObject_TypeCheck(task, want)) {
        static PyObject *py_future; /* asyncio.futures._PyFuture (strong), Py_None if none */
        if (py_future == NULL) {
            PyObject *mod = PyImport_ImportModule("asyncio.futures");
            py_future = mod != NULL ? PyObject_GetAttrString(mod, "_PyFuture") : NULL;
            Py_XDECREF(mod);
            if (py_future == NULL || !PyType_Check(py_future)) {
                PyErr_Clear();
                Py_XSETREF(py_future, Py_NewRef(Py_None));
            }
        }
        if (py_future == Py_None || !PyObject_TypeCheck(task, (PyTypeObject *)py_future)) return NULL;
        want = (PyTypeObject *)py_future;
    }
    if (G.fut_type != (PyObject *)want) {
        PyObject *add = PyObject_GetAttr((PyObject *)want, G.s_add_done_callback);
        if (add == NULL) {
            PyErr_Clear();
            return NULL;
        }
        Py_XSETREF(G.fut_add_done, add);
        Py_XSETREF(G.fut_type, Py_NewRef((PyObject *)want));
    }
    return G.fut_add_done;
}

/* Link record tid to its task object and watch for its end.  named: the task already has
 * the name its creator gives it (it was made with that name), so no late name is awaited. */
static void attach_task(uint32_t tid, PyObject *task, int named) {
    uint32_t ti;
    if (!task_registered(tid, &ti)) return;
    int g = tls.guard;
    tls.guard = 1;
    if (watched_task(task)) {
        /* its end will pass the watcher, unless it has already happened (an eager task
         * whose first step finished it, before we knew the object): then the record ends
         * here, and the object index never holds it (on an eager tree, most tasks: an
         * insertion and a removal saved, in a table that at 56,000 tasks misses the cache) */
        uint32_t st = c_task_state(task);
        if (st == TS_PENDING ? S.eager_score > -16 : S.eager_score < 16) S.eager_score += st == TS_PENDING ? -1 : 1;
        note_object(tid, ti, task, st == TS_PENDING);
        if (st != TS_PENDING) {
            end_record(tid, ti, task, st);
#ifdef MS_LATE_NAMES
            /* end_record has read its name; one made without a name may get it only when
             * we return (see late_name_watch), unless we can tell what it will be */
            if (!named && !late_name_known(tid, task)) late_name_watch(tid, task);
#else
            (void)named;
#endif
        }
        clear_error_quick();
        tls.guard = g;
        return;
    }
    note_object(tid, ti, task, 1);
    PyObject *ctx = callback_context();
    if (ctx != NULL) {
        PyObject *args[4] = {NULL, task, G.done_cb, ctx};
        PyObject *add = base_add_done_callback(task);
        PyObject *r = add != NULL ? PyObject_Vectorcall(add, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, G.kw_context)
                                  : PyObject_VectorcallMethod(G.s_add_done_callback, args + 1,
                                                              2 | PY_VECTORCALL_ARGUMENTS_OFFSET, G.kw_context);
        Py_XDECREF(r);
    }
    PyErr_Clear(); /* an object without add_done_callback: its record stays pending */
#ifdef MS_LATE_NAMES
    /* a Task subclass whose eager first step finished it: our callback ran at once (see
     * call_soon's), reading a name its maker may set only when we return, as above */
    if (!named && task_registered(tid, &ti) && (S.tasks[ti].flags & TF_FINISHED) && !late_name_known(tid, task))
        late_name_watch(tid, task);
    PyErr_Clear();
#endif
    tls.guard = g;
}

static uint32_t task_state_of(PyObject *task) {
    if (c_task(task)) return c_task_state(task);
    uint32_t st = TS_DONE;
    PyObject *s = PyObject_GetAttr(task, G.s_state);
    if (s != NULL && PyUnicode_Check(s)) {
        st = state_code(task, s);
    } else {
        PyErr_Clear();
        PyObject *c = PyObject_CallMethodNoArgs(task, G.s_cancelled);
        if (c == Py_True) st = TS_CANCELLED;
        Py_XDECREF(c);
    }
    Py_XDECREF(s);
    PyErr_Clear();
    return st;
}

/* Run the tracker's fold hook if enough finished tasks wait: hook(True) for a pass, when
 * more than G.fold_at wait in S.finished; hook(False) to hand the tasks folded as they
 * finished to their groups, once EARLY_BATCH of them wait.  Called where running Python
 * code is safe (our factory, before it makes a task); never lets an exception escape. */
static void maybe_fold(void) {
    PyObject *hook = G.fold_hook;
    if (hook == NULL || G.folding) return;
    int pass = S.nfinished > G.fold_at;
    if (!pass && S.nearly < EARLY_BATCH) return;
    uint64_t at = G.fold_at;
    if (pass) G.fold_at = UINT64_MAX; /* the hook sets the next threshold */
    G.folding = 1;                    /* no re-entry meanwhile */
    Py_INCREF(hook);
    int g = tls.guard;
    tls.guard = 1;
    PyObject *r = PyObject_CallOneArg(hook, pass ? Py_True : Py_False);
    tls.guard = g;
    G.folding = 0;
    if (r == NULL) {
        if (pass && G.fold_at == UINT64_MAX) G.fold_at = at + 1000; /* try again later */
        int interrupted = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        PyErr_WriteUnraisable(hook);
        if (interrupted) PyErr_SetInterrupt(); /* delivered at the next check */
    }
    Py_XDECREF(r);
    Py_DECREF(hook);
}

/* The offset of the name field in a C Task, learnt from the first tasks whose get_name()
 * we call: the one pointer-sized slot of the object that holds the very string returned,
 * the same slot for two tasks in a row.  (Task.__init__ formats the name on 3.11; 3.12+
 * keep the counter as an int and format "Task-<n>" only when asked, which costs ~2,500
 * instructions per task, so we keep the int and format it when a report is made.)  A
 * Task without such a slot (asyncio's pure-Python Task) keeps using get_name(). */
static void learn_name_offset(PyObject *task, PyObject *name) {
    PyTypeObject *tp = (PyTypeObject *)G.task_type;
    Py_ssize_t found = 0, n = 0;
    for (Py_ssize_t off = (Py_ssize_t)sizeof(PyObject); off + (Py_ssize_t)sizeof(PyObject *) <= tp->tp_basicsize;
         off += (Py_ssize_t)sizeof(PyObject *)) {
        if (*(PyObject **)((char *)task + off) == name) {
            found = off;
            n++;
        }
    }
    if (n != 1 || (G.name_hits && found != G.name_candidate)) {
        G.name_off = -1;
        return;
    }
    G.name_candidate = found;
    if (++G.name_hits == 2) G.name_off = found;
}

/* s, or (not an interned str) a copy made under the guard; new reference. */
static PyObject *own_str(PyObject *s) {
    if (!PyUnicode_Check(s) || (PyUnicode_CheckExact(s) && PyUnicode_CHECK_INTERNED(s))) return Py_NewRef(s);
    int g = tls.guard;
    tls.guard = 1;
    PyObject *copy = PyUnicode_FromKindAndData(PyUnicode_KIND(s), PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s));
    tls.guard = g;
    return copy;
}

/* Record r keeps the task's name (steals name; NULL: none).  Not the task's object: it was
 * made by whoever named the task (asyncio's Task constructor, or the program's
 * f"job-{i}"), in that task's context, so it counts as that task's live bytes, and kept
 * by the record it would hold them for as long as the record lives (a task naming 1,000
 * children showed 51 KB retained after they had all ended; on 3.11 every creator held its
 * children's Task-<n>, 55 bytes each, which kept it from folding).  A str is copied under
 * the guard (never recorded; an interned one is the interpreter's and is kept as it is);
 * 3.12+'s default name, the int n of "Task-<n>", is kept as a number. */
static void keep_name(task_info_t *r, PyObject *name) {
    r->name_num = 0;
    if (name != NULL && PyLong_CheckExact(name)) {
        unsigned long long n = PyLong_AsUnsignedLongLong(name); /* (-1 and an error if it does not fit) */
        if (n < UINT64_MAX) {
            r->name_num = (uint64_t)n + 1;
            Py_DECREF(name);
            Py_CLEAR(r->name);
            return;
        }
        PyErr_Clear(); /* (past 64 bits: the name as get_name() would give it) */
        int g = tls.guard;
        tls.guard = 1;
        PyObject *s = PyUnicode_FromFormat("Task-%S", name);
        tls.guard = g;
        Py_DECREF(name);
        name = s;
        if (s == NULL) PyErr_Clear();
    } else if (name != NULL) {
        PyObject *copy = own_str(name);
        if (copy != NULL) {
            Py_DECREF(name);
            name = copy;
        } else {
            PyErr_Clear(); /* no memory: the task's own, then */
        }
    }
    Py_XSETREF(r->name, name);
}

/* The task's name: a str, or (3.12+, never asked for) the int n of "Task-<n>"; NULL if
 * none.  Runs no Python code once the name slot is known. */
static PyObject *task_name_of(PyObject *task) {
    if (G.name_off > 0 && PyObject_TypeCheck(task, (PyTypeObject *)G.task_type)) {
        PyObject *v = *(PyObject **)((char *)task + G.name_off);
        if (v != NULL && (PyUnicode_CheckExact(v) || PyLong_CheckExact(v))) return Py_NewRef(v);
    }
    PyObject *name = PyObject_CallMethodNoArgs(task, G.s_get_name);
    if (name == NULL || !PyUnicode_Check(name)) {
        PyErr_Clear();
        Py_CLEAR(name);
        return NULL;
    }
    if (G.name_off == 0 && Py_TYPE(task) == (PyTypeObject *)G.task_type && PyType_Check(G.task_type) &&
        Py_REFCNT(name) > 1)
        learn_name_offset(task, name);
    return name;
}

/* Task `task` has ended in `state` (TS_UNREAD: read it now): end its record, if we hold one
 * and the profiler still runs (a done callback of ours outlives it: a task still running
 * when it stopped stays pending in its report, as the watcher, which stops with it, leaves
 * it on 3.12+). */
static void end_task(PyObject *task, uint32_t state) {
    uint32_t tid;
    if (!S.active || !S.has_data || !u64map_get(&S.obj_index, (uint64_t)(uintptr_t)task, &tid)) return;
    u64map_del(&S.obj_index, (uint64_t)(uintptr_t)task);
    end_record(tid, 0, task, state);
}

/* Record tid, made for `task`, ends in `state` (TS_UNREAD: read it now), unless it has
 * already ended or is another task's.  ti: its slot if the caller knows it, else 0. */
static void end_record(uint32_t tid, uint32_t ti, PyObject *task, uint32_t state) {
    if ((!record_at(tid, ti) && !task_registered(tid, &ti)) || (S.tasks[ti].flags & TF_FINISHED) ||
        S.tasks[ti].obj != (uintptr_t)task)
        return;
    int g = tls.guard;
    tls.guard = 1;
    if (state == TS_UNREAD) state = task_state_of(task);
    PyObject *name = task_name_of(task);
    if (!record_at(tid, ti) || (S.tasks[ti].flags & TF_FINISHED)) { /* changed meanwhile */
        Py_XDECREF(name);
        tls.guard = g;
        return;
    }
    task_info_t *r = &S.tasks[ti]; /* after the calls above: they may grow S.tasks */
    r->state = state;
    keep_name(r, name);
    finish_record(tid, ti);
    if (S.ninferred) {
        for (uint32_t i = 0; i < S.nthreads; i++) {
            if (S.threads[i].inferred_tid == tid) S.threads[i].owner_done = 1;
        }
    }
    tls.guard = g;
    /* The fold itself waits for the next task creation: we are inside asyncio's
     * future_schedule_callbacks or its running-task dict, where running Python code is
     * best avoided. */
}

PyDoc_STRVAR(task_done_doc,
"task_done(task)\n--\n\nThe done callback our factory adds to tasks whose end the running-task\n"
"watcher does not see (3.11, Task subclasses, other task types).");

/* End task's record in state, to be folded at the next pass, not now. */
static void end_task_deferred(PyObject *task, uint32_t state) {
    int defer = G.defer_fold;
    G.defer_fold = 1;
    end_task(task, state);
    G.defer_fold = defer;
}

static PyObject *core_task_done(PyObject *m, PyObject *task) {
    /* A done callback runs (or, inline from CallSoon, is being scheduled) inside the
     * task's last step, which goes on in its context: asyncio schedules the task's other
     * callbacks, making their Handles.  So its record waits for a fold pass instead of
     * folding now (fold_at_finish), else those bytes had no record to go to and were
     * counted unattributed (3.11, sampled mode: about half a short task's bytes, whose
     * live estimate is 0 at its end). */
    end_task_deferred(task, TS_UNREAD);
    Py_RETURN_NONE;
}


/* ---- names given after a task ended (3.12) ---------------------------------------------
 * 3.12's asyncio.create_task and TaskGroup.create_task name a task after the loop made it,
 * so a task whose eager first step finished it (eager_task_factory) ends before its name
 * is set.  When they made it, the name is read from their frame (late_name_known).  A
 * task made by other code is watched with a weak reference; its name is read again at the
 * next safe point (the next task made, the next snapshot) or, if it goes first, from its
 * name slot while it is being destroyed (the weakref callback runs before the Task's
 * fields are cleared). */
#ifdef MS_LATE_NAMES
typedef struct {
    PyObject *ref;  /* owned weakref */
    PyObject *task; /* borrowed, read only while alive or being destroyed; NULL: gone */
    uint32_t tid;
    unsigned long thread; /* the thread that made it: its create_task names it */
} late_name_t;
static late_name_t *late_names;
static uint32_t nlate, caplate;

static void set_late_name(uint32_t tid, PyObject *task, PyObject *name) {
    uint32_t ti;
    if (name != NULL && task_registered(tid, &ti) && S.tasks[ti].obj == (uintptr_t)task)
        keep_name(&S.tasks[ti], name);
    else
        Py_XDECREF(name);
}

static PyObject *late_name_gone(PyObject *m, PyObject *ref) {
    for (uint32_t i = 0; i < nlate; i++) {
        late_name_t *e = &late_names[i];
        if (e->ref != ref || e->task == NULL) continue;
        /* the slot, or while it is still being learnt, the one candidate found so far */
        Py_ssize_t off = G.name_off > 0 ? G.name_off : (G.name_off == 0 && G.name_hits ? G.name_candidate : 0);
        PyObject *v = off > 0 && Py_TYPE(e->task) == (PyTypeObject *)G.task_type ? *(PyObject **)((char *)e->task + off)
                                                                                : NULL;
        if (v != NULL && PyUnicode_CheckExact(v)) set_late_name(e->tid, e->task, Py_NewRef(v));
        e->task = NULL; /* the weakref itself is dropped at the next flush, not inside its callback */
        break;
    }
    Py_RETURN_NONE;
}

static PyMethodDef late_name_def = {"late_name_gone", late_name_gone, METH_O, NULL};
static PyObject *late_name_cb;

/* Task `task` (record tid) has ended inside the loop's create_task, called from Python
 * code whose frame is the running one: if that is one of asyncio's own makers (G.namer_code,
 * looking through those that hand the task back to their caller), the name it is about to
 * give is known now: its local `name` (None: the task keeps the name it has; a str: that
 * is the name, as set_name stores str(name)), or none at all (gather).  So the record has
 * the name its maker gives, as on 3.13, where asyncio passes names to the loop; a name the
 * program's own code sets after the task has ended is not seen there either.  Returns 1 if
 * the name is settled, 0 if it must be watched for (a task made by other code).  Most 3.12
 * programs make their tasks this way, and watching an eager task that its first step
 * finished cost ~1,000 instructions a task (callgrind, eager TaskGroup tree: the weak
 * reference, the flush, freeing it). */
static int late_name_known(uint32_t tid, PyObject *task) {
    PyThreadState *ts = tstate_unchecked();
    _PyInterpreterFrame *f = ts != NULL ? top_frame(ts) : NULL;
    for (int depth = 0; f != NULL && depth < 4; depth++, f = f->previous) {
        PyCodeObject *code = frame_code(f);
        int i = 0;
        while (i < G.nnamers && code != (PyCodeObject *)G.namer_code[i]) i++;
        if (i == G.nnamers) return 0;
        Py_ssize_t slot = G.namer_slot[i];
        if (slot == NAMER_THROUGH) continue;
        if (slot == NAMER_NEVER) return 1;
        PyObject *v = f->localsplus[slot];
        if (v == Py_None) return 1;
        if (v != NULL && PyUnicode_CheckExact(v)) {
            set_late_name(tid, task, Py_NewRef(v));
            return 1;
        }
        return 0;
    }
    return 0;
}

static void late_name_watch(uint32_t tid, PyObject *task) {
    uint32_t ti;
    if (!task_registered(tid, &ti)) return; /* folded as it finished: its name is not kept */
    if (late_name_cb == NULL && (late_name_cb = PyCFunction_NewEx(&late_name_def, NULL, NULL)) == NULL) {
        PyErr_Clear();
        return;
    }
    if (grow_array((void **)&late_names, &caplate, sizeof(late_name_t), nlate + 1) < 0) return;
    PyObject *ref = PyWeakref_NewRef(task, late_name_cb);
    if (ref == NULL) {
        PyErr_Clear();
        return;
    }
    late_names[nlate++] = (late_name_t){ref, task, tid, PyThread_get_thread_ident()};
}

/* Where running Python code is safe: read the names of those still alive and drop the
 * refs; this_thread: only those made by this thread (another thread's create_task may not
 * have named its task yet: it can give up the GIL in between).  Nothing here runs Python
 * code (C getters of exact Tasks; a weakref going away calls nothing). */
static void late_names_flush(int this_thread) {
    if (nlate == 0) return;
    int g = tls.guard;
    tls.guard = 1;
    unsigned long me = PyThread_get_thread_ident();
    uint32_t kept = 0;
    for (uint32_t i = 0; i < nlate; i++) {
        late_name_t e = late_names[i];
        if (this_thread && e.thread != me) {
            late_names[kept++] = e;
            continue;
        }
        PyObject *alive = e.task != NULL ? weak_target(e.ref) : NULL;
        if (alive != NULL && alive == e.task) set_late_name(e.tid, e.task, task_name_of(e.task));
        Py_XDECREF(alive);
        PyErr_Clear();
        Py_DECREF(e.ref);
    }
    nlate = kept;
    tls.guard = g;
}
#else
static inline void late_names_flush(int this_thread) { (void)this_thread; }
#endif

/* ---- seeing C Tasks end without a done callback (3.12+) ---------------------------------
 * A done callback costs each task ~2,800 instructions (callgrind, 3.12, task tree): the
 * add_done_callback call, and, as ours takes the future's single inline callback slot, a
 * list and a tuple for the awaiting task's wakeup.  On 3.12+ we watch instead the dict in
 * which _asyncio keeps each loop's running task: every step of a C Task leaves it (a
 * deletion, or a replacement when an eager task's first step ends, 3.12's
 * swap_current_task), and a task that is done when its step leaves has ended.  The watcher
 * runs before the change, so the leaving task is still the dict's value (and alive).  Only
 * asyncio.Task itself: subclasses and other task types keep the done callback. */
#if PY_VERSION_HEX >= 0x030C0000
/* Is `task` (ended, on `loop`) the task record tid was made for, and not another task now
 * at the address of one that was destroyed while pending (its record never ended, so the
 * address is still in S.obj_index; pymalloc hands the address straight back out)?  A
 * recorded task is on an instrumented loop, and its steps run in its own context, which is
 * current when the step leaves: that context carries the record's Tag (ids are never
 * reused), or, if several tasks were given one context= object, is the context the record
 * was made with.  (The end of an eager first step comes after the context was left, but a
 * task whose first step ends it is finished by attach_task, not here.) */
static int is_recorded_task(uint32_t tid, PyObject *task, PyObject *loop) {
    uint32_t ti;
    loop_entry_t *e = loop_entry(loop);
    if (e == NULL || !task_registered(tid, &ti) || S.tasks[ti].loop_serial != e->factory->serial) return 0;
    if (context_tid() == tid) return 1;
    PyThreadState *ts = tstate_unchecked();
    return ts != NULL && S.tasks[ti].ctx != 0 && S.tasks[ti].ctx == (uintptr_t)ts->context;
}

static void adopt_eager(PyObject *loop, PyObject *task);

static int tasks_watcher(PyDict_WatchEvent ev, PyObject *d, PyObject *key, PyObject *new_value) {
    if (d != G.watched) return 0;
    tls_t *t = &tls;
    if (ev != PyDict_EVENT_ADDED && ev != PyDict_EVENT_MODIFIED && ev != PyDict_EVENT_DELETED) {
        G.watch_gen++; /* cleared, cloned, gone: what every thread remembers is void */
        return 0;
    }
    /* The leaving task: the value this thread saw go in for this loop (a loop runs in one
     * thread at a time, and every change to the dict passes here), else a lookup. */
    PyObject *old = NULL;
    int known = ev != PyDict_EVENT_ADDED && t->step_task != NULL && t->step_loop == key && t->step_gen == G.watch_gen;
    if (known) old = t->step_task;
    t->step_loop = key;
    t->step_task = ev == PyDict_EVENT_DELETED ? NULL : new_value;
    t->step_gen = G.watch_gen;
    if (t->ctx_shared) { /* the running task, read for a context shared by tasks, changes */
        t->ctx_seen = NULL;
        t->fast_ctx = FAST_NONE;
    }
    if (ev == PyDict_EVENT_ADDED) {
        /* no task was running: inside our factory, the eager first step of the one being
         * made (from a plain callback) going in */
        if (t->pending_tid != 0 && t->pending_obj == NULL && new_value != NULL &&
            Py_TYPE(new_value) == (PyTypeObject *)G.task_type) {
            t->pending_obj = Py_NewRef(new_value);
            t->pending_prev = NULL;
        }
        return 0;
    }
    if (S.obj_index.count == 0) return 0;
    /* A replacement is an eager first step going in or out.  Inside our factory, the
     * first task we do not know to go in is the one being made; outside it, or another
     * one inside it, a Task built directly with eager_start (asyncio.Task(coro,
     * eager_start=True)): no call_soon comes before its first step, so it is adopted
     * here, before that step runs (rare: only such steps replace the running task
     * outside our factory). */
    int making = ev == PyDict_EVENT_MODIFIED && t->pending_tid != 0;
    int arriving = ev == PyDict_EVENT_MODIFIED && new_value != NULL && new_value != t->pending_obj &&
                   !(making && new_value == t->pending_prev) && Py_TYPE(new_value) == (PyTypeObject *)G.task_type;
    int leaving = 1;
    if (making) {
        if (arriving && t->pending_obj == NULL) { /* the one being made: its eager first step goes in */
            t->pending_obj = Py_NewRef(new_value);
            /* (the task it displaces comes back in after it: not another task arriving) */
            t->pending_prev = known ? old : PyDict_GetItemWithError(d, key);
            return 0;
        }
        /* The task leaving is the one being made, whose end attach_task sees (it is not
         * in the index yet), or the one it displaced (back in after it, not arriving):
         * only another one goes on, an adopted one's eager first step coming out, to be
         * ended if it was its last (or one going in over it, mid-step, which is let be). */
        leaving = known && old != NULL && old != t->pending_obj;
        if (!arriving && !leaving) return 0;
    }
    PyThreadState *ts = tstate_unchecked();
    if (ts == NULL) return 0;
    /* The error indicator read from the thread state itself: PyErr_Occurred and
     * PyErr_Clear each find the thread state again, twice per task step. */
    PyObject *exc = ts->current_exception != NULL ? PyErr_GetRaisedException_compat() : NULL;
    uint32_t tid;
    uint32_t st;
    if (arriving && !u64map_get(&S.obj_index, (uint64_t)(uintptr_t)new_value, &tid)) adopt_eager(key, new_value);
    if (!leaving) old = NULL;
    else if (!known) old = PyDict_GetItemWithError(d, key);
    /* a step that leaves its task pending (most steps of a long-lived task) is told by
     * the task's state alone, once its place is known: no index lookup */
    if (old != NULL && Py_TYPE(old) == (PyTypeObject *)G.task_type &&
        (G.state_off <= 0 || state_slot(old) != 0) &&
        u64map_get(&S.obj_index, (uint64_t)(uintptr_t)old, &tid) && (st = c_task_state(old)) != TS_PENDING) {
        Py_INCREF(old);
        if (is_recorded_task(tid, old, key)) end_task(old, st);
        Py_DECREF(old);
    }
    if (ts->current_exception != NULL) PyErr_Clear();
    if (exc != NULL) PyErr_SetRaisedException_compat(exc);
    return 0;
}

#endif

/* The C getter behind asyncio.Task.<name>, if it is a getset descriptor. */
static void find_getter(PyObject *name, getter *get, void **closure) {
    PyObject *d = PyObject_GetAttr(G.task_type, name);
    if (d != NULL && Py_IS_TYPE(d, &PyGetSetDescr_Type) && ((PyGetSetDescrObject *)d)->d_getset->get != NULL) {
        *get = ((PyGetSetDescrObject *)d)->d_getset->get;
        *closure = ((PyGetSetDescrObject *)d)->d_getset->closure;
    }
    Py_XDECREF(d);
    PyErr_Clear();
}

/* Start (on) or stop watching _asyncio._current_tasks.  Failing to start is not an error:
 * tasks then get done callbacks. */
static void tasks_watch(int on) {
    if (!on) Py_CLEAR(G.current_tasks);
    else if (G.current_tasks == NULL) {
        PyObject *mod = PyImport_ImportModule("_asyncio");
        PyObject *d = mod != NULL ? PyObject_GetAttrString(mod, "_current_tasks") : NULL;
        Py_XDECREF(mod);
        if (d != NULL && PyDict_CheckExact(d)) G.current_tasks = d;
        else Py_XDECREF(d);
        PyErr_Clear();
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (!on) {
        if (G.watched != NULL) {
            if (PyDict_Unwatch(G.watcher - 1, G.watched) < 0) PyErr_Clear();
            Py_CLEAR(G.watched);
        }
        return;
    }
    /* (the getters are found by configure) */
    if (G.watched != NULL || G.task_type == NULL || G.state_get == NULL) return;
    if (G.watcher == 0) {
        int id = PyDict_AddWatcher(tasks_watcher);
        if (id < 0) {
            PyErr_Clear();
            return;
        }
        G.watcher = id + 1;
    }
    PyObject *mod = PyImport_ImportModule("_asyncio");
    PyObject *d = mod != NULL ? PyObject_GetAttrString(mod, "_current_tasks") : NULL;
    Py_XDECREF(mod);
    if (d != NULL && PyDict_CheckExact(d) && PyDict_Watch(G.watcher - 1, d) == 0) {
        G.watched = d;
        G.watch_gen++;
    } else {
        Py_XDECREF(d);
    }
    PyErr_Clear();
#else
    (void)on;
#endif
}

/* ---- adopting tasks we did not make ------------------------------------------------- */
/* Record a task that already exists (not finished: get_coro() of a finished eager task
 * crashes CPython 3.12.1) and runs in ctx (NULL: the running context).  *tid is its id, 0
 * if it could not be tagged.  Returns -1 with an exception set on failure. */
static int record_existing_task(PyObject *task, PyObject *ctx, uint32_t serial, uint32_t *tid) {
    PyThreadState *ts = tstate_unchecked();
    /* Running now (a task built with eager_start=True, inside its first step): it cannot
     * be entered again, so it is tagged in place, as the running context. */
    PyObject *running = ctx != NULL && ts != NULL && ts->context == ctx ? ctx : NULL;
    int g = tls.guard;
    tls.guard = 1;
    PyObject *coro = PyObject_CallMethodNoArgs(task, G.s_get_coro);
    if (coro == NULL) PyErr_Clear();
    int rc = register_task(running ? NULL : ctx, CTX_ADOPTED, 0, serial, coro, tid, NULL);
    Py_XDECREF(coro);
    uint32_t ti;
    if (rc == 0 && running && *tid && task_registered(*tid, &ti)) S.tasks[ti].ctx = (uintptr_t)running;
    if (rc == 0 && *tid) attach_task(*tid, task, 1); /* it exists already: its name is its own */
    tls.guard = g;
    return rc;
}

static void adopt_task(uint32_t serial, PyObject *task, PyObject *ctx) {
    int g = tls.guard;
    tls.guard = 1;
    PyObject *done = PyObject_CallMethodNoArgs(task, G.s_done);
    tls.guard = g;
    if (done != Py_False) { /* finished, or not a future after all */
        Py_XDECREF(done);
        PyErr_Clear();
        return;
    }
    Py_DECREF(done);
    uint32_t tid;
    if (record_existing_task(task, ctx, serial, &tid) < 0) PyErr_Clear();
}

#if PY_VERSION_HEX >= 0x030C0000
/* A Task built directly with eager_start=True, its first step about to run (tasks_watcher):
 * recorded as adopted, its context (not entered yet) tagged, so that step is its own and
 * not its creator's, and the tasks it makes there are its children. */
static void adopt_eager(PyObject *loop, PyObject *task) {
    loop_entry_t *e = loop_entry(loop);
    if (e == NULL) return;
    int g = tls.guard;
    tls.guard = 1;
    PyObject *ctx = PyObject_CallMethodNoArgs(task, G.s_get_context);
    tls.guard = g;
    if (ctx != NULL && PyContext_CheckExact(ctx)) {
        uint32_t tid;
        (void)record_existing_task(task, ctx, e->factory->serial, &tid);
    }
    Py_XDECREF(ctx);
    PyErr_Clear();
}
#endif

/* The task id tagged in a context that is not running, 0 if none. */
static uint32_t ctx_tag(PyObject *ctx) {
    uint32_t tid = 0;
    PyObject *v = PyObject_GetItem(ctx, S.tag_var);
    if (v == NULL) {
        PyErr_Clear(); /* KeyError: not tagged (call_soon has no exception pending) */
        return 0;
    }
    if (Py_TYPE(v) == &TagType) tid = ((TagObject *)v)->tid;
    Py_DECREF(v);
    return tid;
}

/* "TaskStepMethWrapper" (3.11) or "_asyncio.TaskStepMethWrapper" (3.12+). */
static int is_step_wrapper_name(const char *name) {
    const char *dot = strrchr(name, '.');
    return strcmp(dot ? dot + 1 : name, "TaskStepMethWrapper") == 0;
}

PyDoc_STRVAR(next_task_id_doc,
"next_task_id() -> int\n--\n\nThe id the next task recorded will get (ids grow, and tasks made from now on\n"
"have this one or more, until 2**31 ids have been handed out).");

static PyObject *core_next_task_id(PyObject *m, PyObject *noargs) { return PyLong_FromUnsignedLong(tasks_next_tid()); }

PyDoc_STRVAR(tag_running_task_doc,
"tag_running_task(task, loop_serial) -> int\n--\n\nRecord the running task (made before its loop was instrumented) from\n"
"inside its own step, tagging the running context.  Returns its id, 0 if not recorded.");

static PyObject *core_tag_running_task(PyObject *m, PyObject *args) {
    PyObject *task;
    unsigned long serial;
    if (!PyArg_ParseTuple(args, "Ok", &task, &serial)) return NULL;
    uint32_t tid = 0;
    /* A running context tagged in this session is left as it is; one whose Tag an earlier
     * session left (the same task profiled again: @profile's next call) is tagged anew. */
    if (S.active && !tid_this_session(context_tid()) && !u64map_get(&S.obj_index, (uint64_t)(uintptr_t)task, &tid) &&
        record_existing_task(task, NULL, (uint32_t)serial, &tid) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(tid);
}

/* The task a step wrapper steps (new reference; NULL with an error if none).  _asyncio's
 * TaskStepMethWrapper keeps it in its first slot on 3.11-3.13, so after the first one has
 * shown its __self__ there, it is read from the struct (the attribute lookup was ~180
 * instructions a task). */
static PyObject *step_wrapper_task(PyObject *cb) {
    PyObject **slot = (PyObject **)((char *)cb + sizeof(PyObject));
    if (G.step_direct > 0 && *slot != NULL) return Py_NewRef(*slot);
    PyObject *task = PyObject_GetAttr(cb, G.s_self);
    if (G.step_direct == 0 && task != NULL)
        G.step_direct = Py_TYPE(cb)->tp_basicsize >= (Py_ssize_t)(sizeof(PyObject) + sizeof(PyObject *)) && *slot == task ? 1 : -1;
    return task;
}

/* Whether a task seen stepping in a copy of the context our factory made is the one the
 * user's factory is making: the first such task (or the one whose eager first step went
 * in: tasks_watcher), or one made right inside the factory's call (a factory that returns
 * another Task than the one it made for the coroutine: both are that task's).  A task
 * built directly inside the eager first step of the one being made is another task. */
static inline int pending_made_here(tls_t *t, PyObject *task) {
    if (t->pending_obj == NULL || t->pending_obj == task) return 1;
    PyThreadState *ts = tstate_unchecked();
    return ts != NULL && ts->context == t->pending_ctx;
}

/* call_soon(callback, context=ctx) is about to schedule a step of some task: make sure
 * we know that task. */
static void check_step(PyObject *loop, PyObject *cb, PyObject *ctx) {
    PyObject *task = NULL;
    int owned = 0;
    PyTypeObject *tp = Py_TYPE(cb);
    if (tp == G.step_type) {
        task = step_wrapper_task(cb);
        owned = 1;
    } else if (PyCFunction_Check(cb)) {
        task = PyCFunction_GET_SELF(cb);
    } else if (PyMethod_Check(cb)) {
        task = PyMethod_GET_SELF(cb);
    } else if (G.step_type == NULL && is_step_wrapper_name(tp->tp_name)) {
        Py_INCREF(tp);
        G.step_type = tp;
        task = step_wrapper_task(cb);
        owned = 1;
    }
    if (task == NULL) {
        if (owned) PyErr_Clear();
        return;
    }
    tls_t *t = &tls;
    uint32_t tid;
    if (!PyObject_TypeCheck(task, (PyTypeObject *)G.task_type)) {
        /* not a task */
    } else if (t->pending_tid && t->pending_ctx == ctx) {
        /* The first step of the task our factory is making right now (nearly every task):
         * attach_task indexes what the factory returns, and this object too should that
         * be another one (factory_create), so the index is written once a task. */
        if (t->pending_obj == NULL) t->pending_obj = Py_NewRef(task);
    } else if (u64map_get(&S.obj_index, (uint64_t)(uintptr_t)task, &tid)) {
        /* one we know */
    } else if (t->pending_tid && t->pending_copied && pending_made_here(t, task) && ctx_tag(ctx) == t->pending_tid) {
        /* The same, in a copy of the context we made (the user's factory runs inside
         * ours, and may copy it again): the record keeps the context the task has, which
         * ours (freed when the factory returns) is not.  Only for what pending_made_here
         * says: a task built directly inside an eager first step also runs in a copy of
         * ours, and is another task. */
        uint32_t ti;
        if (t->pending_obj == NULL) t->pending_obj = Py_NewRef(task);
        if (task_registered(t->pending_tid, &ti)) {
            S.tasks[ti].ctx = (uintptr_t)ctx;
            note_object(t->pending_tid, ti, task, 1);
        }
    } else {
        loop_entry_t *e = loop_entry(loop); /* only tasks of instrumented loops */
        if (e != NULL) adopt_task(e->factory->serial, task, ctx);
    }
    if (owned) Py_DECREF(task);
}

static PyObject *callsoon_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    CallSoonObject *cs = (CallSoonObject *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n >= 2) {
        PyObject *cb = args[1];
        if (cb == G.done_cb && n == 3) return core_task_done(NULL, args[2]);
        if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) == 1 && S.active) {
            PyObject *ctx = args[n];
            PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
            if (ctx != Py_None && PyContext_CheckExact(ctx) && kw_is_context(key))
                check_step(args[0], cb, ctx);
        }
    }
    return PyObject_Vectorcall(cs->orig, args, nargsf, kwnames);
}

static PyObject *CallSoon_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *orig;
    if (!PyArg_ParseTuple(args, "O:CallSoon", &orig)) return NULL;
    if (!PyCallable_Check(orig)) {
        PyErr_SetString(PyExc_TypeError, "CallSoon needs the original call_soon");
        return NULL;
    }
    CallSoonObject *self = (CallSoonObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    Py_INCREF(orig);
    self->orig = orig;
    self->vectorcall = callsoon_vectorcall;
    return (PyObject *)self;
}

static void CallSoon_dealloc(CallSoonObject *self) {
    if (self->weaklist != NULL) PyObject_ClearWeakRefs((PyObject *)self);
    Py_CLEAR(self->orig);
    Py_CLEAR(self->where);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *CallSoon_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyMemberDef CallSoon_members[] = {
    {"original", T_OBJECT, offsetof(CallSoonObject, orig), READONLY, "the loop class's own call_soon"},
    {NULL},
};

/* ---- stand-ins ------------------------------------------------------------------------
 * Our versions of a loop's methods (CallSoon, CreateTask, HandOver) and the work HandOver
 * wraps (Handed) read as what they stand for: an attribute they do not have themselves
 * (__name__, __qualname__, __module__, ...) is the wrapped object's, __doc__ is its
 * docstring and __wrapped__ is the object itself.  So inspect.signature(loop.create_task)
 * finds asyncio's signature, asyncio reports "Exception in callback cb() at file:line"
 * for a callback handed over from a thread, and an executor that logs fn.__name__ logs
 * the user's function.  The getters' closure is the offset of the wrapped object. */
static PyObject *stand_in_getattr(PyObject *self, PyObject *name, PyObject *target) {
    PyObject *r = PyObject_GenericGetAttr(self, name);
    if (r != NULL || target == NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) return r;
    PyErr_Clear();
    return PyObject_GetAttr(target, name);
}

static PyObject *stand_in_target(PyObject *self, void *offset) {
    PyObject *t = *(PyObject **)((char *)self + (size_t)offset);
    if (t == NULL) PyErr_SetString(PyExc_AttributeError, "__wrapped__");
    return Py_XNewRef(t);
}

static PyObject *stand_in_doc(PyObject *self, void *offset) {
    PyObject *t = *(PyObject **)((char *)self + (size_t)offset);
    return t != NULL ? PyObject_GetAttrString(t, "__doc__") : Py_NewRef(Py_None);
}

#define STAND_IN_GETSET(type, field)                                                                       \
    {"__wrapped__", stand_in_target, NULL, "what this stands for", (void *)offsetof(type, field)},        \
    {"__doc__", stand_in_doc, NULL, NULL, (void *)offsetof(type, field)},                                 \
    {NULL}

/* The loop methods we stand in for (CallSoon, ExceptionHook, CreateTask, HandOver: each
 * begins with the original, where it was put and its weak references) also pass for it
 * where code looks at a method rather than calls it, as the Python wrappers before them
 * did: __class__ is the original's (so inspect.isfunction, getfile and getsource see a
 * function, whose __code__ is the original's), an attribute set on one is set on the
 * original (where it would have gone without us: the class's own method), one can be
 * weakly referenced, and copy, deepcopy and pickle treat one as what it is reached by:
 * the attribute of the class it was put on (stand_in_placed; uvloop's go on uvloop.Loop,
 * a subclass of the Cython class whose name the original's __qualname__ gives), else the
 * original's module and qualified name, as for a function.  The repr says what it is. */
typedef struct {
    PyObject_HEAD
    PyObject *orig;
    PyObject *where;
    PyObject *weaklist;
} MethodStandInObject;

/* (orig is NULL only in a CreateTask the collector is clearing) */
static PyObject *method_stand_in_class(PyObject *self, void *closure) {
    PyObject *orig = ((MethodStandInObject *)self)->orig;
    return Py_NewRef(orig != NULL ? (PyObject *)Py_TYPE(orig) : (PyObject *)Py_TYPE(self));
}

static int method_stand_in_setattro(PyObject *self, PyObject *name, PyObject *value) {
    PyObject *orig = ((MethodStandInObject *)self)->orig;
    if (orig == NULL) return PyObject_GenericSetAttr(self, name, value);
    return PyObject_SetAttr(orig, name, value);
}

static PyObject *method_stand_in_repr(PyObject *self) {
    return PyUnicode_FromFormat("<memscope_async stand-in for %R>", ((MethodStandInObject *)self)->orig);
}

static PyObject *method_stand_in_reduce(PyObject *self, PyObject *unused) {
    MethodStandInObject *si = (MethodStandInObject *)self;
    if (si->where != NULL) {
        PyObject *owner = weak_target(PyTuple_GET_ITEM(si->where, 0));
        if (owner != NULL) {
            PyObject *getattr_ = PyDict_GetItemString(PyEval_GetBuiltins(), "getattr"); /* borrowed */
            PyObject *r = getattr_ != NULL ? Py_BuildValue("O(OO)", getattr_, owner, PyTuple_GET_ITEM(si->where, 1)) : NULL;
            Py_DECREF(owner);
            if (r != NULL) return r;
        }
        PyErr_Clear();
    }
    if (si->orig == NULL) return PyErr_Format(PyExc_TypeError, "cannot pickle a cleared %s", Py_TYPE(self)->tp_name);
    return PyObject_GetAttrString(si->orig, "__qualname__");
}

static PyMethodDef method_stand_in_methods[] = {
    {"__reduce__", method_stand_in_reduce, METH_NOARGS, NULL},
    {NULL},
};

PyDoc_STRVAR(stand_in_placed_doc,
"stand_in_placed(stand_in, owner, name)\n--\n\nRecord that a loop-method stand-in was put on class owner as name\n"
"(what pickling it refers to).");

static int is_method_stand_in(PyObject *o);

static PyObject *core_stand_in_placed(PyObject *m, PyObject *args) {
    PyObject *si, *owner, *name;
    if (!PyArg_ParseTuple(args, "OO!U:stand_in_placed", &si, &PyType_Type, &owner, &name)) return NULL;
    if (!is_method_stand_in(si)) {
        PyErr_SetString(PyExc_TypeError, "stand_in_placed: not a loop-method stand-in");
        return NULL;
    }
    PyObject *ref = PyWeakref_NewRef(owner, NULL);
    if (ref == NULL) return NULL;
    PyObject *where = PyTuple_Pack(2, ref, name);
    Py_DECREF(ref);
    if (where == NULL) return NULL;
    Py_XSETREF(((MethodStandInObject *)si)->where, where);
    Py_RETURN_NONE;
}

#define METHOD_STAND_IN_GETSET(type)                                                                       \
    {"__class__", method_stand_in_class, NULL, NULL, NULL},                                               \
    STAND_IN_GETSET(type, orig)

#define METHOD_STAND_IN_SLOTS                                                                              \
    .tp_setattro = method_stand_in_setattro, .tp_repr = method_stand_in_repr,                             \
    .tp_methods = method_stand_in_methods, .tp_weaklistoffset = offsetof(MethodStandInObject, weaklist)

static PyObject *CallSoon_getattro(PyObject *self, PyObject *name) {
    return stand_in_getattr(self, name, ((CallSoonObject *)self)->orig);
}

static PyGetSetDef CallSoon_getset[] = {METHOD_STAND_IN_GETSET(CallSoonObject)};

static PyTypeObject CallSoonType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.CallSoon",
    .tp_basicsize = sizeof(CallSoonObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = PyDoc_STR("CallSoon(original): an instrumented loop's call_soon, in front of the original."),
    .tp_new = CallSoon_new,
    .tp_dealloc = (destructor)CallSoon_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CallSoonObject, vectorcall),
    .tp_descr_get = CallSoon_get,
    .tp_members = CallSoon_members,
    .tp_getattro = CallSoon_getattro,
    .tp_getset = CallSoon_getset,
    METHOD_STAND_IN_SLOTS,
};

/* ---- call_exception_handler ------------------------------------------------------------
 * A Task destroyed while still pending tells its loop through call_exception_handler,
 * with the context {"message": "Task was destroyed but it is pending!", "task": task, ...}
 * (C and Python Tasks alike, 3.11-3.13).  Its record ends there, pending and with its
 * name, while the task can still be read; else its end is found only when another task
 * is made at its address (note_object) or at the next report, when it is gone: no name.
 * In C, like CallSoon, so no frame of ours is on the stack when the handler logs: uvloop's
 * default handler is Cython, with no frame of its own, and logging names the innermost
 * Python frame as the record's file, line and function (a Python wrapper was named in
 * every "Exception in callback" record on uvloop).  Same object layout as CallSoon. */
static int note_destroyed_pending(PyObject *loop, PyObject *context) {
    if (!S.active || !PyDict_CheckExact(context) || loop_entry(loop) == NULL) return 0;
    PyObject *msg = PyDict_GetItemWithError(context, G.s_message); /* borrowed */
    if (msg == NULL || !PyUnicode_Check(msg) || PyUnicode_Compare(msg, G.s_destroyed_pending) != 0) {
        PyErr_Clear();
        return 0;
    }
    PyObject *task = PyDict_GetItemWithError(context, G.s_task);
    if (task == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_INCREF(task);
    PyObject *done = PyObject_CallMethodNoArgs(task, G.s_done);
    if (done != NULL && PyObject_IsTrue(done) == 0) end_task_deferred(task, TS_PENDING);
    Py_XDECREF(done);
    Py_DECREF(task);
    /* Never in the way of the handler: an error of ours is dropped, but KeyboardInterrupt
     * or SystemExit (a signal handled while a Python Task's done() ran) is the user's. */
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyErr_Clear();
    return 0;
}

static PyObject *exceptionhook_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    /* (loop, context), or (loop, context=context) */
    int rc = 0;
    if (n == 2 && kwnames == NULL)
        rc = note_destroyed_pending(args[0], args[1]);
    else if (n == 1 && kwnames != NULL && PyTuple_GET_SIZE(kwnames) == 1 && kw_is_context(PyTuple_GET_ITEM(kwnames, 0)))
        rc = note_destroyed_pending(args[0], args[1]);
    if (rc < 0) return NULL;
    return PyObject_Vectorcall(((CallSoonObject *)self)->orig, args, nargsf, kwnames);
}

static PyObject *ExceptionHook_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *orig;
    if (!PyArg_ParseTuple(args, "O:ExceptionHook", &orig)) return NULL;
    if (!PyCallable_Check(orig)) {
        PyErr_SetString(PyExc_TypeError, "ExceptionHook needs the original call_exception_handler");
        return NULL;
    }
    CallSoonObject *self = (CallSoonObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->orig = Py_NewRef(orig);
    self->vectorcall = exceptionhook_vectorcall;
    return (PyObject *)self;
}

static PyMemberDef ExceptionHook_members[] = {
    {"original", T_OBJECT, offsetof(CallSoonObject, orig), READONLY, "the loop class's own call_exception_handler"},
    {NULL},
};

static PyTypeObject ExceptionHookType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.ExceptionHook",
    .tp_basicsize = sizeof(CallSoonObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = PyDoc_STR("ExceptionHook(original): an instrumented loop's call_exception_handler, in front of the original."),
    .tp_new = ExceptionHook_new,
    .tp_dealloc = (destructor)CallSoon_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CallSoonObject, vectorcall),
    .tp_descr_get = CallSoon_get,
    .tp_members = ExceptionHook_members,
    .tp_getattro = CallSoon_getattro,
    .tp_getset = CallSoon_getset,
    METHOD_STAND_IN_SLOTS,
};

/* ---- the task factory ---------------------------------------------------------------- */
/* The user's factory is called with the arguments the loop gave ours: context= only if
 * the caller gave a Context (then it is that Context, tagged), else without it (or with
 * the loop's context=None, as uvloop passes), run inside the tagged copy so the task it
 * makes copies that.  Passing our copy as context= where asyncio passes nothing broke
 * factories that hand their **kwargs to a Task class without a context parameter. */
static inline int passes_context(FactoryObject *f, int explicit) {
    /* (asyncio's eager factories make the Task with the context given, exactly as one
     * made from inside ours: so they may have ours, which spares a context switch) */
    return f->user_factory == NULL || f->forwards_context || explicit;
}

/* After the user's factory ran in the caller's context `cur` with its mapping swapped for
 * `tagged` (make_task): the caller's own mapping `orig` (a reference of ours) goes back,
 * or, if the factory set variables meanwhile, those stay and ours is set back to what the
 * caller had.  Keeps any exception in flight; drops our reference to cur. */
static void caller_vars_back(tls_t *t, PyThreadState *ts, PyContext *cur, PyObject *orig, PyObject *tagged) {
    PyObject *exc = PyErr_GetRaisedException_compat();
    PyObject *now = (PyObject *)cur->ctx_vars;
    if (now == tagged) {
        cur->ctx_vars = (PyHamtObject *)orig; /* the caller's own mapping back, as it was */
        Py_DECREF(now);
    } else {
        PyObject *fixed = NULL;
        int g = t->guard;
        t->guard = 1;
        PyObject *old = PyObject_GetItem(orig, S.tag_var); /* (a mapping: KeyError if it had none) */
        if (old == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) PyErr_Clear();
        if (!PyErr_Occurred())
            fixed = old != NULL ? PyObject_CallMethod(now, "set", "OO", S.tag_var, old)
                                : PyObject_CallMethod(now, "delete", "O", S.tag_var);
        t->guard = g;
        Py_XDECREF(old);
        if (fixed != NULL && Py_TYPE(fixed) == Py_TYPE(now)) {
            cur->ctx_vars = (PyHamtObject *)fixed;
            Py_DECREF(now);
            Py_DECREF(orig);
        } else { /* (cannot happen) the caller's mapping back without the factory's change */
            PyErr_Clear();
            Py_XDECREF(fixed);
            cur->ctx_vars = (PyHamtObject *)orig;
            Py_DECREF(now);
        }
    }
    ts->context_ver++;
    t->ctx_seen = NULL; /* (our cached answers for this context were for the swapped mapping) */
    t->fast_ctx = FAST_NONE;
    Py_DECREF(cur);
    PyErr_SetRaisedException_compat(exc);
}

static PyObject *make_task(FactoryObject *f, PyObject *loop, PyObject *coro, PyObject *ctx, PyObject *name,
                           PyObject *kwargs, int explicit) {
    int has_name = name != NULL && name != Py_None;
    PyObject *task = NULL;
    if (f->user_factory == NULL) {
        if (kwargs == NULL) {
            PyObject *args[5] = {NULL, coro, loop, ctx, name};
            return PyObject_Vectorcall(G.task_type, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                       has_name ? G.kw_loop_context_name : G.kw_loop_context);
        }
        PyObject *d = kwargs != NULL ? Py_NewRef(kwargs) : PyDict_New();
        if (d == NULL) return NULL;
        PyObject *eager = PyDict_GetItemWithError(d, G.s_eager_start);
        if ((eager == Py_None && PyDict_DelItem(d, G.s_eager_start) < 0) || (eager == NULL && PyErr_Occurred()) ||
            (has_name && PyDict_SetItem(d, G.s_name, name) < 0) || PyDict_SetItem(d, G.s_loop, loop) < 0 ||
            PyDict_SetItem(d, G.s_context, ctx) < 0) {
            Py_DECREF(d);
            return NULL;
        }
        PyObject *a = PyTuple_Pack(1, coro);
        if (a != NULL) task = PyObject_Call(G.task_type, a, d);
        Py_XDECREF(a);
        Py_DECREF(d);
        return task;
    }
    if (passes_context(f, explicit)) {
        if (kwargs == NULL) {
            PyObject *args[4] = {NULL, loop, coro, ctx};
            task = PyObject_Vectorcall(f->user_factory, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, G.kw_context);
        } else if (PyDict_SetItem(kwargs, G.s_context, ctx) == 0) {
            PyObject *a = PyTuple_Pack(2, loop, coro);
            if (a != NULL) task = PyObject_Call(f->user_factory, a, kwargs);
            Py_XDECREF(a);
        }
    } else {
        /* Run it in the caller's context, its mapping for the call the one we made (the
         * caller's with our variable set to the new task's Tag), so the task it makes
         * copies the Tag, and a context variable the factory sets stays the caller's, as
         * without us (running it inside our copy, as ctx.run would, kept such a change
         * there).  The task's context shares that mapping, as it did when made inside our
         * copy: untracked by the collector and off its count (register_task).  Without a
         * running context (or our own, if it is running), inside our copy after all. */
        tls_t *t = &tls;
        PyThreadState *ts = tstate_unchecked();
        PyContext *cur = ts != NULL ? (PyContext *)ts->context : NULL;
        PyObject *tagged = t->pending_ctx == ctx && t->pending_tag != NULL ? context_vars(ctx) : NULL;
        PyObject *orig = NULL; /* the caller's mapping, ours while swapped out */
        if (tagged != NULL && cur != NULL && (PyObject *)cur != ctx) {
            Py_INCREF(cur);
            orig = (PyObject *)cur->ctx_vars;
            cur->ctx_vars = (PyHamtObject *)Py_NewRef(tagged);
            ts->context_ver++; /* values cached for the old mapping (ContextVar.get's, ours) go */
            t->pending_ctx = (PyObject *)cur; /* where the factory makes the task (pending_made_here) */
        } else if (PyContext_Enter(ctx) < 0) {
            return NULL;
        }
        PyObject *a = PyTuple_Pack(2, loop, coro);
        if (a != NULL) task = PyObject_Call(f->user_factory, a, kwargs);
        Py_XDECREF(a);
        if (orig == NULL) {
            if (PyContext_Exit(ctx) < 0) Py_CLEAR(task);
        } else {
            t->pending_ctx = ctx;
            caller_vars_back(t, ts, cur, orig, tagged);
        }
    }
    /* CPython 3.13.0-3.13.2's create_task calls task.set_name(name) after the user's
     * factory whatever name is, so an unnamed task is named "None" (CPython issue 130033;
     * 3.13.3 passes the name to the factory instead).  Our create_task does the same there
     * (name is None, not NULL, only when create_task was called), so names stay as
     * without us. */
    int none_quirk = name == Py_None && Py_Version >= 0x030D00F0 && Py_Version < 0x030D03F0;
    if (task != NULL && (has_name || none_quirk)) {
        PyObject *set_name = PyObject_GetAttr(task, G.s_set_name);
        if (set_name == NULL && Py_Version < 0x030D00F0 && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            /* 3.11 and 3.12 (asyncio.tasks._set_task_name) only warn when the factory's
             * object has no set_name; 3.13 calls it, and fails, as above. */
            PyErr_Clear();
            if (PyErr_WarnEx(PyExc_DeprecationWarning,
                             "Task.set_name() was added in Python 3.8, the method support will be mandatory "
                             "for third-party task implementations since 3.13.", 1) < 0)
                Py_CLEAR(task);
            return task;
        }
        PyObject *r = set_name != NULL ? PyObject_CallOneArg(set_name, name) : NULL;
        Py_XDECREF(set_name);
        if (r == NULL) Py_CLEAR(task);
        Py_XDECREF(r);
    }
    return task;
}

/* Make a tagged task.  ctx is the context= argument (NULL or None: a copy of the running
 * context); kwargs (a dict this call may change, or NULL) are the factory's other keyword
 * arguments; name is given only by our own create_task (stdlib loops).  A task made with
 * a name has it when we get it back (make_task gives it); one made without may be named
 * by its creator afterwards (3.12's asyncio.create_task and TaskGroup.create_task do, see
 * late_name_watch). */
static PyObject *factory_create(FactoryObject *f, PyObject *loop, PyObject *coro, PyObject *name, PyObject *ctx,
                                PyObject *kwargs) {
    maybe_fold();
    late_names_flush(1);
    if (ctx == Py_None) ctx = NULL;
    Py_XINCREF(ctx);
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) == 0) kwargs = NULL;
    int explicit = ctx != NULL;
    if (ctx == NULL) {
        ctx = PyContext_CopyCurrent();
        if (ctx == NULL) return NULL;
    } else if (!PyContext_CheckExact(ctx)) {
        /* not ours to judge: let the Task constructor raise what it raises */
        PyObject *task = make_task(f, loop, coro, ctx, name, kwargs, 1);
        Py_DECREF(ctx);
        return task;
    }
    uint32_t tid = 0;
    TagObject *tag = NULL;
    if (register_task(ctx, explicit ? CTX_GIVEN : CTX_COPIED, TF_VIA_FACTORY, f->serial, coro, &tid, &tag) < 0) {
        Py_DECREF(ctx);
        return NULL;
    }
    tls_t *t = &tls;
    PyObject *saved_ctx = t->pending_ctx, *saved_vars = t->pending_vars, *saved_obj = t->pending_obj,
             *saved_prev = t->pending_prev;
    uint32_t saved_tid = t->pending_tid;
    int saved_copied = t->pending_copied;
    TagObject *saved_tag = t->pending_tag;
    PyObject *vars = NULL;
    if (tid) {
        vars = Py_XNewRef(context_vars(ctx)); /* held, so its address names it alone */
        t->pending_ctx = ctx;
        t->pending_tid = tid;
        t->pending_tag = tag;
        t->pending_vars = vars;
        t->pending_obj = NULL;
        t->pending_prev = NULL;
        t->pending_copied = !passes_context(f, explicit);
    }
    PyObject *task = make_task(f, loop, coro, ctx, name, kwargs, explicit);
    PyObject *stepped = tid ? t->pending_obj : NULL; /* owned: the Task whose first step check_step saw */
    t->pending_ctx = saved_ctx;
    t->pending_tid = saved_tid;
    t->pending_tag = saved_tag;
    t->pending_vars = saved_vars;
    t->pending_copied = saved_copied;
    if (tid) {
        t->pending_obj = saved_obj;
        t->pending_prev = saved_prev;
    }
    Py_XDECREF(vars);
    if (tid) {
        uint32_t ti, known;
        if (task != NULL) {
            /* a factory that returned another object than the Task it made: both are this
             * task's (as when check_step indexed the first itself) */
            if (stepped != NULL && stepped != task && task_registered(tid, &ti) &&
                !u64map_get(&S.obj_index, (uint64_t)(uintptr_t)stepped, &known))
                note_object(tid, ti, stepped, 1);
            /* A name our create_task was given is the task's (make_task set it); from 3.13
             * asyncio passes its callers' names to it, so None means none will be set.
             * Without it (name NULL), the loop's create_task is another's (uvloop's), which
             * names the task when the factory returns, or 3.12's asyncio names it after. */
            attach_task(tid, task, name != NULL && (name != Py_None || PY_VERSION_HEX >= 0x030D0000));
        } else if (task_registered(tid, &ti)) {
            /* The task was never made: drop its record (keeping the error in flight), or,
             * if something it allocated is still live, end it to be folded later. */
            PyObject *exc = PyErr_GetRaisedException_compat();
            if (release_task_slot(tid, 0) != 0) {
                if (S.tasks[ti].obj) u64map_del(&S.obj_index, (uint64_t)S.tasks[ti].obj);
                finish_record(tid, ti);
            }
            PyErr_SetRaisedException_compat(exc);
        }
    }
    Py_XDECREF(stepped);
    Py_DECREF(ctx);
    return task;
}

static PyObject *factory_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n != 2) {
        PyErr_Format(PyExc_TypeError, "task factory takes (loop, coro), got %zd positional arguments", n);
        return NULL;
    }
    PyObject *kwargs = NULL, *ctx = NULL;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (kw_is_context(key)) {
            ctx = args[n + i];
            /* context=None (uvloop's create_task passes it): the user's factory gets it too */
            if (ctx != Py_None || ((FactoryObject *)self)->user_factory == NULL) continue;
        }
        if (kwargs == NULL && (kwargs = PyDict_New()) == NULL) return NULL;
        if (PyDict_SetItem(kwargs, key, args[n + i]) < 0) {
            Py_DECREF(kwargs);
            return NULL;
        }
    }
    PyObject *task = factory_create((FactoryObject *)self, args[0], args[1], NULL, ctx, kwargs);
    Py_XDECREF(kwargs);
    return task;
}

PyDoc_STRVAR(factory_create_doc,
"create(loop, coro, name, kwargs) -> task\n--\n\nWhat create_task does on an instrumented stdlib loop:\n"
"kwargs (a dict, changed by the call) are the factory keyword arguments, including context.");

static PyObject *Factory_create(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 4 || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "create(loop, coro, name, kwargs: dict)");
        return NULL;
    }
    PyObject *kwargs = args[3], *ctx = PyDict_GetItemWithError(kwargs, G.s_context);
    if (ctx == NULL && PyErr_Occurred()) return NULL;
    Py_XINCREF(ctx);
    if (ctx != NULL && PyDict_DelItem(kwargs, G.s_context) < 0) {
        Py_DECREF(ctx);
        return NULL;
    }
    PyObject *task = factory_create((FactoryObject *)self, args[0], args[1], args[2], ctx, kwargs);
    Py_XDECREF(ctx);
    return task;
}

static PyObject *Factory_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"serial", "user_factory", "forwards_context", NULL};
    unsigned long serial;
    PyObject *uf = Py_None;
    int forwards = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "k|Op:TaskFactory", kwlist, &serial, &uf, &forwards)) return NULL;
    FactoryObject *self = (FactoryObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->serial = (uint32_t)serial;
    self->user_factory = uf == Py_None ? NULL : Py_NewRef(uf);
    self->forwards_context = forwards;
    self->vectorcall = factory_vectorcall;
    return (PyObject *)self;
}

static int Factory_traverse(FactoryObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->user_factory);
    return 0;
}

static int Factory_clear(FactoryObject *self) {
    Py_CLEAR(self->user_factory);
    return 0;
}

static void Factory_dealloc(FactoryObject *self) {
    PyObject_GC_UnTrack(self);
    Factory_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Factory_get_uf(FactoryObject *self, void *c) {
    return Py_NewRef(self->user_factory ? self->user_factory : Py_None);
}

static int Factory_set_uf(FactoryObject *self, PyObject *v, void *c) {
    if (v == NULL) v = Py_None;
    Py_XSETREF(self->user_factory, v == Py_None ? NULL : Py_NewRef(v));
    return 0;
}

static PyObject *Factory_get_forwards(FactoryObject *self, void *c) { return PyBool_FromLong(self->forwards_context); }

static int Factory_set_forwards(FactoryObject *self, PyObject *v, void *c) {
    int b = v == NULL ? 0 : PyObject_IsTrue(v);
    if (b < 0) return -1;
    self->forwards_context = b;
    return 0;
}

static PyObject *Factory_get_serial(FactoryObject *self, void *c) { return PyLong_FromUnsignedLong(self->serial); }

static PyGetSetDef Factory_getset[] = {
    {"user_factory", (getter)Factory_get_uf, (setter)Factory_set_uf, "the user's task factory, or None", NULL},
    {"forwards_context", (getter)Factory_get_forwards, (setter)Factory_set_forwards,
     "the user's factory is asyncio's own eager one: it may be given the task's tagged context", NULL},
    {"serial", (getter)Factory_get_serial, NULL, "the loop's serial number", NULL},
    {NULL},
};

static PyMethodDef Factory_methods[] = {
    {"create", (PyCFunction)(void (*)(void))Factory_create, METH_FASTCALL, factory_create_doc},
    {NULL},
};

static PyTypeObject FactoryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.TaskFactory",
    .tp_basicsize = sizeof(FactoryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR("TaskFactory(serial, user_factory=None, forwards_context=False): an instrumented loop's task factory."),
    .tp_new = Factory_new,
    .tp_dealloc = (destructor)Factory_dealloc,
    .tp_traverse = (traverseproc)Factory_traverse,
    .tp_clear = (inquiry)Factory_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FactoryObject, vectorcall),
    .tp_getset = Factory_getset,
    .tp_methods = Factory_methods,
};

/* ---- create_task on stdlib loops ---------------------------------------------------- */
/* CreateTask(original, slow): create_task on a stdlib loop class.  On an instrumented loop
 * the usual call (create_task(coro, name=..., context=...)) goes straight to the loop's
 * factory after the loop's own _check_closed(); any other shape goes to slow(loop, *args,
 * **kwargs), the Python version, so errors read exactly as asyncio's do.  Other loops get
 * the original. */
typedef struct {
    PyObject_HEAD
    PyObject *orig;
    PyObject *where;
    PyObject *weaklist;
    PyObject *slow;
    vectorcallfunc vectorcall;
} CreateTaskObject;

/* asyncio.base_events.BaseEventLoop._check_closed (strong), once looked up; Py_None if it
 * is not there or not asyncio's own function (replaced before we looked). */
static PyObject *std_check_closed;

static PyObject *find_std_check_closed(void) {
    PyObject *mod = PyImport_GetModule(G.s_base_events_module), *cls = NULL, *fn = NULL;
    if (mod != NULL) cls = PyObject_GetAttrString(mod, "BaseEventLoop");
    if (cls != NULL && PyType_Check(cls)) fn = _PyType_Lookup((PyTypeObject *)cls, G.s_check_closed);
    int own = fn != NULL && PyFunction_Check(fn) &&
              PyUnicode_Check(((PyFunctionObject *)fn)->func_qualname) &&
              PyUnicode_CompareWithASCIIString(((PyFunctionObject *)fn)->func_qualname,
                                               "BaseEventLoop._check_closed") == 0 &&
              ((PyFunctionObject *)fn)->func_module != NULL && PyUnicode_Check(((PyFunctionObject *)fn)->func_module) &&
              PyUnicode_CompareWithASCIIString(((PyFunctionObject *)fn)->func_module, "asyncio.base_events") == 0;
    std_check_closed = Py_NewRef(own ? fn : Py_None);
    Py_XDECREF(cls);
    Py_XDECREF(mod);
    PyErr_Clear();
    return std_check_closed;
}

/* What create_task does first, loop._check_closed(): 0, or -1 with its exception set.
 * When the method the call would find (the loop's own attribute first, then its class's)
 * is asyncio's, which only tests loop._closed, that test is made here: calling the method
 * from C costs a fresh entry into the interpreter, ~800 instructions a task. */
#if PY_VERSION_HEX >= 0x030D0000
/* Exported by libpython 3.11-3.13 with this signature; declared in cpython/object.h up to
 * 3.12, in an internal header from 3.13.  The method as a call `obj.name()` finds it: 1
 * and the function itself when it is the type's (no bound method is made), else 0 and the
 * attribute. */
PyAPI_FUNC(int) _PyObject_GetMethod(PyObject *obj, PyObject *name, PyObject **method);
#endif

static int check_closed(PyObject *loop) {
    PyObject *std = std_check_closed != NULL ? std_check_closed : find_std_check_closed();
    PyObject *m = NULL;
    int unbound = _PyObject_GetMethod(loop, G.s_check_closed, &m);
    if (m == NULL) return -1;
    if (unbound && m == std) {
        Py_DECREF(m);
        PyObject *closed = PyObject_GetAttr(loop, G.s_closed);
        int yes = closed != NULL ? PyObject_IsTrue(closed) : -1;
        Py_XDECREF(closed);
        if (yes > 0) PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
        return yes == 0 ? 0 : -1;
    }
    PyObject *r = unbound ? PyObject_CallOneArg(m, loop) : PyObject_CallNoArgs(m);
    Py_DECREF(m);
    Py_XDECREF(r);
    return r != NULL ? 0 : -1;
}

static PyObject *createtask_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    CreateTaskObject *ct = (CreateTaskObject *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf), nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    loop_entry_t *e = n >= 1 ? loop_entry(args[0]) : NULL;
    if (e == NULL) return PyObject_Vectorcall(ct->orig, args, nargsf, kwnames);
    PyObject *name = NULL, *ctx = NULL;
    int usual = n == 2;
    for (Py_ssize_t i = 0; usual && i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (key == G.s_name && name == NULL) name = args[n + i];
        else if (key == G.s_context && ctx == NULL) ctx = args[n + i];
        else usual = 0; /* not interned, repeated or another keyword: the slow, exact path */
    }
    if (!usual) return PyObject_Vectorcall(ct->slow, args, nargsf, kwnames);
    if (name == NULL) name = Py_None; /* create_task's default (make_task tells it from a factory call's NULL) */
    FactoryObject *f = (FactoryObject *)Py_NewRef(e->factory); /* the calls below may drop the entry */
    PyObject *task = NULL;
    if (check_closed(args[0]) == 0) task = factory_create(f, args[0], args[1], name, ctx, NULL);
    Py_DECREF(f);
    return task;
}

static PyObject *CreateTask_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *orig, *slow;
    if (!PyArg_ParseTuple(args, "OO:CreateTask", &orig, &slow)) return NULL;
    CreateTaskObject *self = PyObject_GC_New(CreateTaskObject, type);
    if (self == NULL) return NULL;
    self->orig = Py_NewRef(orig);
    self->where = self->weaklist = NULL;
    self->slow = Py_NewRef(slow);
    self->vectorcall = createtask_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int CreateTask_traverse(CreateTaskObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->orig);
    Py_VISIT(self->where);
    Py_VISIT(self->slow);
    return 0;
}

static int CreateTask_clear(CreateTaskObject *self) {
    Py_CLEAR(self->orig);
    Py_CLEAR(self->where);
    Py_CLEAR(self->slow);
    return 0;
}

static void CreateTask_dealloc(CreateTaskObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->weaklist != NULL) PyObject_ClearWeakRefs((PyObject *)self);
    CreateTask_clear(self);
    PyObject_GC_Del(self);
}

static PyMemberDef CreateTask_members[] = {
    {"original", T_OBJECT, offsetof(CreateTaskObject, orig), READONLY, "the loop class's own create_task"},
    {NULL},
};

static PyObject *CreateTask_getattro(PyObject *self, PyObject *name) {
    return stand_in_getattr(self, name, ((CreateTaskObject *)self)->orig);
}

static PyGetSetDef CreateTask_getset[] = {METHOD_STAND_IN_GETSET(CreateTaskObject)};

static PyTypeObject CreateTaskType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.CreateTask",
    .tp_basicsize = sizeof(CreateTaskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR("CreateTask(original, slow): create_task for a stdlib loop class."),
    .tp_new = CreateTask_new,
    .tp_dealloc = (destructor)CreateTask_dealloc,
    .tp_traverse = (traverseproc)CreateTask_traverse,
    .tp_clear = (inquiry)CreateTask_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CreateTaskObject, vectorcall),
    .tp_descr_get = CallSoon_get,
    .tp_members = CreateTask_members,
    .tp_getattro = CreateTask_getattro,
    .tp_getset = CreateTask_getset,
    METHOD_STAND_IN_SLOTS,
};

/* ---- hand-over to another thread ---------------------------------------------------- */
/* Handed (tid, fn): calling it runs fn(*args, **kwargs) with the calling thread marked as
 * doing task tid's work (the propagated route), then restores the previous mark.  What
 * HandOver sends to the other thread; a C object, so the worker runs no extra Python frame
 * per job. */
typedef struct {
    PyObject_HEAD
    uint32_t tid;
    uint32_t from_slot; /* the sending thread's slot in session `session` (0: not known) */
    uint32_t session;
    int to_loop;        /* sent to a loop (call_soon_threadsafe), not to a pool */
    PyObject *fn;
    vectorcallfunc vectorcall;
} HandedObject;

static PyTypeObject HandedType;

static PyObject *handed_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    HandedObject *h = (HandedObject *)self;
    tls_t *t = &tls;
    if (S.has_data && t->session != S.session) tls_enter_session(t);
    if (h->to_loop && S.active) mark_loop_thread(t);
    uint32_t prev = t->handover, prev_from = t->handover_from;
    t->handover_from = h->session == S.session ? h->from_slot : 0;
    set_handover(t, h->tid);
    PyObject *r = PyObject_Vectorcall(h->fn, args, nargsf, kwnames);
    t->handover_from = prev_from;
    set_handover(t, prev);
    return r;
}

static int Handed_traverse(HandedObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->fn);
    return 0;
}

static int Handed_clear(HandedObject *self) {
    Py_CLEAR(self->fn);
    return 0;
}

static void Handed_dealloc(HandedObject *self) {
    PyObject_GC_UnTrack(self);
    Handed_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* As the wrapped callable (uvloop names a failing callback by its repr). */
static PyObject *Handed_repr(HandedObject *self) {
    return PyObject_Repr(self->fn);
}

static PyMemberDef Handed_members[] = {
    {"func", T_OBJECT, offsetof(HandedObject, fn), READONLY, "the wrapped callable"},
    {NULL},
};

/* Pickled (work sent to another process: uvloop takes a process pool as its default
 * executor, and one set before the loop was instrumented cannot be seen), a Handed is
 * functools.partial(fn): in that process it calls fn as it is, with no task to mark. */
static PyObject *Handed_reduce(HandedObject *self, PyObject *noargs) {
    PyObject *functools = PyImport_ImportModule("functools");
    if (functools == NULL) return NULL;
    PyObject *partial = PyObject_GetAttrString(functools, "partial");
    Py_DECREF(functools);
    if (partial == NULL) return NULL;
    return Py_BuildValue("(N(O))", partial, self->fn);
}

static PyMethodDef Handed_methods[] = {
    {"__reduce__", (PyCFunction)Handed_reduce, METH_NOARGS, NULL},
    {NULL},
};

static PyObject *Handed_getattro(PyObject *self, PyObject *name) {
    return stand_in_getattr(self, name, ((HandedObject *)self)->fn);
}

static PyGetSetDef Handed_getset[] = {STAND_IN_GETSET(HandedObject, fn)};

static PyTypeObject HandedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.Handed",
    .tp_basicsize = sizeof(HandedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR("fn, run with this thread marked as doing task tid's work (made by HandOver)."),
    .tp_dealloc = (destructor)Handed_dealloc,
    .tp_traverse = (traverseproc)Handed_traverse,
    .tp_clear = (inquiry)Handed_clear,
    .tp_repr = (reprfunc)Handed_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HandedObject, vectorcall),
    .tp_members = Handed_members,
    .tp_methods = Handed_methods,
    .tp_getattro = Handed_getattro,
    .tp_getset = Handed_getset,
};

/* HandOver(original, kind, pool_type, get_running_loop): an instrumented loop's
 * run_in_executor (kind 0) or call_soon_threadsafe (kind 1), in front of the class's own.
 * Work sent to a thread pool, or a callback sent from another thread, is wrapped in Handed
 * with the id of the task that sent it (the context's tag, else the thread's hand-over). */
typedef struct {
    PyObject_HEAD
    PyObject *orig;
    PyObject *where;
    PyObject *weaklist;
    PyObject *pool_type;
    PyObject *get_running_loop;
    int kind;
    vectorcallfunc vectorcall;
} HandOverObject;

static PyTypeObject HandOverType;

static PyObject *wrap_handed(uint32_t tid, PyObject *fn, int to_loop) {
    HandedObject *h = PyObject_GC_New(HandedObject, &HandedType);
    if (h == NULL) return NULL;
    tls_t *t = &tls;
    if (t->session != S.session) tls_enter_session(t);
    h->tid = tid;
    h->from_slot = thread_slot(t);
    h->session = S.session;
    h->to_loop = to_loop;
    h->fn = Py_NewRef(fn);
    h->vectorcall = handed_vectorcall;
    PyObject_GC_Track(h);
    return (PyObject *)h;
}

/* Call orig with args[pos] replaced by `repl` (the args array is the caller's: copy). */
static PyObject *call_replacing(PyObject *orig, PyObject *const *args, Py_ssize_t n, PyObject *kwnames,
                                Py_ssize_t pos, PyObject *repl) {
    Py_ssize_t total = n + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[9];
    PyObject **buf = total + 1 <= 9 ? small : (PyObject **)PyMem_Malloc((size_t)(total + 1) * sizeof(PyObject *));
    if (buf == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < total; i++) buf[i + 1] = args[i];
    buf[pos + 1] = repl;
    PyObject *r = PyObject_Vectorcall(orig, buf + 1, (size_t)n | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
    if (buf != small) PyMem_Free(buf);
    return r;
}

static PyObject *handover_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    HandOverObject *ho = (HandOverObject *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint32_t tid = 0;
    Py_ssize_t pos = -1;
    loop_entry_t *e = n >= 1 ? loop_entry(args[0]) : NULL;
    if (e == NULL || !e->propagate) {
        /* not ours, or not carrying work across threads */
    } else if (S.active && ho->kind == 0 && n >= 3) {
        /* run_in_executor(loop, executor, func, *args): thread pools only */
        PyObject *ex = args[1];
        int pool = ex == Py_None ? e->default_pool : PyObject_IsInstance(ex, ho->pool_type);
        if (pool < 0) return NULL;
        if (pool) {
            tid = current_tid();
            pos = 2;
        }
    } else if (S.active && ho->kind == 1 && n >= 2) {
        /* call_soon_threadsafe(loop, callback, *args, context=None): from another thread */
        PyObject *running = PyObject_CallNoArgs(ho->get_running_loop);
        if (running == NULL) return NULL;
        int other = running != args[0];
        Py_DECREF(running);
        if (other) {
            PyObject *ctx = NULL;
            for (Py_ssize_t i = 0; kwnames != NULL && i < PyTuple_GET_SIZE(kwnames); i++) {
                if (kw_is_context(PyTuple_GET_ITEM(kwnames, i))) ctx = args[n + i];
            }
            tid = (ctx != NULL && ctx != Py_None && PyContext_CheckExact(ctx)) ? ctx_tag(ctx) : context_tid();
            if (tid == 0) tid = tls.handover;
            pos = 1;
        }
    }
    /* (what is not callable goes as it came, for the loop's own error: in debug mode
     * run_in_executor refuses it at the call, not when the job runs) */
    if (tid == 0 || pos < 0 || !PyCallable_Check(args[pos])) return PyObject_Vectorcall(ho->orig, args, nargsf, kwnames);
    PyObject *wrapped = wrap_handed(tid, args[pos], ho->kind == 1);
    if (wrapped == NULL) return NULL;
    PyObject *r = call_replacing(ho->orig, args, n, kwnames, pos, wrapped);
    Py_DECREF(wrapped);
    return r;
}

static PyObject *HandOver_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *orig, *pool_type, *grl;
    int kind;
    if (!PyArg_ParseTuple(args, "OiOO:HandOver", &orig, &kind, &pool_type, &grl)) return NULL;
    if (kind != 0 && kind != 1) {
        PyErr_SetString(PyExc_ValueError, "kind is 0 (run_in_executor) or 1 (call_soon_threadsafe)");
        return NULL;
    }
    HandOverObject *self = (HandOverObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->orig = Py_NewRef(orig);
    self->pool_type = Py_NewRef(pool_type);
    self->get_running_loop = Py_NewRef(grl);
    self->kind = kind;
    self->vectorcall = handover_vectorcall;
    return (PyObject *)self;
}

static void HandOver_dealloc(HandOverObject *self) {
    if (self->weaklist != NULL) PyObject_ClearWeakRefs((PyObject *)self);
    Py_CLEAR(self->orig);
    Py_CLEAR(self->where);
    Py_CLEAR(self->pool_type);
    Py_CLEAR(self->get_running_loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef HandOver_members[] = {
    {"original", T_OBJECT, offsetof(HandOverObject, orig), READONLY, "the loop class's own method"},
    {NULL},
};

static PyObject *HandOver_getattro(PyObject *self, PyObject *name) {
    return stand_in_getattr(self, name, ((HandOverObject *)self)->orig);
}

static PyGetSetDef HandOver_getset[] = {METHOD_STAND_IN_GETSET(HandOverObject)};

static PyTypeObject HandOverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.HandOver",
    .tp_basicsize = sizeof(HandOverObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = PyDoc_STR("HandOver(original, kind, pool_type, get_running_loop): run_in_executor (0) or "
                        "call_soon_threadsafe (1) carrying the sending task's id to the other thread."),
    .tp_new = HandOver_new,
    .tp_dealloc = (destructor)HandOver_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HandOverObject, vectorcall),
    .tp_descr_get = CallSoon_get,
    .tp_members = HandOver_members,
    .tp_getattro = HandOver_getattro,
    .tp_getset = HandOver_getset,
    METHOD_STAND_IN_SLOTS,
};

static int is_method_stand_in(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    return t == &CallSoonType || t == &ExceptionHookType || t == &CreateTaskType || t == &HandOverType;
}

PyDoc_STRVAR(register_loop_doc,
"register_loop(loop, factory, propagate, default_pool=True)\n--\n\nMark loop as instrumented, with its TaskFactory; propagate: carry\n"
"work across threads; default_pool: run_in_executor(None, ...) runs in a thread pool (not\n"
"where uvloop was given a process pool as its default executor: nothing unpicklable may go\n"
"there).  Registering a loop again updates its entry.");

static PyObject *core_register_loop(PyObject *m, PyObject *args) {
    PyObject *loop, *factory;
    int propagate, default_pool = 1;
    if (!PyArg_ParseTuple(args, "OO!p|p", &loop, &FactoryType, &factory, &propagate, &default_pool)) return NULL;
    loop_entry_t *e = loop_entry(loop);
    if (e == NULL) {
        if (grow_array((void **)&LR.v, &LR.cap, sizeof(loop_entry_t), LR.n + 1) < 0) return PyErr_NoMemory();
        e = &LR.v[LR.n++];
        e->loop = (uintptr_t)loop;
        e->factory = NULL;
    }
    PyObject *old = (PyObject *)e->factory;
    e->factory = (FactoryObject *)Py_NewRef(factory);
    e->propagate = propagate;
    e->default_pool = default_pool;
    Py_XDECREF(old);
    learn_states_from_futures(loop);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(unregister_loop_doc,
"unregister_loop(loop_id)\n--\n\nForget the loop whose id() is loop_id (it may be gone already).");

static PyObject *core_unregister_loop(PyObject *m, PyObject *arg) {
    uintptr_t addr = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (addr == 0 && PyErr_Occurred()) return NULL;
    for (uint32_t i = 0; i < LR.n; i++) {
        if (LR.v[i].loop != addr) continue;
        PyObject *f = (PyObject *)LR.v[i].factory;
        LR.v[i] = LR.v[--LR.n];
        Py_DECREF(f); /* last: this may run arbitrary code */
        break;
    }
    Py_RETURN_NONE;
}

/* ---- reading and maintaining records (Python side: tracker.py) ---------------------- */
PyDoc_STRVAR(configure_doc,
"configure(labels_var, task_type, namers=())\n--\n\nThe LABELS ContextVar and asyncio.Task (once, at import); namers: up to 8\n"
"(function, kind) pairs for asyncio's functions that make tasks through the loop, kind\n"
"saying what they do about the name next: \"name\" (they set their argument `name`),\n"
"\"never\", or \"through\" (they return the task to their caller).  Used on 3.12 only.");

static PyObject *core_configure(PyObject *m, PyObject *args) {
    PyObject *labels_var, *task_type, *namers = NULL;
    if (!PyArg_ParseTuple(args, "OO!|O!", &labels_var, &PyType_Type, &task_type, &PyTuple_Type, &namers)) return NULL;
    /* (a legacy sub-interpreter gets a copy of this module, made in the main one on 3.13) */
    if (main_interpreter_only("it cannot be imported in") < 0) return NULL;
    if (!PyContextVar_CheckExact(labels_var)) {
        PyErr_SetString(PyExc_TypeError, "labels_var must be a contextvars.ContextVar");
        return NULL;
    }
    Py_XSETREF(G.labels_var, Py_NewRef(labels_var));
    if (task_type != G.task_type) { /* the getters and the state's place are this type's */
        G.state_get = NULL;
        G.exc_get = NULL;
        G.state_off = 0;
        G.state_cands = 0;
        memset(G.state_seen, 0, sizeof(G.state_seen));
    }
    Py_XSETREF(G.task_type, Py_NewRef(task_type));
    /* its C getters, so a task's end reads its state without an attribute lookup (3.11,
     * where no watcher sees ends, too) */
    if (G.state_get == NULL) {
        find_getter(G.s_state, &G.state_get, &G.state_closure);
        find_getter(G.s_exception, &G.exc_get, &G.exc_closure);
    }
#ifdef MS_LATE_NAMES
    for (int i = 0; i < G.nnamers; i++) Py_CLEAR(G.namer_code[i]);
    G.nnamers = 0;
    Py_ssize_t n = namers != NULL ? PyTuple_GET_SIZE(namers) : 0;
    for (Py_ssize_t i = 0; i < n && G.nnamers < NAMERS_MAX; i++) {
        /* (function, "name" | "never" | "through"); "name": `name` must be a plain local,
         * an argument and not a cell (its slot would then hold a cell) */
        PyObject *item = PyTuple_GET_ITEM(namers, i), *code = NULL, *names = NULL, *cells = NULL;
        const char *kind = NULL;
        Py_ssize_t slot = NAMER_UNUSABLE;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2 && PyUnicode_Check(PyTuple_GET_ITEM(item, 1)))
            kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 1));
        if (kind != NULL) code = PyObject_GetAttrString(PyTuple_GET_ITEM(item, 0), "__code__");
        if (code != NULL && PyCode_Check(code)) {
            if (strcmp(kind, "never") == 0) {
                slot = NAMER_NEVER;
            } else if (strcmp(kind, "through") == 0) {
                slot = NAMER_THROUGH;
            } else if (strcmp(kind, "name") == 0 && (names = PyObject_GetAttrString(code, "co_varnames")) != NULL &&
                       (cells = PyObject_GetAttrString(code, "co_cellvars")) != NULL && PyTuple_Check(names) &&
                       PyTuple_Check(cells)) {
                PyCodeObject *co = (PyCodeObject *)code;
                int is_cell = 0;
                for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(cells); j++)
                    is_cell |= PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(cells, j), "name") == 0;
                for (Py_ssize_t j = 0; !is_cell && j < PyTuple_GET_SIZE(names) && j < co->co_argcount + co->co_kwonlyargcount; j++) {
                    if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(names, j), "name") == 0) slot = j;
                }
            }
        }
        PyErr_Clear();
        if (slot != NAMER_UNUSABLE) { /* (only ever set with a code object in hand) */
            G.namer_code[G.nnamers] = Py_NewRef(code);
            G.namer_slot[G.nnamers++] = slot;
        }
        Py_XDECREF(code);
        Py_XDECREF(names);
        Py_XDECREF(cells);
    }
#else
    (void)namers;
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(labels_in_use_doc,
"labels_in_use()\n--\n\n_LABELS is about to be set (labels(), the only setter, calls this first): from\n"
"now on every new task reads it.  Until then it holds its default everywhere, and task\n"
"creation skips the read (a ContextVar that was never set misses its cache).");

static PyObject *core_labels_in_use(PyObject *m, PyObject *noargs) {
    G.labels_used = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(unrecorded_doc,
"unrecorded(fn, *args) -> fn(*args)\n--\n\nCall fn with this thread's allocations left out of the books (our own\n"
"bookkeeping objects that records keep alive, e.g. a task's labels mapping).");

/* ---- labels the records keep ------------------------------------------------------------
 * A record keeps its task's labels, a mapping made under the guard (our bookkeeping, not
 * the task's memory).  Made under the guard is not enough: a dict and its keys table come
 * from CPython's free lists when there is one to take, and those were freed there by a
 * task, whose block it still is in our tables.  Kept by a record, it stayed that task's
 * "live" bytes for good (~180 bytes a labelled task: each one a leak suspect, and none
 * could fold).  So the blocks of the mapping we keep are credited to their owner as freed
 * now, and its strs are our own copies (a label value the task made stays the task's). */
static void disown_block(void *p) {
    if (p == NULL || !S.active) return;
    int g = tls.guard;
    tls.guard = 1;
    record_free(p, S.mode);
    tls.guard = g;
}

PyDoc_STRVAR(own_labels_doc,
"own_labels(labels: dict) -> mappingproxy\n--\n\nA read-only copy of labels that is the profiler's own: no block of it is\n"
"counted as any task's (see disown_block).");

static PyObject *core_own_labels(PyObject *m, PyObject *src) {
    if (!PyDict_Check(src)) {
        PyErr_SetString(PyExc_TypeError, "own_labels() takes a dict");
        return NULL;
    }
    int g = tls.guard;
    tls.guard = 1;
    PyObject *d = PyDict_New(), *out = NULL, *k, *v;
    Py_ssize_t pos = 0;
    while (d != NULL && PyDict_Next(src, &pos, &k, &v)) {
        PyObject *ck = own_str(k), *cv = ck != NULL ? own_str(v) : NULL;
        int rc = cv != NULL ? PyDict_SetItem(d, ck, cv) : -1;
        Py_XDECREF(ck);
        Py_XDECREF(cv);
        if (rc < 0) Py_CLEAR(d);
    }
    if (d != NULL) {
        /* a dict's block starts at its GC header (two words, before the object; no other
         * pre-header for dicts on 3.11-3.13, none at all on a free-threaded build); its
         * keys table is a block of its own */
#ifndef Py_GIL_DISABLED
        disown_block((char *)d - 2 * sizeof(void *));
#endif
        disown_block(((PyDictObject *)d)->ma_keys);
        out = PyDictProxy_New(d);
        Py_DECREF(d);
    }
    tls.guard = g;
    return out;
}

static PyObject *core_unrecorded(PyObject *m, PyObject *const *args, Py_ssize_t n) {
    if (n < 1) {
        PyErr_SetString(PyExc_TypeError, "unrecorded(fn, *args)");
        return NULL;
    }
    tls_t *t = &tls;
    int g = t->guard;
    t->guard = 1;
    PyObject *r = PyObject_Vectorcall(args[0], args + 1, (size_t)(n - 1), NULL);
    t->guard = g;
    return r;
}

PyDoc_STRVAR(set_fold_hook_doc,
"set_fold_hook(hook, at)\n--\n\nCall hook() when more than `at` finished tasks wait to be folded (None: never).");

static PyObject *core_set_fold_hook(PyObject *m, PyObject *args) {
    PyObject *hook;
    unsigned long long at;
    if (!PyArg_ParseTuple(args, "OK", &hook, &at)) return NULL;
    Py_XSETREF(G.fold_hook, hook == Py_None ? NULL : Py_NewRef(hook));
    G.fold_at = at;
    Py_RETURN_NONE;
}

static const char *state_names[] = {"pending", "done", "cancelled", "failed"};

PyDoc_STRVAR(records_doc,
"records() -> list[tuple]\n--\n\nOne row per task record: (tid, parent_id, coro, name, labels, thread_id,\n"
"loop_serial, home_slot, created_ns, finished_ns, state, via_factory, cross_thread_parent, obj_id,\n"
"up, folded_tasks, folded_alloc_bytes, folded_allocs, code): up is the nearest ancestor with a record\n"
"(None: none), the folded_* sum the tasks folded away below this one, and code is the\n"
"coroutine's code object (None if not a coroutine).");

static PyObject *core_records(PyObject *m, PyObject *noargs) {
    late_names_flush(0);
    int g = tls.guard;
    tls.guard = 1;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 1; out != NULL && i < S.ntasks; i++) {
        task_info_t *r = &S.tasks[i];
        if (!r->in_use || !(r->flags & TF_REGISTERED)) continue;
        PyObject *parent = r->parent ? PyLong_FromUnsignedLong(r->parent) : Py_NewRef(Py_None);
        PyObject *fin = (r->flags & TF_FINISHED) ? PyLong_FromUnsignedLongLong(r->finished_ns) : Py_NewRef(Py_None);
        if (r->name == NULL && r->name_num != 0) { /* a default name, as get_name() formats it */
            PyObject *s = PyUnicode_FromFormat("Task-%llu", (unsigned long long)(r->name_num - 1));
            if (s != NULL) {
                r->name = s;
                r->name_num = 0;
            }
            else PyErr_Clear();
        }
        PyObject *row = NULL;
        if (parent != NULL && fin != NULL)
            row = Py_BuildValue("(kOOOOkkkKOsOONNkLdO)", (unsigned long)r->tid, parent, r->coro ? r->coro : Py_None,
                                r->name ? r->name : Py_None, r->labels ? r->labels : Py_None, r->thread_ident,
                                (unsigned long)r->loop_serial, (unsigned long)r->home_slot,
                                (unsigned long long)r->created_ns, fin, state_names[r->state & 3],
                                (r->flags & TF_VIA_FACTORY) ? Py_True : Py_False,
                                (r->flags & TF_CROSS_PARENT) ? Py_True : Py_False, PyLong_FromSize_t(r->obj),
                                r->up ? PyLong_FromUnsignedLong(S.tasks[r->up].tid) : Py_NewRef(Py_None),
                                (unsigned long)r->sub_tasks, (long long)r->sub_alloc_bytes, r->sub_allocs,
                                r->code ? r->code : Py_None);
        Py_XDECREF(parent);
        Py_XDECREF(fin);
        if (row == NULL || PyList_Append(out, row) < 0) Py_CLEAR(out);
        Py_XDECREF(row);
    }
    tls.guard = g;
    return out;
}

typedef struct {
    int64_t alloc_bytes;
    uint32_t tid;
    uint32_t pos; /* its index in S.finished */
} fold_cand_t;

/* fold_cand_t.tid of a folded task that owned sites (ids are 31-bit, see register_task) */
#define CAND_SITES (UINT32_C(1) << 31)

/* a < b (a folds first): fewer bytes first, then the newer task (ties are common: tasks
 * alike allocate alike, and a sampled task is often charged nothing; the newer folds first
 * so that a task that allocated no more than every kept one can fold as it finishes, see
 * fold_at_finish).  Written without branches: the selection below runs over every waiting
 * finished task on each pass, and its comparisons are coin flips for the branch
 * predictor. */
static inline int fold_cand_less(fold_cand_t a, fold_cand_t b) {
    return (a.alloc_bytes < b.alloc_bytes) | ((a.alloc_bytes == b.alloc_bytes) & (a.tid > b.tid));
}

/* Reorder a[0..n) so that its k smallest (by fold_cand_less) come first, in O(n) on
 * average: quickselect, the pivot the median of three taken at random places (the finish
 * order has long runs that are sorted one way or the other: picked at fixed places, a
 * tree of eager tasks made the median nearly the least again and again, ~80 ms a pass),
 * each partition a branchless Lomuto pass (every element is swapped with the boundary
 * one; the boundary moves on when the element is smaller than the pivot: both elements
 * are then on their right sides). */
static void select_smallest(fold_cand_t *a, uint32_t n, uint32_t k) {
    uint32_t lo = 0, hi = n; /* a[..lo) <= a[lo..hi) <= a[hi..), and lo <= k < hi */
    uint64_t rs = 0x9E3779B97F4A7C15u ^ n;
    while (lo < k && k < hi && hi - lo > 1) {
        uint32_t span = hi - lo, three[3];
        for (int j = 0; j < 3; j++) { /* xorshift64: a fixed sequence, so a pass is repeatable */
            rs ^= rs << 13;
            rs ^= rs >> 7;
            rs ^= rs << 17;
            three[j] = lo + (uint32_t)((rs >> 32) * span >> 32);
        }
        uint32_t x = three[0], y = three[1], z = three[2], p;
        if (fold_cand_less(a[x], a[y]))
            p = fold_cand_less(a[y], a[z]) ? y : (fold_cand_less(a[x], a[z]) ? z : x);
        else
            p = fold_cand_less(a[x], a[z]) ? x : (fold_cand_less(a[y], a[z]) ? z : y);
        fold_cand_t pivot = a[p];
        uint32_t lt = lo;
        for (uint32_t i = lo; i < hi; i++) {
            fold_cand_t x = a[i];
            uint32_t smaller = (uint32_t)fold_cand_less(x, pivot);
            a[i] = a[lt];
            a[lt] = x;
            lt += smaller;
        }
        if (lt == lo) { /* nothing below the pivot: it is the least; put it first */
            for (uint32_t i = lo; i < hi; i++) {
                if (!fold_cand_less(pivot, a[i]) && !fold_cand_less(a[i], pivot)) {
                    fold_cand_t t = a[i]; /* swapped, not overwritten: equal is not the same */
                    a[i] = a[lo];
                    a[lo] = t;
                    break;
                }
            }
            lo++;
        } else if (k < lt) {
            hi = lt;
        } else {
            lo = lt;
        }
    }
}

#define FOLD_SCRATCH_UNIT (sizeof(int64_t) + 2 * sizeof(uint32_t)) /* a value, a tid, a group */

typedef struct {
    PyObject *coro, *labels, *code; /* owned: a folded record drops its own */
    uint32_t n;              /* tasks folded into it */
    uint32_t off;            /* where its tasks start in the pass's values and tids */
    uint32_t nsites;         /* of those, the ones with sites (TF_SITES): their tids */
    double allocs;
} fold_group_t;

/* Drop the zeroed (folded or stale) ids from the finished queue; returns how many remain. */
static uint32_t compact_finished(void) {
    uint32_t keep = 0;
    for (uint32_t i = 0; i < S.nfinished; i++) {
        uint32_t tid = S.finished[i];
        if (tid != 0) S.finished[keep++] = tid;
    }
    S.nfinished = keep;
    return keep;
}

PyDoc_STRVAR(fold_doc,
"fold(keep, scan=True) -> (remaining, groups)\n--\n\nHand the tasks folded as they finished to their groups, and with scan, forget\n"
"finished tasks that hold no live allocation, those that allocated least first (the newer\n"
"of equals first), until at most `keep` of them remain (those holding memory all stay).\n"
"remaining: the finished tasks still waiting.  groups:\n"
"one row per (coro, labels, code) folded, (coro, labels, allocated_bytes: bytes of int64 per\n"
"task, allocations, tids: bytes of uint32, one per task that owns stack-sample sites,\n"
"sum of allocated_bytes, largest of them, the coroutine's code object or None).");

/* The group of (coro, labels) in groups[0..*ngroups), made if new (room was made for it);
 * *last: the one found the time before, tried first. */
static uint32_t fold_group_of(fold_group_t *groups, uint32_t *ngroups, uint32_t *last, PyObject *coro,
                              PyObject *labels, PyObject *code) {
    uint32_t gi = *last;
    if (gi < *ngroups && groups[gi].coro == coro && groups[gi].labels == labels && groups[gi].code == code) return gi;
    for (gi = 0; gi < *ngroups; gi++)
        if (groups[gi].coro == coro && groups[gi].labels == labels && groups[gi].code == code) break;
    if (gi == *ngroups) {
        memset(&groups[gi], 0, sizeof(fold_group_t));
        groups[gi].coro = Py_XNewRef(coro);
        groups[gi].labels = Py_XNewRef(labels);
        groups[gi].code = Py_XNewRef(code);
        (*ngroups)++;
    }
    *last = gi;
    return gi;
}

static PyObject *fold_now(Py_ssize_t keep, int scan);

static PyObject *core_fold(PyObject *m, PyObject *args) {
    Py_ssize_t keep;
    int scan = 1;
    if (!PyArg_ParseTuple(args, "n|p:fold", &keep, &scan)) return NULL;
    if (keep < 0) keep = 0;
    if (!S.has_data) return Py_BuildValue("(n[])", (Py_ssize_t)0);
    /* A call nested in another (code run by a reference it drops, or by the collector)
     * would reuse its work space under it: it folds nothing. */
    if (S.fold_busy) return Py_BuildValue("(I[])", (unsigned int)S.nfinished);
    S.fold_busy = 1;
    /* a pass first lets go of the code objects only our stack samples held: what they
     * took is freed, so the tasks that made them can fold (if memory for it cannot be had,
     * they stay: the pass goes on) */
    if (scan && settle_as_nobody() < 0) PyErr_Clear();
    PyObject *out = fold_now(keep, scan);
    S.fold_busy = 0;
    return out;
}

static PyObject *fold_now(Py_ssize_t keep, int scan) {
    /* One look at each waiting record: the stale ids (none expected: only folding
     * releases a finished record) are zeroed, those holding nothing live are candidates;
     * the ids folded below are zeroed through their positions, and one pass compacts. */
    uint32_t n = scan ? S.nfinished : 0, nc = 0, ne = S.nearly;
    if (grow_array(&S.fold_cand, &S.capfold_cand, sizeof(fold_cand_t), n ? n : 1) < 0) return PyErr_NoMemory();
    fold_cand_t *cand = (fold_cand_t *)S.fold_cand;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t tid = S.finished[i], ti;
        if (!task_registered(tid, &ti) || !(S.tasks[ti].flags & TF_FINISHED)) {
            S.finished[i] = 0;
            continue;
        }
        int64_t ab, le;
        task_totals(ti, &ab, NULL, &le);
        if (le == 0) {
            cand[nc].alloc_bytes = ab;
            cand[nc].tid = tid;
            cand[nc].pos = i;
            nc++;
        }
    }
    /* The candidates beyond `keep` go.  Those holding memory stay, but do not take a
     * candidate's place: a task whose step's last objects are still alive when a pass
     * comes (a done callback queued, a result not yet read) would otherwise make the pass
     * fold tasks that allocated more, and be the one kept once its objects are gone. */
    uint32_t excess = 0;
    if (scan && (Py_ssize_t)nc > keep)
        excess = nc - (uint32_t)keep;
    else if (scan)
        S.fold_armed = 0; /* room for more: each finished task waits to be counted again */
    if (excess == 0 && ne == 0) return Py_BuildValue("(I[])", (unsigned int)compact_finished());
    int g = tls.guard;
    tls.guard = 1;
    PyObject *out = NULL;
    fold_group_t *groups = NULL;
    uint32_t ngroups = 0, total = excess + ne;
    /* Room for every task this call may fold (values, tids, and the early ones' groups)
     * and for as many groups, taken before any record is released: nothing can fail after
     * one is gone (untouched pages cost nothing). */
    if (grow_array(&S.fold_scratch, &S.capfold_scratch, FOLD_SCRATCH_UNIT, total) < 0 ||
        grow_array(&S.fold_groups, &S.capfold_groups, sizeof(fold_group_t), total) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    char *scratch = (char *)S.fold_scratch;
    groups = (fold_group_t *)S.fold_groups;
    int64_t *values = (int64_t *)scratch;
    uint32_t *tids = (uint32_t *)(scratch + (size_t)total * sizeof(int64_t));
    uint32_t *early_group = tids + total;
    if (excess) {
        if (excess < nc) select_smallest(cand, nc, excess);
        /* From now on a task that finishes with nothing live and allocated no more than
         * every candidate kept here folds at once (fold_at_finish): the next pass would
         * fold it first.  Kept none: every finished task that can fold goes. */
        int64_t floor = INT64_MAX;
        for (uint32_t k = excess; k < nc; k++)
            if (cand[k].alloc_bytes < floor) floor = cand[k].alloc_bytes;
        S.fold_floor = floor;
        S.fold_armed = 1;
    }
    /* Fold each chosen task; cand[k] then keeps its group (in pos) and its bytes, or
     * UINT32_MAX in pos if it stayed. */
    uint32_t last = 0;
    for (uint32_t k = 0; k < excess; k++) {
        uint32_t ti, pos = cand[k].pos;
        cand[k].pos = UINT32_MAX;
        if (!task_registered(cand[k].tid, &ti)) continue;
        task_info_t *r = &S.tasks[ti];
        uint32_t gi = fold_group_of(groups, &ngroups, &last, r->coro, r->labels, r->code);
        int64_t ab, le;
        double na;
        task_totals(ti, &ab, &na, &le);
        if (le != 0) continue; /* (cannot happen: our own allocations are not recorded) */
        int sites = (r->flags & TF_SITES) != 0;
        release_slot(cand[k].tid, ti, 1, ab, na);
        /* (a labels mapping freed just now can run a __del__ that makes tasks; a fold
         * call nested in it folds nothing, but the queue is checked, not trusted) */
        if (pos < S.nfinished && S.finished[pos] == cand[k].tid) S.finished[pos] = 0;
        if (sites) cand[k].tid |= CAND_SITES; /* the record is gone: the bit is free */
        cand[k].pos = gi;
        cand[k].alloc_bytes = ab;
        groups[gi].n++;
        groups[gi].allocs += na;
    }
    /* Those folded as they finished: their records are gone already.  The buffer is taken
     * over first (a reference dropped here can run code that finishes tasks). */
    folded_early_t *early = S.early;
    uint32_t capearly = S.capearly;
    S.early = S.early_spare;
    S.capearly = S.capearly_spare;
    S.early_spare = NULL;
    S.capearly_spare = 0;
    S.nearly = 0;
    for (uint32_t j = 0; j < ne; j++) {
        uint32_t gi = fold_group_of(groups, &ngroups, &last, early[j].coro, early[j].labels, early[j].code);
        early_group[j] = gi;
        groups[gi].n++;
        groups[gi].allocs += early[j].allocs;
    }
    /* Each group's tasks side by side, in the order they were folded: one block for all. */
    for (uint32_t gi = 0, off = 0; gi < ngroups; gi++) {
        groups[gi].off = off;
        off += groups[gi].n;
        groups[gi].n = 0;
    }
    /* the tids go only for tasks that own sites (a pass folds thousands, few of them
     * ever sampled): fold_sites hands those sites to the group */
    for (uint32_t k = 0; k < excess; k++) {
        if (cand[k].pos == UINT32_MAX) continue;
        fold_group_t *fg = &groups[cand[k].pos];
        values[fg->off + fg->n] = cand[k].alloc_bytes;
        if (cand[k].tid & CAND_SITES) tids[fg->off + fg->nsites++] = cand[k].tid & ~CAND_SITES;
        fg->n++;
    }
    for (uint32_t j = 0; j < ne; j++) {
        fold_group_t *fg = &groups[early_group[j]];
        values[fg->off + fg->n] = early[j].alloc_bytes;
        if (early[j].sites) tids[fg->off + fg->nsites++] = early[j].tid;
        fg->n++;
    }
    for (uint32_t j = 0; j < ne; j++) { /* the groups hold their own references */
        Py_XDECREF(early[j].coro);
        Py_XDECREF(early[j].labels);
        Py_XDECREF(early[j].code);
    }
    if (S.early_spare == NULL) { /* the buffer comes round again (a nested call takes none) */
        S.early_spare = early;
        S.capearly_spare = capearly;
    } else {
        sysmem_free(early);
    }
    PyObject *list = PyList_New(0);
    for (uint32_t gi = 0; list != NULL && gi < ngroups; gi++) {
        fold_group_t *fg = &groups[gi];
        if (fg->n == 0) continue;
        long long total = 0, largest = 0;
        for (uint32_t k = 0; k < fg->n; k++) {
            total += values[fg->off + k];
            if (values[fg->off + k] > largest) largest = values[fg->off + k];
        }
        PyObject *row = Py_BuildValue("(OOy#dy#LLO)", fg->coro ? fg->coro : Py_None, fg->labels ? fg->labels : Py_None,
                                      (const char *)(values + fg->off), (Py_ssize_t)fg->n * (Py_ssize_t)sizeof(int64_t),
                                      fg->allocs, (const char *)(tids + fg->off),
                                      (Py_ssize_t)fg->nsites * (Py_ssize_t)sizeof(uint32_t), total, largest,
                                      fg->code ? fg->code : Py_None);
        if (row == NULL || PyList_Append(list, row) < 0) Py_CLEAR(list);
        Py_XDECREF(row);
    }
    if (list != NULL) out = Py_BuildValue("(IN)", (unsigned int)compact_finished(), list);
done:
    for (uint32_t gi = 0; gi < ngroups; gi++) {
        Py_XDECREF(groups[gi].coro);
        Py_XDECREF(groups[gi].labels);
        Py_XDECREF(groups[gi].code);
    }
    tls.guard = g;
    return out;
}

PyDoc_STRVAR(task_layout_doc,
"task_layout() -> dict\n--\n\nWhere a C Task's name and state are read from: their offsets in the\n"
"struct once learnt, 0 while learning, -1 where they are asked of the task instead.");

static PyObject *core_task_layout(PyObject *m, PyObject *noargs) {
    return Py_BuildValue("{s:n,s:n}", "name_offset", G.name_off, "state_offset", G.state_off);
}

PyDoc_STRVAR(tid_of_doc, "tid_of(task) -> int\n--\n\nThe record id of a task not finished yet, 0 if unknown.");

static PyObject *core_tid_of(PyObject *m, PyObject *task) {
    uint32_t tid = 0;
    if (S.has_data && !u64map_get(&S.obj_index, (uint64_t)(uintptr_t)task, &tid)) tid = 0;
    return PyLong_FromUnsignedLong(tid);
}

PyDoc_STRVAR(task_labels_doc, "task_labels(tid) -> mapping | None\n--\n\nThe labels recorded for a task.");

static PyObject *core_task_labels(PyObject *m, PyObject *arg) {
    unsigned long tid;
    uint32_t ti;
    if (parse_tid(arg, &tid) < 0) return NULL;
    if (!S.has_data || !task_registered((uint32_t)tid, &ti) || S.tasks[ti].labels == NULL) Py_RETURN_NONE;
    return Py_NewRef(S.tasks[ti].labels);
}

PyDoc_STRVAR(set_task_labels_doc, "set_task_labels(tid, labels)\n--\n\nReplace the labels recorded for a task.");

static PyObject *core_set_task_labels(PyObject *m, PyObject *args) {
    unsigned long tid;
    PyObject *labels;
    uint32_t ti;
    if (!PyArg_ParseTuple(args, "kO", &tid, &labels)) return NULL;
    if (S.has_data && task_registered((uint32_t)tid, &ti))
        Py_XSETREF(S.tasks[ti].labels, labels == Py_None ? NULL : Py_NewRef(labels));
    Py_RETURN_NONE;
}
