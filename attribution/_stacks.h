/* Stack samples: where allocations happen, captured inside the allocator hook.
 *
 * A sampled allocation's stack is read by walking the thread's interpreter frames
 * directly (as CPython's tracemalloc does), without creating frame objects and without
 * running Python code.  A frame is kept as (code object, instruction offset): the code
 * object gets a strong reference (Py_INCREF never allocates) and the line number is only
 * computed when a report is built.  Frames, stacks and (task, stack) sites are interned;
 * a stack seen before is found with one lookup keyed by its frames' code objects and
 * offsets (intern_walk), then its site with one more.
 *
 * A code object that only our frames still hold (code a task compiled at run time, with
 * exec, eval or a template engine, and then dropped) is let go at the next fold pass
 * (stacks_settle): its frames keep copies of its file name, qualified name and line, and
 * its memory is freed as it would have been without us (else it stays charged to the task
 * that compiled it: retained bytes that are ours, and a task that never folds).
 *
 * Weights: a sample of `size` bytes taken by a Poisson process of mean R bytes stands for
 * size / (1 - exp(-size / R)) bytes (Go's scaleHeapSample).  Live bytes per site come from
 * remembering which sampled pointers are still alive.
 */
#ifndef MEMSCOPE_STACKS_H
#define MEMSCOPE_STACKS_H

#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE

#include <math.h>
#include "_u64map.h"

#define STACK_MAX_DEPTH 256

typedef struct {
    PyObject *code; /* strong; NULL once settled (stacks_settle) */
    uint32_t lasti;
    int line;              /* settled: the line, and copies of the code's names */
    PyObject *file, *func; /* (ours, made with recording off: see settled_name) */
} frame_rec_t;

typedef struct {
    uint64_t hash; /* of its frames' (code, offset) pairs, as walked: see intern_walk */
    uint32_t off;
    uint16_t len;  /* (at most STACK_MAX_DEPTH) */
    uint16_t dead; /* 1: a frame of it is settled, so no walk will find it (stacks_reindex) */
} stack_rec_t;

/* A site's tid is a task's (0: unattributed), or, with GROUP_SITE_BIT, a group of folded
 * tasks' (see stacks_fold_sites).  A free slot has `dead` set and chains through `stack`. */
#define GROUP_SITE_BIT 0x80000000u

typedef struct {
    uint32_t tid;
    uint32_t stack;
    double alloc_bytes;
    double allocs;
    double live_bytes;
    uint32_t nlive; /* live samples that name this site */
    uint32_t dead;  /* 1: a free slot */
} site_t;

/* A live sample: one stretch of a live block, `raw` bytes from offset `base`, standing for
 * `bytes` (raw times its weight) at its site.  A block has one per sampled stretch (exact
 * mode samples what a block grows by on its own: keep_resized), newest first, chained
 * through `below`; K.live_index names the newest. */
typedef struct {
    uint32_t site;
    uint32_t next_free;
    uint32_t below; /* the block's next older sampled stretch, UINT32_MAX none */
    double bytes;   /* the estimate this sample added to its site */
    double raw, base;
} live_sample_t;

static struct {
    int depth;
    u64map_t frame_index;
    frame_rec_t *frames;
    uint32_t nframes, capframes;
    u64map_t stack_index;
    stack_rec_t *stacks;
    uint32_t nstacks, capstacks;
    uint32_t *stack_data;
    uint32_t ndata, capdata;
    u64map_t site_index;
    site_t *sites;
    uint32_t nsites, capsites, free_site; /* free_site: first free slot, UINT32_MAX none */
    u64map_t live_index; /* pointer -> live sample */
    live_sample_t *live;
    uint32_t nlive, caplive, free_live;
    uint64_t samples;
    u64map_t folded; /* stacks_fold_sites' site owners: tid + 1 -> gid, kept empty between calls */
    PyObject *names; /* settled frames' names: a dict of our copies, each its own key */
    int settling;
    double w_size, w_R, w_weight; /* the last sample's weight and what it was for */
} K;

static int stacks_init(int depth) {
    memset(&K, 0, sizeof(K));
    K.depth = depth < 1 ? 1 : (depth > STACK_MAX_DEPTH ? STACK_MAX_DEPTH : depth);
    K.free_live = UINT32_MAX;
    K.free_site = UINT32_MAX;
    if (u64map_init(&K.frame_index, 1024) < 0 || u64map_init(&K.stack_index, 1024) < 0 ||
        u64map_init(&K.site_index, 1024) < 0 || u64map_init(&K.live_index, 1024) < 0)
        return -1;
    return 0;
}

static void stacks_clear(void) {
    for (uint32_t i = 0; i < K.nframes; i++) {
        Py_XDECREF(K.frames[i].code);
        Py_XDECREF(K.frames[i].file);
        Py_XDECREF(K.frames[i].func);
    }
    Py_XDECREF(K.names);
    u64map_free(&K.frame_index);
    u64map_free(&K.stack_index);
    u64map_free(&K.site_index);
    u64map_free(&K.live_index);
    u64map_free(&K.folded);
    sysmem_free(K.frames);
    sysmem_free(K.stacks);
    sysmem_free(K.stack_data);
    sysmem_free(K.sites);
    sysmem_free(K.live);
    memset(&K, 0, sizeof(K));
    K.free_live = UINT32_MAX;
    K.free_site = UINT32_MAX;
}

static size_t stacks_bytes(void) {
    size_t maps = (K.frame_index.slots ? K.frame_index.mask + 1 : 0) + (K.stack_index.slots ? K.stack_index.mask + 1 : 0) +
                  (K.site_index.slots ? K.site_index.mask + 1 : 0) + (K.live_index.slots ? K.live_index.mask + 1 : 0) +
                  (K.folded.slots ? K.folded.mask + 1 : 0);
    return maps * sizeof(u64map_entry_t) + (size_t)K.capframes * sizeof(frame_rec_t) +
           (size_t)K.capstacks * sizeof(stack_rec_t) + (size_t)K.capdata * sizeof(uint32_t) +
           (size_t)K.capsites * sizeof(site_t) + (size_t)K.caplive * sizeof(live_sample_t);
}

/* ---- frame walking, per CPython version -------------------------------------------- */
static inline _PyInterpreterFrame *top_frame(PyThreadState *ts) {
#if PY_VERSION_HEX >= 0x030D0000
    return ts->current_frame;
#else
    return ts->cframe ? ts->cframe->current_frame : NULL;
#endif
}

static inline PyCodeObject *frame_code(_PyInterpreterFrame *f) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *ex = f->f_executable;
    return (ex != NULL && PyCode_Check(ex)) ? (PyCodeObject *)ex : NULL;
#else
    return f->f_code;
#endif
}

static inline _Py_CODEUNIT *frame_instr(_PyInterpreterFrame *f) {
#if PY_VERSION_HEX >= 0x030D0000
    return f->instr_ptr;
#else
    return f->prev_instr;
#endif
}

/* A frame that has not started running its own code (or a C-stack shim) is skipped. */
static inline int frame_skip(_PyInterpreterFrame *f, PyCodeObject *code) {
    if (code == NULL) return 1;
#if PY_VERSION_HEX >= 0x030C0000
    if (f->owner == FRAME_OWNED_BY_CSTACK) return 1;
#endif
    return f->owner != FRAME_OWNED_BY_GENERATOR && frame_instr(f) < _PyCode_CODE(code) + code->_co_firsttraceable;
}

/* The line a frame record's instruction is on (0 if none). */
static inline int frame_line(PyCodeObject *code, uint32_t lasti) {
    int line = PyCode_Addr2Line(code, (int)(lasti * sizeof(_Py_CODEUNIT)));
    return line < 0 ? 0 : line;
}

static inline uint64_t frame_key(const PyCodeObject *code, uint32_t lasti) {
    return ((((uint64_t)(uintptr_t)code >> 3) << 19) ^ (uint64_t)(lasti & 0x7FFFF)) | (UINT64_C(1) << 63);
}

/* The next key along a chain of keys that hashed alike (the frame and stack indexes: a
 * record whose key another holds takes the next one along). */
static inline uint64_t chain_next(uint64_t key) {
    return (key * UINT64_C(0x9E3779B97F4A7C15)) | (UINT64_C(1) << 63);
}

/* value under the first key along key's chain that m does not hold yet; -1 if memory ran
 * out (as u64map_put). */
static int chain_put(u64map_t *m, uint64_t key, uint32_t value) {
    uint32_t other;
    while (u64map_get(m, key, &other)) key = chain_next(key);
    return u64map_put(m, key, value);
}

/* *index made again, sized for `live` entries, holding each record i < n under its key
 * key_of(i), or leaving it out where that is 0 (no key of these indexes is: their top bit
 * is set).  If memory for the new index cannot be had, the old one stays. */
static void index_rebuild(u64map_t *index, uint32_t n, uint64_t live, uint64_t (*key_of)(uint32_t)) {
    uint64_t cap = 1024;
    while (cap < live * 2) cap *= 2;
    u64map_t m;
    if (u64map_init(&m, cap) < 0) return;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t key = key_of(i);
        if (key != 0 && chain_put(&m, key, i) < 0) {
            u64map_free(&m);
            return;
        }
    }
    u64map_free(index);
    *index = m;
}

static uint32_t intern_frame(PyCodeObject *code, uint32_t lasti, int *ok) {
    uint64_t key = frame_key(code, lasti);
    uint32_t idx;
    /* code pointers are unique while we hold a reference, but the xor folds bits: verify
     * (settled frames are out of the index: see frames_reindex) */
    while (u64map_get(&K.frame_index, key, &idx)) {
        if (K.frames[idx].code == (PyObject *)code && K.frames[idx].lasti == lasti) return idx;
        key = chain_next(key);
    }
    if (grow_array((void **)&K.frames, &K.capframes, sizeof(frame_rec_t), K.nframes + 1) < 0) {
        *ok = 0;
        return 0;
    }
    idx = K.nframes;
    if (u64map_put(&K.frame_index, key, idx) < 0) {
        *ok = 0;
        return 0;
    }
    Py_INCREF(code);
    K.frames[idx].code = (PyObject *)code;
    K.frames[idx].lasti = lasti;
    K.frames[idx].line = 0;
    K.frames[idx].file = K.frames[idx].func = NULL;
    K.nframes++;
    return idx;
}

/* Our copy of a code object's name (its file or qualified name), one per distinct string:
 * the code's own string may be the task's (compile(src, f"<job {n}>", "exec")), which
 * would stay charged to it.  Called with recording off.  A new reference, NULL on error. */
static PyObject *settled_name(PyObject *s) {
    if (K.names == NULL && (K.names = PyDict_New()) == NULL) return NULL;
    PyObject *c = PyDict_GetItemWithError(K.names, s);
    if (c != NULL) return Py_NewRef(c);
    if (PyErr_Occurred()) return NULL;
    c = PyUnicode_FromKindAndData(PyUnicode_KIND(s), PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s));
    if (c == NULL || PyDict_SetItem(K.names, c, c) < 0) {
        Py_XDECREF(c);
        return NULL;
    }
    return c;
}

/* The frame index again, with only the frames that still hold their code: a settled
 * one's key left in it would lengthen the probe the hook walks for every later code object
 * at that address (pymalloc hands a freed code object's block to the next one of its
 * size: a program compiling per job reuses a handful of addresses), one more each pass.
 * If memory for a new index cannot be had, the old one stays (settled frames match
 * nothing: slower, still right). */
static uint64_t frame_index_key(uint32_t i) {
    const frame_rec_t *f = &K.frames[i];
    return f->code != NULL ? frame_key((const PyCodeObject *)f->code, f->lasti) : 0;
}

static void frames_reindex(void) {
    uint64_t live = 0;
    for (uint32_t i = 0; i < K.nframes; i++) live += K.frames[i].code != NULL;
    index_rebuild(&K.frame_index, K.nframes, live, frame_index_key);
}

/* Let go of the code objects that only our frames hold, keeping what a report needs of
 * them (see the top of this file).  Repeated while it frees some: a code object may hold
 * another one we hold (a nested function's, in its constants).  Called where running
 * Python code is safe (a code object's end runs code watchers and weakref callbacks);
 * records nothing it allocates.  Returns how many frames it settled, or -1 with an
 * exception if memory ran out (nothing is lost: what was not settled is kept as before). */
static void stacks_reindex(void);

static int stacks_settle(void) {
    if (K.nframes == 0 || K.settling) return 0;
    K.settling = 1;
    int g = tls.guard;
    tls.guard = 1;
    int rc = 0, settled = 0;
    u64map_t held; /* code -> our references to it (0: let go this round) */
    if (u64map_init(&held, 64) < 0) {
        tls.guard = g;
        K.settling = 0;
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t i = 0; i < K.nframes && rc == 0; i++) {
        PyObject *code = K.frames[i].code;
        if (code == NULL) continue;
        uint64_t key = (uint64_t)(uintptr_t)code | (UINT64_C(1) << 63);
        uint32_t n = 0;
        u64map_get(&held, key, &n);
        if (u64map_put(&held, key, n + 1) < 0) rc = -1;
    }
    for (int again = rc == 0; again;) {
        again = 0;
        /* (K.frames is re-read at each step: code run by an end may sample and grow it) */
        for (uint32_t i = 0; i < K.nframes && rc == 0; i++) {
            PyObject *code = K.frames[i].code;
            if (code == NULL) continue;
            uint64_t key = (uint64_t)(uintptr_t)code | (UINT64_C(1) << 63);
            uint32_t n;
            if (!u64map_get(&held, key, &n)) continue; /* a frame made meanwhile */
            if (n != 0) {
                if ((uint64_t)Py_REFCNT(code) != n) continue;
                u64map_put(&held, key, 0); /* (an existing key: cannot fail) */
            }
            PyCodeObject *co = (PyCodeObject *)code;
            int line = frame_line(co, K.frames[i].lasti);
            PyObject *file = settled_name(co->co_filename);
            PyObject *func = file != NULL ? settled_name(co->co_qualname) : NULL;
            if (func == NULL) {
                Py_XDECREF(file);
                rc = -1;
                break;
            }
            K.frames[i].line = line;
            K.frames[i].file = file;
            K.frames[i].func = func;
            K.frames[i].code = NULL;
            Py_DECREF(code); /* the last of ours frees it */
            settled++;
            again = 1;
        }
    }
    u64map_free(&held);
    if (settled) {
        frames_reindex();
        stacks_reindex();
    }
    tls.guard = g;
    K.settling = 0;
    if (rc < 0 && !PyErr_Occurred()) PyErr_NoMemory();
    return rc < 0 ? -1 : settled;
}

/* A frame as the walk reads it: the code object (borrowed: the running frame holds it) and
 * the offset of its instruction. */
typedef struct {
    PyCodeObject *code;
    uint32_t lasti;
} walked_t;

/* The stack index is keyed by a hash of the walked frames' (code, offset) pairs, not of
 * their interned records, so the hook finds a stack it has seen with one lookup and a
 * check of each frame against the record the stack names, instead of a lookup per frame
 * (callgrind, loopback server, exact mode: ~18 frames a walk, two walks a request).  A
 * stack's records hold their code objects, so an equal pointer is the same code; a settled
 * record's (its code gone) matches no walk, and stacks_reindex drops such stacks from the
 * index. */
static inline uint64_t walk_hash(uint64_t h, const PyCodeObject *code, uint32_t lasti) {
    return (h ^ frame_key(code, lasti)) * UINT64_C(1099511628211);
}

#define WALK_HASH_SEED UINT64_C(1469598103934665603)

static inline uint64_t stack_key(uint64_t h, uint32_t n) { return (h ^ n) | (UINT64_C(1) << 63); }

static inline int stack_is_walk(const stack_rec_t *s, const walked_t *w, uint32_t n) {
    if (s->len != n) return 0;
    const uint32_t *fr = K.stack_data + s->off;
    for (uint32_t i = 0; i < n; i++) {
        const frame_rec_t *f = &K.frames[fr[i]];
        if (f->code != (PyObject *)w[i].code || f->lasti != w[i].lasti) return 0;
    }
    return 1;
}

/* The stack of the walked frames w[0..n) whose hash is h: found, or made (its frames
 * interned).  -1 if memory ran out. */
static int64_t intern_walk(const walked_t *w, uint32_t n, uint64_t h) {
    uint64_t key = stack_key(h, n);
    uint32_t idx;
    while (u64map_get(&K.stack_index, key, &idx)) {
        if (stack_is_walk(&K.stacks[idx], w, n)) return idx;
        key = chain_next(key);
    }
    /* new: key is free.  (No stack of these same records can be in the table unfound: it
     * would hash and match as this walk does.) */
    if (grow_array((void **)&K.stacks, &K.capstacks, sizeof(stack_rec_t), K.nstacks + 1) < 0 ||
        grow_array((void **)&K.stack_data, &K.capdata, sizeof(uint32_t), K.ndata + n + 1) < 0)
        return -1;
    int ok = 1;
    for (uint32_t i = 0; i < n; i++) {
        K.stack_data[K.ndata + i] = intern_frame(w[i].code, w[i].lasti, &ok);
        if (!ok) return -1;
    }
    idx = K.nstacks;
    if (u64map_put(&K.stack_index, key, idx) < 0) return -1;
    K.stacks[idx].hash = h;
    K.stacks[idx].off = K.ndata;
    K.stacks[idx].len = (uint16_t)n;
    K.stacks[idx].dead = 0;
    K.ndata += n;
    K.nstacks++;
    return idx;
}

/* The stack index again, with only the stacks whose frames all still hold their code
 * (after stacks_settle): the others can never be walked again, and their keys would
 * lengthen the probes of every later stack through code at the same addresses.  A stack
 * found so is marked for good (settling is for good), so a pass looks at each frame of a
 * live stack, and only once at a dead one.  If memory for a new index cannot be had, the
 * old one stays (slower, still right). */
static uint64_t stack_index_key(uint32_t i) {
    const stack_rec_t *s = &K.stacks[i];
    return s->dead ? 0 : stack_key(s->hash, s->len);
}

static void stacks_reindex(void) {
    uint64_t live = 0;
    for (uint32_t i = 0; i < K.nstacks; i++) {
        stack_rec_t *s = &K.stacks[i];
        if (s->dead) continue;
        for (uint32_t j = 0; j < s->len && !s->dead; j++) s->dead = K.frames[K.stack_data[s->off + j]].code == NULL;
        live += !s->dead;
    }
    index_rebuild(&K.stack_index, K.nstacks, live, stack_index_key);
}

/* K.live_index key of a live sampled pointer (the high bit keeps it off u64map's 0). */
static inline uint64_t live_key(const void *p) { return (uint64_t)(uintptr_t)p | (UINT64_C(1) << 63); }

/* K.site_index key: the tid (a task's, 0 for unattributed, or a group's with its top bit)
 * in the high half, stack + 1 in the low half: never 0, which the map reserves (stack
 * indices stay far below 2**32 - 1). */
static inline uint64_t site_key(uint32_t tid, uint32_t stack) {
    return ((uint64_t)tid << 32) | ((uint64_t)stack + 1);
}

/* Live sample li ends (its pointer is already out of K.live_index): take its bytes off its
 * site and free the slot.  Returns the stretch below it. */
static uint32_t live_release(uint32_t li) {
    live_sample_t *ls = &K.live[li];
    uint32_t below = ls->below;
    K.sites[ls->site].live_bytes -= ls->bytes;
    K.sites[ls->site].nlive--;
    ls->next_free = K.free_live;
    K.free_live = li;
    return below;
}

static void live_release_all(uint32_t li) {
    while (li != UINT32_MAX) li = live_release(li);
}

/* A block's stretches from li (newest first), cut at `size` bytes: those at or above it
 * end, the one it cuts keeps its weight for what is left of it.  Returns the newest left
 * (UINT32_MAX: none). */
static uint32_t stretches_cut(uint32_t li, double size) {
    while (li != UINT32_MAX && K.live[li].base + K.live[li].raw > size) {
        live_sample_t *ls = &K.live[li];
        if (ls->base < size) {
            double keep = size - ls->base;
            double nb = ls->bytes * (keep / ls->raw);
            K.sites[ls->site].live_bytes += nb - ls->bytes;
            ls->bytes = nb;
            ls->raw = keep;
            break;
        }
        li = live_release(li);
    }
    return li;
}

/* The site (cell_key's tid, the stack running now), made if new; UINT32_MAX if it cannot
 * be (no memory for its frames, stack or slot). */
static uint32_t site_here(uint64_t cell_key) {
    PyThreadState *ts = tstate_unchecked();
    walked_t w[K.depth > 0 ? K.depth : 1]; /* (K.depth: 1 to STACK_MAX_DEPTH, 32 by default: 512 bytes) */
    uint32_t n = 0;
    uint64_t h = WALK_HASH_SEED;
    if (ts != NULL) {
        for (_PyInterpreterFrame *f = top_frame(ts); f != NULL && n < (uint32_t)K.depth; f = f->previous) {
            PyCodeObject *code = frame_code(f);
            if (frame_skip(f, code)) continue;
            uint32_t lasti = (uint32_t)(frame_instr(f) - _PyCode_CODE(code));
            w[n].code = code;
            w[n].lasti = lasti;
            h = walk_hash(h, code, lasti);
            n++;
        }
    }
    int64_t stack = intern_walk(w, n, h);
    if (stack < 0) return UINT32_MAX;
    uint32_t tid = (uint32_t)(cell_key & 0xFFFFFFFFu);
    uint64_t skey = site_key(tid, (uint32_t)stack);
    uint32_t site;
    if (!u64map_get(&K.site_index, skey, &site)) {
        int reuse = K.free_site != UINT32_MAX;
        if (!reuse && grow_array((void **)&K.sites, &K.capsites, sizeof(site_t), K.nsites + 1) < 0) return UINT32_MAX;
        site = reuse ? K.free_site : K.nsites;
        if (u64map_put(&K.site_index, skey, site) < 0) return UINT32_MAX;
        if (reuse) K.free_site = K.sites[site].stack;
        else K.nsites++;
        memset(&K.sites[site], 0, sizeof(site_t));
        K.sites[site].tid = tid;
        K.sites[site].stack = (uint32_t)stack;
    }
    return site;
}

/* Sampled mode: a sampled block's owner resized it; `site` (UINT32_MAX: the running
 * stack's) takes the correction the cell took (resample_resized), which may leave it below
 * zero for a while: the report's shares count a site's bytes from zero up (_apportion). */
static void stacks_adjust(uint32_t site, uint64_t cell_key, double bytes, double allocs) {
    if (site == UINT32_MAX) site = site_here(cell_key);
    if (site == UINT32_MAX) return;
    K.sites[site].alloc_bytes += bytes;
    K.sites[site].allocs += allocs;
}

/* One sample of `size` bytes at p from offset `base`, at `site` (site_here's answer, or
 * the site of a sample it replaces), drawn by a sampling process of mean R bytes (its
 * weight follows from it).  A new block: base 0, counted 1; what a block grew by (exact
 * mode): base its old size, counted 0 (the block was counted when it was made), on top of
 * the block's other samples. */
static void stacks_record_at(void *p, size_t base, size_t size, uint32_t site, double R, int counted) {
    /* (a program's samples come in few sizes: the server's receive buffers are all 256 KiB) */
    double w;
    if ((double)size == K.w_size && R == K.w_R) {
        w = K.w_weight;
    } else {
        w = 1.0 / (1.0 - exp(-(double)size / R));
        K.w_size = (double)size;
        K.w_R = R;
        K.w_weight = w;
    }
    double bytes = (double)size * w;
    K.sites[site].alloc_bytes += bytes;
    if (counted) K.sites[site].allocs += w;
    K.sites[site].live_bytes += bytes;
    K.samples++;
    /* remember the pointer so its free takes the bytes off the site's live total */
    uint64_t key = live_key(p);
    uint32_t below;
    if (K.live_index.count == 0 || !u64map_get(&K.live_index, key, &below)) below = UINT32_MAX;
    uint32_t li = K.free_live;
    if (li != UINT32_MAX) K.free_live = K.live[li].next_free;
    else if (grow_array((void **)&K.live, &K.caplive, sizeof(live_sample_t), K.nlive + 1) == 0) li = K.nlive++;
    if (li == UINT32_MAX || u64map_put(&K.live_index, key, li) < 0) {
        /* no memory to remember it: counted as allocated, never as live */
        K.sites[site].live_bytes -= bytes;
        if (li != UINT32_MAX) {
            K.live[li].next_free = K.free_live;
            K.free_live = li;
        }
        return;
    }
    K.sites[site].nlive++;
    K.live[li].site = site;
    K.live[li].bytes = bytes;
    K.live[li].raw = (double)size;
    K.live[li].base = (double)base;
    K.live[li].below = below;
    K.live[li].next_free = UINT32_MAX;
}

/* stacks_record_at the running stack's site. */
static void stacks_record_alloc(void *p, size_t base, size_t size, uint64_t cell_key, double R, int counted) {
    uint32_t site = site_here(cell_key);
    if (site != UINT32_MAX) stacks_record_at(p, base, size, site, R, counted);
}

/* p is freed: its samples end.  Returns 1 if it had some, else 0. */
static int stacks_record_free(void *p) {
    uint64_t key = live_key(p);
    uint32_t li;
    if (K.live_index.count == 0 || !u64map_get(&K.live_index, key, &li)) return 0;
    u64map_del(&K.live_index, key);
    live_release_all(li);
    return 1;
}

/* Sampled mode, a sampled block resized by its owner (record_realloc_sampled): its samples
 * come off their sites' live bytes but keep their slots and stretches, the layout of the
 * lines that made it.  Returns the newest (UINT32_MAX: it had none); `site` is set to its
 * site.  stacks_reattach hands them to the resized block, or ends them. */
static uint32_t stacks_detach(void *p, uint32_t *site) {
    uint64_t key = live_key(p);
    uint32_t li;
    *site = UINT32_MAX;
    if (K.live_index.count == 0 || !u64map_get(&K.live_index, key, &li)) return UINT32_MAX;
    u64map_del(&K.live_index, key);
    *site = K.live[li].site;
    for (uint32_t i = li; i != UINT32_MAX; i = K.live[i].below) {
        K.sites[K.live[i].site].live_bytes -= K.live[i].bytes;
        K.live[i].bytes = 0;
    }
    return li;
}

/* The most stretches a sampled-mode block keeps (stacks_reattach walks them all at each
 * resize; a `str` grown by `+=` is resized at every step). */
#define STRETCHES_MAX 16

/* The resized block p (`size` bytes) got a sample (its newest, covering all of it, at the
 * resizing line or the block's own): the detached stretches below `size` take their part
 * of it back at their own lines, at the new sample's weight, so a buffer made at one line
 * and grown at another is held by both, each for its stretch.  A stretch that grows at
 * the line of the one below it extends that one; past STRETCHES_MAX the oldest two become
 * one, at the line of either, drawn by their bytes.  Without a new sample (or with no
 * stretches) they end. */
static void stacks_reattach(void *p, uint32_t old, size_t size, int sampled) {
    uint64_t key = live_key(p);
    uint32_t top;
    if (!sampled || old == UINT32_MAX || K.live_index.count == 0 || !u64map_get(&K.live_index, key, &top)) {
        live_release_all(old);
        return;
    }
    live_sample_t *t = &K.live[top];
    double W = t->raw > 0 ? t->bytes / t->raw : 0, n = (double)size, below = 0;
    old = stretches_cut(old, n); /* (detached: their bytes are 0 until reweighted below) */
    if (old == UINT32_MAX) return;
    below = K.live[old].base + K.live[old].raw; /* what the old stretches cover */
    uint32_t count = 0, last = UINT32_MAX, before_last = UINT32_MAX;
    for (uint32_t i = old; i != UINT32_MAX; i = K.live[i].below) {
        K.live[i].bytes = K.live[i].raw * W;
        K.sites[K.live[i].site].live_bytes += K.live[i].bytes;
        before_last = last;
        last = i;
        count++;
    }
    if (count >= STRETCHES_MAX && before_last != UINT32_MAX) {
        live_sample_t *a = &K.live[before_last], *b = &K.live[last]; /* b: the oldest */
        /* the merged stretch goes to one of the two lines, drawn by their bytes, so each
         * line's live estimate stays unbiased (the bigger one's would take every later
         * merge: a str grown at two lines in turn went all to one) */
        double u = (double)(rng_next(&tls.rng) >> 11) * (1.0 / 9007199254740992.0);
        if (u * (a->raw + b->raw) < b->raw) {
            K.sites[a->site].live_bytes -= a->bytes;
            K.sites[b->site].live_bytes += a->bytes;
            K.sites[a->site].nlive--;
            K.sites[b->site].nlive++;
            a->site = b->site;
        } else {
            K.sites[b->site].live_bytes -= b->bytes;
            K.sites[a->site].live_bytes += b->bytes;
        }
        b->bytes = 0;
        a->bytes += b->raw * W;
        a->raw += b->raw;
        a->base = b->base;
        a->below = UINT32_MAX;
        (void)live_release(last);
    }
    /* (anything under the new sample is a chain left at p by a free never seen: it ends) */
    if (below >= n || K.live[old].site == t->site) {
        /* shrunk (or not grown): the old stretches are all of it; or grown at the line of
         * the newest of them, which takes the growth */
        if (below < n) {
            double add = (n - below) * W;
            K.live[old].raw += n - below;
            K.live[old].bytes += add;
            K.sites[K.live[old].site].live_bytes += add;
        }
        (void)u64map_put(&K.live_index, key, old); /* (an existing key: cannot fail, u64map_put) */
        live_release_all(top);
        return;
    }
    live_release_all(t->below);
    double nb = (n - below) * W;
    K.sites[t->site].live_bytes += nb - t->bytes;
    t->bytes = nb;
    t->raw = n - below;
    t->base = below;
    t->below = old;
}

/* Exact mode: a block was resized in place or moved by realloc by the task that owns it;
 * its samples follow it to p.  Each sampled stretch of the block stays what it was (its
 * site and weight), so what it stands for stays unbiased: a stretch sampled with chance
 * 1/W stands for W times its bytes.  Shrunk, the block loses its newest stretches first
 * (what it grew by last), the one cut into keeping its weight for what is left of it:
 * re-sampling a buffer shrunk from 256 KiB to 100 bytes at its new size would give it
 * either nothing or the weight of a 100-byte sample (~650 at R = 64 KiB), and walk the
 * frames again.  Grown, the growth is a stretch of its own, sampled as a new block of its
 * size would be, at the line that grew it (keep_resized): a buffer
 * made at one line and grown at another is held by both, each for what it added.
 * Returns 1 if p now carries samples, 0 if they ended (shrunk away, or no memory to follow
 * the block), -1 if old had none. */
static int stacks_move(void *old, void *p, size_t size) {
    uint64_t okey = live_key(old);
    uint32_t li;
    if (K.live_index.count == 0 || !u64map_get(&K.live_index, okey, &li)) return -1;
    li = stretches_cut(li, (double)size);
    if (li == UINT32_MAX) {
        u64map_del(&K.live_index, okey);
        return 0;
    }
    if (p != old) {
        u64map_del(&K.live_index, okey);
        if (u64map_put(&K.live_index, live_key(p), li) < 0) {
            live_release_all(li); /* no memory to follow it: the samples end here */
            return 0;
        }
    } else {
        (void)u64map_put(&K.live_index, okey, li); /* (an existing key: cannot fail, u64map_put) */
    }
    return 1;
}

/* A task's site that may go to its group: not a free slot, and no live sample names it. */
static inline int site_movable(const site_t *st) {
    return !st->dead && !(st->tid & GROUP_SITE_BIT) && st->nlive == 0;
}

/* Tasks folded into a group (tids, n of them) hand their sites to the group's own sites
 * (tid = gid, with GROUP_SITE_BIT): a site of the same stack is merged, others re-keyed.
 * The site table then grows with the program's distinct stacks per task kept and per
 * group, not with every task that was ever sampled (a service running for days samples
 * millions of short tasks).  A site a live sample still names is left as it is (a folded
 * task holds no live bytes, so only an estimate's rounding can leave one). */
static int stacks_fold_sites(const uint32_t *tids, const uint32_t *gids, size_t n) {
    if (n == 0 || K.nsites == 0) return 0;
    /* The owners of the movable sites, each mapped to its group once found among the
     * folded tasks (UINT32_MAX until then).  The map is sized by the sites, not by the
     * folded tasks: a pass folds thousands of tasks, few of them ever sampled (a tree of
     * 168,000 tasks: a map entry and its clearing for each were ~240 instructions a task).
     * It is kept from one call to the next, emptied after use: a fresh mapping each time
     * was page faults and a TLB flush when it went. */
    u64map_t *owners = &K.folded;
    uint64_t cap = 16;
    while (cap < (uint64_t)K.nsites * 2 + 16) cap <<= 1;
    if (owners->slots != NULL && owners->mask + 1 < cap) u64map_free(owners);
    if (owners->slots == NULL && u64map_init_local(owners, cap, 0) < 0) return -1;
    int rc = 0;
    for (uint32_t i = 0; i < K.nsites && rc == 0; i++)
        if (site_movable(&K.sites[i])) rc = u64map_put(owners, (uint64_t)K.sites[i].tid + 1, UINT32_MAX);
    uint32_t gid;
    for (size_t i = 0; i < n && rc == 0 && owners->count != 0; i++)
        if (u64map_get(owners, (uint64_t)tids[i] + 1, &gid)) rc = u64map_put(owners, (uint64_t)tids[i] + 1, gids[i]);
    if (rc < 0 || owners->count == 0) goto done;
    for (uint32_t i = 0; i < K.nsites; i++) {
        site_t *st = &K.sites[i];
        if (!site_movable(st) || !u64map_get(owners, (uint64_t)st->tid + 1, &gid) || gid == UINT32_MAX) continue;
        uint64_t okey = site_key(st->tid, st->stack), nkey = site_key(gid, st->stack);
        uint32_t j;
        if (u64map_get(&K.site_index, nkey, &j)) {
            site_t *to = &K.sites[j];
            to->alloc_bytes += st->alloc_bytes;
            to->allocs += st->allocs;
            to->live_bytes += st->live_bytes;
            u64map_del(&K.site_index, okey);
            memset(st, 0, sizeof(*st));
            st->dead = 1;
            st->stack = K.free_site;
            K.free_site = i;
        } else if (u64map_put(&K.site_index, nkey, i) == 0) {
            u64map_del(&K.site_index, okey);
            st->tid = gid;
        }
    }
done:
    memset(owners->slots, 0, (size_t)(owners->mask + 1) * sizeof(u64map_entry_t));
    owners->count = 0;
    return rc;
}

PyDoc_STRVAR(fold_sites_doc,
"fold_sites(tids: bytes, gids: bytes)\n--\n\nHand the allocation sites of folded tasks to their groups' sites\n"
"(native uint32 arrays of equal length; group ids have the top bit set).  One pass over the sites.");

static PyObject *core_fold_sites(PyObject *m, PyObject *args) {
    Py_buffer tb, gb;
    if (!PyArg_ParseTuple(args, "y*y*", &tb, &gb)) return NULL;
    int rc = -2;
    if (tb.len == gb.len && tb.len % (Py_ssize_t)sizeof(uint32_t) == 0) {
        const uint32_t *gids = (const uint32_t *)gb.buf;
        size_t n = (size_t)tb.len / sizeof(uint32_t);
        rc = 0;
        for (size_t i = 0; i < n; i++)
            if (!(gids[i] & GROUP_SITE_BIT)) rc = -2;
        if (rc == 0) {
            int g = tls.guard;
            tls.guard = 1;
            rc = stacks_fold_sites((const uint32_t *)tb.buf, gids, n);
            tls.guard = g;
        }
    }
    PyBuffer_Release(&tb);
    PyBuffer_Release(&gb);
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "fold_sites(tids, gids): uint32 arrays of one length, group ids with the top bit set");
        return NULL;
    }
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(settle_stacks_doc,
"settle_stacks() -> int\n--\n\nLet go of the code objects that only stack samples still hold,\n"
"keeping their file, function and line; returns how many frames were settled.  (Their\n"
"freed parts may wait in CPython's free lists until the next full collection.)");

static int settle_as_nobody(void); /* _tasks.h */

static PyObject *core_settle_stacks(PyObject *m, PyObject *noargs) {
    int n = settle_as_nobody();
    return n < 0 ? NULL : PyLong_FromLong(n);
}

PyDoc_STRVAR(stack_samples_doc,
"stack_samples() -> tuple[list, list, list]\n--\n\n(sites, stacks, frames): sites are\n"
"(tid, stack_index, allocated_bytes, allocations, live_bytes) estimates; stacks are tuples\n"
"of frame indices, innermost first; frames are (filename, qualname, line).");

static PyObject *core_stack_samples(PyObject *m, PyObject *noargs) {
    int g = tls.guard;
    tls.guard = 1;
    /* No code object we hold may go while its names are being read: making a row can run
     * the collector (3.11), whose finalizers can reach stacks_settle (a fold pass). */
    int settling = K.settling;
    K.settling = 1;
    PyObject *sites = PyList_New(0), *stacks = PyList_New(0), *frames = PyList_New(0), *out = NULL;
    if (sites == NULL || stacks == NULL || frames == NULL) goto done;
    for (uint32_t i = 0; i < K.nsites; i++) {
        site_t s = K.sites[i];
        if (s.dead) continue; /* a free slot */
        PyObject *row = Py_BuildValue("(kkddd)", (unsigned long)s.tid, (unsigned long)s.stack, s.alloc_bytes,
                                      s.allocs, s.live_bytes);
        if (row == NULL || PyList_Append(sites, row) < 0) {
            Py_XDECREF(row);
            goto done;
        }
        Py_DECREF(row);
    }
    for (uint32_t i = 0; i < K.nstacks; i++) {
        stack_rec_t s = K.stacks[i];
        PyObject *t = PyTuple_New(s.len);
        if (t == NULL) goto done;
        for (uint32_t j = 0; j < s.len; j++) {
            PyObject *v = PyLong_FromUnsignedLong(K.stack_data[s.off + j]);
            if (v == NULL) {
                Py_DECREF(t);
                goto done;
            }
            PyTuple_SET_ITEM(t, j, v);
        }
        if (PyList_Append(stacks, t) < 0) {
            Py_DECREF(t);
            goto done;
        }
        Py_DECREF(t);
    }
    for (uint32_t i = 0; i < K.nframes; i++) {
        PyCodeObject *code = (PyCodeObject *)K.frames[i].code;
        PyObject *row;
        if (code == NULL) {
            row = Py_BuildValue("(OOi)", K.frames[i].file, K.frames[i].func, K.frames[i].line);
        } else {
            row = Py_BuildValue("(OOi)", code->co_filename, code->co_qualname, frame_line(code, K.frames[i].lasti));
        }
        if (row == NULL || PyList_Append(frames, row) < 0) {
            Py_XDECREF(row);
            goto done;
        }
        Py_DECREF(row);
    }
    out = Py_BuildValue("(OOO)", sites, stacks, frames);
done:
    Py_XDECREF(sites);
    Py_XDECREF(stacks);
    Py_XDECREF(frames);
    K.settling = settling;
    tls.guard = g;
    return out;
}

#endif
