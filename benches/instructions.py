"""Deterministic instruction counts: each workload at two sizes under callgrind.

Wall-clock ratios on a shared or virtual machine spread more than the targets are wide, so
the README's second table counts CPU instructions instead::

    python -m benches.instructions                      # every workload below (~20 min)
    python -m benches.instructions --only alloc,server  # a subset

Each (workload, config) runs twice, at a small and a larger size, in a fresh interpreter
under ``valgrind --tool=callgrind`` with ``PYTHONHASHSEED=0``; the difference of the two
totals divided by the difference in units of work (tasks, requests, jobs) is the cost per
unit with start-up, imports and tracer set-up cancelled out.  Ratios are to the plain run.
Instructions are not time: cache misses and memory stalls are not in them (see the README
for what that leaves out on the task trees).  Needs valgrind (``apt-get install valgrind``).
The trees run with the garbage collector off, so the slope is not moved by where a
collection happens to fall between the two sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .child import _settle_malloc
from .configs import CONFIGS, RunContext
from .workloads import WORKLOADS

__all__ = ["CASES", "main"]


_SEED = 20261124  # memscope's sampling seed in every child


def _tree_tasks(depth: int, branches: int = 6) -> int:
    return sum(branches**k for k in range(depth + 1))


@dataclass(frozen=True)
class Case:
    """A workload at two sizes; ``units`` counts the work each size does."""

    workload: str
    unit: str
    small: dict[str, Any]
    large: dict[str, Any]
    units: tuple[int, int]
    configs: tuple[str, ...] = ("plain", "memscope-exact", "memscope-sampled")  # benches.configs names
    gc_off: bool = False


_TREE = {"branches": 6, "rounds": 1}
CASES: dict[str, Case] = {
    c.workload: c
    for c in [
        Case("alloc", "task", {"tasks": 200, "steps": 30, "per_step": 40},
             {"tasks": 600, "steps": 30, "per_step": 40}, (200, 600)),
        Case("server", "request", {"requests": 1000, "clients": 50}, {"requests": 3000, "clients": 50},
             (1000, 3000)),
        Case("to_thread", "job", {"jobs": 2000, "tasks": 200}, {"jobs": 6000, "tasks": 200}, (2000, 6000),
             configs=("memscope-exact-nothreads", "memscope-exact")),
        *(
            Case(name, "task", {"depth": 4, **_TREE}, {"depth": 5, **_TREE}, (_tree_tasks(4), _tree_tasks(5)),
                 gc_off=True)
            for name in ("tree-gather", "tree-taskgroup", "tree-gather-eager", "tree-taskgroup-eager")
        ),
    ]
}


def _child(workload: str, config: str, params: dict[str, Any], gc_off: bool) -> None:
    """Run one workload once (inside callgrind) under one of benches.run's configs."""
    if gc_off:
        gc.disable()
    # first_repeat=False: no report after the run, whose cost grows with the size.  The seed
    # is fixed, so the same allocations are sampled (and their stacks walked) in every run
    # and a count repeats exactly: a drawn one moved the server's by ~+-300 a request.
    with tempfile.TemporaryDirectory() as tmp, CONFIGS[config].session(RunContext(Path(tmp), False, _SEED)) as session:
        with asyncio.Runner(loop_factory=session.loop_factory) as runner:
            runner.get_loop()
            # glibc's large blocks served alike in every config, as in the timed runs
            # (else the server's receive buffers may be mapped in one config and not in
            # another, and the mapping's cost is the kernel's, which callgrind does not count)
            _settle_malloc()
            result = runner.run(WORKLOADS[workload].main(**params))
    expected = WORKLOADS[workload].expected(**params)
    if result != expected:
        raise SystemExit(f"{workload}/{config}: result {result} != expected {expected}")


def _instructions(workload: str, config: str, params: dict[str, Any], gc_off: bool, tmp: str) -> int:
    out = os.path.join(tmp, f"cg.{workload}.{config}.{os.getpid()}.{len(os.listdir(tmp))}")
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, "-m", "benches.instructions", "--child", workload, config, json.dumps(params),
        *(["--gc-off"] if gc_off else []),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{workload}/{config} failed under callgrind: {tail}")
    with open(out) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"{workload}/{config}: no totals in {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benches.instructions", description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated workloads (default: all)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs=3, metavar=("WORKLOAD", "CONFIG", "PARAMS"), help=argparse.SUPPRESS)
    ap.add_argument("--gc-off", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        workload, config, params = args.child
        _child(workload, config, json.loads(params), args.gc_off)
        return 0
    if shutil.which("valgrind") is None:
        print("benches.instructions: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"benches.instructions: unknown workload(s): {', '.join(unknown)} "
              f"(choose from {', '.join(CASES)})", file=sys.stderr)
        return 2
    rows = []
    print(f"{'workload':<22} {'config':<26} {'instructions per unit':>22} {'ratio':>8}")
    with tempfile.TemporaryDirectory(prefix="memscope-cg-") as tmp:
        for name in names:
            case = CASES[name]
            reason = WORKLOADS[name].unavailable()
            if reason:
                print(f"{name:<22} skipped: {reason}")
                continue
            base = None
            for config in case.configs:
                try:
                    a = _instructions(name, config, case.small, case.gc_off, tmp)
                    b = _instructions(name, config, case.large, case.gc_off, tmp)
                except RuntimeError as exc:
                    print(f"benches.instructions: {exc}", file=sys.stderr)
                    return 1
                per_unit = (b - a) / (case.units[1] - case.units[0])
                base = per_unit if base is None else base
                ratio = per_unit / base
                rows.append({"workload": name, "config": config, "unit": case.unit,
                             "instructions_per_unit": per_unit, "ratio": ratio})
                print(f"{name:<22} {config:<26} {per_unit:>16,.0f} /{case.unit:<5} {ratio:>7.3f}x", flush=True)
    if args.json:
        tmp_path = args.json + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump({"python": sys.version.split()[0], "rows": rows}, f, indent=1)
        os.replace(tmp_path, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
