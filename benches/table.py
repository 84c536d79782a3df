"""Turn measurements into the printed tables and the ``--json`` document.

Ratios are ratios of medians: ``median(config) / median(baseline)``, where the baseline is
the plain run on the same event loop (asyncio's for most rows, uvloop's for the
``*-uvloop`` rows).  The thread-wrapper overhead is ``ratio(threads=True) /
ratio(threads=False)`` on the to_thread workload, which is the same as the ratio of the
two medians.

A second table splits each config's time: the process's user and kernel CPU time over the
timed span (medians, and their ratios to the baseline's), and the median of the per-repeat
wall ratios (repeats are interleaved across configs, so repeat k of a config and of its
baseline ran side by side), which a slow drift of the machine moves less than the ratio of
medians.
"""

from __future__ import annotations

import re
import statistics
from typing import TYPE_CHECKING, Any, Sequence

from .configs import CONFIGS
from .memory import MEMORY_WORKLOADS
from .targets import BYTES_PER_ALLOCATION_TARGET, WRAPPER_TARGET, target_for
from .workloads import WORKLOADS

if TYPE_CHECKING:
    import argparse

    from .run import Measurement, Plan

__all__ = ["format_table", "print_report"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Plain-text table with ``|`` separators; ``right[i]`` right-aligns column i."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _label(config: str) -> str:
    note = CONFIGS[config].note
    return f"{config} ({note})" if note else config


def _met(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return "-"
    return "yes" if value <= target else "NO"


def _ok(ms: list["Measurement"], workload: str, config: str) -> list["Measurement"]:
    return [m for m in ms if m.workload == workload and m.config == config and m.ok]


def _failed(ms: list["Measurement"], workload: str, config: str) -> list["Measurement"]:
    return [m for m in ms if m.workload == workload and m.config == config and not m.ok]


def _median_of(ms: list["Measurement"], key: str) -> float | None:
    values = [m.doc[key] for m in ms if isinstance(m.doc.get(key), (int, float))]
    return statistics.median(values) if values else None


def _paired(mine: list["Measurement"], theirs: list["Measurement"]) -> list[float]:
    """Wall ratios of the repeats that ran for both a config and its baseline, repeat by repeat."""
    base = {m.repeat: m.wall_s for m in theirs if m.wall_s}
    return sorted(m.wall_s / base[m.repeat] for m in mine if m.wall_s is not None and m.repeat in base)


def _times(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is under 0.05 s: the kernel splits a
    run's time into user and kernel at its clock tick, so a few ticks make no ratio."""
    return a / b if a is not None and b is not None and b >= 0.05 else None


def _timed_rows(plans: list["Plan"], ms: list["Measurement"]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for plan in plans:
        if plan.kind == "memory":
            continue
        medians: dict[str, float] = {}
        for config in plan.configs:
            walls = [m.wall_s for m in _ok(ms, plan.workload, config)]
            if walls:
                medians[config] = statistics.median(walls)
        for config in plan.configs:
            walls = sorted(m.wall_s for m in _ok(ms, plan.workload, config))
            failed = len(_failed(ms, plan.workload, config))
            baseline = CONFIGS[config].baseline
            median = medians.get(config)
            base = medians.get(baseline)
            ratio = median / base if median is not None and base else None
            target = target_for(plan.kind, config)
            mine, theirs = _ok(ms, plan.workload, config), _ok(ms, plan.workload, baseline)
            noisy = sum(1 for m in mine if m.noisy)
            user, kernel = _median_of(mine, "cpu_user_s"), _median_of(mine, "cpu_sys_s")
            paired = _paired(mine, theirs) if config != baseline else []
            rows.append(
                {
                    "workload": plan.workload,
                    "config": config,
                    "noisy_runs": noisy,
                    "median_s": median,
                    "min_s": walls[0] if walls else None,
                    "max_s": walls[-1] if walls else None,
                    "walls_s": walls,
                    "ratio": ratio,
                    "baseline": baseline,
                    "target": target,
                    "met": None if ratio is None or target is None else ratio <= target,
                    "runs": len(walls),
                    "failed_runs": failed,
                    "cpu_user_s": user,
                    "cpu_sys_s": kernel,
                    "user_ratio": _ratio(user, _median_of(theirs, "cpu_user_s")),
                    "sys_ratio": _ratio(kernel, _median_of(theirs, "cpu_sys_s")),
                    "paired_ratios": paired,
                    "paired_ratio": statistics.median(paired) if paired else None,
                }
            )
        if plan.kind == "threads" and {"memscope-exact", "memscope-exact-nothreads"} <= medians.keys():
            rows.append(
                {
                    "workload": plan.workload,
                    "config": "wrappers: threads=True / threads=False",
                    "derived": True,
                    "median_s": None,
                    "ratio": medians["memscope-exact"] / medians["memscope-exact-nothreads"],
                    "baseline": "memscope-exact-nothreads",
                    "target": WRAPPER_TARGET,
                    "met": medians["memscope-exact"] / medians["memscope-exact-nothreads"] <= WRAPPER_TARGET,
                }
            )
    return rows


def _print_timed(rows: list[dict[str, Any]]) -> None:
    out = []
    for r in rows:
        derived = r.get("derived", False)
        if r["median_s"] is None and not derived:
            median = "FAILED"
        else:
            median = "-" if derived else f"{r['median_s']:.3f}"
        spread = "-"
        if not derived and r["median_s"]:
            spread = f"{100 * (r['max_s'] - r['min_s']) / r['median_s']:.1f}%"
        runs = "-"
        if not derived:
            runs = f"{r['runs']}" + (f" ({r['noisy_runs']} noisy)" if r["noisy_runs"] else "")
            runs += f" +{r['failed_runs']} failed" if r["failed_runs"] else ""
        out.append(
            [
                r["workload"],
                r["config"] if derived else _label(r["config"]),
                median,
                _times(r["ratio"]),
                r["baseline"],
                "-" if r["target"] is None else f"<= {r['target']:.2f}x",
                _met(r["ratio"], r["target"]),
                spread,
                runs,
            ]
        )
    headers = ["workload", "config", "median s", "ratio", "ratio to", "target", "met?", "spread", "runs"]
    print(format_table(headers, out, [False, False, True, True, False, True, False, True, True]))


def _memory_rows(plans: list["Plan"], ms: list["Measurement"]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for plan in plans:
        if plan.kind != "memory":
            continue
        w = MEMORY_WORKLOADS[plan.workload]
        readings = {}
        for config in plan.configs:
            ok = _ok(ms, plan.workload, config)
            if ok:
                readings[config] = ok[0].doc["memory"]
        plain = readings.get("plain")

        def add(config: str, metric: str, value: float | None, unit: str, target: float | None = None) -> None:
            rows.append(
                {
                    "workload": plan.workload,
                    "config": config,
                    "metric": metric,
                    "value": value,
                    "unit": unit,
                    "target": target,
                    "met": None if value is None or target is None else value <= target,
                }
            )

        for config in plan.configs:
            r = readings.get(config)
            if r is None:
                add(config, "FAILED (see below)", None, "")
                continue
            n = r["count"]
            d_rss = r["held"]["rss"] - r["before"]["rss"]
            if config == "plain":
                add(config, f"RSS growth per {w.per} (what the {w.per} itself costs)", d_rss / n, "B")
                continue
            if plain is not None:
                plain_d_rss = plain["held"]["rss"] - plain["before"]["rss"]
                add(config, f"extra RSS per {w.per} over plain", (d_rss - plain_d_rss) / n, "B")
            sb, sh = r["before"].get("stats"), r["held"].get("stats")
            if not sb or not sh:
                continue
            d_bytes = sh["tracker_bytes"] - sb["tracker_bytes"]
            d_allocs = sh["tracked_allocations"] - sb["tracked_allocations"]
            exact = config == "memscope-exact"
            if not exact:
                # sampled mode tracks a few samples, not allocations: per-allocation
                # numbers mean nothing there; what it costs per object is what counts
                add(config, f"d tracker_bytes per {w.per}", d_bytes / n, "B")
            elif plan.workload == "mem-objects":
                add(
                    config,
                    f"stats bytes_per_tracked_allocation, holding {n:,} objects",
                    sh["bytes_per_tracked_allocation"],
                    "B",
                    BYTES_PER_ALLOCATION_TARGET if exact else None,
                )
                if d_allocs > 0:
                    add(
                        config,
                        "growth: d tracker_bytes / d tracked_allocations",
                        d_bytes / d_allocs,
                        "B",
                        BYTES_PER_ALLOCATION_TARGET if exact else None,
                    )
                add(config, f"d tracked_allocations per {w.per}", d_allocs / n, "")
                add(config, f"d tracker_bytes per {w.per}", d_bytes / n, "B")
            else:
                add(config, f"d tracker_bytes per {w.per}", d_bytes / n, "B")
                if sh.get("live_tasks"):
                    add(config, "stats tracker_bytes / live_tasks", sh["tracker_bytes"] / sh["live_tasks"], "B")
                add(config, "stats live_tasks while holding", sh.get("live_tasks"), "")
                add(config, f"d tracked_allocations per {w.per}", d_allocs / n, "")
            add(config, "stats tracker_bytes while holding", sh["tracker_bytes"], "B")
    return rows


def _fmt_num(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        s = f"{int(v):,}"
    else:
        s = f"{v:,.2f}"
    return f"{s} {unit}".rstrip()


def _print_memory(rows: list[dict[str, Any]]) -> None:
    out = [
        [
            r["workload"],
            _label(r["config"]),
            r["metric"],
            _fmt_num(r["value"], r["unit"]),
            "-" if r["target"] is None else f"<= {r['target']} {r['unit']}",
            _met(r["value"], r["target"]),
        ]
        for r in rows
    ]
    print(format_table(["workload", "config", "metric", "value", "target", "met?"], out, [False, False, False, True, True, False]))


def _memscope_rows(plans: list["Plan"], ms: list["Measurement"]) -> list[list[str]]:
    out = []
    for plan in plans:
        if plan.kind == "memory":
            continue
        for config in plan.configs:
            if not config.startswith("memscope"):
                continue
            first = [m for m in _ok(ms, plan.workload, config) if m.repeat == 0]
            if not first:
                continue
            x = first[0].doc.get("extras", {})
            st = x.get("stats_after_workload", {})
            tasks = x.get("report_tasks")
            folded = x.get("report_folded_tasks")

            def f(v: Any, fmt: str = "{:,}") -> str:
                return "-" if v is None else fmt.format(v)

            out.append(
                [
                    plan.workload,
                    config,
                    f(st.get("tracked_allocations")),
                    f(st.get("tracker_bytes") / 2**20 if st.get("tracker_bytes") is not None else None, "{:.1f}"),
                    f(st.get("live_tasks")),
                    f(tasks) + (f" ({folded:,} folded)" if folded else ""),
                    f(x.get("start_s"), "{:.3f}") + " / " + f(x.get("stop_s"), "{:.3f}"),
                    f(x.get("snapshot_s"), "{:.3f}"),
                ]
            )
    return out


def _print_split(rows: list[dict[str, Any]]) -> None:
    out = []
    for r in rows:
        if r.get("derived") or r.get("cpu_user_s") is None:
            continue
        paired = r["paired_ratios"]
        out.append(
            [
                r["workload"],
                _label(r["config"]),
                f"{r['cpu_user_s']:.3f}",
                f"{r['cpu_sys_s']:.3f}",
                _times(r["user_ratio"]),
                _times(r["sys_ratio"]),
                _times(r["paired_ratio"]),
                f"{paired[0]:.3f}-{paired[-1]:.3f}" if paired else "-",
            ]
        )
    if not out:
        return
    print("\nCPU time of the timed run (process user / kernel s, medians; ratios to the 'ratio to' config) "
          "and the median of the repeat-by-repeat wall ratios")
    headers = ["workload", "config", "user s", "kernel s", "user ratio", "kernel ratio", "paired wall ratio", "paired range"]
    print(format_table(headers, out, [False, False, True, True, True, True, True, True]))


def print_report(
    plans: list["Plan"], ms: list["Measurement"], env: dict[str, Any], args: "argparse.Namespace", elapsed: float
) -> dict[str, Any]:
    """Print every table; return the same numbers as one JSON-ready document."""
    mods = env["modules"]
    print()
    print(
        f"memscope-async benchmarks: Python {env['python']} ({env['implementation']}), {env['platform']}, "
        f"{env['cpus']} CPUs; {'QUICK (~10x smaller)' if args.quick else 'full size'}, "
        f"median of {args.repeat} run(s), each in a fresh process; suite took {elapsed:.0f} s"
    )
    la0, la1 = env.get("loadavg_before"), env.get("loadavg_after")
    if la0 and la1:
        print(f"  load average (1/5/15 min) before: {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}; after: {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}")
    before, after = env.get("source_before", {}), env.get("source_after", {})
    ms_file = mods.get("memscope_async", {}).get("file") or ""
    editable = ms_file.startswith(_root())
    if editable:
        print(f"  memscope_async is this checkout's (editable): {_root()} at {before.get('head') or '(no commit)'}")
    if editable and before != after:
        print(
            "  WARNING: the profiler's checkout changed during the run "
            f"(HEAD {before.get('head')} -> {after.get('head')}, or a source/built file was rewritten): "
            "rows may mix versions; run again"
        )
    for name, info in mods.items():
        state = f"{info['version']} ({info['file']})" if info["ok"] else f"not available: {info['error']}"
        print(f"  {name}: {state}")
    for plan in plans:
        desc = (WORKLOADS[plan.workload] if plan.workload in WORKLOADS else MEMORY_WORKLOADS[plan.workload]).describe(
            args.quick)
        print(f"  {plan.workload}: {desc}")
        for note in plan.skipped:
            print(f"    note: {note}")

    retried = sum(m.attempts - 1 for m in ms)
    noisy = sum(1 for m in ms if m.noisy)
    print(
        f"  quiet-machine guard: a run during which other processes used > {args.quiet_threshold} cores is repeated "
        f"(up to {args.retries}x); {retried} repeated, {noisy} still noisy"
    )
    timed = _timed_rows(plans, ms)
    if timed:
        print("\nWall time of the workload (median; ratio = median / median of the 'ratio to' config)")
        _print_timed(timed)
        _print_split(timed)
    memory = _memory_rows(plans, ms)
    if memory:
        print("\nTracker memory (one run each; B = bytes; d = growth while the live set was built)")
        _print_memory(memory)
    details = _memscope_rows(plans, ms)
    if details:
        print("\nmemscope-async on the first repeat (stats right after the workload; report from snapshot() after stop())")
        headers = ["workload", "config", "tracked allocs", "tracker MiB", "live tasks", "report tasks", "start / stop s", "snapshot s"]
        print(format_table(headers, details, [False, False, True, True, True, True, True, True]))

    failures = [m for m in ms if not m.ok]
    if failures:
        print(f"\nFAILED measurements ({len(failures)}); reproduce each from {_root()} with the command shown")
        first_seen: dict[str, "Measurement"] = {}
        for m in failures:
            key = _failure_key(m.error or "")
            same = first_seen.get(key)
            if same is not None:
                print(f"--- {m.workload} / {m.config} rep {m.repeat + 1}: same failure as {same.workload} / {same.config}")
                continue
            first_seen[key] = m
            print(f"\n--- {m.workload} / {m.config} rep {m.repeat + 1}")
            print("$ " + " ".join(m.command))
            print(m.error)
    return {
        "env": env,
        "quick": args.quick,
        "repeat": args.repeat,
        "elapsed_s": elapsed,
        "plans": [{"workload": p.workload, "kind": p.kind, "configs": p.configs, "skipped": p.skipped} for p in plans],
        "timed": timed,
        "memory": memory,
    }


def _failure_key(error: str) -> str:
    """What makes two failures the same one: the error text without addresses and ids
    (a crash dump names the thread by address) and without the workload's own frames."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", error)
    lines = [ln for ln in text.splitlines() if "benches/" not in ln and "/asyncio/" not in ln and "uvloop/" not in ln]
    return "\n".join(dict.fromkeys(lines))  # recursion repeats the same frames: once each


def _root() -> str:
    from .run import ROOT

    return str(ROOT)
