"""Which configs run on which workload, and the budget each is held to.

The budget is the project's (its design notes' "Performance budget", and issues 2 and
4): exact <= 1.3x plain on allocation-bound workloads (alloc, tree) and <= 1.10x on the
I/O-bound server; sampled (512 KiB) <= 1.05x and <= 1.02x; the executor/thread wrappers
<= 1.02x; tracker memory <= 24 bytes per live tracked allocation.
"""

from __future__ import annotations

__all__ = [
    "BYTES_PER_ALLOCATION_TARGET",
    "MEMORY_CONFIGS",
    "WRAPPER_TARGET",
    "configs_for",
    "target_for",
]

WRAPPER_TARGET = 1.02
BYTES_PER_ALLOCATION_TARGET = 24

_RATIO_TARGETS = {
    "alloc": {"memscope-exact": 1.30, "memscope-exact-uvloop": 1.30, "memscope-sampled": 1.05},
    "tree": {"memscope-exact": 1.30, "memscope-exact-uvloop": 1.30, "memscope-sampled": 1.05},
    "server": {"memscope-exact": 1.10, "memscope-exact-uvloop": 1.10, "memscope-sampled": 1.02},
}

MEMORY_CONFIGS = ("plain", "memscope-exact", "memscope-sampled")


def configs_for(kind: str, *, tracemalloc16: bool) -> list[str]:
    """Config names for a workload kind, baselines first."""
    if kind == "threads":
        return ["plain", "memscope-exact-nothreads", "memscope-exact"]
    names = ["plain", "memscope-exact", "memscope-sampled", "tracemalloc-1"]
    if tracemalloc16:
        names.append("tracemalloc-16")
    names += ["memray", "memray-pyalloc", "plain-uvloop", "memscope-exact-uvloop"]
    return names


def target_for(kind: str, config: str) -> float | None:
    """The highest acceptable ratio to the baseline, or None when there is no budget."""
    return _RATIO_TARGETS.get(kind, {}).get(config)
