"""Run the benchmark suite: every measurement in a fresh subprocess, medians, ratios.

    python -m benches.run [--quick] [--repeat N] [--only alloc,server,...] [--json out.json]
                          [--tracemalloc16] [--timeout S]

Run it from the repository root.  The parent process never imports a profiler; it plans
the runs, starts ``python -m benches.run --child ...`` for each one (repeats interleaved
across configs, so a slow drift of the machine hits every config alike), and prints the
tables (see ``benches/README.md``).  Exit status: 0 when every measurement ran and
returned the right result (missed targets do not change it), 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .configs import CONFIGS
from .memory import MEMORY_WORKLOADS
from .quiet import OtherLoad, wait_for_quiet
from .table import print_report
from .targets import MEMORY_CONFIGS, configs_for
from .workloads import WORKLOADS

__all__ = ["Measurement", "Plan", "main"]

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {
    "tree": [n for n in WORKLOADS if n.startswith("tree")],
    "memory": list(MEMORY_WORKLOADS),
}


@dataclass
class Measurement:
    workload: str
    config: str
    repeat: int
    command: list[str]
    ok: bool = False
    wall_s: float | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    others_cores: float | None = None  # what other processes used meanwhile (quiet.py)
    noisy: bool = False  # still above the threshold after every retry
    attempts: int = 0


@dataclass
class Plan:
    workload: str
    kind: str  # "alloc" | "server" | "threads" | "tree" | "memory"
    configs: list[str]
    skipped: list[str] = field(default_factory=list)  # notes, one per skipped config or reason


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benches.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every workload ~10x smaller, 1 repeat unless --repeat")
    p.add_argument("--repeat", type=int, default=None, help="runs per (workload, config); median is reported (default 5)")
    names = ", ".join([*WORKLOADS, *MEMORY_WORKLOADS, *GROUPS])
    p.add_argument("--only", default=None, help=f"comma-separated workloads to run: {names}")
    p.add_argument("--json", dest="json_path", default=None, help="also write every number to this JSON file")
    p.add_argument("--report", metavar="FILE", default=None,
                   help="print the tables again from a file written by --json, without measuring")
    p.add_argument("--tracemalloc16", action="store_true", help="add tracemalloc with 16 frames (slow: ~70x)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first run in each process (no quick-size warm-up run before it)")
    p.add_argument("--quiet-threshold", type=float, default=0.15, metavar="CORES",
                   help="a run during which other processes used more CPU than this is repeated (default 0.15 cores)")
    p.add_argument("--quiet-wait", type=float, default=900.0, metavar="S",
                   help="longest wait for a quiet machine before each run (default 900 s)")
    p.add_argument("--retries", type=int, default=3, help="times a noisy run is repeated (default 3)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before one child run is killed")
    # child side
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--first-repeat", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def _selected(only: str | None) -> list[str]:
    everything = [*WORKLOADS, *MEMORY_WORKLOADS]
    if not only:
        return everything
    wanted: set[str] = set()
    for item in (s.strip() for s in only.split(",")):
        if not item:
            continue
        if item in GROUPS:
            wanted.update(GROUPS[item])
        elif item in everything:
            wanted.add(item)
        else:
            raise SystemExit(f"python -m benches.run: error: unknown workload {item!r} (known: {', '.join([*everything, *GROUPS])})")
    return [n for n in everything if n in wanted]


def _child_command(workload: str, config: str, quick: bool, first: bool, warmup: bool) -> list[str]:
    cmd = [sys.executable, "-m", "benches.run", "--child", "--workload", workload, "--config", config]
    if quick:
        cmd.append("--quick")
    if not warmup:
        cmd.append("--no-warmup")
    if first:
        cmd.append("--first-repeat")
    return cmd


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"  # same dict/set layouts in every child
    env["PYTHONFAULTHANDLER"] = "1"  # a crash in a C hook prints the Python stacks
    env.pop("PYTHONTRACEMALLOC", None)
    env.pop("PYTHONASYNCIODEBUG", None)
    return env


def _run_child(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """(result document, None) or (None, what went wrong: exit status and stderr)."""
    from .child import MARK

    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return None, f"timed out after {timeout:.0f} s\n{tail[-4000:]}"
    doc = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            doc = json.loads(line[len(MARK):])
    if proc.returncode != 0 or doc is None:
        what = f"exit status {proc.returncode}" if proc.returncode >= 0 else f"killed by signal {-proc.returncode}"
        return None, f"{what}\n{proc.stderr[-8000:]}"
    return doc, None


def _probe(timeout: float) -> dict[str, Any]:
    doc, err = _run_child([sys.executable, "-m", "benches.run", "--probe"], timeout)
    if doc is None:
        raise SystemExit(f"python -m benches.run: the probe child failed: {err}")
    return doc


def _source_fingerprint() -> dict[str, Any]:
    """The profiler's checkout as the run saw it: HEAD, and the newest modification time
    among its source and built files (so a rebuild in the middle of a run is noticed)."""
    newest = 0.0
    for folder in ("attribution", "loop_hooks", "exporters", "memscope_async"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                newest = max(newest, path.stat().st_mtime)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {"head": head or None, "newest_mtime": newest}


def _plans(names: list[str], env: dict[str, Any], tracemalloc16: bool) -> list[Plan]:
    modules = env["modules"]
    plans = []
    for name in names:
        if name in MEMORY_WORKLOADS:
            plan = Plan(name, "memory", list(MEMORY_CONFIGS))
        else:
            w = WORKLOADS[name]
            plan = Plan(name, w.kind, configs_for(w.kind, tracemalloc16=tracemalloc16))
            reason = w.unavailable()
            if reason:
                plan.configs = []
                plan.skipped.append(f"skipped: {reason} (this is Python {env['python']})")
        kept, lacking = [], {}
        for c in plan.configs:
            missing = [m for m in CONFIGS[c].needs if not modules[m]["ok"]]
            if missing:
                lacking.setdefault(missing[0], []).append(c)
            else:
                kept.append(c)
        for module, configs in lacking.items():
            plan.skipped.append(f"skipped {', '.join(configs)}: {module} is not available")
        plan.configs = kept
        plans.append(plan)
    return plans


def _execute(plans: list[Plan], args: argparse.Namespace) -> list[Measurement]:
    jobs: list[Measurement] = []
    for plan in plans:
        repeats = 1 if plan.kind == "memory" else args.repeat
        for rep in range(repeats):
            k = rep % max(1, len(plan.configs))
            for config in plan.configs[k:] + plan.configs[:k]:  # rotate: no config always goes first
                cmd = _child_command(plan.workload, config, args.quick, rep == 0, args.warmup)
                jobs.append(Measurement(plan.workload, config, rep, cmd))
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {text}", file=sys.stderr, flush=True)

    for i, m in enumerate(jobs, 1):
        while True:
            _measure(m, args, say)
            if m.noisy and m.attempts <= args.retries:
                say(f"{m.workload} {m.config}: other processes used {m.others_cores:.2f} cores meanwhile: measuring again")
                continue
            break
        shown = f"{m.wall_s:.3f} s" if m.wall_s is not None else ("memory" if m.ok else "FAILED")
        if m.error:
            shown += " (FAILED)"
        if m.noisy:
            shown += f" (noisy: others used {m.others_cores:.2f} cores)"
        say(f"{i}/{len(jobs)} {m.workload:<22} {m.config:<26} rep {m.repeat + 1}: {shown}")
    return jobs


def _measure(m: Measurement, args: argparse.Namespace, say: Any) -> None:
    """One attempt at ``m`` on a quiet machine; fills in its result fields."""
    wait_for_quiet(args.quiet_threshold, args.quiet_wait, say)
    load = OtherLoad()
    load.start()
    doc, err = _run_child(m.command, args.timeout)
    m.others_cores = load.stop()
    m.attempts += 1
    m.noisy = m.others_cores > args.quiet_threshold
    m.ok, m.error, m.doc, m.wall_s = False, None, {}, None
    if doc is None:
        m.error = err
        m.noisy = False  # a crash is a crash, however busy the machine was
        return
    m.doc = doc
    m.wall_s = doc.get("wall_s")
    if "expected" in doc and doc["value"] != doc["expected"]:
        m.error = f"wrong result: the workload returned {doc['value']!r}, expected {doc['expected']!r}"
    else:
        m.ok = True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        from .child import child_main

        return child_main(args.workload, args.config, args.quick, args.first_repeat, args.warmup)
    if args.probe:
        from .child import probe_main

        return probe_main()

    if args.report:
        return _report_again(Path(args.report))

    names = _selected(args.only)
    env = _probe(args.timeout)
    env["cpus"] = os.cpu_count()
    plans = _plans(names, env, args.tracemalloc16)
    env["source_before"] = _source_fingerprint()
    env["loadavg_before"] = os.getloadavg()
    t0 = time.perf_counter()
    measurements = _execute(plans, args)
    elapsed = time.perf_counter() - t0
    env["source_after"] = _source_fingerprint()
    env["loadavg_after"] = os.getloadavg()
    doc = print_report(plans, measurements, env, args, elapsed)
    doc.update(quiet_threshold=args.quiet_threshold, retries=args.retries)
    if args.json_path:
        doc["measurements"] = [asdict(m) for m in measurements]
        Path(args.json_path).write_text(json.dumps(doc, indent=2, default=repr) + "\n")
        print(f"\nwrote {args.json_path}")
    return 0 if all(m.ok for m in measurements) else 1


def _report_again(path: Path) -> int:
    try:
        doc = json.loads(path.read_text())
        plans = [Plan(**p) for p in doc["plans"]]
        measurements = [Measurement(**m) for m in doc["measurements"]]
        args = argparse.Namespace(
            quick=doc["quick"],
            repeat=doc["repeat"],
            quiet_threshold=doc.get("quiet_threshold", 0.15),
            retries=doc.get("retries", 3),
        )
        env, elapsed = doc["env"], doc["elapsed_s"]
    except OSError as exc:
        print(f"python -m benches.run: error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError) as exc:  # (json's errors are ValueErrors)
        print(f"python -m benches.run: error: {path} is not a --json file of this suite "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    print_report(plans, measurements, env, args, elapsed)
    return 0 if all(m.ok for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
