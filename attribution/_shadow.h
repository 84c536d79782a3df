/* Shadow map: live small tracked allocation -> (size, cell, flag), found by address.
 *
 * Why: the pointer table (_ptrmap.h) hashes every pointer, so pymalloc's neighbouring
 * blocks land in random slots and every alloc and every free costs a cache miss.  The
 * shadow map instead keeps one 32-bit entry per 16-byte granule of address space, so the
 * metadata of consecutive blocks is consecutive too and an asyncio task that builds and
 * drops objects walks its metadata linearly.  Only blocks smaller than SHADOW_MAX_SIZE go
 * here; anything it cannot hold goes to the pointer table as before.
 *
 * Layout (like CPython's own arena radix tree), for an address a < 2^SHADOW_ADDR_BITS:
 *
 *     a bits 46..34  top index   -> s->top[]: 8192 mid pointers inside shadow_t (64 KiB;
 *                                   bits 47..34 and 128 KiB with SHADOW_ADDR_BITS 48)
 *     a bits 33..20  mid index   -> mid array (mmap, 16384 slots of 16 B = 256 KiB):
 *                                   { leaf pointer, live count }
 *     a bits 19..4   granule     -> leaf (mmap, 65536 entries of 4 B = 256 KiB):
 *                                   one leaf covers 1 MiB of address space
 *     a bits 3..0    must be 0   (pymalloc and glibc both return 16-byte aligned blocks)
 *
 *     entry: bits 0..9 size, bit 10 flag, bits 11..31 cell (cell >= 1, so used != 0)
 *
 * Leaves and mid arrays are mapped lazily with MAP_NORESERVE, so only the pages that are
 * actually written cost RSS: densely packed 48-byte objects cost 12 B of metadata each.
 * Each new mapping also gets MADV_NOHUGEPAGE, because the kernel merges adjacent leaf
 * mappings into one VMA and with THP "always" would back a 2 MiB stretch with a huge page.
 * That madvise runs only when a leaf or mid array is created (already an mmap); put and
 * take themselves never make a syscall once the leaf exists, and a leaf that empties is
 * kept (an alloc/free pattern oscillating around it costs nothing).  Only shadow_trim and
 * shadow_free release memory.
 *
 * The live count of a leaf sits next to the leaf pointer in the mid slot, so besides the
 * (hot) top pointer and shadow_t.count, put and take touch two cache lines: the mid slot
 * and the entry.  take also checks the live
 * count before reading the leaf, so freeing a pointer that was never recorded costs at
 * most the top and mid loads.  A registry (calloc'd array of leaf keys = a >> 20) lists
 * every leaf, so trim, free and the byte counters never walk whole mid arrays.
 *
 * Overwrite rule: a put on a granule that already holds an entry (its free was not seen)
 * replaces the entry; the live counts do not change (one live block before and after).
 * shadow_put_ex reports the replaced entry so the caller can settle the old cell.  The
 * free hook should ask shadow_take first and the pointer table only when it answers 0;
 * if frees can be missed, routing an aligned block to the pointer table should also
 * shadow_take it first, or a stale small entry would shadow the big block's record.
 *
 * Addresses at or above 2^SHADOW_ADDR_BITS (default 47: the x86-64 4-level user space) are
 * refused by put and ignored by take/get.  Define SHADOW_ADDR_BITS 48 before including this
 * header on systems whose user space reaches 2^48 (arm64 with 48-bit VA).
 *
 * The empty state is all zeros, so a static shadow_t is valid without shadow_init.  Memory
 * comes from mmap and the C library (calloc/free), never from a Python domain.  No locking:
 * all functions run with the GIL held.
 */
#ifndef MEMSCOPE_SHADOW_H
#define MEMSCOPE_SHADOW_H

/* mmap flags, madvise and mincore need the default feature set; Python.h (included first
 * in _core.c) already provides it, and so does this if nothing was included before. */
#if !defined(_DEFAULT_SOURCE) && !defined(_GNU_SOURCE)
#define _DEFAULT_SOURCE 1
#endif

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(MAP_ANONYMOUS) || !defined(MAP_NORESERVE) || !defined(MADV_NOHUGEPAGE)
#include <linux/mman.h> /* strict ISO build that included a system header first */
#endif
/* Hidden by glibc in a strict ISO build; these match its declarations. */
int madvise(void *addr, size_t len, int advice);
int mincore(void *addr, size_t len, unsigned char *vec);

#define SHADOW_MAX_SIZE 1024u         /* sizes 0..1023 fit; larger go to the hash table */
#define SHADOW_MAX_CELL ((1u << 21) - 1)

#ifndef SHADOW_ADDR_BITS
#define SHADOW_ADDR_BITS 47
#endif
#if SHADOW_ADDR_BITS < 35 || SHADOW_ADDR_BITS > 48
#error "SHADOW_ADDR_BITS must be in 35..48"
#endif

#define SHADOW_GRANULE_BITS 4
#define SHADOW_LEAF_BITS 16 /* granules per leaf: 2^16 x 16 B = 1 MiB of address space */
#define SHADOW_MID_BITS 14
#define SHADOW_LEAF_SHIFT (SHADOW_GRANULE_BITS + SHADOW_LEAF_BITS)  /* 20 */
#define SHADOW_TOP_SHIFT (SHADOW_LEAF_SHIFT + SHADOW_MID_BITS)      /* 34 */
#define SHADOW_TOP_LEN ((size_t)1 << (SHADOW_ADDR_BITS - SHADOW_TOP_SHIFT))
#define SHADOW_MID_LEN ((size_t)1 << SHADOW_MID_BITS)
#define SHADOW_LEAF_LEN ((size_t)1 << SHADOW_LEAF_BITS)
#define SHADOW_LEAF_BYTES (SHADOW_LEAF_LEN * sizeof(uint32_t))
#define SHADOW_MID_BYTES (SHADOW_MID_LEN * sizeof(shadow_slot_t))

#define SHADOW_SIZE_MASK 0x3FFu
#define SHADOW_FLAG_BIT 10
#define SHADOW_CELL_SHIFT 11

#define SHADOW_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define SHADOW_UNUSED __attribute__((unused)) /* not every includer uses every function */

/* One mid slot per leaf.  16 bytes (with padding), so a slot never straddles a cache line
 * and the live count is on the line put/take load the leaf pointer from anyway. */
typedef struct {
    uint32_t *leaf; /* NULL until the first put in this MiB */
    uint32_t live;  /* used entries in the leaf (0..65536) */
} shadow_slot_t;

typedef struct shadow {
    shadow_slot_t *top[SHADOW_TOP_LEN]; /* in .bss, only the touched pages become resident */
    uint64_t count;                     /* live entries */
    uint32_t *leaves;                   /* registry: key (a >> 20) of every mapped leaf */
    size_t nleaves, capleaves;
    size_t nmids;
} shadow_t;

static inline int shadow_bad_addr(uintptr_t a) {
    return ((a & ((1u << SHADOW_GRANULE_BITS) - 1)) | ((uint64_t)a >> SHADOW_ADDR_BITS)) != 0;
}

static inline void shadow_decode(uint32_t e, uint32_t *size, uint32_t *cell, int *flag) {
    *size = e & SHADOW_SIZE_MASK;
    *flag = (int)((e >> SHADOW_FLAG_BIT) & 1u);
    *cell = e >> SHADOW_CELL_SHIFT;
}

static inline shadow_slot_t *shadow_slot_of_key(const shadow_t *s, uint32_t key) {
    return &s->top[key >> SHADOW_MID_BITS][key & (SHADOW_MID_LEN - 1)];
}

SHADOW_UNUSED static void *shadow_map(size_t bytes) {
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) return NULL;
#ifdef MADV_NOHUGEPAGE
    (void)madvise(m, bytes, MADV_NOHUGEPAGE); /* best effort; see the header comment */
#endif
    return m;
}

SHADOW_UNUSED static int shadow_init(shadow_t *s) {
    memset(s, 0, sizeof(*s));
    return 0;
}

/* Slow path of put: map the mid array and/or the leaf holding address a.  Returns the
 * slot with a non-NULL leaf, or NULL when memory could not be had. */
__attribute__((noinline, cold, unused)) static shadow_slot_t *shadow_make_leaf(shadow_t *s,
                                                                          uintptr_t a) {
    size_t ti = (size_t)(a >> SHADOW_TOP_SHIFT);
    shadow_slot_t *mid = s->top[ti];
    if (mid == NULL) {
        mid = (shadow_slot_t *)shadow_map(SHADOW_MID_BYTES);
        if (mid == NULL) return NULL;
        s->top[ti] = mid;
        s->nmids++;
    }
    shadow_slot_t *slot = &mid[(a >> SHADOW_LEAF_SHIFT) & (SHADOW_MID_LEN - 1)];
    if (slot->leaf != NULL) return slot;
    if (s->nleaves == s->capleaves) {
        size_t ncap = s->capleaves ? s->capleaves * 2 : 64;
        uint32_t *nl = (uint32_t *)calloc(ncap, sizeof(uint32_t));
        if (nl == NULL) return NULL;
        if (s->nleaves) memcpy(nl, s->leaves, s->nleaves * sizeof(uint32_t));
        free(s->leaves);
        s->leaves = nl;
        s->capleaves = ncap;
    }
    uint32_t *leaf = (uint32_t *)shadow_map(SHADOW_LEAF_BYTES);
    if (leaf == NULL) return NULL;
    slot->leaf = leaf;
    slot->live = 0;
    s->leaves[s->nleaves++] = (uint32_t)(a >> SHADOW_LEAF_SHIFT);
    return slot;
}

/* put, also reporting what it replaced: *old = the previous raw entry (0 if the granule
 * was free; decode it with shadow_decode).  Returns 0, or -1 when p cannot be held. */
static inline int shadow_put_ex(shadow_t *s, const void *p, uint32_t size, uint32_t cell, int flag,
                                uint32_t *old) {
    uintptr_t a = (uintptr_t)p;
    if (SHADOW_UNLIKELY(shadow_bad_addr(a) || size >= SHADOW_MAX_SIZE ||
                        cell - 1u >= SHADOW_MAX_CELL))
        return -1;
    shadow_slot_t *mid = s->top[a >> SHADOW_TOP_SHIFT];
    shadow_slot_t *slot = mid ? &mid[(a >> SHADOW_LEAF_SHIFT) & (SHADOW_MID_LEN - 1)] : NULL;
    if (SHADOW_UNLIKELY(slot == NULL || slot->leaf == NULL)) {
        slot = shadow_make_leaf(s, a);
        if (slot == NULL) return -1;
    }
    uint32_t *e = &slot->leaf[(a >> SHADOW_GRANULE_BITS) & (SHADOW_LEAF_LEN - 1)];
    uint32_t prev = *e;
    *e = size | ((uint32_t)(flag != 0) << SHADOW_FLAG_BIT) | (cell << SHADOW_CELL_SHIFT);
    if (prev == 0) {
        slot->live++;
        s->count++;
    }
    *old = prev;
    return 0;
}

/* Record p (size < SHADOW_MAX_SIZE, 1 <= cell <= SHADOW_MAX_CELL).  Returns 0, or -1 when p
 * cannot be held here (unaligned, too high, size too big, bad cell, mmap failed): the
 * caller then uses the pointer table.  Overwrites an existing entry for p. */
static inline int shadow_put(shadow_t *s, const void *p, uint32_t size, uint32_t cell, int flag) {
    uint32_t old;
    return shadow_put_ex(s, p, size, cell, flag, &old);
}

/* Find the entry of p, or NULL (cheap for pointers never recorded). */
static inline uint32_t *shadow_find(const shadow_t *s, uintptr_t a, shadow_slot_t **slotp) {
    if (SHADOW_UNLIKELY(shadow_bad_addr(a))) return NULL;
    shadow_slot_t *mid = s->top[a >> SHADOW_TOP_SHIFT];
    if (mid == NULL) return NULL;
    shadow_slot_t *slot = &mid[(a >> SHADOW_LEAF_SHIFT) & (SHADOW_MID_LEN - 1)];
    if (slot->live == 0) return NULL; /* also covers "no leaf" */
    uint32_t *e = &slot->leaf[(a >> SHADOW_GRANULE_BITS) & (SHADOW_LEAF_LEN - 1)];
    if (*e == 0) return NULL;
    *slotp = slot;
    return e;
}

/* If p is recorded: clear it, fill size/cell/flag, return 1.  Otherwise 0. */
static inline int shadow_take(shadow_t *s, const void *p, uint32_t *size, uint32_t *cell,
                              int *flag) {
    shadow_slot_t *slot;
    uint32_t *e = shadow_find(s, (uintptr_t)p, &slot);
    if (e == NULL) return 0;
    shadow_decode(*e, size, cell, flag);
    *e = 0;
    slot->live--;
    s->count--;
    return 1;
}

/* Like take, without clearing. */
static inline int shadow_get(const shadow_t *s, const void *p, uint32_t *size, uint32_t *cell,
                             int *flag) {
    shadow_slot_t *slot;
    uint32_t *e = shadow_find(s, (uintptr_t)p, &slot);
    if (e == NULL) return 0;
    shadow_decode(*e, size, cell, flag);
    return 1;
}

SHADOW_UNUSED static uint64_t shadow_count(const shadow_t *s) { return s->count; }

/* Bytes of [p, p + len) that lie on resident pages, by mincore. */
SHADOW_UNUSED static size_t shadow_resident_range(const void *p, size_t len) {
    if (len == 0) return 0;
    size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)p, hi = lo + len;
    uintptr_t start = lo & ~(uintptr_t)(ps - 1);
    size_t total = 0;
    unsigned char vec[256];
    while (start < hi) {
        size_t npages = (size_t)((hi - start + ps - 1) / ps);
        if (npages > sizeof(vec)) npages = sizeof(vec);
        if (mincore((void *)start, npages * ps, vec) != 0) return total; /* cannot tell */
        for (size_t i = 0; i < npages; i++) {
            if (!(vec[i] & 1)) continue;
            uintptr_t a = start + i * ps, b = a + ps;
            if (a < lo) a = lo;
            if (b > hi) b = hi;
            total += (size_t)(b - a);
        }
        start += npages * ps;
    }
    return total;
}

/* Real RSS of the metadata: resident pages of the top array, every mid array and leaf,
 * plus the registry.  Pages only ever read (the kernel's shared zero page) count too. */
SHADOW_UNUSED static size_t shadow_resident_bytes(const shadow_t *s) {
    size_t total = shadow_resident_range(s->top, sizeof(s->top));
    for (size_t i = 0; i < SHADOW_TOP_LEN; i++) {
        if (s->top[i] != NULL) total += shadow_resident_range(s->top[i], SHADOW_MID_BYTES);
    }
    for (size_t i = 0; i < s->nleaves; i++) {
        const uint32_t *leaf = shadow_slot_of_key(s, s->leaves[i])->leaf;
        total += shadow_resident_range(leaf, SHADOW_LEAF_BYTES);
    }
    return total + s->capleaves * sizeof(uint32_t);
}

/* Virtual size: top array + all mid arrays + all leaves + registry. */
SHADOW_UNUSED static size_t shadow_mapped_bytes(const shadow_t *s) {
    return sizeof(s->top) + s->nmids * SHADOW_MID_BYTES + s->nleaves * SHADOW_LEAF_BYTES +
           s->capleaves * sizeof(uint32_t);
}

/* Unmap every leaf whose live count is 0, then every mid array left without leaves.
 * Never called from put/take; meant for a periodic or end-of-phase clean-up. */
SHADOW_UNUSED static void shadow_trim(shadow_t *s) {
    size_t i = s->nleaves;
    while (i > 0) {
        i--;
        shadow_slot_t *slot = shadow_slot_of_key(s, s->leaves[i]);
        if (slot->live != 0) continue;
        munmap(slot->leaf, SHADOW_LEAF_BYTES);
        slot->leaf = NULL;
        /* Swap-remove from the registry; the moved entry (index > i) was already visited. */
        s->leaves[i] = s->leaves[--s->nleaves];
    }
    /* A mid array is released when no registered leaf points into it. */
    if (s->nmids == 0) return;
    unsigned char *used = (unsigned char *)calloc(SHADOW_TOP_LEN, 1);
    if (used == NULL) return; /* keep the mids; nothing is lost */
    for (i = 0; i < s->nleaves; i++) used[s->leaves[i] >> SHADOW_MID_BITS] = 1;
    for (i = 0; i < SHADOW_TOP_LEN; i++) {
        if (s->top[i] != NULL && !used[i]) {
            munmap(s->top[i], SHADOW_MID_BYTES);
            s->top[i] = NULL;
            s->nmids--;
        }
    }
    free(used);
}

/* Unmap everything and return to the empty (all-zero) state. */
SHADOW_UNUSED static void shadow_free(shadow_t *s) {
    for (size_t i = 0; i < s->nleaves; i++) {
        munmap(shadow_slot_of_key(s, s->leaves[i])->leaf, SHADOW_LEAF_BYTES);
    }
    for (size_t i = 0; i < SHADOW_TOP_LEN; i++) {
        if (s->top[i] != NULL) munmap(s->top[i], SHADOW_MID_BYTES);
    }
    free(s->leaves);
    memset(s, 0, sizeof(*s));
}

#endif
