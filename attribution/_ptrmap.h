/* Pointer table: live tracked allocation -> (size, cell).
 *
 * Open addressing with linear probing and backward-shift deletion (no tombstones), sized
 * by "fastrange" so the capacity can grow by 1.5x instead of 2x.  Each entry is 12 bytes:
 *
 *     word: bits 0..44  pointer >> 3  (enough for a 48-bit virtual address space)
 *           bits 45..63 cell index    (19 bits; cell 0 is never used)
 *     size: uint32 requested size; PTRMAP_BIG_SIZE means "look it up in the big list"
 *
 * With the maximum load at 0.75 and growth by 1.5x the load stays in [0.5, 0.75], so the
 * table costs 16 to 24 bytes per live tracked allocation.  Memory is mapped from
 * the kernel (_sysmem.h), never taken from a Python domain, so growing it inside an
 * allocator hook does not recurse.  All functions run with the GIL held.
 */
#ifndef MEMSCOPE_PTRMAP_H
#define MEMSCOPE_PTRMAP_H

#include <stdint.h>
#include <string.h>

#include "_sysmem.h"

#define PTRMAP_PTR_BITS 45
#define PTRMAP_PTR_MASK ((UINT64_C(1) << PTRMAP_PTR_BITS) - 1)
#define PTRMAP_CELL_BITS 19
#define PTRMAP_MAX_CELL ((UINT32_C(1) << PTRMAP_CELL_BITS) - 1)
#define PTRMAP_BIG_SIZE UINT32_MAX

#pragma pack(push, 4)
typedef struct {
    uint64_t word;
    uint32_t size;
} ptr_entry_t;
#pragma pack(pop)

typedef struct {
    void *ptr;
    size_t size;
} big_size_t;

typedef struct {
    ptr_entry_t *slots;
    uint64_t capacity;
    uint64_t count;
    uint64_t grow_at;
    big_size_t *big; /* allocations >= 4 GiB: rare, so a plain array */
    size_t nbig, capbig;
} ptrmap_t;

static inline int ptrmap_fits(const void *p) {
    uintptr_t v = (uintptr_t)p;
    return (v & 7u) == 0 && (v >> (PTRMAP_PTR_BITS + 3)) == 0;
}

static inline uint64_t ptrmap_key(const void *p) { return ((uint64_t)(uintptr_t)p) >> 3; }

static inline uint64_t ptrmap_home(uint64_t key, uint64_t capacity) {
    uint64_t h = key * UINT64_C(0x9E3779B97F4A7C15);
    h ^= h >> 29;
    h *= UINT64_C(0xBF58476D1CE4E5B9);
    return (uint64_t)(((__uint128_t)h * capacity) >> 64);
}

static int ptrmap_init(ptrmap_t *m, uint64_t capacity) {
    memset(m, 0, sizeof(*m));
    m->slots = (ptr_entry_t *)sysmem_calloc(capacity, sizeof(ptr_entry_t));
    if (m->slots == NULL) return -1;
    m->capacity = capacity;
    m->grow_at = capacity * 3 / 4;
    return 0;
}

static void ptrmap_free(ptrmap_t *m) {
    sysmem_free(m->slots);
    sysmem_free(m->big);
    memset(m, 0, sizeof(*m));
}

static inline void ptrmap_place(ptr_entry_t *slots, uint64_t capacity, ptr_entry_t e) {
    uint64_t i = ptrmap_home(e.word & PTRMAP_PTR_MASK, capacity);
    while (slots[i].word != 0) {
        if (++i == capacity) i = 0;
    }
    slots[i] = e;
}

static int ptrmap_grow(ptrmap_t *m) {
    uint64_t ncap = m->capacity + m->capacity / 2;
    ptr_entry_t *ns = (ptr_entry_t *)sysmem_calloc(ncap, sizeof(ptr_entry_t));
    if (ns == NULL) return -1;
    for (uint64_t i = 0; i < m->capacity; i++) {
        if (m->slots[i].word != 0) ptrmap_place(ns, ncap, m->slots[i]);
    }
    sysmem_free(m->slots);
    m->slots = ns;
    m->capacity = ncap;
    m->grow_at = ncap * 3 / 4;
    return 0;
}

static int ptrmap_set_big(ptrmap_t *m, void *p, size_t size) {
    if (m->nbig == m->capbig) {
        size_t ncap = m->capbig ? m->capbig * 2 : 8;
        big_size_t *nb = (big_size_t *)sysmem_realloc(m->big, ncap * sizeof(big_size_t));
        if (nb == NULL) return -1;
        m->big = nb;
        m->capbig = ncap;
    }
    m->big[m->nbig].ptr = p;
    m->big[m->nbig].size = size;
    m->nbig++;
    return 0;
}

static size_t ptrmap_take_big(ptrmap_t *m, void *p) {
    for (size_t i = 0; i < m->nbig; i++) {
        if (m->big[i].ptr == p) {
            size_t s = m->big[i].size;
            m->big[i] = m->big[--m->nbig];
            return s;
        }
    }
    return 0;
}

/* Insert a pointer the table does not hold (a fresh allocation).  Returns 0, or -1 when
 * memory for the table itself could not be had (the allocation is then not tracked). */
static inline int ptrmap_insert(ptrmap_t *m, void *p, size_t size, uint32_t cell) {
    if (m->count + 1 > m->grow_at && ptrmap_grow(m) < 0) return -1;
    uint32_t stored = (uint32_t)size;
    if (size >= PTRMAP_BIG_SIZE) {
        if (ptrmap_set_big(m, p, size) < 0) return -1;
        stored = PTRMAP_BIG_SIZE;
    }
    ptr_entry_t e;
    e.word = ptrmap_key(p) | ((uint64_t)cell << PTRMAP_PTR_BITS);
    e.size = stored;
    ptrmap_place(m->slots, m->capacity, e);
    m->count++;
    return 0;
}

/* Remove a pointer; returns 1 and fills size/cell if it was tracked, 0 otherwise. */
static inline int ptrmap_remove(ptrmap_t *m, void *p, size_t *size, uint32_t *cell) {
    if (m->count == 0) return 0;
    uint64_t key = ptrmap_key(p);
    uint64_t cap = m->capacity;
    ptr_entry_t *s = m->slots;
    uint64_t i = ptrmap_home(key, cap);
    for (;;) {
        uint64_t w = s[i].word;
        if (w == 0) return 0;
        if ((w & PTRMAP_PTR_MASK) == key) break;
        if (++i == cap) i = 0;
    }
    *cell = (uint32_t)(s[i].word >> PTRMAP_PTR_BITS);
    *size = s[i].size == PTRMAP_BIG_SIZE ? ptrmap_take_big(m, p) : s[i].size;
    /* Backward-shift deletion: pull later members of the probe run into the hole. */
    uint64_t hole = i;
    uint64_t j = i;
    for (;;) {
        if (++j == cap) j = 0;
        uint64_t w = s[j].word;
        if (w == 0) break;
        uint64_t home = ptrmap_home(w & PTRMAP_PTR_MASK, cap);
        /* Move s[j] into the hole unless its home lies cyclically in (hole, j]. */
        int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            s[hole] = s[j];
            hole = j;
        }
    }
    s[hole].word = 0;
    s[hole].size = 0;
    m->count--;
    return 1;
}

static inline size_t ptrmap_bytes(const ptrmap_t *m) {
    return (size_t)m->capacity * sizeof(ptr_entry_t) + m->capbig * sizeof(big_size_t);
}

#endif
