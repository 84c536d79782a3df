/* Shadow map: live small tracked allocation -> (size, cell, flag), found by address.
 *
 * Why: the pointer table (_ptrmap.h) hashes every pointer, so pymalloc's neighbouring
 * blocks land in random slots and every alloc and every free costs a cache miss.  The
 * shadow map instead keeps one 32-bit entry per 16-byte granule of address space, so the
 * metadata of consecutive blocks is consecutive too and an asyncio task that builds and
 * drops objects walks its metadata linearly.  Only blocks smaller than SHADOW_MAX_SIZE go
 * here; anything it cannot hold goes to the pointer table.
 *
 * Layout, for an address a < 2^SHADOW_ADDR_BITS (47: the x86-64 4-level user space):
 *
 *     a bits 46..26  directory index -> s->dir[]: 2^21 leaf pointers (16 MiB of address
 *                                      space reserved, only touched pages resident: one
 *                                      4 KiB page of it covers 32 GiB of heap)
 *     a bits 25..4   granule         -> leaf: 2^22 entries of 4 B (16 MiB reserved), one
 *                                      leaf covers 64 MiB of address space
 *     a bits 3..0    must be 0       (pymalloc and glibc both return 16-byte aligned blocks)
 *
 *     entry: bits 0..9 size, bit 10 flag, bits 11..31 cell (cell >= 1, so used != 0)
 *
 * So a put or a take is two dependent loads (directory slot, entry) and a store, with no
 * per-leaf bookkeeping: the first version had a three-level tree with a live count per
 * leaf, and callgrind put it at ~35 instructions per put and per take; this one is ~12.
 * Everything is mapped with MAP_NORESERVE, so only the pages that are written cost RSS:
 * densely packed 48-byte objects cost 12 B of metadata each.  Each mapping also gets
 * MADV_NOHUGEPAGE, because the kernel merges adjacent leaf mappings into one VMA and with
 * THP "always" would back a 2 MiB stretch with a huge page.  That madvise runs only when a
 * leaf is created (already an mmap); put and take never make a syscall once the leaf
 * exists, and leaves are kept until shadow_free (an alloc/free pattern oscillating around
 * a leaf costs nothing).  A registry (an array of directory indexes, _sysmem.h) lists every
 * leaf, so shadow_free and the byte counters never walk the directory.
 *
 * Overwrite rule: a put on a granule that already holds an entry (its free was not seen)
 * replaces the entry; the live count does not change (one live block before and after).
 * shadow_put_ex reports the replaced entry so the caller can settle the old cell.  The
 * free hook should ask shadow_take first and the pointer table only when it answers 0;
 * if frees can be missed, routing an aligned block to the pointer table should also
 * shadow_take it first, or a stale small entry would shadow the big block's record.
 *
 * Addresses at or above 2^SHADOW_ADDR_BITS are refused by put and ignored by take/get.
 * Define SHADOW_ADDR_BITS 48 before including this header on systems whose user space
 * reaches 2^48 (arm64 with 48-bit VA; the directory is then 32 MiB reserved).
 *
 * The empty state is all zeros: a map whose directory could not be mapped (shadow_init
 * failed, or was never called) refuses every put and finds nothing.  Memory comes from
 * mmap (_sysmem.h for the list of leaves), never from the C library or a Python domain.  No locking: all
 * functions run with the GIL held.
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
#include "_sysmem.h"
/* Hidden by glibc in a strict ISO build; these match its declarations. */
int madvise(void *addr, size_t len, int advice);
int mincore(void *addr, size_t len, unsigned char *vec);

#define SHADOW_MAX_SIZE 512u          /* sizes 0..511 fit (pymalloc's blocks); larger go to the hash table */
#define SHADOW_MAX_CELL ((1u << 21) - 1)

#ifndef SHADOW_ADDR_BITS
#define SHADOW_ADDR_BITS 47
#endif
#if SHADOW_ADDR_BITS < 35 || SHADOW_ADDR_BITS > 48
#error "SHADOW_ADDR_BITS must be in 35..48"
#endif

#define SHADOW_GRANULE_BITS 4
#define SHADOW_LEAF_BITS 22 /* granules per leaf: 2^22 x 16 B = 64 MiB of address space */
#define SHADOW_LEAF_SHIFT (SHADOW_GRANULE_BITS + SHADOW_LEAF_BITS) /* 26 */
#define SHADOW_DIR_LEN ((size_t)1 << (SHADOW_ADDR_BITS - SHADOW_LEAF_SHIFT))
#define SHADOW_LEAF_LEN ((size_t)1 << SHADOW_LEAF_BITS)
#define SHADOW_LEAF_BYTES (SHADOW_LEAF_LEN * sizeof(uint32_t))
#define SHADOW_DIR_BYTES (SHADOW_DIR_LEN * sizeof(uint32_t *))

#define SHADOW_SIZE_MASK 0x3FFu
#define SHADOW_FLAG_BIT 10
#define SHADOW_CELL_SHIFT 11

#define SHADOW_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define SHADOW_UNUSED __attribute__((unused)) /* not every includer uses every function */

typedef struct shadow {
    uint32_t **dir;   /* SHADOW_DIR_LEN leaf pointers (NULL until the first put there) */
    size_t dir_len;   /* SHADOW_DIR_LEN once dir is mapped, else 0: one bound test covers */
                      /* both an address too high and no directory */
    uint64_t count;   /* live entries */
    uint32_t *leaves; /* registry: directory index of every mapped leaf */
    size_t nleaves, capleaves;
} shadow_t;

/* Is a a granule-aligned address?  Then a >> SHADOW_LEAF_SHIFT is its directory index,
 * which callers compare with s->dir_len: that one bound test also refuses an address at or
 * above 2^SHADOW_ADDR_BITS and a map with no directory (testing each of the three apart
 * cost the free hook ~6 instructions more). */
static inline int shadow_aligned(uintptr_t a) {
    return (a & ((1u << SHADOW_GRANULE_BITS) - 1)) == 0;
}

static inline uint32_t shadow_encode(uint32_t size, uint32_t cell, int flag) {
    return size | ((uint32_t)(flag != 0) << SHADOW_FLAG_BIT) | (cell << SHADOW_CELL_SHIFT);
}

static inline void shadow_decode(uint32_t e, uint32_t *size, uint32_t *cell, int *flag) {
    *size = e & SHADOW_SIZE_MASK;
    *flag = (int)((e >> SHADOW_FLAG_BIT) & 1u);
    *cell = e >> SHADOW_CELL_SHIFT;
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

/* Map the directory.  Returns 0, or -1 (the map then stays empty and refuses puts). */
SHADOW_UNUSED static int shadow_init(shadow_t *s) {
    memset(s, 0, sizeof(*s));
    s->dir = (uint32_t **)shadow_map(SHADOW_DIR_BYTES);
    s->dir_len = s->dir != NULL ? SHADOW_DIR_LEN : 0;
    return s->dir != NULL ? 0 : -1;
}

/* Slow path of put: map the leaf holding address a.  NULL when memory could not be had. */
__attribute__((noinline, cold, unused)) static uint32_t *shadow_make_leaf(shadow_t *s, uintptr_t a) {
    if (s->nleaves == s->capleaves) {
        size_t ncap = s->capleaves ? s->capleaves * 2 : 64;
        uint32_t *nl = (uint32_t *)sysmem_calloc(ncap, sizeof(uint32_t));
        if (nl == NULL) return NULL;
        if (s->nleaves) memcpy(nl, s->leaves, s->nleaves * sizeof(uint32_t));
        sysmem_free(s->leaves);
        s->leaves = nl;
        s->capleaves = ncap;
    }
    uint32_t *leaf = (uint32_t *)shadow_map(SHADOW_LEAF_BYTES);
    if (leaf == NULL) return NULL;
    s->dir[a >> SHADOW_LEAF_SHIFT] = leaf;
    s->leaves[s->nleaves++] = (uint32_t)(a >> SHADOW_LEAF_SHIFT);
    return leaf;
}

/* Record p.  The caller guarantees size < SHADOW_MAX_SIZE and 1 <= cell <= SHADOW_MAX_CELL
 * (the pointer table's 19-bit cell limit caps cells far below).  *old = the entry it
 * replaced (0 if the granule was free; decode it with shadow_decode).  Returns 0, or -1
 * when p cannot be held here (unaligned, too high, no directory, mmap failed). */
static inline int shadow_put_ex(shadow_t *s, const void *p, uint32_t size, uint32_t cell, int flag,
                                uint32_t *old) {
    uintptr_t a = (uintptr_t)p, i = a >> SHADOW_LEAF_SHIFT;
    if (SHADOW_UNLIKELY(!shadow_aligned(a) || i >= s->dir_len)) return -1;
    uint32_t *leaf = s->dir[i];
    if (SHADOW_UNLIKELY(leaf == NULL)) {
        leaf = shadow_make_leaf(s, a);
        if (leaf == NULL) return -1;
    }
    uint32_t *e = &leaf[(a >> SHADOW_GRANULE_BITS) & (SHADOW_LEAF_LEN - 1)];
    uint32_t prev = *e;
    *e = shadow_encode(size, cell, flag);
    if (prev == 0) s->count++;
    *old = prev;
    return 0;
}

/* Record p, overwriting an existing entry (see shadow_put_ex for the contract). */
SHADOW_UNUSED static inline int shadow_put(shadow_t *s, const void *p, uint32_t size, uint32_t cell,
                                           int flag) {
    uint32_t old;
    return shadow_put_ex(s, p, size, cell, flag, &old);
}

/* Lookups that must not map anything, in two steps: the leaf holding address a (NULL for a
 * bad address, no directory or no leaf mapped there yet), then a's entry in it.  A caller
 * that tests the leaf tests one pointer, where shadow_slot's result is tested again after
 * the offset is added. */
static inline uint32_t *shadow_leaf(const shadow_t *s, uintptr_t a) {
    uintptr_t i = a >> SHADOW_LEAF_SHIFT;
    if (SHADOW_UNLIKELY(!shadow_aligned(a) || i >= s->dir_len)) return NULL;
    return s->dir[i];
}

static inline size_t shadow_index(uintptr_t a) {
    return (a >> SHADOW_GRANULE_BITS) & (SHADOW_LEAF_LEN - 1);
}

/* The entry slot for address a, used or not, or NULL when there is none. */
static inline uint32_t *shadow_slot(const shadow_t *s, uintptr_t a) {
    uint32_t *leaf = shadow_leaf(s, a);
    return leaf != NULL ? leaf + shadow_index(a) : NULL;
}

/* The entry of p, or NULL if p is not recorded (cheap for pointers never recorded). */
static inline uint32_t *shadow_find(const shadow_t *s, uintptr_t a) {
    uint32_t *leaf = shadow_leaf(s, a);
    if (leaf == NULL) return NULL;
    uint32_t *e = leaf + shadow_index(a);
    return *e != 0 ? e : NULL;
}

/* If p is recorded: clear it, fill size/cell/flag, return 1.  Otherwise 0. */
static inline int shadow_take(shadow_t *s, const void *p, uint32_t *size, uint32_t *cell,
                              int *flag) {
    uint32_t *e = shadow_find(s, (uintptr_t)p);
    if (e == NULL) return 0;
    shadow_decode(*e, size, cell, flag);
    *e = 0;
    s->count--;
    return 1;
}

/* Like take, without clearing. */
SHADOW_UNUSED static inline int shadow_get(const shadow_t *s, const void *p, uint32_t *size,
                                           uint32_t *cell, int *flag) {
    uint32_t *e = shadow_find(s, (uintptr_t)p);
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

/* Real RSS of the metadata: resident pages of the directory and every leaf, plus the
 * registry.  Pages only ever read (the kernel's shared zero page) count too. */
SHADOW_UNUSED static size_t shadow_resident_bytes(const shadow_t *s) {
    if (s->dir == NULL) return 0;
    size_t total = shadow_resident_range(s->dir, SHADOW_DIR_BYTES);
    for (size_t i = 0; i < s->nleaves; i++) total += shadow_resident_range(s->dir[s->leaves[i]], SHADOW_LEAF_BYTES);
    return total + s->capleaves * sizeof(uint32_t);
}

/* Virtual size: directory + all leaves + registry. */
SHADOW_UNUSED static size_t shadow_mapped_bytes(const shadow_t *s) {
    if (s->dir == NULL) return 0;
    return SHADOW_DIR_BYTES + s->nleaves * SHADOW_LEAF_BYTES + s->capleaves * sizeof(uint32_t);
}

/* Unmap everything and return to the empty (all-zero) state. */
SHADOW_UNUSED static void shadow_free(shadow_t *s) {
    if (s->dir != NULL) {
        for (size_t i = 0; i < s->nleaves; i++) munmap(s->dir[s->leaves[i]], SHADOW_LEAF_BYTES);
        munmap(s->dir, SHADOW_DIR_BYTES);
    }
    sysmem_free(s->leaves);
    memset(s, 0, sizeof(*s));
}

#endif
