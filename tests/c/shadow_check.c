/* The shadow map (attribution/_shadow.h) on its own, for tests/test_shadow_map.py: which
 * addresses it holds and refuses, the overwrite rule, and a map with no directory.  The
 * hooks rely on each of these and only the common case reaches them from Python.  Prints
 * "ok", or the first failed check and exits 1. */
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "_shadow.h"

#define CHECK(cond)                                                    \
    do {                                                               \
        if (!(cond)) {                                                 \
            printf("line %d: %s\n", __LINE__, #cond);                  \
            return 1;                                                  \
        }                                                              \
    } while (0)

static _Alignas(16) char heap[64];

int main(void) {
    shadow_t s;
    uint32_t size = 0, cell = 0, old = 0;
    int flag = 0;
    uintptr_t a = (uintptr_t)heap;

    /* never initialised (the all-zero state): refuses every put, finds nothing */
    memset(&s, 0, sizeof(s));
    CHECK(shadow_put(&s, heap, 10, 1, 0) == -1);
    CHECK(shadow_leaf(&s, a) == NULL);
    CHECK(shadow_slot(&s, a) == NULL);
    CHECK(shadow_find(&s, a) == NULL);
    CHECK(!shadow_take(&s, heap, &size, &cell, &flag));

    CHECK(shadow_init(&s) == 0);
    CHECK(shadow_put(&s, heap, 10, 7, 1) == 0);
    CHECK(shadow_count(&s) == 1);
    CHECK(shadow_get(&s, heap, &size, &cell, &flag) && size == 10 && cell == 7 && flag == 1);

    /* an address off the 16-byte granule is refused and never read as its granule's block */
    CHECK(shadow_put(&s, heap + 8, 5, 2, 0) == -1);
    CHECK(shadow_leaf(&s, a + 8) == NULL);
    CHECK(shadow_find(&s, a + 8) == NULL);
    CHECK(!shadow_take(&s, heap + 8, &size, &cell, &flag));
    CHECK(shadow_count(&s) == 1);

    /* the next granule is a block of its own */
    CHECK(shadow_put(&s, heap + 16, 511, SHADOW_MAX_CELL, 0) == 0);
    CHECK(shadow_get(&s, heap + 16, &size, &cell, &flag) && size == 511 && cell == SHADOW_MAX_CELL && flag == 0);
    CHECK(shadow_get(&s, heap, &size, &cell, &flag) && size == 10 && cell == 7 && flag == 1);
    CHECK(shadow_count(&s) == 2);

    /* at and above 2^SHADOW_ADDR_BITS: refused, not found, nothing read out of bounds */
    uintptr_t high[] = {(uintptr_t)1 << SHADOW_ADDR_BITS, ((uintptr_t)1 << SHADOW_ADDR_BITS) + 16,
                        ~(uintptr_t)15};
    for (size_t i = 0; i < sizeof(high) / sizeof(high[0]); i++) {
        CHECK(shadow_put(&s, (void *)high[i], 1, 1, 0) == -1);
        CHECK(shadow_leaf(&s, high[i]) == NULL);
        CHECK(shadow_find(&s, high[i]) == NULL);
    }
    /* the highest granule below it is held */
    uintptr_t top = ((uintptr_t)1 << SHADOW_ADDR_BITS) - 16;
    CHECK(shadow_put(&s, (void *)top, 3, 4, 0) == 0);
    CHECK(shadow_get(&s, (void *)top, &size, &cell, &flag) && size == 3 && cell == 4);
    CHECK(shadow_take(&s, (void *)top, &size, &cell, &flag) && shadow_find(&s, top) == NULL);

    /* a granule in a leaf never mapped: no slot (lookups map nothing) */
    CHECK(shadow_slot(&s, top - ((uintptr_t)1 << SHADOW_LEAF_SHIFT)) == NULL);
    CHECK(shadow_slot(&s, a) != NULL && *shadow_slot(&s, a) != 0);

    /* overwrite rule: the replaced entry comes back, the live count stays */
    CHECK(shadow_put_ex(&s, heap, 11, 9, 0, &old) == 0);
    CHECK(old == shadow_encode(10, 7, 1) && shadow_count(&s) == 2);
    CHECK(shadow_put_ex(&s, heap + 32, 1, 1, 0, &old) == 0 && old == 0 && shadow_count(&s) == 3);

    /* take clears */
    CHECK(shadow_take(&s, heap, &size, &cell, &flag) && size == 11 && cell == 9 && flag == 0);
    CHECK(shadow_find(&s, a) == NULL && shadow_slot(&s, a) != NULL && shadow_count(&s) == 2);
    CHECK(!shadow_take(&s, heap, &size, &cell, &flag));

    /* freed: back to the all-zero state, which refuses and finds nothing */
    shadow_free(&s);
    CHECK(s.dir == NULL && s.dir_len == 0);
    CHECK(shadow_find(&s, a + 16) == NULL && shadow_put(&s, heap, 1, 1, 0) == -1);
    printf("ok\n");
    return 0;
}
