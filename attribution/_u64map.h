/* A small open-addressing map from a non-zero uint64 key to a uint32 value.
 *
 * Used for the cell index ((task, thread, route, phase) -> cell) and the task index
 * (task id -> task slot).  Power-of-two capacity, linear probing, backward-shift deletion,
 * load kept under 0.5 (these maps hold thousands of entries, not millions).  Memory comes
 * from the C library so it can grow inside an allocator hook.  GIL held throughout.
 */
#ifndef MEMSCOPE_U64MAP_H
#define MEMSCOPE_U64MAP_H

#include <stdint.h>
#include <stdlib.h>

typedef struct {
    uint64_t key; /* 0 = empty */
    uint32_t value;
} u64map_entry_t;

typedef struct {
    u64map_entry_t *slots;
    uint64_t mask;
    uint64_t count;
} u64map_t;

static inline uint64_t u64map_hash(uint64_t k) {
    k ^= k >> 33;
    k *= UINT64_C(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k *= UINT64_C(0xc4ceb9fe1a85ec53);
    k ^= k >> 33;
    return k;
}

static int u64map_init(u64map_t *m, uint64_t capacity_pow2) {
    m->slots = (u64map_entry_t *)calloc(capacity_pow2, sizeof(u64map_entry_t));
    if (m->slots == NULL) return -1;
    m->mask = capacity_pow2 - 1;
    m->count = 0;
    return 0;
}

static void u64map_free(u64map_t *m) {
    free(m->slots);
    m->slots = NULL;
    m->mask = 0;
    m->count = 0;
}

/* Returns 1 and sets *value if found, else 0. */
static inline int u64map_get(const u64map_t *m, uint64_t key, uint32_t *value) {
    if (m->slots == NULL) return 0;
    uint64_t i = u64map_hash(key) & m->mask;
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
    u64map_entry_t *ns = (u64map_entry_t *)calloc(ncap, sizeof(u64map_entry_t));
    if (ns == NULL) return -1;
    for (uint64_t i = 0; i <= m->mask; i++) {
        if (m->slots[i].key != 0) {
            uint64_t j = u64map_hash(m->slots[i].key) & (ncap - 1);
            while (ns[j].key != 0) j = (j + 1) & (ncap - 1);
            ns[j] = m->slots[i];
        }
    }
    free(m->slots);
    m->slots = ns;
    m->mask = ncap - 1;
    return 0;
}

/* Insert or overwrite.  Returns 0, or -1 if memory for the map could not be had. */
static int u64map_put(u64map_t *m, uint64_t key, uint32_t value) {
    if ((m->count + 1) * 2 > m->mask + 1 && u64map_grow(m) < 0) return -1;
    uint64_t i = u64map_hash(key) & m->mask;
    while (m->slots[i].key != 0 && m->slots[i].key != key) i = (i + 1) & m->mask;
    if (m->slots[i].key == 0) m->count++;
    m->slots[i].key = key;
    m->slots[i].value = value;
    return 0;
}

static void u64map_del(u64map_t *m, uint64_t key) {
    if (m->slots == NULL) return;
    uint64_t i = u64map_hash(key) & m->mask;
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
        uint64_t home = u64map_hash(k) & m->mask;
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
