/* A small open-addressing map from a non-zero uint64 key to a uint32 value.
 *
 * Used for the cell index ((task, thread, route, phase) -> cell, for cells other than a
 * task's home cell, which its Tag names), the task index (task id -> task slot, for the
 * ids _core.c's ring of recent ids cannot hold), the object index (task address -> task
 * id) and the stack tables.
 * Power-of-two capacity, linear probing, backward-shift deletion, load kept under 0.5.
 * Memory is mapped from the kernel (_sysmem.h), so it can grow inside an allocator hook
 * and leaves the program's heap alone.  GIL held throughout.
 *
 * Maps made with u64map_init_local keep keys that come in runs (task ids are handed out
 * in order) side by side in blocks of 4 slots (64 bytes, a cache line): the block is
 * chosen by a mixing hash of key >> 2, the slot in it by the low 2 bits.  A task tree
 * touches its tasks roughly in the order they were made, so neighbouring lookups share
 * cache lines instead of each missing the cache on its own: with 56,000 tasks alive the
 * maps outgrow the core's cache, and the random placement made their lookups ~8% of a
 * task tree's time (perf, 3.12).  The object index is local too, over task addresses
 * >> 7 (tasks made one after another sit near each other).  Keys that fill their blocks
 * only in part spread a map over more blocks than it has room for and lengthen the
 * probes, so the other maps (sampled blocks, stacks) hash every key on its own; blocks of
 * 16 slots over task ids and task addresses cost +1,100 instructions a task in a tree
 * (callgrind).
 */
#ifndef MEMSCOPE_U64MAP_H
#define MEMSCOPE_U64MAP_H

#include <stdint.h>

#include "_sysmem.h"

typedef struct {
    uint64_t key;  /* 0 = empty */
    uint32_t value;
    uint32_t home; /* u64map_home(key) at the current capacity: deletion moves entries
                      back without hashing every key after the hole (the slot's padding) */
} u64map_entry_t;

typedef struct {
    u64map_entry_t *slots;
    uint64_t mask;
    uint64_t count;
    int local;      /* keys in runs share blocks (see above) */
    unsigned shift; /* local: low key bits that do not vary between neighbours */
} u64map_t;

static inline uint64_t u64map_hash(uint64_t k) {
    k ^= k >> 33;
    k *= UINT64_C(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k *= UINT64_C(0xc4ceb9fe1a85ec53);
    k ^= k >> 33;
    return k;
}

/* Zeroed slots aligned to a cache line (_sysmem.h: fresh pages from the kernel). */
static u64map_entry_t *u64map_alloc(uint64_t capacity_pow2) {
    return (u64map_entry_t *)sysmem_calloc((size_t)capacity_pow2, sizeof(u64map_entry_t));
}

/* The slot a key starts probing from. */
static inline uint64_t u64map_home(const u64map_t *m, uint64_t key, uint64_t mask) {
    if (m->local) {
        uint64_t k = key >> m->shift;
        return ((u64map_hash(k >> 2) << 2) | (k & 3)) & mask;
    }
    return u64map_hash(key) & mask;
}

static int u64map_init_as(u64map_t *m, uint64_t capacity_pow2, int local, unsigned shift) {
    if (capacity_pow2 < 16) capacity_pow2 = 16;
    m->slots = u64map_alloc(capacity_pow2);
    if (m->slots == NULL) return -1;
    m->mask = capacity_pow2 - 1;
    m->count = 0;
    m->local = local;
    m->shift = shift;
    return 0;
}

static int u64map_init(u64map_t *m, uint64_t capacity_pow2) { return u64map_init_as(m, capacity_pow2, 0, 0); }

static int u64map_init_local(u64map_t *m, uint64_t capacity_pow2, unsigned shift) {
    return u64map_init_as(m, capacity_pow2, 1, shift);
}

static void u64map_free(u64map_t *m) {
    sysmem_free(m->slots);
    m->slots = NULL;
    m->mask = 0;
    m->count = 0;
}

/* Returns 1 and sets *value if found, else 0. */
static inline int u64map_get(const u64map_t *m, uint64_t key, uint32_t *value) {
    if (m->slots == NULL) return 0;
    uint64_t i = u64map_home(m, key, m->mask);
    for (;;) {
        uint64_t k = m->slots[i].key;
        if (k == key) {
            *value = m->slots[i].value;
            return 1;
        }
        if (k == 0) return 0;
        i = (i + 1) & m->mask;
    }
}

static int u64map_grow(u64map_t *m) {
    uint64_t ncap = (m->mask + 1) * 2;
    if (ncap - 1 > UINT32_MAX) return -1; /* homes are 32-bit */
    u64map_entry_t *ns = u64map_alloc(ncap);
    if (ns == NULL) return -1;
    for (uint64_t i = 0; i <= m->mask; i++) {
        if (m->slots[i].key != 0) {
            uint64_t home = u64map_home(m, m->slots[i].key, ncap - 1), j = home;
            while (ns[j].key != 0) j = (j + 1) & (ncap - 1);
            ns[j] = m->slots[i];
            ns[j].home = (uint32_t)home;
        }
    }
    sysmem_free(m->slots);
    m->slots = ns;
    m->mask = ncap - 1;
    return 0;
}

/* Insert or overwrite.  Returns 0, or -1 if memory for the map could not be had (only a
 * new key can need it: overwriting one that is there always succeeds, which callers that
 * re-point a key rely on). */
static int u64map_put(u64map_t *m, uint64_t key, uint32_t value) {
    uint64_t home = u64map_home(m, key, m->mask), i = home;
    while (m->slots[i].key != 0 && m->slots[i].key != key) i = (i + 1) & m->mask;
    if (m->slots[i].key == key) {
        m->slots[i].value = value;
        return 0;
    }
    if ((m->count + 1) * 2 > m->mask + 1) {
        if (u64map_grow(m) < 0) return -1;
        home = u64map_home(m, key, m->mask);
        i = home;
        while (m->slots[i].key != 0) i = (i + 1) & m->mask;
    }
    m->count++;
    m->slots[i].key = key;
    m->slots[i].value = value;
    m->slots[i].home = (uint32_t)home;
    return 0;
}

static void u64map_del(u64map_t *m, uint64_t key) {
    if (m->slots == NULL) return;
    uint64_t i = u64map_home(m, key, m->mask);
    for (;;) {
        if (m->slots[i].key == 0) return;
        if (m->slots[i].key == key) break;
        i = (i + 1) & m->mask;
    }
    uint64_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & m->mask;
        uint64_t k = m->slots[j].key;
        if (k == 0) break;
        uint64_t home = m->slots[j].home;
        int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            m->slots[hole] = m->slots[j];
            hole = j;
        }
    }
    m->slots[hole].key = 0;
    m->count--;
}

#endif
