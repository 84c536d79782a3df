/* The tracker's own tables, mapped from the kernel instead of taken from the C library's
 * heap.
 *
 * Sharing malloc's heap with the program changes how the program's own allocations are
 * served, which a profiler should not do.  glibc serves a block above its mmap threshold
 * from the heap if a free chunk fits and maps it otherwise, and it raises the threshold
 * only when a mapped block is freed at full size.  A loopback server's 256 KiB receive
 * buffer (shrunk with realloc once the bytes are in, then freed) therefore either lands in
 * the heap every time or costs an mmap, a page fault, an mremap and an munmap every time,
 * depending on where the heap's free space was when the first one came; tables growing
 * by doubling in the same heap (a few MiB for a large program, freed and taken again at
 * each growth) move that free space around.  Here they do not: the program's heap sees
 * only the program's calls and those of Python objects (ours included, which the
 * interpreter serves like any other).
 *
 * Each block is its own mapping with a 64-byte header that keeps the mapping's length, so
 * blocks are 64-byte aligned (cache lines) and start zeroed.  Growing uses mremap where
 * there is one, so even a large table is not copied.  The blocks are few (a few dozen
 * tables, growing by doubling, and a fold pass's scratch), so the page each small one
 * rounds up to and the system calls cost nothing measurable.
 */
#ifndef MEMSCOPE_SYSMEM_H
#define MEMSCOPE_SYSMEM_H

/* Python.h, included first, asks for the GNU feature set (mremap); without it, growing
 * maps anew and copies. */
#if !defined(_DEFAULT_SOURCE) && !defined(_GNU_SOURCE)
#define _DEFAULT_SOURCE 1
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(MAP_ANONYMOUS)
#include <linux/mman.h> /* strict ISO build that included a system header first */
#endif
#ifdef MREMAP_MAYMOVE
/* Declared by glibc only with the GNU feature set, which a strict ISO build that
 * included a system header first does not get (while <linux/mman.h> still defines
 * MREMAP_MAYMOVE); this matches its declaration. */
void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...);
#endif

#define SYSMEM_HEADER 64

static size_t sysmem_page;

/* Bytes to map for n bytes of payload; 0 when that overflows. */
static size_t sysmem_span(size_t n) {
    if (sysmem_page == 0) {
        long p = sysconf(_SC_PAGESIZE);
        sysmem_page = p > 0 ? (size_t)p : 4096;
    }
    if (n > SIZE_MAX - SYSMEM_HEADER - sysmem_page) return 0;
    return (n + SYSMEM_HEADER + sysmem_page - 1) & ~(sysmem_page - 1);
}

static inline size_t *sysmem_header(void *p) { return (size_t *)((char *)p - SYSMEM_HEADER); }

/* nelem * elsize zeroed bytes, or NULL. */
static void *sysmem_calloc(size_t nelem, size_t elsize) {
    if (elsize != 0 && nelem > SIZE_MAX / elsize) return NULL;
    size_t span = sysmem_span(nelem * elsize);
    if (span == 0) return NULL;
    void *m = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    *(size_t *)m = span;
    return (char *)m + SYSMEM_HEADER;
}

static void sysmem_free(void *p) {
    if (p == NULL) return;
    size_t *h = sysmem_header(p);
    munmap(h, *h);
}

/* Resize to at least n bytes, keeping the contents; bytes past the old size read zero.
 * NULL (p untouched) when memory could not be had.  Never shrinks. */
static void *sysmem_realloc(void *p, size_t n) {
    if (p == NULL) return sysmem_calloc(n, 1);
    size_t *h = sysmem_header(p), old = *h, span = sysmem_span(n);
    if (span == 0) return NULL;
    if (span <= old) return p;
#ifdef MREMAP_MAYMOVE
    void *m = mremap(h, old, span, MREMAP_MAYMOVE);
    if (m == MAP_FAILED) return NULL;
#else
    void *m = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    memcpy(m, h, old);
    munmap(h, old);
#endif
    *(size_t *)m = span;
    return (char *)m + SYSMEM_HEADER;
}

#endif
