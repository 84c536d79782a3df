/* memscope_async.attribution._core: the allocator hooks and per-tag accounting.
 *
 * Decisions live in Python; this file only counts.  While started, it replaces the
 * PYMEM_DOMAIN_OBJ and PYMEM_DOMAIN_MEM allocators (both are called with the GIL held) by
 * wrappers that call the original allocator and then record the allocation:
 *
 *   tag   -> the Tag object found in a ContextVar (read with PyContextVar_Get, which
 *            is a cached, allocation-free read); Python code puts a Tag into every task's
 *            context.  No tag means "unattributed", kept per thread.
 *   cell  -> (task id, thread slot, route, phase): the unit of accounting.  Routes tell
 *            how the tag reached the thread: through the context, handed over by one of
 *            our wrappers, or inferred from the thread's start.
 *   entry -> pointer -> (size, cell) in an open-addressing table, so a free finds the cell.
 *
 * Rules for the hook path: no Python code runs (no object is created, no refcount drops
 * to zero), a thread-local re-entrancy guard skips allocations we cause ourselves, and all
 * our memory is mapped from the kernel (_sysmem.h), never taken from the program's heap.
 * Design notes: README.md, "How it works".
 *
 * Reference ownership: every function exposed to Python returns a new reference or NULL
 * with an exception set; arguments are borrowed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <time.h>

#include <structmember.h>

#include "_ptrmap.h"
#include "_shadow.h"
#include "_sysmem.h"
#include "_tstate.h"
#include "_u64map.h"

#if PY_VERSION_HEX >= 0x030C0000
#define PyErr_GetRaisedException_compat PyErr_GetRaisedException
#define PyErr_SetRaisedException_compat PyErr_SetRaisedException
#else
static inline PyObject *PyErr_GetRaisedException_compat(void) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL) PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}
static inline void PyErr_SetRaisedException_compat(PyObject *v) {
    if (v == NULL) return;
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(v)), v, PyException_GetTraceback(v));
}
#endif

/* The value of our ContextVar in a task's context.  Besides the task id it carries two
 * hints that spare the allocator hooks' slow path two index lookups at each of the task's
 * steps (with tens of thousands of tasks alive, each is a cache miss: perf on a task tree
 * put them at ~70% of that path): where the task's record is, and its own cell on its
 * home thread.  Record slots and cells are reused once a task is folded, so both are
 * checked before use (tag_record, tag_cell), and 0 means "not known". */
typedef struct {
    PyObject_HEAD
    uint32_t tid;
    uint32_t ti;   /* tasks[] slot of record tid, as register_task made it */
    uint32_t cell : 31; /* the task's cell (tid, home slot, context route), once it has one */
    uint32_t shared : 1; /* the context holding it is another live task's too (see shared_tid) */
    uint32_t ours : 1; /* made by tag_alloc, outside the hooks' accounting: may go to tag_pool */
    uint32_t up : 31;  /* id of the task's record's up (link_record) when it was made, 0 if
                        * none: a task made in this context after the task's own record was
                        * folded joins the tree there (ids are 31-bit) */
} TagObject;

static PyTypeObject TagType;

/* Tags whose contexts are gone, kept for the next tasks (a task's Tag lives as long as its
 * context: on a task tree most are made and freed in bursts, and the allocation through
 * our hooks and pymalloc and back cost ~170 instructions a task).  The GIL guards it. */
#define TAG_POOL_MAX 256
static TagObject *tag_pool[TAG_POOL_MAX];
static int tag_pooled;

static TagObject *tag_alloc(void) {
    if (tag_pooled > 0) {
        TagObject *tag = tag_pool[--tag_pooled];
        (void)PyObject_Init((PyObject *)tag, &TagType);
        return tag;
    }
    TagObject *tag = PyObject_New(TagObject, &TagType);
    if (tag != NULL) tag->ours = 1;
    return tag;
}

static void Tag_dealloc(PyObject *self) {
    if (tag_pooled < TAG_POOL_MAX && ((TagObject *)self)->ours) {
        tag_pool[tag_pooled++] = (TagObject *)self;
        return;
    }
    Py_TYPE(self)->tp_free(self);
}

/* ---- routes (keep in sync with attribution/routes.py) --------------------------------- */
enum {
    ROUTE_CONTEXT = 0,  /* tag read from the running context, no hand-over seen */
    ROUTE_HANDED = 1,   /* our wrappers handed the task's work to this thread */
    ROUTE_INFERRED = 2, /* no context: the thread was started during the task's step */
};
#define INFERRED_PHASES 4 /* phase >= this: the inference has decayed to nothing */
_Static_assert(INFERRED_PHASES == 4, "core_threads() builds a tuple of 4 phases");

enum { MODE_EXACT = 0, MODE_SAMPLED = 1 };

/* ---- state --------------------------------------------------------------------------- */
typedef struct cell {
    uint64_t key;          /* packed (tid, slot, route, phase) */
    uint32_t tinfo;        /* index into tasks[] (0 for unattributed) */
    uint32_t track_time;   /* 1 if this cell is a migration (record last_ns) */
    struct task_info *task; /* &tasks[tinfo], NULL for unattributed (kept when tasks[] moves) */
    int64_t alloc_bytes;
    int64_t allocs;        /* counts are fixed point: COUNT_ONE per allocation */
    int64_t freed_bytes;
    int64_t frees;
    int64_t live_entries;  /* pointer-table entries naming this cell (exact count) */
    int64_t cross_free_bytes;
    int64_t cross_frees;
    uint64_t first_ns;     /* migrations (track_time) only: 0 on a task's own cell */
    uint64_t last_ns;
    uint32_t next_in_task;  /* next cell of the same task, 0 = end */
    uint32_t indexed : 1;   /* in cell_index (a task's home cell is found through its Tag) */
    uint32_t origin : 31;   /* handed-over work: the sending thread's slot, 0 unknown, ORIGIN_MIXED */
} cell_t;

#define ORIGIN_MIXED 0x7FFFFFFFu /* handed over from more than one thread */

typedef struct task_info {
    uint32_t tid;
    uint32_t home_slot;
    int64_t live_bytes;     /* running, for the peak; the other totals: task_totals() */
    int64_t peak_live_bytes;
    uint32_t first_cell;    /* head of the task's cell chain */
    uint32_t in_use;
    /* What the loop hooks registered (see _tasks.h); all zero/NULL for a bare slot. */
    uint32_t parent;        /* parent task id, 0 = none */
    uint32_t flags;         /* TF_* */
    uint32_t loop_serial;
    uint32_t state;         /* TS_* */
    unsigned long thread_ident;
    uint64_t created_ns;
    uint64_t finished_ns;
    uintptr_t obj;          /* id() of the task object (never dereferenced) */
    uintptr_t ctx;          /* id() of the context it was created with */
    PyObject *coro;         /* str: the coroutine's qualified name, or NULL */
    PyObject *code;         /* its code object (which function it is: groups), or NULL */
    PyObject *name;         /* str: the task's name when it finished (a copy: keep_name), or NULL */
    uint64_t name_num;      /* or n + 1 for the default name "Task-<n>" (3.12+: n is all a Task keeps) */
    PyObject *labels;       /* the labels mapping in effect at creation, or NULL */
    /* The tree of records, for subtrees that outlive folding (see link_record): up is the
     * slot of the nearest registered ancestor (the parent's, while it has a record), 0 =
     * none; a record's children by up are a list (first_child, next_sib, prev_sib:
     * slots).  A record folded away adds its own totals and its sub_* to its up's
     * sub_*: the tasks folded under this one, their allocated bytes (freed all: a folded
     * task holds nothing live) and allocations. */
    uint32_t up, first_child, next_sib, prev_sib;
    uint32_t sub_tasks;
    int64_t sub_alloc_bytes;
    double sub_allocs;
} task_info_t;

/* A task folded as it finished, before the fold call that hands it to its group. */
typedef struct {
    PyObject *coro, *labels, *code; /* owned (the record's, which is gone) */
    int64_t alloc_bytes;
    double allocs;
    uint32_t tid;
    uint32_t sites;          /* it had TF_SITES */
} folded_early_t;

enum { TF_REGISTERED = 1, TF_VIA_FACTORY = 2, TF_CROSS_PARENT = 4, TF_FINISHED = 8,
       TF_SITES = 32, TF_UNCOUNTED_SHIFT = 8, TF_UNCOUNTED = 15 << TF_UNCOUNTED_SHIFT };
/* task_info_t.flags.  TF_SITES: a stack sample named it, so it owns sites that go to its
 * group when it folds.  TF_UNCOUNTED: how many of its tag mapping's objects were taken off
 * the collector's count (gc_uncount), 0 to 8. */
enum { TS_PENDING = 0, TS_DONE = 1, TS_CANCELLED = 2, TS_FAILED = 3 };                /* task_info_t.state */

typedef struct {
    unsigned long ident;
    unsigned long native_id;
    uint32_t inferred_tid;   /* task that started this thread, if we saw it */
    uint32_t shared;         /* the thread has run another task's context since */
    uint32_t owner_done;     /* the starting task has finished */
    uint64_t inferred_start_ns;
    /* what the cells of tasks folded since (release_slot) had charged to this thread,
     * which the report's threads still count: bytes, allocations (COUNT_ONE), and whether
     * one of them was a folded task's home (a loop) or ran work handed to it (executor) */
    int64_t folded_bytes, folded_allocs;
    int64_t folded_inferred[INFERRED_PHASES]; /* of folded_bytes, inferred, by phase (threads() lists 4) */
    uint32_t folded_home, folded_handed;
    uint32_t runs_loop;      /* an event loop was made here, or ran a callback sent to it */
} thread_info_t;

typedef struct {
    int guard;
    uint32_t session;
    uint32_t slot;
    uint32_t handover;       /* task id handed over by our wrappers, 0 if none */
    uint32_t handover_from;  /* the slot of the thread that handed it over, 0 if not known */
    uint64_t cache_key;
    uint32_t cache_cell;
    uint32_t cache_gen;
    int64_t countdown;       /* sampled mode: bytes until the next sample */
    int64_t stack_countdown; /* exact mode: bytes until the next stack sample */
    uint64_t rng;
    PyObject *pending_ctx;   /* borrowed: the context of the task our factory is making, */
    uint32_t pending_tid;    /* its id, its Tag and the mapping that holds the Tag (our */
    TagObject *pending_tag;  /* factory holds the context and the mapping while these are */
    PyObject *pending_vars;  /* set; the Tag is the context's while that mapping is) */
    PyObject *pending_obj;   /* owned: the Task whose first step check_step saw in pending_ctx */
    PyObject *pending_prev;  /* borrowed, compared only: the task pending_obj's eager first */
                             /* step displaced (tasks_watcher), which comes back after it */
    int pending_copied;      /* that task's context will be a copy of pending_ctx (a legacy */
                             /* (loop, coro) factory runs inside it) */
    PyObject *empty_ctx;     /* owned: an empty context for our done callbacks */
    PyObject *ctx_seen;      /* borrowed, compared only: the context context_tid last read */
    TagObject *ctx_tag;      /* borrowed: the Tag read there (NULL: none); valid while that */
                             /* answer holds (the context keeps it; only we set the tag) */
    uint64_t ctx_ver;
    uint32_t ctx_session;
    uint32_t ctx_tid;
    int ctx_shared;          /* that Tag is shared: ctx_tid is the running task's (shared_tid) */
    PyObject *fast_ctx;      /* borrowed, compared only; FAST_NONE: no fast answer.  While */
    uint64_t fast_ver;       /* (context, context_ver) and cell_gen hold, the current cell */
    uint32_t fast_now;       /* is cache_cell and the running task (current_tid) fast_now */
    struct cell *fast_cell;  /* &cells[cache_cell] if the exact hooks' fast paths may charge */
                             /* it directly (fast_cell_for), else NULL; read only once the */
                             /* cache is known to hold (cells[] moves bump cell_gen) */
    PyThreadState **ts_slot; /* where this thread's thread state is read (_tstate.h) */
    PyObject *step_loop;     /* borrowed: the key and value this thread last put in   */
    PyObject *step_task;     /* _asyncio._current_tasks (see tasks_watcher); NULL: none */
    uint32_t step_gen;
} tls_t;

/* tls_t.fast_ctx when the cached cell must not be trusted (no context lives at address 1) */
#define FAST_NONE ((PyObject *)(uintptr_t)1)

/* The few functions every tracked allocation and free goes through: inlined into the
 * hooks (callgrind: each call layer costs ~15 instructions of prologue and epilogue). */
#define MS_HOT inline __attribute__((always_inline))
#define MS_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* initial-exec: one offset from the thread pointer instead of a __tls_get_addr call */
static __thread tls_t tls __attribute__((tls_model("initial-exec")));

/* Task id -> record slot.  Ids are handed out in order and most tasks live briefly, so a
 * direct-mapped ring indexed by the id's low bits holds nearly every live id: one load to
 * find it, and ids made one after another share cache lines.  An id whose ring entry is
 * held by an older live id (one a multiple of TID_RING ids earlier) goes to S.task_index;
 * an id is in exactly one of the two.  (The hashed index alone: ~300 instructions a task
 * more on a task tree, callgrind.) */
#define TID_RING (1u << 16)
typedef struct {
    uint32_t tid; /* 0: free */
    uint32_t slot;
} tid_entry_t;

static struct {
    int active;
    int has_data;
    int mode;
    uint32_t session;
    uint32_t first_tid;         /* the first task id this session hands out (tid_this_session) */
    uint32_t cell_gen;
    double sample_interval;     /* R, bytes (sampled mode) */
    double stack_interval;      /* mean bytes between stack samples; 0 = no stacks */
    uint64_t half_life_ns;      /* decay of inferred attribution */
    uint64_t start_ns;
    uint64_t seed;
    PyObject *tag_var;          /* strong ref while active or holding data */
    PyMemAllocatorEx orig_obj, orig_mem;
    /* Our hooks stay installed, recording nothing, after a stop that found another hook
     * (tracemalloc's) installed over them in a domain (see core_stop): pt_left has bit 0
     * (object domain) or bit 1 (memory domain) set for each, pt_mode is their mode and
     * pt_seen counts allocations passed through (a probe's test that they are called). */
    int passthrough, pt_left, pt_mode;
    uint64_t pt_seen;
    Py_ssize_t *raw_blocks;      /* pymalloc's count of blocks it got from the raw allocator,
                                    when our own objects come from there (own_malloc) */
    int own_raw_now;             /* a task's tag mapping is being made, to come from there */
    int eager_score;             /* recent tasks that ended inside create_task (+1 each)
                                    against those still pending there (-1), in +-16 */
    ptrmap_t ptrs;               /* big blocks (exact mode), every sample (sampled mode) */
    shadow_t shadow;             /* small blocks, exact mode: metadata next to metadata */
    uint64_t *filter;            /* sampled mode: bit set "this granule may be sampled" */
    u64map_t filter_more;        /* filter bit + 1 -> live samples on it, where more than one */
    int filter_sticky;           /* filter_more ran out of memory: bits are no longer cleared */
    u64map_t cell_index;
    cell_t *cells;
    uint32_t ncells, capcells;
    uint32_t *free_cells;
    uint32_t nfree_cells, capfree_cells;
    tid_entry_t *tid_ring;       /* task id -> record slot, for most ids (see tid_get) */
    u64map_t task_index;         /* ...and for the others */
    task_info_t *tasks;
    uint32_t ntasks, captasks;
    uint32_t *free_tasks;
    uint32_t nfree_tasks, capfree_tasks;
    thread_info_t *threads;
    uint32_t nthreads, capthreads;
    u64map_t obj_index;          /* id(task) -> tid, for tasks not yet finished */
    uint32_t *finished;          /* finished task ids not yet folded, oldest first */
    uint32_t nfinished, capfinished;
    /* Folding at the finish (see fold_at_finish in _tasks.h): records already released,
     * waiting for the next fold call to hand them to their groups. */
    folded_early_t *early, *early_spare;
    uint32_t nearly, capearly, capearly_spare;
    /* A fold call's work space, kept from one call to the next (a fresh mapping each
     * time was page faults and, when unmapped, a TLB flush: ~2% of an eager tree). */
    void *fold_cand, *fold_scratch, *fold_groups;
    uint32_t capfold_cand, capfold_scratch, capfold_groups;
    int fold_busy;
    int fold_armed;              /* a fold pass found more finished tasks than it keeps */
    int64_t fold_floor;          /* ...and kept none that allocated less than this */
    uint64_t records, pending;   /* registered task records; those not finished */
    uint64_t mappings_reused;    /* tasks given a kept tag mapping (kept_mapping_take) */
    uint32_t ninferred;          /* threads with an inferred owner (0: skip that work) */
    uint64_t untracked;          /* allocations we could not record (table memory) */
    uint64_t foreign;            /* allocations of sub-interpreters, not recorded */
    PyInterpreterState *main_interp; /* the main interpreter, the one profiled (set at start) */
    uint64_t dropped_cells;      /* allocations charged to the overflow cell */
} S;

/* ---- small helpers ------------------------------------------------------------------ */
static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t coarse_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline PyThreadState *tstate_unchecked(void) { return tstate_read(tls.ts_slot); }

static inline uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * UINT64_C(2685821657736338717);
}

/* Exponentially distributed gap with the given mean (bytes). */
static inline int64_t draw_gap(uint64_t *rng, double mean) {
    double u = ((double)(rng_next(rng) >> 11) + 1.0) * (1.0 / 9007199254740993.0); /* (0,1] */
    double g = -log(u) * mean;
    return g < 1.0 ? 1 : (int64_t)g;
}

/* Sampled mode: the number of bytes one sample of `size` bytes stands for. */
static inline int64_t scaled_bytes(size_t size) {
    double r = S.sample_interval;
    double w = 1.0 / (1.0 - exp(-(double)size / r));
    return (int64_t)llround((double)size * w);
}

static inline double scaled_count(size_t size) {
    return 1.0 / (1.0 - exp(-(double)size / S.sample_interval));
}

/* Allocation counts are kept in fixed point: COUNT_ONE is one allocation.  2^10 keeps a
 * sampled weight to 1/1024 of an allocation and lets a cell count 9e15 allocations (15
 * years at 20 million a second) before the int64 overflows. */
#define COUNT_ONE ((int64_t)1 << 10)

static inline int64_t scaled_count_fp(size_t size) { return llround(scaled_count(size) * (double)COUNT_ONE); }

static inline double count_value(int64_t fp) { return (double)fp / (double)COUNT_ONE; }

/* Room for `need` elements in *arr (of *cap, doubled as needed).  The new elements read
 * zero without being written: the kernel's fresh pages (_sysmem.h), so a doubling does not
 * touch the half it adds until it is used. */
static int grow_array(void **arr, uint32_t *cap, size_t elem, uint32_t need) {
    if (need <= *cap) return 0;
    uint32_t ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    void *n = sysmem_realloc(*arr, (size_t)ncap * elem);
    if (n == NULL) return -1;
    *arr = n;
    *cap = ncap;
    return 0;
}

#include "_stacks.h"

/* ---- threads ------------------------------------------------------------------------ */
static void tls_enter_session(tls_t *t) {
    t->session = S.session;
    t->ts_slot = tstate_bind();
    t->slot = 0;
    t->handover = 0;
    t->handover_from = 0;
    t->cache_key = 0;
    t->cache_gen = 0;
    t->fast_ctx = FAST_NONE;
    t->fast_cell = NULL;
    t->rng = S.seed ^ (uint64_t)(uintptr_t)t ^ UINT64_C(0x9E3779B97F4A7C15);
    if (t->rng == 0) t->rng = 1;
    t->countdown = S.mode == MODE_SAMPLED ? draw_gap(&t->rng, S.sample_interval) : 0;
    t->stack_countdown = S.stack_interval > 0 ? draw_gap(&t->rng, S.stack_interval) : INT64_MAX;
}

/* The calling thread's slot (1-based), registering the thread on first use; 0 on OOM. */
static inline uint32_t thread_slot(tls_t *t) {
    if (t->slot) return t->slot;
    if (grow_array((void **)&S.threads, &S.capthreads, sizeof(thread_info_t), S.nthreads + 1) < 0)
        return 0;
    thread_info_t *ti = &S.threads[S.nthreads];
    memset(ti, 0, sizeof(*ti));
    ti->ident = PyThread_get_thread_ident();
    ti->native_id = PyThread_get_thread_native_id();
    t->slot = ++S.nthreads;
    return t->slot;
}

/* ---- tasks and cells ------------------------------------------------------------------ */
static inline int tid_get(uint32_t tid, uint32_t *slot) {
    if (MS_UNLIKELY(S.tid_ring == NULL)) return 0;
    const tid_entry_t *e = &S.tid_ring[tid & (TID_RING - 1)];
    if (e->tid == tid) {
        *slot = e->slot;
        return 1;
    }
    return u64map_get(&S.task_index, (uint64_t)tid + 1, slot);
}

/* tid is not in use (register_task hands out only such ids). */
static inline int tid_put(uint32_t tid, uint32_t slot) {
    tid_entry_t *e = &S.tid_ring[tid & (TID_RING - 1)];
    if (e->tid == 0) {
        e->tid = tid;
        e->slot = slot;
        return 0;
    }
    return u64map_put(&S.task_index, (uint64_t)tid + 1, slot);
}

static inline void tid_del(uint32_t tid) {
    if (S.tid_ring == NULL) return;
    tid_entry_t *e = &S.tid_ring[tid & (TID_RING - 1)];
    if (e->tid == tid) e->tid = 0;
    else u64map_del(&S.task_index, (uint64_t)tid + 1);
}

/* The slot of task tid, or 0; with create, a new slot for a tid not in use (register_task
 * hands out only those). */
static uint32_t task_info_for(uint32_t tid, uint32_t home_slot, int create) {
    uint32_t idx;
    if (!create) return tid_get(tid, &idx) ? idx : 0;
    if (S.nfree_tasks) {
        idx = S.free_tasks[--S.nfree_tasks];
    } else {
        task_info_t *before = S.tasks;
        if (grow_array((void **)&S.tasks, &S.captasks, sizeof(task_info_t), S.ntasks + 1) < 0) return 0;
        if (S.tasks != before) { /* moved: the cells' task pointers follow */
            for (uint32_t i = 1; i < S.ncells; i++)
                if (S.cells[i].tinfo) S.cells[i].task = &S.tasks[S.cells[i].tinfo];
        }
        idx = S.ntasks++;
    }
    if (tid_put(tid, idx) < 0) return 0;
    task_info_t *ti = &S.tasks[idx];
    memset(ti, 0, sizeof(*ti));
    ti->tid = tid;
    ti->home_slot = home_slot;
    ti->in_use = 1;
    return idx;
}

static inline uint64_t cell_key(uint32_t tid, uint32_t slot, uint32_t route, uint32_t phase) {
    return (uint64_t)tid | ((uint64_t)(slot & 0xFFFFFu) << 32) | ((uint64_t)(route & 0xFu) << 52) |
           ((uint64_t)(phase & 0xFu) << 56) | (UINT64_C(1) << 63);
}

/* A new cell for key; ti: the slot of registered task tid (0 with tid 0).  indexed: put it
 * in cell_index (not a task's home cell, which its Tag remembers). */
static uint32_t new_cell(uint64_t key, uint32_t tid, uint32_t ti, uint32_t slot, uint32_t route, int indexed) {
    uint32_t idx;
    if (S.nfree_cells) {
        idx = S.free_cells[--S.nfree_cells];
    } else {
        if (S.ncells > PTRMAP_MAX_CELL) return 0;
        cell_t *before = S.cells;
        if (grow_array((void **)&S.cells, &S.capcells, sizeof(cell_t), S.ncells + 1) < 0) return 0;
        if (S.cells != before) S.cell_gen++; /* moved: every thread's fast_cell points at the old array */
        idx = S.ncells++;
    }
    if (indexed && u64map_put(&S.cell_index, key, idx) < 0) return 0;
    cell_t *c = &S.cells[idx];
    memset(c, 0, sizeof(*c));
    c->key = key;
    c->indexed = (uint32_t)indexed;
    c->tinfo = ti;
    c->task = ti ? &S.tasks[ti] : NULL;
    if (tid) {
        c->next_in_task = S.tasks[ti].first_cell;
        S.tasks[ti].first_cell = idx;
        c->track_time = route != ROUTE_CONTEXT || S.tasks[ti].home_slot != slot;
    } else {
        c->track_time = 0;
    }
    /* the times are a migration's (first and last seen on its route): a task's own cell
     * (most cells) does not read the clock */
    if (c->track_time) c->first_ns = c->last_ns = now_ns();
    return idx;
}

/* The task id tagged in the running context, 0 if none.  CPython bumps the thread's
 * context_ver on every context switch (not on ContextVar.set: the one place we set the tag
 * in the running context, register_task, resets ctx_seen), so while (context, context_ver)
 * is unchanged the answer is too: most allocations skip the lookup. */
static PyObject *context_vars(PyObject *ctx); /* _tasks.h */
static MS_HOT int tag_in_context(PyObject *ctx, PyObject **v);
static uint32_t shared_tid(const TagObject *tag, PyThreadState *ts, int *cacheable);

static MS_HOT uint32_t context_tid(void) {
    PyThreadState *ts = tstate_unchecked();
    if (ts == NULL) return 0;
    tls_t *t = &tls;
    if (ts->context == t->ctx_seen && ts->context_ver == t->ctx_ver && t->ctx_session == S.session)
        return t->ctx_tid;
    uint32_t tid = 0;
    PyObject *v = NULL;
    /* Never touch the error indicator here: an allocation can happen while an exception
     * is being raised, and PyContextVar_Get cannot fail for a real ContextVar. */
    TagObject *tag = NULL;
    if (ts->context == t->pending_ctx && t->pending_tag != NULL && context_vars(ts->context) == t->pending_vars) {
        /* The context of the task our factory is making, in its eager first step (and in
         * the tasks that step makes, each time one of their own eager steps returns): while
         * it still holds the mapping we made (a task made meanwhile with this very context
         * would have replaced it), it holds the Tag we put there, which a lookup would find
         * after ~200 instructions (the variable's cache misses after every context switch). */
        tag = t->pending_tag;
        tid = tag->tid;
    } else {
        int found = tag_in_context(ts->context, &v);
        if (found < 0) {
            v = NULL;
            if (PyContextVar_Get(S.tag_var, NULL, &v) == 0 && v != NULL) {
                found = 1;
                Py_DECREF(v); /* the context still holds it: never the last reference */
            }
        }
        if (found > 0 && Py_TYPE(v) == &TagType) {
            tag = (TagObject *)v;
            tid = tag->tid;
        }
    }
    int cacheable = 1;
    t->ctx_shared = tag != NULL && tag->shared;
    if (MS_UNLIKELY(t->ctx_shared)) tid = shared_tid(tag, ts, &cacheable);
    t->ctx_tag = tag;
    t->ctx_seen = cacheable ? ts->context : NULL;
    t->ctx_ver = ts->context_ver;
    t->ctx_session = S.session;
    t->ctx_tid = tid;
    return tid;
}

/* Set this thread's hand-over; the cached cell no longer holds. */
static inline void set_handover(tls_t *t, uint32_t tid) {
    t->handover = tid;
    t->fast_ctx = FAST_NONE;
    if (t->ctx_shared) t->ctx_seen = NULL; /* the answer for a shared context names it (shared_fallback) */
}

/* Is the cached answer (cache_cell, fast_now) right for thread state ts?  It is while the
 * context is the one it was computed in (CPython bumps context_ver on every switch) and no
 * cell has ended since; a hand-over change or an inferred route resets fast_ctx. */
static MS_HOT int fast_valid(const tls_t *t, const PyThreadState *ts) {
    return ts != NULL && ts->context == t->fast_ctx && ts->context_ver == t->fast_ver;
}

/* The cell for the code running now on this thread.  0 means "could not record".  Most
 * allocations take the first return: same context as the last one, same hand-over, no
 * cell ended meanwhile, and not an inferred route (whose phase moves with time). */
static uint32_t current_cell_slow(tls_t *t, PyThreadState *ts);

static MS_HOT uint32_t current_cell(tls_t *t) {
    PyThreadState *ts = tstate_read(t->ts_slot);
    if (fast_valid(t, ts) && t->cache_gen == S.cell_gen) return t->cache_cell;
    return current_cell_slow(t, ts);
}

/* What the exact hooks' fast paths may charge without a call: the cell itself, unless it is a
 * migration (it keeps a timestamp), the thread has no slot to check the cache against, or there
 * is no shadow map (exact mode without one sends every block to the pointer table). */
static inline cell_t *fast_cell_for(const tls_t *t, uint32_t idx) {
    cell_t *c = &S.cells[idx];
    return (t->ts_slot != NULL && S.shadow.dir != NULL && !c->track_time) ? c : NULL;
}

/* Is slot ti record tid's?  (A slot is cleared when its record is released.) */
static inline int record_at(uint32_t tid, uint32_t ti) {
    return ti != 0 && ti < S.ntasks && S.tasks[ti].in_use && S.tasks[ti].tid == tid;
}

/* The hints of a Tag (see TagObject), 0 unless they still hold: the record slot while it
 * holds record tag->tid, the cell while it is the one for key. */
static inline uint32_t tag_record(const TagObject *tag) { return record_at(tag->tid, tag->ti) ? tag->ti : 0; }

static inline uint32_t tag_cell(const TagObject *tag, uint64_t key) {
    uint32_t c = tag->cell;
    return c != 0 && c < S.ncells && S.cells[c].key == key ? c : 0;
}

/* Handed-over work charged to cell idx came from thread slot `from` (0: not known): the
 * report's migration names it (one that came from several threads names none). */
static inline void note_origin(uint32_t idx, uint32_t from) {
    if (from == 0 || idx == 0) return;
    cell_t *c = &S.cells[idx];
    if (c->origin == 0) c->origin = from;
    else if (c->origin != from) c->origin = ORIGIN_MIXED;
}

__attribute__((noinline)) static uint32_t current_cell_slow(tls_t *t, PyThreadState *ts) {
    /* A sub-interpreter's allocation (its thread state in this thread, or a thread of its
     * own) is not recorded: its objects, frames and code are its own, never to be held or
     * freed from here, and it runs no task of ours.  (Its thread states never pass
     * fast_valid: their contexts are their own objects.) */
    if (MS_UNLIKELY(ts != NULL && ts->interp != S.main_interp)) return 0;
    uint32_t slot = thread_slot(t);
    if (slot == 0) return 0;
    uint32_t tid = context_tid(), route = ROUTE_CONTEXT, phase = 0;
    t->fast_now = tid ? tid : t->handover; /* = current_tid() */
    thread_info_t *th = &S.threads[slot - 1];
    if (tid) {
        if (t->handover == tid) route = ROUTE_HANDED;
        if (th->inferred_tid && tid != th->inferred_tid) th->shared = 1;
    } else if (t->handover) {
        tid = t->handover;
        route = ROUTE_HANDED;
        if (th->inferred_tid && tid != th->inferred_tid) th->shared = 1;
    } else if (th->inferred_tid && !th->shared) {
        uint64_t age = now_ns() - th->inferred_start_ns;
        uint64_t p = (S.half_life_ns ? age / S.half_life_ns : 0) + (th->owner_done ? 2 : 0);
        if (p < INFERRED_PHASES) {
            tid = th->inferred_tid;
            route = ROUTE_INFERRED;
            phase = (uint32_t)p;
        }
    }
    uint64_t key = cell_key(tid, slot, route, phase);
    uint32_t from = route == ROUTE_HANDED ? t->handover_from : 0;
    /* (a context shared by tasks, where the running one cannot be watched for: no cache) */
    t->fast_ctx = (route != ROUTE_INFERRED && ts != NULL && t->ctx_seen != NULL) ? ts->context : FAST_NONE;
    t->fast_ver = ts != NULL ? ts->context_ver : 0;
    if (key == t->cache_key && t->cache_gen == S.cell_gen) { /* fast_cell holds too */
        note_origin(t->cache_cell, from);
        return t->cache_cell;
    }
    /* the Tag this tid came from, for its hints (a tid from the context always has one) */
    TagObject *tag = route == ROUTE_CONTEXT && tid != 0 && t->ctx_tag != NULL && t->ctx_tag->tid == tid
                         ? t->ctx_tag : NULL;
    uint32_t idx = tag != NULL ? tag_cell(tag, key) : 0;
    uint32_t hti = idx == 0 && tag != NULL ? tag_record(tag) : 0;
    if (hti != 0 && S.tasks[hti].home_slot == slot) {
        /* The task's home cell, which its Tag would name if it had one (cells go only with
         * their task, whose record still holds): a new one, kept out of cell_index. */
        idx = new_cell(key, tid, hti, slot, route, 0);
        if (idx == 0) {
            S.dropped_cells++;
            t->fast_ctx = FAST_NONE;
            return 0;
        }
    } else if (idx == 0 && !u64map_get(&S.cell_index, key, &idx)) {
        uint32_t ti = hti != 0 || tid == 0 ? hti : task_info_for(tid, slot, 0);
        if (tid && ti == 0) {
            /* A tag whose task is not registered (folded away, or left over from an
             * earlier run): the bytes are this thread's, unattributed.  The cache keeps
             * the original key, so the next allocation under that tag lands here directly. */
            uint64_t ukey = cell_key(0, slot, ROUTE_CONTEXT, 0);
            if (!u64map_get(&S.cell_index, ukey, &idx)) idx = new_cell(ukey, 0, 0, slot, ROUTE_CONTEXT, 1);
        } else {
            idx = new_cell(key, tid, ti, slot, route, 1);
        }
        if (idx == 0) {
            S.dropped_cells++;
            t->fast_ctx = FAST_NONE;
            return 0;
        }
    }
    /* the task's own cell on its home thread is the one its Tag remembers (a migration's
     * would make tasks running one context on two threads overwrite each other's) */
    if (tag != NULL && S.cells[idx].tinfo != 0 && !S.cells[idx].track_time) tag->cell = idx;
    note_origin(idx, from);
    t->cache_key = key;
    t->cache_cell = idx;
    t->cache_gen = S.cell_gen;
    t->fast_cell = fast_cell_for(t, idx);
    return idx;
}

static inline uint32_t current_tid(void) {
    uint32_t tid = context_tid();
    return tid ? tid : tls.handover;
}

/* current_tid(), from the cached answer when it holds (the free hook asks on every free of
 * a task's block, to count frees by another task). */
static MS_HOT uint32_t current_tid_fast(void) {
    tls_t *t = &tls;
    if (t->session == S.session && fast_valid(t, tstate_read(t->ts_slot))) return t->fast_now;
    return current_tid();
}

static inline uint32_t cell_tid(const cell_t *c) { return (uint32_t)(c->key & 0xFFFFFFFFu); }
/* the other fields cell_key packs */
static inline uint32_t cell_slot(const cell_t *c) { return (uint32_t)((c->key >> 32) & 0xFFFFFu); }
static inline uint32_t cell_route(const cell_t *c) { return (uint32_t)((c->key >> 52) & 0xFu); }
static inline uint32_t cell_phase(const cell_t *c) { return (uint32_t)((c->key >> 56) & 0x7u); }

/* Totals of task slot ti over its cells. */
static void task_totals(uint32_t ti, int64_t *alloc_bytes, double *allocs, int64_t *live_entries) {
    int64_t ab = 0, le = 0;
    double na = 0;
    for (uint32_t i = S.tasks[ti].first_cell; i != 0; i = S.cells[i].next_in_task) {
        ab += S.cells[i].alloc_bytes;
        na += count_value(S.cells[i].allocs);
        le += S.cells[i].live_entries;
    }
    if (alloc_bytes) *alloc_bytes = ab;
    if (allocs) *allocs = na;
    if (live_entries) *live_entries = le;
}

static inline int64_t task_live_entries(uint32_t ti) {
    int64_t le;
    task_totals(ti, NULL, NULL, &le);
    return le;
}

/* Per allocation and free only what cannot be summed later is kept: the cell's counters
 * (its live bytes are alloc_bytes - freed_bytes) and the task's running live bytes, for its
 * peak.  A task's other totals are the sums over its cells (task_totals).  Counts are fixed
 * point (COUNT_ONE per allocation) so exact mode adds a constant and sampled mode its
 * scaled weight, both as integers. */
static MS_HOT void task_live_add(task_info_t *ti, int64_t delta) {
    int64_t live = ti->live_bytes + delta;
    ti->live_bytes = live;
    if (live > ti->peak_live_bytes) ti->peak_live_bytes = live;
}

/* The counting itself, with no call in it (the exact hooks' fast paths use these too):
 * a new block, a freed one (`now`: the task freeing it, 0 if none), a block resized in
 * place by its owner (only the difference counts). */
static MS_HOT void charge_alloc(cell_t *c, int64_t bytes, int64_t count) {
    c->alloc_bytes += bytes;
    c->allocs += count;
    c->live_entries++;
    if (c->task != NULL) task_live_add(c->task, bytes);
}

static MS_HOT void charge_free(cell_t *c, int64_t bytes, int64_t count, uint32_t now) {
    c->freed_bytes += bytes;
    c->frees += count;
    c->live_entries--;
    if (c->task != NULL) {
        c->task->live_bytes -= bytes;
        if (now != 0 && now != cell_tid(c)) {
            c->cross_free_bytes += bytes;
            c->cross_frees += count;
        }
    }
}

static MS_HOT void charge_resize(cell_t *c, int64_t delta) {
    if (delta >= 0) c->alloc_bytes += delta;
    else c->freed_bytes -= delta;
    if (c->task != NULL) task_live_add(c->task, delta);
}

static MS_HOT void account_alloc(uint32_t cell, int64_t bytes, int64_t count) {
    cell_t *c = &S.cells[cell];
    charge_alloc(c, bytes, count);
    if (c->track_time) c->last_ns = coarse_ns();
}

static MS_HOT void account_free(uint32_t cell, int64_t bytes, int64_t count) {
    cell_t *c = &S.cells[cell];
    charge_free(c, bytes, count, c->task != NULL ? current_tid_fast() : 0);
}

/* ---- where live tracked blocks are kept ------------------------------------------------
 * Exact mode: blocks under SHADOW_MAX_SIZE go to the shadow map (no hashing: neighbours in
 * memory have neighbouring metadata), bigger or odd ones to the pointer table.  Sampled
 * mode: the few sampled blocks go to the pointer table, and a 32 KiB bit filter lets the
 * free of an unsampled block (nearly all of them) return after one load.  A bit clears when
 * the last live sample on it is freed (a second one on the same bit is counted aside, in
 * filter_more): pymalloc hands a freed address straight back out, so a bit left behind by a
 * freed sample would send a busy address's every free down the slow path (callgrind, server
 * workload: 7% of frees did with stale bits). */
#define FILTER_BITS 18
#define FILTER_WORDS ((size_t)1 << (FILTER_BITS - 6))

static inline uint64_t filter_hash(const void *p) {
    return (((uint64_t)(uintptr_t)p >> 4) * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - FILTER_BITS);
}

static inline int filter_maybe(const void *p) {
    uint64_t h = filter_hash(p);
    return (int)((S.filter[h >> 6] >> (h & 63)) & 1u);
}

static inline void filter_add(const void *p) {
    uint64_t h = filter_hash(p);
    uint64_t bit = UINT64_C(1) << (h & 63);
    if (!(S.filter[h >> 6] & bit)) {
        S.filter[h >> 6] |= bit;
        return;
    }
    uint32_t n = 1;
    (void)u64map_get(&S.filter_more, h + 1, &n);
    /* no memory to count it: bits are never cleared from now on (slower, still right) */
    if (u64map_put(&S.filter_more, h + 1, n + 1) < 0) S.filter_sticky = 1;
}

/* p, a sample, was freed (taken out of the pointer table). */
static inline void filter_del(const void *p) {
    if (S.filter_sticky) return;
    uint64_t h = filter_hash(p);
    uint32_t n;
    if (S.filter_more.count != 0 && u64map_get(&S.filter_more, h + 1, &n)) {
        if (n > 2) {
            if (u64map_put(&S.filter_more, h + 1, n - 1) < 0) S.filter_sticky = 1;
        } else {
            u64map_del(&S.filter_more, h + 1);
        }
        return;
    }
    S.filter[h >> 6] &= ~(UINT64_C(1) << (h & 63));
}

/* A put found an entry whose free we never saw: settle the block it described. */
__attribute__((noinline, cold)) static void settle_stale(uint32_t old) {
    uint32_t osize, ocell;
    int oflag;
    shadow_decode(old, &osize, &ocell, &oflag);
    account_free(ocell, (int64_t)osize, COUNT_ONE);
}

/* Keep p -> (size, cell, flag).  Returns 0, or -1 if it cannot be kept (not tracked).  mode
 * is a constant at every call site: each hook is compiled with its own mode's steps only. */
static MS_HOT int ptrs_put(void *p, size_t size, uint32_t cell, int flag, int mode) {
    if (mode == MODE_EXACT) {
        uint32_t old;
        if (size < SHADOW_MAX_SIZE && shadow_put_ex(&S.shadow, p, (uint32_t)size, cell, flag, &old) == 0) {
            if (MS_UNLIKELY(old != 0)) settle_stale(old);
            return 0;
        }
        uint32_t osize, ocell;
        int oflag;
        if (shadow_take(&S.shadow, p, &osize, &ocell, &oflag)) /* same: a stale small entry */
            account_free(ocell, (int64_t)osize, COUNT_ONE);
    }
    if (!ptrmap_fits(p) || ptrmap_insert(&S.ptrs, p, size, cell) < 0) return -1;
    if (mode == MODE_SAMPLED) filter_add(p);
    return 0;
}

/* Take p out if it is kept: fills size, cell and flag (1 = "may have a stack sample"). */
static MS_HOT int ptrs_take(void *p, size_t *size, uint32_t *cell, int *flag, int mode) {
    if (mode == MODE_EXACT) {
        uint32_t sz;
        if (shadow_take(&S.shadow, p, &sz, cell, flag)) {
            *size = sz;
            return 1;
        }
    } else if (!filter_maybe(p)) {
        return 0;
    }
    if (S.ptrs.count == 0 || !ptrmap_remove(&S.ptrs, p, size, cell)) return 0;
    if (mode == MODE_SAMPLED) filter_del(p);
    *flag = 1;
    return 1;
}

static inline uint64_t ptrs_count(void) { return S.ptrs.count + S.shadow.count; }

/* ---- the hooks ------------------------------------------------------------------------ */
/* The module's state is static (single-phase init), one for the process, and holds the
 * main interpreter's objects: a sub-interpreter must not set it (its objects would be
 * freed with it, and used after).  0, or -1 with ImportError set. */
static int main_interpreter_only(const char *what) {
    if (PyInterpreterState_Get() == PyInterpreterState_Main()) return 0;
    PyErr_Format(PyExc_ImportError, "memscope_async profiles the main interpreter only; %s a sub-interpreter", what);
    return -1;
}

/* Does this thread run the main interpreter now (not a sub-interpreter's thread state)? */
static inline int main_interpreter(tls_t *t) {
    PyThreadState *ts = tstate_read(t->ts_slot);
    return ts == NULL || ts->interp == S.main_interp;
}

/* Exact mode's stack countdown ran out: draw the next gap.  Returns 1 if this allocation
 * gets a stack (the countdown is INT64_MAX when stacks are off, so this is rare). */
__attribute__((noinline)) static int stack_due(tls_t *t) {
    if (!(S.stack_interval > 0)) {
        t->stack_countdown = INT64_MAX;
        return 0;
    }
    t->stack_countdown = draw_gap(&t->rng, S.stack_interval);
    return 1;
}

__attribute__((noinline)) static void passed_through(tls_t *t) {
    S.pt_seen++;
    t->countdown = INT64_MAX; /* sampled hooks: straight to the allocator from now on */
}

/* A new block p of `size` bytes, in cell `into` (0: the running task's on this thread).
 * `site`: where its stack sample goes if it gets one (UINT32_MAX: the running stack's
 * site).  Returns 1 if it got a stack sample. */
static MS_HOT int record_alloc_at(void *p, size_t size, int mode, uint32_t into, uint32_t site) {
    tls_t *t = &tls;
    /* (every allocation comes here while passing through: start() and the stop that
     * began it bump cell_gen, so no exact fast path holds) */
    if (MS_UNLIKELY(S.passthrough)) {
        passed_through(t);
        return 0;
    }
    if (MS_UNLIKELY(t->session != S.session)) tls_enter_session(t);
    int64_t bytes, count;
    int stack = 0;
    if (mode == MODE_SAMPLED) {
        t->countdown -= (int64_t)size;
        if (t->countdown > 0) return 0;
        t->countdown = draw_gap(&t->rng, S.sample_interval);
        bytes = scaled_bytes(size);
        count = scaled_count_fp(size);
        stack = S.stack_interval > 0; /* every sample carries its stack */
    } else {
        bytes = (int64_t)size;
        count = COUNT_ONE;
        t->stack_countdown -= (int64_t)size;
        if (MS_UNLIKELY(t->stack_countdown <= 0)) stack = stack_due(t);
    }
    if (MS_UNLIKELY(into == 0 && !main_interpreter(t))) {
        /* A sub-interpreter's block (see current_cell_slow): not recorded.  Its bytes move
         * the countdowns like any (a sample landing on them is dropped, the next gap drawn
         * as for any sample), so the main interpreter's samples stay unbiased. */
        S.foreign++;
        return 0;
    }
    uint32_t cell = into != 0 ? into : current_cell(t);
    if (cell == 0 || ptrs_put(p, size, cell, stack, mode) < 0) {
        S.untracked++;
        return 0;
    }
    account_alloc(cell, bytes, count);
    /* a sample stands for 1/(1-exp(-size/R)) blocks of its size, R the interval it was drawn at */
    if (stack) {
        double R = mode == MODE_SAMPLED ? (double)S.sample_interval : S.stack_interval;
        if (site != UINT32_MAX) stacks_record_at(p, 0, size, site, R, 1);
        else stacks_record_alloc(p, 0, size, S.cells[cell].key, R, 1);
        if (S.cells[cell].task != NULL) S.cells[cell].task->flags |= TF_SITES;
    }
    return stack;
}

static MS_HOT void record_alloc(void *p, size_t size, int mode) {
    (void)record_alloc_at(p, size, mode, 0, UINT32_MAX);
}

static MS_HOT void record_free(void *p, int mode) {
    size_t size;
    uint32_t cell;
    int flag;
    /* (a sub-interpreter frees only its own blocks, never ours; one with its own GIL runs
     * beside our threads, so it does not even look the tables up) */
    if (MS_UNLIKELY(!main_interpreter(&tls))) return;
    if (!ptrs_take(p, &size, &cell, &flag, mode)) return;
    if (mode == MODE_SAMPLED) account_free(cell, scaled_bytes(size), scaled_count_fp(size));
    else account_free(cell, (int64_t)size, COUNT_ONE);
    if (flag && S.stack_interval > 0) stacks_record_free(p);
}

/* Exact mode: the block at old (taken from the tables: old_size bytes in old_cell, flag its
 * stack-sample mark), now at p with `size` bytes, stays with that cell and only the size
 * difference counts.  Returns 1, or 0 if it could not be kept in the tables (it ends). */
static int keep_resized(void *old, void *p, size_t size, size_t old_size, uint32_t old_cell, int flag,
                        int may_sample) {
    /* (a block in the pointer table is flagged whether it has a sample or not) */
    int kept = flag && S.stack_interval > 0 ? stacks_move(old, p, size) : -1;
    if (kept < 0) kept = 0;
    if (may_sample && size > old_size) {
        /* the growth is sampled for its stack as a new block of its size is (stacks_move) */
        tls_t *t = &tls;
        t->stack_countdown -= (int64_t)(size - old_size);
        if (MS_UNLIKELY(t->stack_countdown <= 0) && stack_due(t)) {
            stacks_record_alloc(p, old_size, size - old_size, S.cells[old_cell].key, S.stack_interval, 0);
            if (S.cells[old_cell].task != NULL) S.cells[old_cell].task->flags |= TF_SITES;
            kept = 1;
        }
    }
    if (ptrs_put(p, size, old_cell, kept, MODE_EXACT) < 0) {
        S.untracked++;
        if (kept) stacks_record_free(p);
        account_free(old_cell, (int64_t)old_size, COUNT_ONE);
        return 0;
    }
    charge_resize(&S.cells[old_cell], (int64_t)size - (int64_t)old_size);
    return 1;
}

/* Sampled mode: a sample at `old` (old_size bytes, in old_cell) is resized by its owner.
 * Exact mode charges such a realloc only the difference (growth as allocated, shrinkage as
 * freed), but a realloc of a block that was not sampled cannot be told from a new block:
 * its old size is known nowhere.  That one is left as it is, an allocation of the new size
 * (its sample decision drawn on the new size, as for any allocation), and this branch, the
 * only one that knows the old size, makes up for it.  With p(s) = 1 - exp(-s/R) the chance
 * a block of s bytes is a sample, the unsampled branch adds new_size to allocated in
 * expectation (1 - p(old_size)) of the time; so this one, taken p(old_size) of the time,
 * takes min(old_size, new_size) / p(old_size) off allocated and adds the shrinkage over
 * p(old_size) to freed, and the realloc is charged what exact mode charges in expectation
 * (growth to allocated, shrinkage to freed, no new allocation; the block's live estimate
 * is its old weight off, and whatever the new decision gives on).  Counted at every new
 * size, a buffer grown by `+=` came to ~9x its size (docs/attribution.md).  `site` takes
 * the same correction (UINT32_MAX: the running stack's). */
static void resample_resized(size_t old_size, uint32_t old_cell, size_t size, uint32_t cell, uint32_t site) {
    double w = scaled_count(old_size); /* 1 / p(old_size) */
    int64_t whole = scaled_bytes(old_size);
    int64_t undone = llround((double)(size < old_size ? size : old_size) * w);
    if (undone > whole) undone = whole;
    cell_t *c = &S.cells[old_cell];
    c->alloc_bytes -= undone;
    c->freed_bytes += whole - undone;
    c->allocs -= scaled_count_fp(old_size);
    c->live_entries--;
    if (c->task != NULL) c->task->live_bytes -= whole;
    if (S.stack_interval > 0) stacks_adjust(site, S.cells[cell].key, -(double)undone, -w);
}

/* Where the sites come in: the resized block keeps the lines that made it, each for its
 * stretch (stacks_detach, stacks_reattach).  Grown, the line that grows it takes the
 * correction, and the new stretch if the block is sampled again; shrunk, the block's
 * newest line takes the correction, and no stack is walked. */
static void record_realloc_sampled(void *old, void *p, size_t size) {
    size_t old_size;
    uint32_t old_cell;
    int flag;
    uint32_t site = UINT32_MAX, was = UINT32_MAX, layout = UINT32_MAX, into = 0;
    if (ptrs_take(old, &old_size, &old_cell, &flag, MODE_SAMPLED)) {
        if (flag && S.stack_interval > 0) layout = stacks_detach(old, &was);
        tls_t *t = &tls;
        uint32_t cell = 0;
        if (!S.passthrough) {
            if (t->session != S.session) tls_enter_session(t);
            cell = current_cell(t);
        }
        if (cell != 0 && cell_tid(&S.cells[cell]) == cell_tid(&S.cells[old_cell])) {
            /* the block stays in its cell (its thread and route), as in exact mode */
            into = old_cell;
            if (size <= old_size) site = was;
            resample_resized(old_size, old_cell, size, cell, site);
        } else { /* another owner resizes it: the sample ends as a free, the new block is its */
            account_free(old_cell, scaled_bytes(old_size), scaled_count_fp(old_size));
            live_release_all(layout);
            layout = UINT32_MAX;
        }
    }
    int sampled = record_alloc_at(p, size, MODE_SAMPLED, into, site);
    if (layout != UINT32_MAX) stacks_reattach(p, layout, size, sampled);
}

static void record_realloc(void *old, void *p, size_t size) {
    if (MS_UNLIKELY(!main_interpreter(&tls))) {
        /* a sub-interpreter's block: record_alloc moves the countdowns by it and counts it
         * foreign, as for its allocations (its old block is not ours either: record_free) */
        record_alloc(p, size, S.mode);
        return;
    }
    if (S.mode == MODE_SAMPLED) {
        record_realloc_sampled(old, p, size);
        return;
    }
    tls_t *t = &tls;
    if (t->session != S.session) tls_enter_session(t);
    size_t old_size;
    uint32_t old_cell;
    int flag;
    if (!ptrs_take(old, &old_size, &old_cell, &flag, MODE_EXACT)) {
        record_alloc(p, size, MODE_EXACT);
        return;
    }
    uint32_t cell = current_cell(t);
    if (cell != 0 && cell_tid(&S.cells[cell]) == cell_tid(&S.cells[old_cell])) {
        /* Same owner: the block keeps its cell (and its stack sample), so a buffer grown
         * by realloc is charged its final size, not every step. */
        if (keep_resized(old, p, size, old_size, old_cell, flag, 1) && S.cells[old_cell].track_time)
            S.cells[old_cell].last_ns = coarse_ns();
        return;
    }
    /* Another owner grows or shrinks the block: ownership moves to it. */
    if (flag && S.stack_interval > 0) stacks_record_free(old);
    account_free(old_cell, (int64_t)old_size, COUNT_ONE);
    record_alloc(p, size, MODE_EXACT);
}

/* Exact mode, guard up: the block at old, now at p with `size` bytes, stays with the cell
 * it had, if it had one. */
static void record_realloc_kept(void *old, void *p, size_t size) {
    size_t old_size;
    uint32_t old_cell;
    int flag;
    if (ptrs_take(old, &old_size, &old_cell, &flag, MODE_EXACT)) (void)keep_resized(old, p, size, old_size, old_cell, flag, 0);
}

/* What every hook does around the original allocator.  The guard keeps *allocations*
 * made by our own bookkeeping out of the books; frees are always recorded (the guard can
 * be up while Python code runs, e.g. a collection inside the fold hook, and a lost free
 * would leave a block "live" for good).  Exact mode records every allocation, so these
 * steps are inlined into its hooks. */
static MS_HOT void *alloc_after(void *p, size_t size, int mode) {
    if (p != NULL && !tls.guard) {
        tls.guard = 1;
        record_alloc(p, size, mode);
        tls.guard = 0;
    }
    return p;
}

static MS_HOT void free_with(PyMemAllocatorEx *a, void *ptr, int mode) {
    if (ptr != NULL) {
        int g = tls.guard;
        tls.guard = 1;
        record_free(ptr, mode);
        tls.guard = g;
    }
    a->free(a->ctx, ptr);
}

/* The objects made to tag a task (the new mapping that holds its Tag in its context, and
 * its root node while the context holds only the Tag; register_task sets own_raw_now
 * around their making) come from the raw allocator, not from pymalloc's pools, where they
 * would sit among the program's objects of that size class, its tasks' contexts first of
 * all.  A full collection visits every task's context and the mapping it points to: with
 * ours out of the pools, the contexts stay as densely packed as without us.  Measured
 * (3.12, gather tree, the collector on, sampled mode): its 17 full collections took
 * 1.12-1.17 s, 1.00 s this way, 0.94 s in the plain run.  Smaller ones (the Tag) stay in
 * pymalloc: the raw allocator is slower, and taking every one of ours there cost the eager
 * trees ~2%.  So does the mapping while most recent tasks ended inside create_task (eager
 * tasks whose first step was their last: S.eager_score > 0): those are freed before any
 * collection sees them, and the raw allocator and its free cost ~300 instructions a task
 * (callgrind).  pymalloc hands any block it did not make to the raw allocator when it is
 * freed (as it does its own big blocks, also after we stop) and counts it out of
 * sys.getallocatedblocks(), so such a block is counted in here (S.raw_blocks): only where
 * that count was found and pymalloc itself is the object allocator (raw_blocks_counter). */
#define OWN_RAW_MIN 49 /* pymalloc's 64-byte size class */
#define OWN_RAW_MAX 64

static inline int own_raw(const PyMemAllocatorEx *a, size_t size) {
    return S.own_raw_now && a == &S.orig_obj && S.raw_blocks != NULL && size >= OWN_RAW_MIN && size <= OWN_RAW_MAX;
}

/* A block of `size` (own_raw said so) from the raw allocator, counted as pymalloc counts its own. */
static void *own_raw_alloc(size_t size, int zero) {
    void *p = zero ? PyMem_RawCalloc(1, size) : PyMem_RawMalloc(size);
    if (p != NULL) (*S.raw_blocks)++;
    return p;
}

__attribute__((noinline)) static void *own_malloc(PyMemAllocatorEx *a, size_t size) {
    return own_raw(a, size) ? own_raw_alloc(size, 0) : a->malloc(a->ctx, size);
}

__attribute__((noinline)) static void *own_calloc(PyMemAllocatorEx *a, size_t nelem, size_t elsize) {
    if (elsize != 0 && nelem <= OWN_RAW_MAX / elsize && own_raw(a, nelem * elsize)) return own_raw_alloc(nelem * elsize, 1);
    return a->calloc(a->ctx, nelem, elsize);
}

/* Exact mode's common cases, done in registers with no call (so the hooks need next to no
 * frame; callgrind: saving and restoring registers for the general path cost ~15
 * instructions a call).  Each returns 1 if it recorded the block, or 0 having changed
 * nothing, and then the general path runs.  Common means: the thread's cached cell holds,
 * the block is small, its shadow entry is where it should be, no stack is due or kept, and
 * the cell is not a migration (those keep a timestamp). */
static MS_HOT int exact_alloc_fast(void *p, size_t size) {
    tls_t *t = &tls;
    cell_t *c = t->fast_cell; /* non-NULL: there is a slot, a shadow map, no timestamp to keep */
    int64_t left = t->stack_countdown - (int64_t)size;
    if (c == NULL || t->guard || left <= 0 || size >= SHADOW_MAX_SIZE) return 0;
    /* (no session test: start() bumps cell_gen, so a cache from an older session fails) */
    if (!fast_valid(t, *t->ts_slot) || t->cache_gen != S.cell_gen) return 0;
    uint32_t *leaf = shadow_leaf(&S.shadow, (uintptr_t)p);
    if (leaf == NULL) return 0;
    uint32_t *e = leaf + shadow_index((uintptr_t)p);
    if (*e != 0) return 0;
    *e = shadow_encode((uint32_t)size, t->cache_cell, 0);
    S.shadow.count++;
    t->stack_countdown = left;
    charge_alloc(c, (int64_t)size, COUNT_ONE);
    return 1;
}

static MS_HOT int exact_free_fast(void *p) {
    uint32_t *leaf = shadow_leaf(&S.shadow, (uintptr_t)p);
    if (leaf == NULL) return S.ptrs.count == 0; /* not ours, and the pointer table is empty */
    uint32_t *e = leaf + shadow_index((uintptr_t)p);
    uint32_t v = *e;
    if (v == 0) return S.ptrs.count == 0;
    if (v & (1u << SHADOW_FLAG_BIT)) return 0; /* a stack sample to drop */
    cell_t *c = &S.cells[v >> SHADOW_CELL_SHIFT];
    task_info_t *ti = c->task;
    uint32_t now = 0;
    if (ti != NULL) { /* who frees it, for the cross-task count */
        tls_t *t = &tls;
        PyThreadState **slot = t->ts_slot;
        if (t->session != S.session || slot == NULL || !fast_valid(t, *slot)) return 0; /* as current_tid_fast */
        now = t->fast_now;
    }
    *e = 0;
    S.shadow.count--;
    charge_free(c, (int64_t)(v & SHADOW_SIZE_MASK), COUNT_ONE, now);
    return 1;
}

/* realloc(old) -> p by the task that owns old, both small: the block keeps its cell and
 * only the size difference counts (as in record_realloc). */
static MS_HOT int exact_realloc_fast(void *old, void *p, size_t size) {
    tls_t *t = &tls;
    cell_t *cur = t->fast_cell;
    if (cur == NULL || t->guard || size >= SHADOW_MAX_SIZE) return 0;
    if (!fast_valid(t, *t->ts_slot) || t->cache_gen != S.cell_gen) return 0;
    uint32_t *lo = shadow_leaf(&S.shadow, (uintptr_t)old);
    if (lo == NULL) return 0;
    uint32_t *eo = lo + shadow_index((uintptr_t)old);
    uint32_t v = *eo, cell = v >> SHADOW_CELL_SHIFT;
    if (v == 0) return 0;
    cell_t *c = &S.cells[cell];
    if ((v & (1u << SHADOW_FLAG_BIT)) || c->track_time || cell_tid(c) != cell_tid(cur))
        return 0; /* a stack sample, a migration, or another owner: the general path */
    uint32_t *en = eo; /* resized in place: its entry is already there */
    if (p != old) {
        uint32_t *ln = shadow_leaf(&S.shadow, (uintptr_t)p);
        if (ln == NULL) return 0;
        en = ln + shadow_index((uintptr_t)p);
        if (*en != 0) return 0;
    }
    int64_t delta = (int64_t)size - (int64_t)(v & SHADOW_SIZE_MASK);
    if (delta > 0) { /* growth moves the stack countdown (keep_resized) */
        int64_t left = t->stack_countdown - delta;
        if (left <= 0) return 0;
        t->stack_countdown = left;
    }
    *eo = 0;
    *en = shadow_encode((uint32_t)size, cell, 0);
    charge_resize(c, delta);
    return 1;
}

__attribute__((noinline)) static void *exact_alloc_slow(void *p, size_t size) {
    return alloc_after(p, size, MODE_EXACT);
}

/* The object domain's exact hooks find the guard up only after the allocation (a test
 * before the call kept a register across it: ~7 instructions on every allocation), and
 * move one of ours that belongs in the raw allocator there: a pymalloc allocation and
 * free more, ~2 a task.  Its hooks name S.orig_obj directly, so nothing is kept. */
__attribute__((noinline)) static void *exact_alloc_slow_obj(void *p, size_t size, int zero) {
    if (tls.guard && own_raw(&S.orig_obj, size)) {
        void *q = own_raw_alloc(size, zero);
        if (q == NULL) return p;
        S.orig_obj.free(S.orig_obj.ctx, p);
        return q;
    }
    return alloc_after(p, size, MODE_EXACT);
}

static void *hook_malloc(void *ctx, size_t size) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    void *p = a->malloc(a->ctx, size);
    if (p == NULL || exact_alloc_fast(p, size)) return p;
    return exact_alloc_slow(p, size);
}

static void *hook_calloc(void *ctx, size_t nelem, size_t elsize) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    void *p = a->calloc(a->ctx, nelem, elsize);
    if (p == NULL || exact_alloc_fast(p, nelem * elsize)) return p;
    return exact_alloc_slow(p, nelem * elsize);
}

static void *hook_malloc_obj(void *ctx, size_t size) {
    (void)ctx; /* &S.orig_obj */
    void *p = S.orig_obj.malloc(S.orig_obj.ctx, size);
    if (p == NULL || exact_alloc_fast(p, size)) return p;
    return exact_alloc_slow_obj(p, size, 0);
}

static void *hook_calloc_obj(void *ctx, size_t nelem, size_t elsize) {
    (void)ctx;
    void *p = S.orig_obj.calloc(S.orig_obj.ctx, nelem, elsize);
    if (p == NULL || exact_alloc_fast(p, nelem * elsize)) return p;
    return exact_alloc_slow_obj(p, nelem * elsize, 1);
}

static MS_HOT void *hook_realloc_after(void *ptr, void *p, size_t size, int mode) {
    if (p == NULL) return p;
    if (!tls.guard) {
        tls.guard = 1;
        if (ptr == NULL) record_alloc(p, size, mode);
        else record_realloc(ptr, p, size);
        tls.guard = 0;
    } else if (ptr != NULL) {
        /* Under the guard: our bookkeeping, or Python code that ran inside it (a finalizer
         * during a snapshot).  A block the program owns stays its owner's, resized; one of
         * ours stays untracked.  (Sampled mode lets a sample go: an estimate.) */
        if (mode == MODE_EXACT) record_realloc_kept(ptr, p, size);
        else record_free(ptr, mode);
    }
    return p;
}

__attribute__((noinline)) static void *exact_realloc_slow(void *ptr, void *p, size_t size) {
    return hook_realloc_after(ptr, p, size, MODE_EXACT);
}

static void *hook_realloc(void *ctx, void *ptr, size_t size) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    void *p = a->realloc(a->ctx, ptr, size);
    if (p == NULL || (ptr == NULL ? exact_alloc_fast(p, size) : exact_realloc_fast(ptr, p, size))) return p;
    return exact_realloc_slow(ptr, p, size);
}

__attribute__((noinline)) static void exact_free_slow(PyMemAllocatorEx *a, void *ptr) {
    free_with(a, ptr, MODE_EXACT);
}

static void hook_free(void *ctx, void *ptr) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    if (ptr == NULL || exact_free_fast(ptr)) {
        a->free(a->ctx, ptr);
        return;
    }
    exact_free_slow(a, ptr);
}

/* Sampled mode: nearly every call only moves the countdown (an allocation) or stops at the
 * filter (a free).  Both are decided before the original allocator runs, so that call is
 * the hook's last (a jump, not a call: no frame, no register kept across it, and the
 * allocator returns straight to our caller); callgrind, loopback server: ~19 -> ~16
 * instructions a malloc.  Everything else is a call out of line.  An allocation that
 * then fails has moved the countdown all the same: harmless (a sample comes a little
 * later). */
__attribute__((noinline)) static void *sampled_malloc_slow(PyMemAllocatorEx *a, size_t size) {
    void *p = a->malloc(a->ctx, size);
    return alloc_after(p, size, MODE_SAMPLED); /* record_alloc moves the countdown (sampled_skip left it) */
}

__attribute__((noinline)) static void *sampled_calloc_slow(PyMemAllocatorEx *a, size_t nelem, size_t elsize) {
    void *p = a->calloc(a->ctx, nelem, elsize);
    return alloc_after(p, nelem * elsize, MODE_SAMPLED);
}

enum { SKIP_NO = 0, SKIP_YES = 1, SKIP_OURS = 2 };

/* Not a sample: move the countdown.  The session test stays: a countdown left from an
 * earlier session was drawn for that session's interval, and a thread that outlives it
 * (a pool or driver thread) would otherwise record nothing until it had allocated that
 * old gap (1 GiB before a 4 KiB session: nothing at all). */
static inline int sampled_skip(size_t size) {
    tls_t *t = &tls;
    int64_t left = t->countdown - (int64_t)size;
    if (left > 0 && t->session == S.session && !t->guard) {
        t->countdown = left;
        return SKIP_YES;
    }
    /* our own bookkeeping (the guard is up) is never recorded and does not use up the
     * gap; that is decided here, not on the slow path (a task tree makes ~5 such
     * allocations per task).  Otherwise due, or a new session: the slow path. */
    return t->guard ? SKIP_OURS : SKIP_NO;
}

static void *hook_malloc_sampled(void *ctx, size_t size) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    int k = sampled_skip(size);
    if (k == SKIP_YES) return a->malloc(a->ctx, size);
    if (k == SKIP_OURS) return own_malloc(a, size);
    return sampled_malloc_slow(a, size);
}

static void *hook_calloc_sampled(void *ctx, size_t nelem, size_t elsize) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    int k = sampled_skip(nelem * elsize);
    if (k == SKIP_YES) return a->calloc(a->ctx, nelem, elsize);
    if (k == SKIP_OURS) return own_calloc(a, nelem, elsize);
    return sampled_calloc_slow(a, nelem, elsize);
}

__attribute__((noinline)) static void *sampled_realloc_slow(PyMemAllocatorEx *a, void *ptr, size_t size) {
    void *p = a->realloc(a->ctx, ptr, size);
    return hook_realloc_after(ptr, p, size, MODE_SAMPLED);
}

/* A realloc is the old block's free and the new block's allocation: the fast path needs
 * the old block not to be a sample and the new one not to be due. */
static void *hook_realloc_sampled(void *ctx, void *ptr, size_t size) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    if (!filter_maybe(ptr) && sampled_skip(size) != SKIP_NO) return a->realloc(a->ctx, ptr, size);
    return sampled_realloc_slow(a, ptr, size);
}

__attribute__((noinline)) static void sampled_free_slow(PyMemAllocatorEx *a, void *ptr) {
    free_with(a, ptr, MODE_SAMPLED);
}

static void hook_free_sampled(void *ctx, void *ptr) {
    PyMemAllocatorEx *a = (PyMemAllocatorEx *)ctx;
    if (!filter_maybe(ptr)) {
        a->free(a->ctx, ptr);
        return;
    }
    sampled_free_slow(a, ptr);
}

/* ---- lifecycle ------------------------------------------------------------------------ */
static void clear_task_refs(task_info_t *r) {
    Py_CLEAR(r->coro);
    Py_CLEAR(r->code);
    Py_CLEAR(r->name);
    Py_CLEAR(r->labels);
}

static void tasks_watch(int on);
static uint32_t tasks_next_tid(void);
static void kept_mappings_clear(void);

/* The sampled free hooks' filter while passing through, or between sessions: all clear. */
static uint64_t no_samples[FILTER_WORDS];

/* Empty the tables of recorded blocks, leaving them as hooks passing through expect (no
 * shadow directory, an empty pointer table, a clear filter).  Their counters stay. */
static void detach_block_tables(void) {
    shadow_free(&S.shadow);
    ptrmap_free(&S.ptrs);
    if (S.filter != no_samples) sysmem_free(S.filter);
    S.filter = no_samples;
    u64map_free(&S.filter_more);
    S.filter_sticky = 0;
}

static void clear_data(void) {
    tasks_watch(0);
    kept_mappings_clear();
    detach_block_tables();
    for (uint32_t i = 1; S.tasks != NULL && i < S.ntasks; i++) clear_task_refs(&S.tasks[i]);
    u64map_free(&S.obj_index);
    sysmem_free(S.finished);
    S.finished = NULL;
    S.nfinished = S.capfinished = 0;
    for (uint32_t i = 0; i < S.nearly; i++) {
        Py_CLEAR(S.early[i].coro);
        Py_CLEAR(S.early[i].code);
        Py_CLEAR(S.early[i].labels);
    }
    sysmem_free(S.early);
    sysmem_free(S.early_spare);
    S.early = S.early_spare = NULL;
    S.nearly = S.capearly = S.capearly_spare = 0;
    sysmem_free(S.fold_cand);
    sysmem_free(S.fold_scratch);
    sysmem_free(S.fold_groups);
    S.fold_cand = S.fold_scratch = S.fold_groups = NULL;
    S.capfold_cand = S.capfold_scratch = S.capfold_groups = 0;
    S.fold_busy = 0;
    S.fold_armed = 0;
    S.records = S.pending = S.mappings_reused = 0;
    S.ninferred = 0;
    u64map_free(&S.cell_index);
    u64map_free(&S.task_index);
    sysmem_free(S.tid_ring);
    S.tid_ring = NULL;
    sysmem_free(S.cells);
    sysmem_free(S.free_cells);
    sysmem_free(S.tasks);
    sysmem_free(S.free_tasks);
    sysmem_free(S.threads);
    S.cells = NULL;
    S.free_cells = NULL;
    S.tasks = NULL;
    S.free_tasks = NULL;
    S.threads = NULL;
    S.ncells = S.capcells = S.nfree_cells = S.capfree_cells = 0;
    S.ntasks = S.captasks = S.nfree_tasks = S.capfree_tasks = 0;
    S.nthreads = S.capthreads = 0;
    S.untracked = S.foreign = S.dropped_cells = 0;
    stacks_clear();
    Py_CLEAR(S.tag_var);
    S.has_data = 0;
}

PyDoc_STRVAR(start_doc,
"start(tag_var, mode, sample_interval, stack_interval, stack_depth, half_life, seed)\n--\n\n"
"Install the allocator hooks.  tag_var: the ContextVar holding Tag objects; mode: 0 exact,\n"
"1 sampled; sample_interval: mean bytes between samples (sampled mode); stack_interval:\n"
"mean bytes between stack samples, 0 for none; stack_depth: frames kept per stack;\n"
"half_life: seconds for inferred attribution to halve; seed: RNG seed.  Discards data\n"
"of a previous run.  Raises RuntimeError if already started.");

static Py_ssize_t *raw_blocks_counter(void);

static inline int hooks_on_top(PyMemAllocatorDomain domain, const PyMemAllocatorEx *orig) {
    PyMemAllocatorEx top;
    PyMem_GetAllocator(domain, &top);
    return top.ctx == (void *)orig; /* our hooks' ctx: only ours name our copy */
}

/* In each domain of mask (bit 0 object, bit 1 memory) where our hooks are on top, the
 * original allocator goes back.  Returns the domains of mask where ours stay (under
 * another hook, or taken out by someone else). */
static int take_hooks_off(int mask) {
    if ((mask & 1) && hooks_on_top(PYMEM_DOMAIN_OBJ, &S.orig_obj)) {
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &S.orig_obj);
        mask &= ~1;
    }
    if ((mask & 2) && hooks_on_top(PYMEM_DOMAIN_MEM, &S.orig_mem)) {
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &S.orig_mem);
        mask &= ~2;
    }
    return mask;
}

/* Of the domains in mask (bit 0 object, bit 1 memory) where our hooks pass through, those
 * where they are still called: an allocation in each, made to take the hooks' slow path. */
static int probe_hooks(int mask) {
    tls_t *t = &tls;
    int g = t->guard, called = 0;
    t->guard = 0;
    if (mask & 1) {
        uint64_t seen = S.pt_seen;
        t->countdown = 0;
        PyObject_Free(PyObject_Malloc(16));
        if (S.pt_seen != seen) called |= 1;
    }
    if (mask & 2) {
        uint64_t seen = S.pt_seen;
        t->countdown = 0;
        PyMem_Free(PyMem_Malloc(16));
        if (S.pt_seen != seen) called |= 2;
    }
    t->guard = g;
    return called;
}

/* Before a start, hooks left passing through by the last stop (see core_stop): where they
 * are on top again (the hook over them was removed: tracemalloc.stop() puts back what it
 * found), the original allocator goes back; where they are no longer called at all, they
 * are forgotten; where they are still called under another hook, they are kept, to record
 * again in this session, which must then be in their mode.  Returns -1 with an exception
 * set (nothing changed) if it is not. */
static int settle_passthrough(int mode) {
    S.pt_left = take_hooks_off(S.pt_left);
    int under = probe_hooks(S.pt_left);
    if (under && S.pt_mode != mode) {
        PyErr_Format(PyExc_RuntimeError,
                     "another allocator hook (tracemalloc?) was installed over this profiler's %s-mode hooks "
                     "and is still active; %s-mode session can start only once it is removed "
                     "(tracemalloc.stop())",
                     S.pt_mode == MODE_SAMPLED ? "sampled" : "exact", mode == MODE_SAMPLED ? "a sampled" : "an exact");
        return -1;
    }
    S.pt_left = under;
    if (!under) S.passthrough = 0;
    return 0;
}

/* Put our hooks over what `domain` has now (kept in orig, which the hooks call). */
static void install_hooks(PyMemAllocatorDomain domain, PyMemAllocatorEx *hook, PyMemAllocatorEx *orig, int sampled,
                          void *(*exact_malloc)(void *, size_t), void *(*exact_calloc)(void *, size_t, size_t)) {
    PyMem_GetAllocator(domain, orig);
    hook->ctx = orig;
    hook->malloc = sampled ? hook_malloc_sampled : exact_malloc;
    hook->calloc = sampled ? hook_calloc_sampled : exact_calloc;
    hook->realloc = sampled ? hook_realloc_sampled : hook_realloc;
    hook->free = sampled ? hook_free_sampled : hook_free;
    PyMem_SetAllocator(domain, hook);
}

static PyObject *core_start(PyObject *m, PyObject *args) {
    PyObject *var;
    int mode, depth;
    double interval, stack_interval, half_life;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "OiddidK", &var, &mode, &interval, &stack_interval, &depth,
                          &half_life, &seed))
        return NULL;
    if (main_interpreter_only("it cannot profile") < 0) return NULL; /* (a legacy one may share the module) */
    S.main_interp = PyInterpreterState_Main();
    if (S.active) {
        PyErr_SetString(PyExc_RuntimeError, "the allocator hooks are already installed");
        return NULL;
    }
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "tag_var must be a contextvars.ContextVar");
        return NULL;
    }
    if (mode != MODE_EXACT && mode != MODE_SAMPLED) {
        PyErr_SetString(PyExc_ValueError, "mode must be 0 (exact) or 1 (sampled)");
        return NULL;
    }
    if (mode == MODE_SAMPLED && !(interval >= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "sample_interval must be >= 1 byte");
        return NULL;
    }
    if (S.passthrough && settle_passthrough(mode) < 0) return NULL;
    if (S.has_data) clear_data();
    if (ptrmap_init(&S.ptrs, mode == MODE_SAMPLED ? 1u << 10 : 1u << 14) < 0 || u64map_init_local(&S.cell_index, 1024, 0) < 0 ||
        u64map_init_local(&S.task_index, 1024, 0) < 0 || u64map_init_local(&S.obj_index, 1024, 7) < 0 || stacks_init(depth) < 0 ||
        (S.tid_ring = (tid_entry_t *)sysmem_calloc(TID_RING, sizeof(tid_entry_t))) == NULL ||
        (mode == MODE_SAMPLED && ((S.filter = (uint64_t *)sysmem_calloc(FILTER_WORDS, sizeof(uint64_t))) == NULL ||
                                  u64map_init(&S.filter_more, 64) < 0))) {
        clear_data();
        return PyErr_NoMemory();
    }
    /* Exact mode keeps small blocks in the shadow map; if its directory cannot be mapped
     * they all go to the pointer table instead (slower, still exact). */
    if (mode == MODE_EXACT) (void)shadow_init(&S.shadow);
    /* cell 0 and task slot 0 are reserved (0 = "none") */
    if (grow_array((void **)&S.cells, &S.capcells, sizeof(cell_t), 1) < 0 ||
        grow_array((void **)&S.tasks, &S.captasks, sizeof(task_info_t), 1) < 0) {
        clear_data();
        return PyErr_NoMemory();
    }
    S.ncells = 1;
    S.ntasks = 1;
    Py_INCREF(var);
    S.tag_var = var;
    S.mode = mode;
    S.sample_interval = interval;
    S.stack_interval = stack_interval > 0 ? stack_interval : 0;
    S.half_life_ns = half_life > 0 ? (uint64_t)(half_life * 1e9) : 0;
    S.seed = seed ? (uint64_t)seed : (uint64_t)now_ns();
    S.session++;
    S.first_tid = tasks_next_tid();
    S.cell_gen++;
    S.start_ns = now_ns();
    S.has_data = 1;

    tstate_locate();
    tasks_watch(1); /* before the hooks: it may import _asyncio */
    static PyMemAllocatorEx hook_obj, hook_mem;
    int sampled = mode == MODE_SAMPLED;
    if (!(S.pt_left & 1)) install_hooks(PYMEM_DOMAIN_OBJ, &hook_obj, &S.orig_obj, sampled, hook_malloc_obj, hook_calloc_obj);
    if (!(S.pt_left & 2)) install_hooks(PYMEM_DOMAIN_MEM, &hook_mem, &S.orig_mem, sampled, hook_malloc, hook_calloc);
    S.raw_blocks = raw_blocks_counter(); /* (it tests S.orig_obj: what is under our hooks now) */
    /* (hooks still under another one, from the last session, record again from here) */
    S.pt_left = 0;
    S.passthrough = 0;
    S.active = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stop_doc, "stop() -> bool\n--\n\nRestore the original allocators.  Data is kept until clear() or start().\n"
"True if the hooks had been taken out of the allocator chain by someone else (some\n"
"allocations went unrecorded).");

/* A hook installed over ours since start (tracemalloc.start() while profiling) holds our
 * hooks as its allocator and will call them, and put them back when it is removed.  Taking
 * them out under it would cut it off from the allocator (its frees of blocks made through
 * it then go astray), and putting the original back over it would drop it.  So in each
 * domain where ours are not on top they stay, recording nothing from now on (passthrough:
 * S.cell_gen moves, so no exact fast path holds, and the tables of recorded blocks are
 * emptied so that no free finds one; record_alloc turns back every allocation), until a
 * start finds where they are (settle_passthrough). */
static PyObject *core_stop(PyObject *m, PyObject *noargs) {
    int cut = 0;
    if (S.active) {
        /* code objects only our stack samples hold go while their frees are still seen
         * (_stacks.h); if that fails for want of memory, they stay, as before */
        if (settle_as_nobody() < 0) PyErr_Clear();
        int left = take_hooks_off(3);
        if (left) {
            S.passthrough = 1;
            S.pt_left = left;
            S.pt_mode = S.mode;
            S.cell_gen++;
            detach_block_tables();
            /* and if they are no longer called at all, they were taken out (tracemalloc
             * started before us and stopped since: it put back what it found) */
            if (probe_hooks(left) != left) cut = 1;
        }
        S.active = 0;
    }
    return PyBool_FromLong(cut);
}

PyDoc_STRVAR(clear_doc, "clear()\n--\n\nFree all recorded data.  Raises RuntimeError while started.");

static PyObject *core_clear(PyObject *m, PyObject *noargs) {
    if (S.active) {
        PyErr_SetString(PyExc_RuntimeError, "stop() before clear()");
        return NULL;
    }
    if (K.settling || S.fold_busy) { /* code run by an object we let go (a weakref callback) */
        PyErr_SetString(PyExc_RuntimeError, "clear() while the recorded data is being read or folded");
        return NULL;
    }
    if (S.has_data) clear_data();
    Py_RETURN_NONE;
}

static PyObject *core_is_active(PyObject *m, PyObject *noargs) { return PyBool_FromLong(S.active); }

PyDoc_STRVAR(main_interpreter_only_doc,
"main_interpreter_only()\n--\n\nRaise ImportError in a sub-interpreter (the package's first line: before it\n"
"loads anything there, such as orjson, which a legacy sub-interpreter cannot unload cleanly).");

static PyObject *core_main_interpreter_only(PyObject *m, PyObject *noargs) {
    if (main_interpreter_only("it cannot be imported in") < 0) return NULL;
    Py_RETURN_NONE;
}

/* A task id argument (an unsigned int).  Returns -1 with an exception set. */
static int parse_tid(PyObject *arg, unsigned long *tid) {
    *tid = PyLong_AsUnsignedLong(arg);
    return (*tid == (unsigned long)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* ---- thread and hand-over controls (called from Python in the thread concerned) ------- */
PyDoc_STRVAR(thread_slot_doc, "thread_slot() -> int\n--\n\nThe calling thread's slot (registering it).");

static PyObject *core_thread_slot(PyObject *m, PyObject *noargs) {
    if (!S.has_data) return PyLong_FromLong(0);
    tls_t *t = &tls;
    if (t->session != S.session) tls_enter_session(t);
    return PyLong_FromUnsignedLong(thread_slot(t));
}

PyDoc_STRVAR(set_handover_doc,
"set_handover(tid) -> int\n--\n\nCharge context-less work on this thread to task tid (0: stop),\n"
"as handed over by our wrappers.  Returns the previous value, to restore it.");

static PyObject *core_set_handover(PyObject *m, PyObject *arg) {
    unsigned long tid;
    if (parse_tid(arg, &tid) < 0) return NULL;
    tls_t *t = &tls;
    if (S.has_data && t->session != S.session) tls_enter_session(t);
    uint32_t prev = t->handover;
    set_handover(t, (uint32_t)tid);
    return PyLong_FromUnsignedLong(prev);
}

PyDoc_STRVAR(tag_in_context_doc,
"tag_in_context(context) -> (int, object)\n--\n\nHow the hooks read the tag variable in a contextvars.Context: (1, value)\n"
"read from its mapping's nodes, (0, None) not in it, (-1, None) left to ContextVar.get (a\n"
"mapping of another shape; also before any task was made, or when not started).  For tests.");

static PyObject *core_tag_in_context(PyObject *m, PyObject *ctx) {
    if (!PyContext_CheckExact(ctx)) {
        PyErr_SetString(PyExc_TypeError, "tag_in_context() takes a contextvars.Context");
        return NULL;
    }
    PyObject *v = NULL;
    int r = S.active && S.tag_var != NULL ? tag_in_context(ctx, &v) : -1;
    return Py_BuildValue("(iO)", r, r > 0 ? v : Py_None);
}

PyDoc_STRVAR(current_tid_doc,
"current_tid() -> int\n--\n\nThe task the calling thread's work is charged to now (by its context's\n"
"tag, the running task where tasks share that context, or the hand-over), 0 if none.");

static PyObject *core_current_tid(PyObject *m, PyObject *noargs) {
    tls_t *t = &tls;
    if (!S.active || S.tag_var == NULL) return PyLong_FromLong(0);
    if (t->session != S.session) tls_enter_session(t);
    int g = t->guard;
    t->guard = 1;
    uint32_t tid = current_tid();
    t->guard = g;
    return PyLong_FromUnsignedLong(tid);
}

PyDoc_STRVAR(set_inferred_doc,
"set_inferred(tid, started_ns)\n--\n\nMark the calling thread as started during task tid's step\n"
"at monotonic time started_ns: its context-less allocations are inferred to that task.");

static PyObject *core_set_inferred(PyObject *m, PyObject *args) {
    unsigned long tid;
    unsigned long long started;
    if (!PyArg_ParseTuple(args, "kK", &tid, &started)) return NULL;
    if (!S.has_data) Py_RETURN_NONE;
    tls_t *t = &tls;
    if (t->session != S.session) tls_enter_session(t);
    int g = t->guard;
    t->guard = 1;
    uint32_t slot = thread_slot(t);
    t->guard = g;
    if (slot) {
        thread_info_t *th = &S.threads[slot - 1];
        th->inferred_tid = (uint32_t)tid;
        th->inferred_start_ns = started;
        t->fast_ctx = FAST_NONE;
        th->shared = 0;
        th->owner_done = 0;
        S.ninferred++;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(serves_doc,
"serves()\n--\n\nThe calling thread takes work from a queue (queue.Queue.get): if its context-less\n"
"allocations were inferred to the task that started it, they are not any more (a thread\n"
"that serves a queue serves whoever fills it; its bytes go to the contexts it runs work\n"
"in, else to its own unattributed bucket).");

/* Thread th (the caller's, t) is inferred to no task from now on. */
static void stop_inference(tls_t *t, thread_info_t *th) {
    if (th->inferred_tid && !th->shared) {
        th->shared = 1;
        t->fast_ctx = FAST_NONE; /* the next allocation finds its cell again */
    }
}

static PyObject *core_serves(PyObject *m, PyObject *noargs) {
    if (!S.has_data || S.ninferred == 0) Py_RETURN_NONE;
    tls_t *t = &tls;
    if (t->session != S.session || t->slot == 0) Py_RETURN_NONE; /* not a thread we marked */
    stop_inference(t, &S.threads[t->slot - 1]);
    Py_RETURN_NONE;
}

/* The calling thread runs an event loop: its role in the report, and no inference (a loop
 * thread started by a task serves its loop's tasks; what its loop does between them is
 * loop internals, the thread's own unattributed bytes). */
static void mark_loop_thread(tls_t *t) {
    uint32_t slot = thread_slot(t);
    if (slot == 0) return;
    S.threads[slot - 1].runs_loop = 1;
    stop_inference(t, &S.threads[slot - 1]);
}

PyDoc_STRVAR(loop_thread_doc,
"loop_thread(was=None)\n--\n\nThe calling thread is about to make (and run) an event loop: it is a loop\n"
"thread in the report, and what it allocates outside any task is not inferred to the task\n"
"that started it but its own unattributed bytes.  Returns what the thread was before, an\n"
"int, for loop_thread(was) to put back if making the loop failed (None: nothing to undo).");

static PyObject *core_loop_thread(PyObject *m, PyObject *args) {
    PyObject *was = Py_None;
    if (!PyArg_ParseTuple(args, "|O:loop_thread", &was)) return NULL;
    if (!S.active) Py_RETURN_NONE;
    tls_t *t = &tls;
    if (was != Py_None) {
        /* undo: only for the session and thread that were marked (else nothing is ours) */
        long v = PyLong_AsLong(was);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (t->session != S.session || t->slot == 0 || v < 0 || v > 3) Py_RETURN_NONE;
        thread_info_t *th = &S.threads[t->slot - 1];
        th->runs_loop = (uint32_t)(v & 1);
        if (!(v & 2) && th->shared) {
            th->shared = 0; /* inference goes on where it was */
            t->fast_ctx = FAST_NONE;
        }
        Py_RETURN_NONE;
    }
    if (t->session != S.session) tls_enter_session(t);
    uint32_t slot = thread_slot(t);
    if (slot == 0) Py_RETURN_NONE;
    thread_info_t *th = &S.threads[slot - 1];
    long before = (long)th->runs_loop | ((long)th->shared << 1);
    mark_loop_thread(t);
    return PyLong_FromLong(before);
}

static PyObject *core_set_guard(PyObject *m, PyObject *arg) {
    int v = PyObject_IsTrue(arg);
    if (v < 0) return NULL;
    int prev = tls.guard;
    tls.guard = v;
    return PyBool_FromLong(prev);
}

static PyObject *core_now_ns(PyObject *m, PyObject *noargs) { return PyLong_FromUnsignedLongLong(now_ns()); }

/* ---- reading the data (the guard is set so our own output is not recorded) --------- */
PyDoc_STRVAR(cells_doc,
"cells() -> list[tuple]\n--\n\nOne tuple per accounting cell: (tid, thread_slot, route, phase,\n"
"allocated_bytes, allocations, freed_bytes, frees, live_bytes, live_entries,\n"
"cross_free_bytes, cross_frees, first_ns, last_ns, origin).  Counts are floats (estimates in\n"
"sampled mode), bytes are ints.  origin: for work handed over, the slot of the thread that\n"
"sent it (0 not known, -1 several).");

static PyObject *core_cells(PyObject *m, PyObject *noargs) {
    int g = tls.guard;
    tls.guard = 1;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 1; out != NULL && i < S.ncells; i++) {
        cell_t c = S.cells[i];
        if (c.key == 0) continue; /* released */
        PyObject *row = Py_BuildValue(
            "(kkkkLdLdLLLdKKl)", (unsigned long)cell_tid(&c), (unsigned long)cell_slot(&c),
            (unsigned long)cell_route(&c), (unsigned long)cell_phase(&c), (long long)c.alloc_bytes,
            count_value(c.allocs), (long long)c.freed_bytes, count_value(c.frees),
            (long long)(c.alloc_bytes - c.freed_bytes), (long long)c.live_entries, (long long)c.cross_free_bytes,
            count_value(c.cross_frees), (unsigned long long)c.first_ns,
            (unsigned long long)c.last_ns, c.origin == ORIGIN_MIXED ? -1L : (long)c.origin);
        if (row == NULL || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(row);
    }
    tls.guard = g;
    return out;
}

PyDoc_STRVAR(tasks_doc,
"tasks() -> dict[int, tuple[int, int, int]]\n--\n\ntid -> (home_slot, live_bytes, peak_live_bytes) for every task with data.");

static PyObject *core_tasks(PyObject *m, PyObject *noargs) {
    int g = tls.guard;
    tls.guard = 1;
    PyObject *out = PyDict_New();
    for (uint32_t i = 1; out != NULL && i < S.ntasks; i++) {
        task_info_t ti = S.tasks[i];
        if (!ti.in_use) continue;
        PyObject *k = PyLong_FromUnsignedLong(ti.tid);
        PyObject *v = Py_BuildValue("(kLL)", (unsigned long)ti.home_slot, (long long)ti.live_bytes,
                                    (long long)ti.peak_live_bytes);
        if (k == NULL || v == NULL || PyDict_SetItem(out, k, v) < 0) Py_CLEAR(out);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    tls.guard = g;
    return out;
}

PyDoc_STRVAR(threads_doc,
"threads() -> list[tuple]\n--\n\n(slot, ident, native_id, inferred_tid, shared, owner_done, folded_bytes,\n"
"folded_allocations, folded_home, folded_handed) per thread seen: the last four are what\n"
"the tasks folded so far had there (bytes, allocations, whether it was one's loop thread,\n"
"whether it ran work one handed over); then runs_loop (see loop_thread) and, of the folded\n"
"bytes, those inferred, by phase.");

static PyObject *core_threads(PyObject *m, PyObject *noargs) {
    int g = tls.guard;
    tls.guard = 1;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 0; out != NULL && i < S.nthreads; i++) {
        thread_info_t th = S.threads[i];
        PyObject *row = Py_BuildValue("(kkkkkkLdkkk(LLLL))", (unsigned long)(i + 1), th.ident, th.native_id,
                                      (unsigned long)th.inferred_tid, (unsigned long)th.shared,
                                      (unsigned long)th.owner_done, (long long)th.folded_bytes,
                                      (double)th.folded_allocs / (double)COUNT_ONE,
                                      (unsigned long)th.folded_home, (unsigned long)th.folded_handed,
                                      (unsigned long)th.runs_loop, (long long)th.folded_inferred[0],
                                      (long long)th.folded_inferred[1], (long long)th.folded_inferred[2],
                                      (long long)th.folded_inferred[3]);
        if (row == NULL || PyList_Append(out, row) < 0) Py_CLEAR(out);
        Py_XDECREF(row);
    }
    tls.guard = g;
    return out;
}

/* ---- the collector's count of a task's tag mapping ---------------------------------
 * The collector starts a young collection when allocations of collected objects, net of
 * frees, pass a threshold.  A task's tag mapping (two such objects, three or more where
 * our variable shares a slot with another; a plain task's context shares its parent's)
 * counts there while the task runs, so a task tree ran ~20% more young collections, and
 * so more full ones (~70 ms each at 56,000 pending tasks), than without us.  When the
 * mapping is untracked (hamt_untrack_if_acyclic) its objects are taken off the count
 * while the task runs and given back when it ends, before they
 * are freed (which takes them off again, as for any object): over a task's life the count
 * moves as in a plain run.  The count lives in CPython's interpreter state, whose layout
 * is internal: it is used only after the thresholds read there matched
 * gc.get_threshold() (gc_count_check). */
#undef _PyGC_FINALIZED /* pycore_gc.h (from pycore_interp.h) defines it its own way */
#define Py_BUILD_CORE 1
#include "internal/pycore_interp.h"
#undef Py_BUILD_CORE

/* pymalloc's count of the blocks it got from the raw allocator, if pymalloc itself is the
 * object allocator (no debug hooks, no other tool's hooks under ours) and the count is
 * where this build's headers say: a block too big for pymalloc's pools must move it by
 * exactly one.  Called before our hooks go in.  NULL: our own objects stay in pymalloc. */
static Py_ssize_t *raw_blocks_counter(void) {
#if PY_VERSION_HEX < 0x030C0000 || defined(Py_GIL_DISABLED)
    return NULL; /* 3.11 keeps the count in a static of obmalloc.c */
#else
    if (S.orig_obj.ctx != NULL || S.orig_obj.malloc == NULL) return NULL;
    PyInterpreterState *interp = PyInterpreterState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    if (interp->obmalloc == NULL) return NULL;
    Py_ssize_t *n = &interp->obmalloc->mgmt.raw_allocated_blocks;
#else
    Py_ssize_t *n = &interp->obmalloc.mgmt.raw_allocated_blocks;
#endif
    Py_ssize_t before = *n;
    void *p = S.orig_obj.malloc(S.orig_obj.ctx, 4096); /* above pymalloc's 512-byte limit */
    if (p == NULL) return NULL;
    Py_ssize_t during = *n;
    S.orig_obj.free(S.orig_obj.ctx, p);
    return (during == before + 1 && *n == before) ? n : NULL;
#endif
}

static int gc_count_ok; /* 0 unchecked, 1 usable, -1 not */
static int *gc_young;   /* the young generation's count, once gc_count_ok is 1 */

static void gc_count_check(void) {
    gc_count_ok = -1;
    PyObject *gc = PyImport_ImportModule("gc");
    PyObject *th = gc ? PyObject_CallMethod(gc, "get_threshold", NULL) : NULL;
    Py_XDECREF(gc);
    if (th != NULL && PyTuple_Check(th) && PyTuple_GET_SIZE(th) == 3) {
        struct _gc_runtime_state *st = &PyInterpreterState_Get()->gc;
        int same = 1;
        for (int i = 0; i < 3; i++)
            same &= PyLong_AsLong(PyTuple_GET_ITEM(th, i)) == (long)st->generations[i].threshold;
        if (same && !PyErr_Occurred()) {
            gc_young = &st->generations[0].count;
            gc_count_ok = 1;
        }
    }
    Py_XDECREF(th);
    PyErr_Clear();
}

static void gc_count_add(int n) {
    *gc_young = *gc_young + n > 0 ? *gc_young + n : 0;
}

/* A task whose mapping was just untracked, n objects with the nodes made under it: take
 * them off the count (returns n), or leave it (0: the layout is not known to match). */
static int gc_uncount(int n) {
    if (MS_UNLIKELY(gc_count_ok == 0)) gc_count_check();
    if (gc_count_ok < 0) return 0;
    gc_count_add(-n);
    return n;
}

/* The task ends (or its record goes without ending): give the objects back. */
static inline void gc_recount(task_info_t *r) {
    if (r->flags & TF_UNCOUNTED) {
        gc_count_add((int)((r->flags & TF_UNCOUNTED) >> TF_UNCOUNTED_SHIFT));
        r->flags &= ~(uint32_t)TF_UNCOUNTED;
    }
}

/* Record ti (registered) joins the tree under its parent's record or, if that was folded,
 * under the record that was the parent's up when the parent was made (parent_up), if
 * that one is still kept.  (Deeper than that, a task made in a folded task's context after
 * its grandparent's record was folded too starts a tree of its own.) */
static int up_of(uint32_t ti, uint32_t tid, uint32_t *up) {
    return tid != 0 && tid_get(tid, up) && *up != ti && (S.tasks[*up].flags & TF_REGISTERED);
}

static void link_record(uint32_t ti, uint32_t parent_tid, uint32_t parent_up) {
    task_info_t *r = &S.tasks[ti];
    uint32_t up;
    if (!up_of(ti, parent_tid, &up) && !up_of(ti, parent_up, &up)) return; /* (no parent: no parent_up) */
    task_info_t *u = &S.tasks[up];
    r->up = up;
    r->prev_sib = 0;
    r->next_sib = u->first_child;
    if (u->first_child) S.tasks[u->first_child].prev_sib = ti;
    u->first_child = ti;
}

/* Record ti leaves the tree.  Its children move up to its own up (or become roots), and
 * with carry (it is folded into its group), what it and the tasks folded under it
 * allocated goes to its up's sub_* (its own totals: alloc_bytes, allocs).  Each move
 * costs a child one write; a record moves at most once per ancestor folded. */
static void unlink_record(uint32_t ti, int carry, int64_t alloc_bytes, double allocs) {
    task_info_t *r = &S.tasks[ti];
    uint32_t up = r->up;
    if (r->prev_sib) S.tasks[r->prev_sib].next_sib = r->next_sib;
    else if (up) S.tasks[up].first_child = r->next_sib;
    if (r->next_sib) S.tasks[r->next_sib].prev_sib = r->prev_sib;
    uint32_t c = r->first_child, last = 0;
    for (; c != 0; c = S.tasks[c].next_sib) {
        S.tasks[c].up = up;
        last = c;
    }
    if (up) {
        task_info_t *u = &S.tasks[up];
        if (last) { /* the children go in front of up's own */
            S.tasks[last].next_sib = u->first_child;
            if (u->first_child) S.tasks[u->first_child].prev_sib = last;
            u->first_child = r->first_child;
        }
        if (carry) {
            u->sub_tasks += 1 + r->sub_tasks;
            u->sub_alloc_bytes += alloc_bytes + r->sub_alloc_bytes;
            u->sub_allocs += allocs + r->sub_allocs;
        }
    } else {
        for (c = r->first_child; c != 0;) { /* roots now: no list */
            uint32_t next = S.tasks[c].next_sib;
            S.tasks[c].prev_sib = S.tasks[c].next_sib = 0;
            c = next;
        }
    }
    r->up = r->first_child = r->next_sib = r->prev_sib = 0;
}

/* Forget task tid (slot ti), whose cells name no live allocation and total ab bytes in na
 * allocations (the caller has just summed them: task_totals): its cells and its record.
 * With carry, the task is folded into its group: its bytes stay in its ancestors'
 * subtrees (unlink_record). */
static void release_slot(uint32_t tid, uint32_t ti, int carry, int64_t ab, double na) {
    if (S.tasks[ti].flags & TF_REGISTERED) unlink_record(ti, carry, ab, na);
    gc_recount(&S.tasks[ti]);
    int g = tls.guard;
    tls.guard = 1;
    for (uint32_t i = S.tasks[ti].first_cell; i != 0;) {
        uint32_t next = S.cells[i].next_in_task;
        const cell_t *c = &S.cells[i];
        uint32_t slot = cell_slot(c);
        if (carry && slot != 0 && slot <= S.nthreads) {
            thread_info_t *th = &S.threads[slot - 1];
            th->folded_bytes += c->alloc_bytes;
            th->folded_allocs += c->allocs;
            if (slot == S.tasks[ti].home_slot) th->folded_home = 1;
            if (cell_route(c) == ROUTE_HANDED) th->folded_handed = 1;
            if (cell_route(c) == ROUTE_INFERRED && cell_phase(c) < INFERRED_PHASES)
                th->folded_inferred[cell_phase(c)] += c->alloc_bytes;
        }
        if (S.cells[i].indexed) u64map_del(&S.cell_index, S.cells[i].key);
        S.cells[i].key = 0;
        S.cells[i].next_in_task = 0;
        S.cells[i].tinfo = 0;
        S.cells[i].task = NULL;
        if (grow_array((void **)&S.free_cells, &S.capfree_cells, sizeof(uint32_t), S.nfree_cells + 1) == 0)
            S.free_cells[S.nfree_cells++] = i;
        i = next;
    }
    tid_del(tid);
    task_info_t *r = &S.tasks[ti];
    if (r->flags & TF_REGISTERED) {
        S.records--;
        if (!(r->flags & TF_FINISHED)) {
            S.pending--;
            if (r->obj) u64map_del(&S.obj_index, (uint64_t)r->obj);
        }
    }
    PyObject *coro = r->coro, *name = r->name, *labels = r->labels, *code = r->code;
    memset(r, 0, sizeof(*r));
    if (grow_array((void **)&S.free_tasks, &S.capfree_tasks, sizeof(uint32_t), S.nfree_tasks + 1) == 0)
        S.free_tasks[S.nfree_tasks++] = ti;
    S.cell_gen++; /* invalidate every thread's cached cell */
    Py_XDECREF(coro);
    Py_XDECREF(name);
    Py_XDECREF(labels);
    Py_XDECREF(code);
    tls.guard = g;
}

/* Forget task tid, as release_slot.  Returns 0 if done (or nothing was held), 1 if some
 * cell still names a live allocation (then nothing changes). */
static int release_task_slot(uint32_t tid, int carry) {
    uint32_t ti;
    if (!tid_get(tid, &ti)) return 0;
    int64_t ab, le;
    double na;
    task_totals(ti, &ab, &na, &le);
    if (le != 0) return 1;
    release_slot(tid, ti, carry, ab, na);
    return 0;
}

#include "_tasks.h"

PyDoc_STRVAR(stats_doc,
"stats() -> dict\n--\n\nThe tracker's own footprint: tracked_allocations, table_bytes, stacks_bytes,\n"
"tracker_bytes, cells, tasks, threads, untracked, foreign (sub-interpreters' allocations), dropped, start_ns, active, table_capacity,\n"
"task_records, pending_task_records; fast_thread_state: 1 if the calling thread reads its\n"
"thread state from its slot (_tstate.h), 0 if through the call; direct_context_tagging: 1\n"
"if new tasks' contexts are tagged through the HAMT directly (_tasks.h), 0 if not yet known,\n"
"-1 if through PyContextVar_Set; direct_hamt_insertion: 1 if that mapping's new root is built\n"
"here (hamt_set_direct, checked against the HAMT's own set()), -1 if set() does it, 0 if not yet\n"
"known; own_objects_raw: 1 if our own objects of a context's size\n"
"come from the raw allocator (own_malloc), 0 if all stay in pymalloc; tag_mappings_reused:\n"
"tasks whose context was given the tag mapping of a task that is gone (kept_mapping_take);\n"
"stack_frames: frames stack samples named; stack_frames_indexed: those the hooks can still\n"
"match (their code object is alive: see stacks_settle); stacks, stacks_indexed: the same for\n"
"whole stacks (stacks_reindex).");

static PyObject *core_stats(PyObject *m, PyObject *noargs) {
    int g = tls.guard;
    tls.guard = 1;
    size_t table = ptrmap_bytes(&S.ptrs) + shadow_resident_bytes(&S.shadow) +
                   (S.filter != NULL && S.filter != no_samples ? FILTER_WORDS * sizeof(uint64_t) : 0) +
                   (S.filter_more.slots ? (S.filter_more.mask + 1) * sizeof(u64map_entry_t) : 0);
    size_t other = (size_t)S.capcells * sizeof(cell_t) + (size_t)S.captasks * sizeof(task_info_t) +
                   (size_t)S.capthreads * sizeof(thread_info_t) +
                   ((size_t)(S.cell_index.slots ? S.cell_index.mask + 1 : 0) +
                    (size_t)(S.task_index.slots ? S.task_index.mask + 1 : 0)) * sizeof(u64map_entry_t) +
                   ((size_t)S.capfree_cells + S.capfree_tasks + S.capfinished) * sizeof(uint32_t) +
                   ((size_t)S.capearly + S.capearly_spare) * sizeof(folded_early_t) +
                   (size_t)S.capfold_cand * sizeof(fold_cand_t) + (size_t)S.capfold_scratch * FOLD_SCRATCH_UNIT +
                   (size_t)S.capfold_groups * sizeof(fold_group_t) + (S.tid_ring ? TID_RING * sizeof(tid_entry_t) : 0) +
                   (size_t)(S.obj_index.slots ? S.obj_index.mask + 1 : 0) * sizeof(u64map_entry_t);
    size_t stacks = stacks_bytes();
    PyObject *d = Py_BuildValue(
        "{s:K,s:n,s:n,s:n,s:I,s:I,s:I,s:K,s:K,s:K,s:K,s:i,s:K,s:K,s:K,s:i,s:i,s:i,s:i,s:K,s:I,s:K,s:I,s:K}", "tracked_allocations",
        (unsigned long long)ptrs_count(), "table_bytes", (Py_ssize_t)table, "stacks_bytes", (Py_ssize_t)stacks,
        "tracker_bytes", (Py_ssize_t)(table + other + stacks), "cells",
        (unsigned int)(S.ncells - 1 - S.nfree_cells), "tasks", (unsigned int)(S.ntasks - 1 - S.nfree_tasks),
        "threads", (unsigned int)S.nthreads, "untracked", (unsigned long long)S.untracked, "foreign", (unsigned long long)S.foreign, "dropped",
        (unsigned long long)S.dropped_cells, "start_ns", (unsigned long long)S.start_ns, "active", S.active,
        "table_capacity", (unsigned long long)S.ptrs.capacity, "task_records", (unsigned long long)S.records,
        "pending_task_records", (unsigned long long)S.pending, "fast_thread_state", tls.ts_slot != NULL,
        "direct_context_tagging", HAMT.known, "direct_hamt_insertion", HAMT.known == 0 ? 0 : HAMT.direct,
        "own_objects_raw", S.raw_blocks != NULL, "tag_mappings_reused", (unsigned long long)S.mappings_reused,
        "stack_frames", (unsigned int)K.nframes, "stack_frames_indexed", (unsigned long long)K.frame_index.count,
        "stacks", (unsigned int)K.nstacks, "stacks_indexed", (unsigned long long)K.stack_index.count);
    tls.guard = g;
    return d;
}

/* ---- the Tag type ---------------------------------------------------------------------- */
static PyObject *Tag_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    unsigned long tid;
    if (!PyArg_ParseTuple(args, "k:Tag", &tid)) return NULL;
    if (tid == 0 || tid > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a Tag id is in 1..2**32-1");
        return NULL;
    }
    TagObject *self = (TagObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->tid = (uint32_t)tid;
    return (PyObject *)self;
}

static PyObject *Tag_repr(TagObject *self) { return PyUnicode_FromFormat("Tag(%lu)", (unsigned long)self->tid); }

static PyObject *Tag_get_id(TagObject *self, void *closure) { return PyLong_FromUnsignedLong(self->tid); }

static PyGetSetDef Tag_getset[] = {{"id", (getter)Tag_get_id, NULL, "the task id", NULL}, {NULL}};

static PyTypeObject TagType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memscope_async.attribution._core.Tag",
    .tp_basicsize = sizeof(TagObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Tag(id): the value our ContextVar holds inside a task's context."),
    .tp_new = Tag_new,
    .tp_dealloc = Tag_dealloc,
    .tp_repr = (reprfunc)Tag_repr,
    .tp_getset = Tag_getset,
};

/* ---- module ---------------------------------------------------------------------------- */
static PyMethodDef core_methods[] = {
    {"start", core_start, METH_VARARGS, start_doc},
    {"stop", core_stop, METH_NOARGS, stop_doc},
    {"clear", core_clear, METH_NOARGS, clear_doc},
    {"is_active", core_is_active, METH_NOARGS, NULL},
    {"thread_slot", core_thread_slot, METH_NOARGS, thread_slot_doc},
    {"set_handover", core_set_handover, METH_O, set_handover_doc},
    {"current_tid", core_current_tid, METH_NOARGS, current_tid_doc},
    {"tag_in_context", core_tag_in_context, METH_O, tag_in_context_doc},
    {"set_inferred", core_set_inferred, METH_VARARGS, set_inferred_doc},
    {"serves", core_serves, METH_NOARGS, serves_doc},
    {"loop_thread", core_loop_thread, METH_VARARGS, loop_thread_doc},
    {"main_interpreter_only", core_main_interpreter_only, METH_NOARGS, main_interpreter_only_doc},
    {"now_ns", core_now_ns, METH_NOARGS, NULL},
    {"set_guard", core_set_guard, METH_O,
     "set_guard(flag) -> bool\n--\n\nWhile set, this thread's allocations are not recorded (our own\n"
     "bookkeeping).  Returns the previous value, to restore it."},
    {"cells", core_cells, METH_NOARGS, cells_doc},
    {"tasks", core_tasks, METH_NOARGS, tasks_doc},
    {"threads", core_threads, METH_NOARGS, threads_doc},
    {"stats", core_stats, METH_NOARGS, stats_doc},
    {"stack_samples", core_stack_samples, METH_NOARGS, stack_samples_doc},
    {"settle_stacks", core_settle_stacks, METH_NOARGS, settle_stacks_doc},
    {"fold_sites", core_fold_sites, METH_VARARGS, fold_sites_doc},
    {"configure", core_configure, METH_VARARGS, configure_doc},
    {"labels_in_use", core_labels_in_use, METH_NOARGS, labels_in_use_doc},
    {"unrecorded", (PyCFunction)(void (*)(void))core_unrecorded, METH_FASTCALL, unrecorded_doc},
    {"register_loop", core_register_loop, METH_VARARGS, register_loop_doc},
    {"stand_in_placed", core_stand_in_placed, METH_VARARGS, stand_in_placed_doc},
    {"unregister_loop", core_unregister_loop, METH_O, unregister_loop_doc},
    {"set_fold_hook", core_set_fold_hook, METH_VARARGS, set_fold_hook_doc},
    {"records", core_records, METH_NOARGS, records_doc},
    {"fold", core_fold, METH_VARARGS, fold_doc},
    {"tid_of", core_tid_of, METH_O, tid_of_doc},
    {"task_layout", core_task_layout, METH_NOARGS, task_layout_doc},
    {"tag_running_task", core_tag_running_task, METH_VARARGS, tag_running_task_doc},
    {"next_task_id", core_next_task_id, METH_NOARGS, next_task_id_doc},
    {"task_labels", core_task_labels, METH_O, task_labels_doc},
    {"own_labels", core_own_labels, METH_O, own_labels_doc},
    {"set_task_labels", core_set_task_labels, METH_VARARGS, set_task_labels_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "_core", "Allocator hooks and per-task accounting (see attribution/tracker.py).", -1, core_methods,
};

static PyMethodDef task_done_def = {"task_done", core_task_done, METH_O, task_done_doc};

static int init_strings(void) {
#define INTERN(field, text) \
    if ((G.field = PyUnicode_InternFromString(text)) == NULL) return -1;
    INTERN(s_qualname, "__qualname__");
    INTERN(s_self, "__self__");
    INTERN(s_get_name, "get_name");
    INTERN(s_set_name, "set_name");
    INTERN(s_state, "_state");
    INTERN(s_exception, "_exception");
    INTERN(s_cancelled, "cancelled");
    INTERN(s_add_done_callback, "add_done_callback");
    INTERN(s_get_coro, "get_coro");
    INTERN(s_get_context, "get_context");
    INTERN(s_done, "done");
    INTERN(s_message, "message");
    INTERN(s_task, "task");
    INTERN(s_destroyed_pending, "Task was destroyed but it is pending!");
    INTERN(s_eager_start, "eager_start");
    INTERN(s_name, "name");
    INTERN(s_loop, "loop");
    INTERN(s_context, "context");
    INTERN(s_check_closed, "_check_closed");
    INTERN(s_closed, "_closed");
    INTERN(s_base_events_module, "asyncio.base_events");
    INTERN(s_decimal_module, "_decimal");
#undef INTERN
    G.kw_context = PyTuple_Pack(1, G.s_context);
    G.kw_loop_context = PyTuple_Pack(2, G.s_loop, G.s_context);
    G.kw_loop_context_name = PyTuple_Pack(3, G.s_loop, G.s_context, G.s_name);
    return (G.kw_context == NULL || G.kw_loop_context == NULL || G.kw_loop_context_name == NULL) ? -1 : 0;
}

PyMODINIT_FUNC PyInit__core(void) {
    /* One module state for the process (static, single-phase init): a sub-interpreter
     * sharing it would run sessions over the main interpreter's data and hold its objects
     * across interpreters.  Sub-interpreters are not profiled (current_cell_slow). */
    if (main_interpreter_only("it cannot be imported in") < 0) return NULL;
    if (PyType_Ready(&TagType) < 0 || PyType_Ready(&FactoryType) < 0 || PyType_Ready(&CallSoonType) < 0 ||
        PyType_Ready(&ExceptionHookType) < 0 || PyType_Ready(&CreateTaskType) < 0 ||
        PyType_Ready(&HandedType) < 0 || PyType_Ready(&HandOverType) < 0 ||
        init_strings() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL) return NULL;
    if (G.done_cb == NULL && (G.done_cb = PyCFunction_NewEx(&task_done_def, NULL, m)) == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TagType);
    Py_INCREF(&FactoryType);
    Py_INCREF(&CallSoonType);
    Py_INCREF(&ExceptionHookType);
    Py_INCREF(&CreateTaskType);
    Py_INCREF(&HandedType);
    Py_INCREF(&HandOverType);
    if (PyModule_AddObject(m, "Tag", (PyObject *)&TagType) < 0 ||
        PyModule_AddObject(m, "TaskFactory", (PyObject *)&FactoryType) < 0 ||
        PyModule_AddObject(m, "CallSoon", (PyObject *)&CallSoonType) < 0 ||
        PyModule_AddObject(m, "ExceptionHook", (PyObject *)&ExceptionHookType) < 0 ||
        PyModule_AddObject(m, "CreateTask", (PyObject *)&CreateTaskType) < 0 ||
        PyModule_AddObject(m, "Handed", (PyObject *)&HandedType) < 0 ||
        PyModule_AddObject(m, "HandOver", (PyObject *)&HandOverType) < 0 ||
        PyModule_AddObjectRef(m, "task_done", G.done_cb) < 0 ||
        PyModule_AddIntConstant(m, "ROUTE_CONTEXT", ROUTE_CONTEXT) < 0 ||
        PyModule_AddIntConstant(m, "GROUP_SITE_BIT", (long)GROUP_SITE_BIT) < 0 ||
        PyModule_AddIntConstant(m, "ROUTE_HANDED", ROUTE_HANDED) < 0 ||
        PyModule_AddIntConstant(m, "ROUTE_INFERRED", ROUTE_INFERRED) < 0 ||
        PyModule_AddIntConstant(m, "INFERRED_PHASES", INFERRED_PHASES) < 0 ||
        PyModule_AddIntConstant(m, "MODE_EXACT", MODE_EXACT) < 0 ||
        PyModule_AddIntConstant(m, "MODE_SAMPLED", MODE_SAMPLED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
