/* The running thread state, read without a function call.
 *
 * Exact mode reads the thread state on every tracked allocation and on most frees (its
 * context tells which task runs).  From 3.12 on CPython keeps it in a thread-local variable
 * of libpython (_Py_tss_tstate); with a shared libpython, as pyenv and most distributions
 * build it, every PyThreadState_GetUnchecked() is a PLT call into libpython and a
 * __tls_get_addr call (callgrind: ~21 instructions a read, 13% of exact mode's cost per
 * allocation).  The variable is not exported, but it sits in libpython's TLS block, and
 * dl_iterate_phdr reports where the calling thread's copy of every module's block is
 * (dlpi_tls_data).  So, once, from Python code (never inside a hook):
 *
 *   1. look through every module's TLS block for the pointer-sized slots that hold the
 *      current thread state; exactly one must;
 *   2. it must lie in glibc's static TLS area, just below the thread pointer (x86-64 puts
 *      TLS blocks at negative offsets; the area's size comes from _dl_get_tls_static_info,
 *      the call sanitizers use for the same purpose).  Every thread's static TLS has the
 *      same layout, so the slot's offset from the thread pointer is the same in all of them
 *      and a read is one %fs-relative load;
 *   3. each thread checks that read against PyThreadState_GetUnchecked() when it first
 *      enters a session (tstate_bind) and keeps the official call if they differ.
 *
 * 3.11 keeps the thread state in a global instead (see below).  Anything else (another
 * architecture or C library, an interpreter whose variable is not found) keeps the
 * official call.  The fast read returns exactly what the official
 * call would: it is the same variable.
 */
#ifndef MEMSCOPE_TSTATE_H
#define MEMSCOPE_TSTATE_H

#include <Python.h>

static inline PyThreadState *tstate_official(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && PY_VERSION_HEX >= 0x030C0000
#define TSTATE_FAST 1
#include <dlfcn.h>
#include <link.h>

static intptr_t tstate_offset; /* slot address minus the thread pointer; 0: not found */

static inline uintptr_t tstate_thread_pointer(void) {
    uintptr_t tp;
    __asm__ volatile("mov %%fs:0, %0" : "=r"(tp)); /* the TCB's self pointer */
    return tp;
}

typedef struct {
    PyThreadState *want;
    uintptr_t found;
    int matches;
} tstate_search_t;

static int tstate_search_module(struct dl_phdr_info *info, size_t size, void *arg) {
    tstate_search_t *s = (tstate_search_t *)arg;
    if (size < offsetof(struct dl_phdr_info, dlpi_tls_data) + sizeof(info->dlpi_tls_data)) return 0;
    if (info->dlpi_tls_modid == 0 || info->dlpi_tls_data == NULL) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_TLS) continue;
        uintptr_t lo = (uintptr_t)info->dlpi_tls_data;
        uintptr_t first = (lo + sizeof(void *) - 1) & ~(uintptr_t)(sizeof(void *) - 1);
        for (uintptr_t a = first; a + sizeof(void *) <= lo + ph->p_memsz; a += sizeof(void *)) {
            if (*(PyThreadState *const *)a == s->want) {
                s->found = a;
                s->matches++;
            }
        }
    }
    return 0;
}

/* Find the slot (see the header comment).  Call with the GIL held, outside the hooks. */
static void tstate_locate(void) {
    if (tstate_offset != 0) return;
    PyThreadState *ts = tstate_official();
    if (ts == NULL) return;
    void (*static_info)(size_t *, size_t *) =
        (void (*)(size_t *, size_t *))dlsym(RTLD_DEFAULT, "_dl_get_tls_static_info");
    if (static_info == NULL) return;
    size_t static_size = 0, static_align = 0;
    static_info(&static_size, &static_align);
    tstate_search_t s = {ts, 0, 0};
    dl_iterate_phdr(tstate_search_module, &s);
    if (s.matches != 1) return; /* e.g. 3.14's _Py_tss_gilstate holds it too: the call */
    uintptr_t tp = tstate_thread_pointer();
    /* static_size also counts the TCB, so this bound is a little loose; harmless, as the
     * area below the thread pointer is mapped in every thread and tstate_bind checks. */
    if (s.found >= tp || tp - s.found > static_size) return; /* not static TLS: no fixed offset */
    tstate_offset = (intptr_t)s.found - (intptr_t)tp;
}

/* This thread's slot if the fast read is right here, else NULL. */
static PyThreadState **tstate_bind(void) {
    if (tstate_offset == 0) return NULL;
    PyThreadState **slot = (PyThreadState **)(tstate_thread_pointer() + (uintptr_t)tstate_offset);
    PyThreadState *ts = tstate_official();
    return (ts != NULL && *slot == ts) ? slot : NULL;
}

#elif PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
/* 3.11 keeps the running thread state in a global, _PyRuntime.gilstate.tstate_current (an
 * _Py_atomic_address read with a relaxed load, a plain load on every platform CPython
 * supports).  Its offset comes from CPython's own internal header; the slot is the same for
 * every thread and tstate_bind still checks it against the official call. */
#define TSTATE_FAST 1
#undef _PyGC_FINALIZED /* the internal header defines it its own way */
#define Py_BUILD_CORE 1
#include "internal/pycore_runtime.h"
#undef Py_BUILD_CORE

static void tstate_locate(void) {}

static PyThreadState **tstate_bind(void) {
    PyThreadState **slot = (PyThreadState **)&_PyRuntime.gilstate.tstate_current._value;
    PyThreadState *ts = tstate_official();
    return (ts != NULL && *slot == ts) ? slot : NULL;
}
#else
#define TSTATE_FAST 0
static void tstate_locate(void) {}
static PyThreadState **tstate_bind(void) { return NULL; }
#endif

/* slot: what tstate_bind returned for this thread. */
static inline PyThreadState *tstate_read(PyThreadState **slot) {
    return slot != NULL ? *slot : tstate_official();
}

#endif
