"""Exporters against hand-built reports: no C extension, no event loop under test."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re

import aiofiles.os
import orjson
import pytest

from memscope_async.attribution.report import (
    AttributionShare,
    Distribution,
    Frame,
    Group,
    Hotspot,
    LeakSuspect,
    Migration,
    Report,
    ReportError,
    RunInfo,
    SubtreeCounters,
    TaskReport,
    ThreadReport,
    Totals,
    Unattributed,
    UnattributedThread,
)
from memscope_async.exporters import (
    SCHEMA_PATH,
    ExportError,
    export_json_async,
    load_schema,
    render_text,
    validate_document,
    write_json,
)
from memscope_async.exporters import json_report

KiB = 1024
MiB = 1024 * KiB
LOOP_THREAD = 140_001
POOL_THREAD = 140_002


# -- building reports ------------------------------------------------------------------


def _hotspot(file: str, line: int, nbytes: int, live: int) -> Hotspot:
    return Hotspot(
        file=file,
        line=line,
        function="fn",
        bytes=nbytes,
        allocations=3,
        live_bytes=live,
        stack=(Frame(file, line, "fn"), Frame("app/main.py", 10, "main")),
    )


def _task(
    id: int,
    lineage: tuple[int, ...],
    *,
    name: str | None = None,
    coro: str | None = "app.worker",
    allocated: int = 0,
    live: int = 0,
    peak: int | None = None,
    state: str = "done",
    confidence: float = 1.0,
    attribution: tuple[AttributionShare, ...] | None = None,
) -> TaskReport:
    if attribution is None:
        attribution = (AttributionShare("observed", LOOP_THREAD, allocated, 5, 1.0),)
    return TaskReport(
        id=id,
        name=name if name is not None else f"Task-{id}",
        coro=coro,
        parent_id=lineage[-2] if len(lineage) > 1 else None,
        lineage=lineage,
        labels={"tenant": "acme"},
        thread_id=LOOP_THREAD,
        loop_id=7,
        created_at=0.25 * id,
        finished_at=None if state == "pending" else 0.25 * id + 1.0,
        state=state,
        allocated_bytes=allocated,
        allocations=5,
        freed_bytes=allocated - live,
        live_bytes=live,
        peak_live_bytes=peak if peak is not None else max(live, allocated // 2),
        retained_after_done_bytes=live if state == "done" else 0,
        subtree=SubtreeCounters(allocated, 5, allocated - live, live, 1),
        attribution=attribution,
        confidence=confidence,
        migrations=(Migration("propagated", LOOP_THREAD, POOL_THREAD, 0.5, 0.75, 2 * KiB, 2, 0.95),),
        cross_task_frees=1,
        cross_task_freed_bytes=64,
        hotspots=(_hotspot("app/worker.py", 42, allocated, live),),
        live_hotspots=(_hotspot("app/worker.py", 42, allocated, live),),
        via_factory=True,
        cross_thread_parent=False,
    )


def make_report(*, estimated: bool = False, tasks: tuple[TaskReport, ...] | None = None) -> Report:
    if tasks is None:
        tasks = (
            _task(1, (1,), name="root", coro="app.main", allocated=4 * MiB, live=100 * KiB, state="pending"),
            _task(2, (1, 2), name="child", coro="app.handler", allocated=2 * MiB, live=3 * MiB // 2),
            _task(3, (1, 2, 3), name="grandchild", coro="app.fetch", allocated=300 * KiB, live=200 * KiB),
            _task(
                4,
                (4,),
                name="guessed",
                coro="app.offload",
                allocated=3 * MiB,
                live=10 * KiB,
                confidence=0.76,
                attribution=(
                    AttributionShare("observed", LOOP_THREAD, 3 * MiB - 1258291, 4, 1.0),
                    AttributionShare("inferred", POOL_THREAD, 1258291, 2, 0.4),
                ),
            ),
        )
    return Report(
        run=RunInfo(
            python="3.12.1",
            platform="linux-x86_64",
            loop="asyncio",
            mode="sampled" if estimated else "exact",
            sample_interval=512 * KiB if estimated else None,
            stack_depth=16,
            started_at="2024-05-01T12:00:00Z",
            duration_s=2.5,
            pid=4242,
            estimated=estimated,
            stacks_sampled=estimated,
            tracker_bytes=4096,
        ),
        totals=Totals(
            allocated_bytes=10 * MiB,
            allocations=100,
            freed_bytes=8 * MiB,
            live_bytes=2 * MiB,
            attributed_bytes=9 * MiB,
            unattributed_bytes=MiB,
            tasks=len(tasks) + 3,
            folded_tasks=3,
        ),
        tasks=tasks,
        unattributed=Unattributed(
            allocated_bytes=MiB,
            allocations=20,
            freed_bytes=MiB - 4 * KiB,
            live_bytes=4 * KiB,
            by_thread=(
                UnattributedThread(LOOP_THREAD, 768 * KiB, 15, 764 * KiB, 4 * KiB),
                UnattributedThread(POOL_THREAD, 256 * KiB, 5, 256 * KiB, 0),
            ),
        ),
        groups=(
            Group(
                key="app.worker",
                coro="app.worker",
                labels={"tenant": "acme"},
                tasks=5,
                folded_tasks=3,
                allocated_bytes=Distribution(sum=MiB, p50=100 * KiB, p95=400 * KiB, max=500 * KiB),
                allocations=40,
                live_bytes=0,
                retained_after_done_bytes=0,
                hotspots=(_hotspot("app/worker.py", 42, MiB, 0),),
            ),
        ),
        leak_suspects=(
            LeakSuspect(
                key="app.cache_fill",
                coro="app.cache_fill",
                labels={},
                tasks=12,
                retained_bytes=5 * MiB,
                hotspots=(
                    _hotspot("app/cache.py", 10, 6 * MiB, KiB),
                    _hotspot("/srv/very/long/path/to/app/cache_store.py", 77, MiB, 5 * MiB),
                ),
            ),
        ),
        threads=(
            ThreadReport(LOOP_THREAD, 9001, "MainThread", "loop", 8 * MiB, 768 * KiB, 80),
            ThreadReport(POOL_THREAD, 9002, "asyncio_0", "executor", MiB, 256 * KiB, 20),
        ),
        tool={"name": "memscope-async", "version": "0.1.0"},
    )


# -- JSON round trip and atomic writes -------------------------------------------------


def test_round_trip_preserves_every_field():
    report = make_report()
    for indent in (False, True):
        again = Report.from_json(report.to_json(indent=indent))
        assert again == report
        # Equality is field-wise; also compare documents, which include nested tuples.
        assert again.to_dict() == report.to_dict()
    assert Report.from_json(make_report(estimated=True).to_json()) == make_report(estimated=True)


def test_write_json_writes_document_and_returns_path(tmp_path):
    report = make_report()
    target = tmp_path / "report.json"
    result = write_json(report, str(target))
    assert result == target
    assert target.read_bytes() == report.to_json_bytes()
    assert isinstance(report.to_json(), str) and report.to_json().encode() == report.to_json_bytes()
    assert Report.load(target) == report
    assert os.listdir(tmp_path) == ["report.json"]

    write_json(report, target, indent=True)
    assert target.read_bytes() == report.to_json_bytes(indent=True)
    assert b"\n  " in target.read_bytes()


def test_write_json_missing_parent_is_a_clear_error(tmp_path):
    target = tmp_path / "no-such-dir" / "report.json"
    with pytest.raises(ExportError, match="does not exist") as info:
        write_json(make_report(), target)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "no-such-dir").exists()


def test_write_json_file_named_as_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "plain-file").write_text("kept")
    target = tmp_path / "plain-file" / "report.json"
    with pytest.raises(ExportError, match=r"plain-file is not a directory$"):
        write_json(make_report(), target)
    assert (tmp_path / "plain-file").read_text() == "kept"


def test_write_json_failed_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_bytes(b"old contents")

    def boom(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(json_report.os, "replace", boom)
    with pytest.raises(ExportError, match="Permission denied") as info:
        write_json(make_report(), target)
    assert isinstance(info.value.__cause__, PermissionError)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_json_failed_fsync_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_bytes(b"old contents")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json_report.os, "fsync", no_space)
    with pytest.raises(ExportError, match="No space left"):
        write_json(make_report(), target)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_json_to_a_directory_fails_without_leftovers(tmp_path):
    target = tmp_path / "is_a_dir"
    target.mkdir()
    with pytest.raises(ExportError):
        write_json(make_report(), target)
    assert target.is_dir()
    assert os.listdir(tmp_path) == ["is_a_dir"]


@pytest.mark.parametrize("writer", ["sync", "async"])
@pytest.mark.parametrize(("name", "reason"), [
    (".", "it is a directory"), ("..", "it is a directory"), ("/", "it is a directory"), ("", "an empty path"),
    ("sub/", "no such directory"),  # a directory meant, which Path would quietly drop
])
def test_names_that_cannot_be_a_report_file_are_an_export_error(tmp_path, monkeypatch, writer, name, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match=reason):
        if writer == "sync":
            write_json(make_report(), name)
        else:
            asyncio.run(export_json_async(make_report(), name))
    assert os.listdir(tmp_path) == []


def test_export_json_async_cancelled_while_its_file_is_opened_leaves_nothing(tmp_path):
    """The open runs in a worker thread; cancelled before it ran, it must not make a file
    after the cleanup (a file stayed behind in ~2% of exports cancelled at random)."""
    import concurrent.futures
    import threading

    release, waiting = threading.Event(), threading.Event()
    submitted = []

    class Gated(concurrent.futures.ThreadPoolExecutor):
        """Runs the first two jobs (resolving the target, checking its directory); the
        ones after wait for release."""

        def submit(self, fn, /, *args, **kwargs):
            submitted.append(fn)
            if len(submitted) <= 2:
                return super().submit(fn, *args, **kwargs)

            def gated():
                waiting.set()
                release.wait(10)
                return fn(*args, **kwargs)

            return super().submit(gated)

    target = tmp_path / "report.json"
    target.write_bytes(b"old contents")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(Gated(max_workers=1))
        task = asyncio.create_task(export_json_async(make_report(), target))
        while not waiting.is_set():  # the open is in the worker, waiting (not cancellable now)
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()  # the open runs now, after the cleanup
        await loop.run_in_executor(None, lambda: None)  # (one worker: this runs after it)

    asyncio.run(main())
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_json_unserialisable_report_creates_nothing(tmp_path):
    bad = dataclasses.replace(make_report(), tool={"name": object()})
    with pytest.raises(ExportError, match="not serialisable"):
        write_json(bad, tmp_path / "report.json")
    assert os.listdir(tmp_path) == []


def test_export_json_async_writes_document(tmp_path):
    report = make_report(estimated=True)
    target = tmp_path / "report.json"
    result = asyncio.run(export_json_async(report, target, indent=True))
    assert result == target
    assert target.read_bytes() == report.to_json_bytes(indent=True)
    assert os.listdir(tmp_path) == ["report.json"]


def test_export_json_async_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_bytes(b"old contents")

    async def boom(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(aiofiles.os, "replace", boom)
    with pytest.raises(ExportError, match="Input/output error"):
        asyncio.run(export_json_async(make_report(), target))
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["report.json"]


def test_export_json_async_missing_parent(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        asyncio.run(export_json_async(make_report(), tmp_path / "missing" / "r.json"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("writer", ["sync", "async"])
def test_a_symlink_is_followed_and_a_special_file_written_through(tmp_path, writer):
    """A link keeps pointing at the (replaced) report; a FIFO or /dev/null stays what it
    is and gets the bytes, as with the shell's >.  Replacing /dev/null with a plain file
    (as root, which CI is) would break the machine."""
    import stat
    import threading

    def write(path):
        if writer == "sync":
            return write_json(report, path)
        return asyncio.run(export_json_async(report, path))

    report = make_report()
    real = tmp_path / "real.json"
    real.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert write(link) == link
    assert link.is_symlink() and real.read_bytes() == report.to_json_bytes()
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "later.json")
    write(dangling)
    assert dangling.is_symlink() and (tmp_path / "later.json").read_bytes() == report.to_json_bytes()

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write(fifo)
    reader.join(10)
    assert got == [report.to_json_bytes()] and stat.S_ISFIFO(os.stat(fifo).st_mode)

    # character devices of our own (as root; /dev's own would be destroyed by the bug)
    try:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(tmp_path / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except OSError:
        pytest.skip("cannot make device nodes here (not root)")
    write(tmp_path / "null")
    assert stat.S_ISCHR(os.stat(tmp_path / "null").st_mode)
    with pytest.raises(ExportError, match="No space left") as info:
        write(tmp_path / "full")
    assert "\n" not in str(info.value)
    assert stat.S_ISCHR(os.stat(tmp_path / "full").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["dangling.json", "fifo", "full", "later.json", "link.json", "null",
                                            "real.json"]


# -- schema ----------------------------------------------------------------------------


def test_schema_file_ships_and_loads():
    assert SCHEMA_PATH.is_file()
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    load_schema()["title"] = "mutated"
    assert load_schema()["title"] != "mutated"


def test_schema_is_valid_draft_2020_12():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(load_schema())


# Fields added to version 1 after reports were first written: optional in the schema, so
# those reports still validate, and loaded with their defaults.
ADDED_IN_V1 = {"leak_suspect": {"confidence", "inferred_bytes"}, "thread": {"inferred_bytes", "inferred_confidence"}}


def _props(schema: dict, name: str) -> set[str]:
    node = schema if name == "" else schema["$defs"][name]
    assert node["additionalProperties"] is False, name
    assert set(node["required"]) == set(node["properties"]) - ADDED_IN_V1.get(name, set()), name
    return set(node["properties"])


def test_reports_written_before_fields_were_added_still_validate_and_load():
    pytest.importorskip("jsonschema")
    doc = orjson.loads(make_report().to_json())
    assert doc["leak_suspects"], "make_report must have a leak suspect"
    for suspect in doc["leak_suspects"]:
        for name in ADDED_IN_V1["leak_suspect"]:
            del suspect[name]
    for thread in doc["threads"]:
        for name in ADDED_IN_V1["thread"]:
            del thread[name]
    assert validate_document(doc) == []
    loaded = Report.from_dict(doc)
    assert all(s.confidence == 1.0 and s.inferred_bytes == 0 for s in loaded.leak_suspects)
    assert all(t.inferred_bytes == 0 and t.inferred_confidence is None for t in loaded.threads)


@pytest.mark.parametrize(
    ("cls", "def_name"),
    [
        (Report, ""),
        (RunInfo, "run"),
        (Totals, "totals"),
        (TaskReport, "task"),
        (SubtreeCounters, "subtree"),
        (AttributionShare, "attribution_share"),
        (Migration, "migration"),
        (Hotspot, "hotspot"),
        (Frame, "frame"),
        (Group, "group"),
        (Distribution, "distribution"),
        (LeakSuspect, "leak_suspect"),
        (ThreadReport, "thread"),
        (Unattributed, "unattributed"),
        (UnattributedThread, "unattributed_thread"),
    ],
)
def test_schema_names_exactly_the_model_fields(cls, def_name):
    # Drift guard: a field added to report.py without a schema change fails here.
    fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    assert _props(load_schema(), def_name) == fields


def test_schema_accepts_full_reports():
    pytest.importorskip("jsonschema")
    for estimated in (False, True):
        report = make_report(estimated=estimated)
        assert validate_document(orjson.loads(report.to_json())) == []
        assert validate_document(report.to_dict()) == []  # tuples count as arrays


def test_schema_accepts_negative_live_bytes_and_nulls():
    pytest.importorskip("jsonschema")
    doc = orjson.loads(make_report().to_json())
    doc["tasks"][0]["live_bytes"] = -64
    doc["tasks"][0]["name"] = None
    doc["tasks"][0]["attribution"][0]["thread_id"] = None
    assert validate_document(doc) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["tasks"][0].pop("state"), r"^tasks/0: 'state' is a required property$"),
        (lambda d: d.pop("unattributed"), r"^<root>: 'unattributed' is a required property$"),
        (lambda d: d["tasks"][1].__setitem__("allocated_bytes", "12"), r"^tasks/1/allocated_bytes: '12' is not of type 'integer'$"),
        (lambda d: d["tasks"][1].__setitem__("allocated_bytes", 1.5), r"^tasks/1/allocated_bytes: "),
        (lambda d: d["tasks"][0].__setitem__("state", "running"), r"^tasks/0/state: 'running' is not one of"),
        (lambda d: d["tasks"][3]["attribution"][1].__setitem__("route", "guessed"), r"^tasks/3/attribution/1/route: "),
        (lambda d: d["tasks"][3].__setitem__("confidence", 1.5), r"^tasks/3/confidence: 1.5 is greater than the maximum of 1$"),
        (lambda d: d["totals"].__setitem__("allocated_bytes", -1), r"^totals/allocated_bytes: -1 is less than the minimum of 0$"),
        (lambda d: d["run"].__setitem__("estimated", "yes"), r"^run/estimated: 'yes' is not of type 'boolean'$"),
        (lambda d: d["tasks"][0]["hotspots"][0]["stack"][0].pop("line"), r"^tasks/0/hotspots/0/stack/0: 'line' is a required property$"),
        (lambda d: d["threads"][0].__setitem__("extra", 1), r"^threads/0: Additional properties are not allowed \('extra' was unexpected\)$"),
        (lambda d: d.__setitem__("schema_version", 2), r"^schema_version: 1 was expected$"),
    ],
)
def test_schema_rejects_broken_documents(mutate, expected):
    pytest.importorskip("jsonschema")
    doc = orjson.loads(make_report().to_json())
    mutate(doc)
    errors = validate_document(doc)
    assert len(errors) == 1, errors
    assert re.search(expected, errors[0]), errors


def test_validate_without_jsonschema_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # makes `import jsonschema` fail
    with pytest.raises(ExportError, match="needs the 'jsonschema' package"):
        validate_document({})


# -- text ------------------------------------------------------------------------------


def _section(text: str, title: str) -> list[str]:
    """The lines of one blank-line-separated section, title included."""
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0] == title:
            return lines
    raise AssertionError(f"no section {title!r} in:\n{text}")


def _rows(section: list[str]) -> list[str]:
    # title, header, dashes, then rows until a footnote or "... more" line
    return [ln for ln in section[3:] if re.match(r"^\s*\d+\s", ln)]


def _row_ids(section: list[str]) -> list[int]:
    return [int(ln.split()[0]) for ln in _rows(section)]


def _row(section: list[str], task_id: int) -> str:
    return next(ln for ln in _rows(section) if int(ln.split()[0]) == task_id)


def test_render_text_header_exact_mode():
    text = render_text(make_report())
    head = text.split("\n\n")[0]
    assert "loop: asyncio" in head and "mode: exact" in head and "duration: 2.50 s" in head
    assert "allocated: 10.0 MiB" in head and "live: 2.0 MiB" in head and "unattributed: 1.0 MiB" in head
    assert "tasks: 7 (3 folded into groups)" in head
    assert "estimate" not in head


def test_render_text_tables_are_sorted_and_limited():
    text = render_text(make_report())
    by_live = _section(text, "Top tasks by live bytes")
    by_alloc = _section(text, "Top tasks by allocated bytes")
    assert _row_ids(by_live) == [2, 3, 1, 4]  # 1.5 MiB, 200 KiB, 100 KiB, 10 KiB
    assert _row_ids(by_alloc) == [1, 4, 2, 3]  # 4 MiB, 3 MiB (incl. inferred), 2 MiB, 300 KiB

    short = render_text(make_report(), top=2)
    assert _row_ids(_section(short, "Top tasks by live bytes")) == [2, 3]
    assert "... and 2 more tasks" in _section(short, "Top tasks by live bytes")


def test_render_text_ties_are_broken_by_id():
    tasks = tuple(_task(i, (i,), allocated=KiB, live=KiB) for i in (9, 3, 5))
    text = render_text(make_report(tasks=tasks))
    assert _row_ids(_section(text, "Top tasks by live bytes")) == [3, 5, 9]


def test_render_text_indents_by_lineage_depth():
    section = _section(render_text(make_report(), width=120), "Top tasks by allocated bytes")
    col = section[1].index("task")
    assert _row(section, 1)[col:].startswith("root (app.main)")
    assert _row(section, 2)[col:].startswith("  child (app.handler)")
    assert _row(section, 3)[col:].startswith("    grandchild (app.fetch)")
    assert _row(section, 4)[col:].startswith("guessed (app.offload)")
    # rows go by bytes, not by tree: each names its parent's id ("-" for a root)
    assert [_row(section, i).split()[1] for i in (1, 2, 3, 4)] == ["-", "1", "2", "-"]
    assert section[1].split()[:3] == ["id", "parent", "task"]


def test_render_text_shows_inferred_bytes_apart_with_confidence():
    section = _section(render_text(make_report()), "Top tasks by allocated bytes")
    assert section[1].split()[-1] == "inferred"
    row = _row(section, 4)
    # 1258291 inferred bytes of 3 MiB: 1.2 MiB shown as a guess, the rest (1.8 MiB) as allocated
    assert row.endswith("~1.2 MiB (c=0.40)")
    assert re.search(r"\s1\.8 MiB\s", row) and not re.search(r"\s3\.0 MiB\s", row)
    assert re.search(r"\s0\.76\s", row)  # overall confidence < 1 with two decimals
    assert _row(section, 1).endswith(" -")  # no inferred bytes: nothing invented
    assert "not counted in allocated; live and peak include them (marked ~)." in section
    # live and peak hold the inferred bytes too: marked as partly guessed in the cell
    assert re.search(r"\s~10\.0 KiB\s+~1\.5 MiB\s", row), row
    assert "~" not in _row(section, 1)
    assert "rows are ranked by allocated + inferred." in section


def test_render_text_marks_no_guess_in_a_size_of_nothing():
    """A task whose inferred bytes were all freed: its live 0 B is no guess ("~0 B" was)."""
    share = AttributionShare("inferred", POOL_THREAD, 5 * KiB, 2, 0.5)
    tasks = (_task(1, (1,), allocated=5 * KiB, live=0, peak=5 * KiB, confidence=0.5, attribution=(share,)),)
    row = _row(_section(render_text(make_report(tasks=tasks)), "Top tasks by allocated bytes"), 1)
    assert re.search(r"\s0 B\s+~5\.0 KiB\s", row), row


def test_render_text_omits_inferred_column_when_nothing_is_inferred():
    tasks = (_task(1, (1,), allocated=MiB, live=KiB), _task(2, (1, 2), allocated=KiB, live=0))
    text = render_text(make_report(tasks=tasks))
    assert "inferred" not in text
    assert "~" not in text  # exact mode, nothing guessed: no approximations anywhere


def test_render_text_confidence_is_never_rounded_up():
    tasks = (_task(1, (1,), allocated=MiB, live=KiB, confidence=0.999),
             _task(2, (2,), allocated=KiB, live=0, confidence=0.29))
    section = _section(render_text(make_report(tasks=tasks)), "Top tasks by live bytes")
    assert _row(section, 1).endswith(" 0.99")
    assert _row(section, 2).endswith(" 0.29")


def test_render_text_sampled_mode_marks_every_number():
    text = render_text(make_report(estimated=True))
    head = text.split("\n\n")[0]
    assert "sampled mode: numbers are estimates" in head
    assert "allocated: ~10.0 MiB" in head and "live: ~2.0 MiB" in head
    for title in ("Top tasks by live bytes", "Top tasks by allocated bytes"):
        for row in _rows(_section(text, title)):
            sizes = re.findall(r"(\S*)\d+(?:\.\d)? (?:B|KiB|MiB|GiB)\b", row)
            assert sizes and all(s.startswith("~") for s in sizes), row
    assert "~~" not in text
    assert "~5.0 MiB" in "\n".join(_section(text, "Leak suspects"))
    assert "~768.0 KiB" in "\n".join(_section(text, "Unattributed"))


def test_render_text_leak_suspects_of_one_coroutine_keep_their_labels():
    """Suspects of one coroutine (a framework's request runner), told apart by labels:
    the table showed the coroutine alone, twice (helper-64, starlette)."""
    base = make_report()
    (suspect,) = base.leak_suspects
    by_route = tuple(
        dataclasses.replace(suspect, key=f"app.cache_fill[route={route}]", labels={"route": route},
                            retained_bytes=size)
        for route, size in (("/leak", 6 * MiB), ("/sync_leak", 2 * MiB))
    )
    leaks = _section(render_text(dataclasses.replace(base, leak_suspects=by_route)), "Leak suspects")
    assert leaks[1].split()[0] == "group"
    assert [row.split()[0] for row in leaks[3:5]] == ["app.cache_fill[route=/leak]", "app.cache_fill[route=/sync_leak]"]


def test_render_text_unattributed_leaks_and_threads():
    text = render_text(make_report())
    unattributed = _section(text, "Unattributed")
    assert "allocated: 1.0 MiB" in unattributed[1]
    rows = [ln for ln in unattributed[4:]]
    assert rows[0].split()[:2] == [str(LOOP_THREAD), "MainThread"] and "768.0 KiB" in rows[0]
    assert rows[1].split()[:2] == [str(POOL_THREAD), "asyncio_0"] and "256.0 KiB" in rows[1]

    leaks = _section(text, "Leak suspects")
    assert leaks[3].startswith("app.cache_fill")
    assert "5.0 MiB" in leaks[3]
    # the site still holding the most live bytes, not the one that allocated the most
    assert leaks[3].endswith("cache_store.py:77")

    threads = _section(text, "Threads")
    assert threads[3].split()[:3] == [str(LOOP_THREAD), "MainThread", "loop"]

    bare = dataclasses.replace(make_report(), leak_suspects=(), threads=())
    assert "Leak suspects" not in render_text(bare) and "Threads" not in render_text(bare)

    # a thread id the OS gave two threads in turn: its unattributed bytes are both's
    reused = dataclasses.replace(make_report(), threads=(
        *make_report().threads, ThreadReport(POOL_THREAD, 9003, "late-worker", "other", 0, 10, 1)))
    rows = _section(render_text(reused), "Unattributed")[4:]
    assert rows[1].split()[:4] == [str(POOL_THREAD), "asyncio_0", "/", "late-worker"], rows


def test_render_text_marks_inferred_bytes_in_the_threads_table():
    """A thread a task started holds guessed bytes: shown apart with "~" and their
    confidence, as in the task tables; an executor thread (never inferred) that had the
    same id before it shows none."""
    report = make_report()
    started = ThreadReport(POOL_THREAD, 9003, "started-by-4", "other", 1258291 + 100, 0, 3,
                           inferred_bytes=1258291, inferred_confidence=0.4)
    threads = _section(render_text(dataclasses.replace(report, threads=(*report.threads, started))), "Threads")
    assert "of it inferred" in threads[1]
    (row,) = [ln for ln in threads if "started-by-4" in ln]
    assert "~1.2 MiB (c=0.40)" in row
    (pool,) = [ln for ln in threads if "asyncio_0" in ln]
    assert " - " in pool and "~" not in pool
    assert any(ln.startswith("of it inferred: attributed bytes guessed") for ln in threads)
    assert "of it inferred" not in "\n".join(_section(render_text(report), "Threads"))  # none shown: no column


def test_render_text_marks_inferred_bytes_of_a_report_written_before_threads_said_so():
    """A report file from before threads carried inferred_bytes: the table still shows the
    inferred bytes, from the tasks' shares (by thread id), as it did then."""
    report = make_report()
    started = ThreadReport(POOL_THREAD, 9003, "started-by-4", "other", 1258291 + 100, 0, 3)
    assert started.inferred_confidence is None
    threads = _section(render_text(dataclasses.replace(report, threads=(*report.threads, started))), "Threads")
    (row,) = [ln for ln in threads if "started-by-4" in ln]
    assert "~1.2 MiB (c=0.40)" in row


def test_render_text_sizes():
    tasks = (
        _task(1, (1,), allocated=512, live=0, peak=0),
        _task(2, (2,), allocated=1536, live=0, peak=0),
        _task(3, (3,), allocated=MiB - 1, live=0, peak=0),
        _task(4, (4,), allocated=5 * 1024 * MiB // 2, live=0, peak=0),
    )
    section = _section(render_text(make_report(tasks=tasks)), "Top tasks by allocated bytes")
    assert re.search(r"\s2\.5 GiB\s", _row(section, 4))
    assert re.search(r"\s1\.0 MiB\s", _row(section, 3))  # not "1024.0 KiB"
    assert re.search(r"\s1\.5 KiB\s", _row(section, 2))
    assert re.search(r"\s512 B\s", _row(section, 1))


def test_render_text_is_ascii_deterministic_and_fits_width():
    long_name = "w\u00e9ird\nname-" + "x" * 150
    tasks = (_task(1, (1,), name=long_name, allocated=MiB, live=KiB),) + make_report().tasks[1:]
    report = make_report(tasks=tasks)
    text = render_text(report)
    assert text == render_text(report)
    assert text.isascii()
    assert "w\\xe9ird\\nname" in text  # escaped, not printed raw
    assert "x" * 150 not in text  # shortened to the width ...
    assert all(len(ln) <= 100 for ln in text.splitlines()), text
    assert all(ln == ln.rstrip() for ln in text.splitlines())
    # ... only when needed: given the room, the whole name, escaped
    assert "w\\xe9ird\\nname-" + "x" * 150 in render_text(report, width=400)


def test_render_text_rejects_bad_arguments():
    with pytest.raises(ValueError):
        render_text(make_report(), top=0)
    with pytest.raises(ValueError):
        render_text(make_report(), width=10)


def test_reports_are_frozen_all_the_way_down():
    """A Report is plain, frozen data: its labels and tool mappings too (they were
    dicts that could be changed in place, and made a TaskReport unhashable)."""
    import copy
    import pickle

    report = make_report()
    task = next(t for t in report.tasks if t.labels)
    with pytest.raises(TypeError):
        task.labels["route"] = "/other"  # type: ignore[index]
    with pytest.raises(TypeError):
        report.tool["name"] = "x"  # type: ignore[index]
    for change in (lambda m: m.update(a="b"), lambda m: m.pop("name"), lambda m: m.clear(), lambda m: m.setdefault("z", "1")):
        with pytest.raises(TypeError):
            change(report.tool)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.name = "x"  # type: ignore[misc]
    assert isinstance(task.labels, dict) and task.labels == dict(task.labels)
    assert hash(task) == hash(copy.deepcopy(task)) and pickle.loads(pickle.dumps(report)) == report
    assert Report.from_dict(orjson.loads(report.to_json())) == report
    assert orjson.loads(report.to_json())["tool"] == dict(report.tool)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [(("schema_version",), True, "schema_version"),
     (("run", "duration_s"), "1.5", "RunInfo.duration_s is '1.5', not a number"),
     (("totals", "tasks"), None, "Totals.tasks is None, not an integer"),
     (("tasks", 0, "id"), "abc", "TaskReport.id is 'abc', not an integer"),
     (("tasks", 0, "live_bytes"), True, "TaskReport.live_bytes is True, not an integer"),
     (("tasks", 0, "name"), 5, "TaskReport.name is 5, not a string or null"),
     (("tasks", 0, "lineage"), ["x"], "lineage holds task ids"),
     (("tasks", 0, "labels"), {"route": 1}, "labels map names to strings"),
     (("tasks", 0, "subtree"), None, "a SubtreeCounters is NoneType"),
     (("tasks",), "abc", "tasks is str, not a list")],
)
def test_a_report_read_back_with_a_wrong_typed_field_is_refused(path, value, expected):
    """A JSON report whose fields have the wrong types is refused when read, with one line
    that names the field; before, Report.load took it and its readers (the CLI's report
    command) failed later with a traceback."""
    doc = orjson.loads(make_report().to_json_bytes())
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(ReportError) as info:
        Report.from_dict(doc)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [(lambda tasks: tasks[1].update(id=tasks[0]["id"]), "task id 1 appears twice"),
     (lambda tasks: tasks[1].update(parent_id=tasks[1]["id"]), "task 2 is its own ancestor"),
     (lambda tasks: tasks[0].update(parent_id=tasks[2]["id"]), "is its own ancestor"),
     (lambda tasks: tasks[0].update(state="running"), "task 1 has state 'running'")],
)
def test_a_report_whose_lineage_cannot_hold_is_refused(change, expected):
    """Duplicate ids and parent cycles made walk() drop or repeat tasks silently."""
    doc = orjson.loads(make_report().to_json_bytes())
    change(doc["tasks"])
    with pytest.raises(ReportError) as info:
        Report.from_dict(doc)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    ok = orjson.loads(make_report().to_json_bytes())
    ok["tasks"][1]["parent_id"] = 999  # a parent not listed (folded) is fine
    Report.from_dict(ok)


def test_a_name_with_a_lone_surrogate_is_written_escaped(tmp_path):
    """os.fsdecode gives lone surrogates for bytes that are not UTF-8 (file names): a task
    named after one made the whole report unwritable (orjson refuses them)."""
    report = make_report()
    odd = dataclasses.replace(report.tasks[0], name="file-\udcff.txt", labels={"path": "x\udc80"})
    report = dataclasses.replace(report, tasks=(odd, *report.tasks[1:]))
    write_json(report, tmp_path / "r.json")
    again = Report.load(tmp_path / "r.json")
    assert again.tasks[0].name == "file-\\udcff.txt" and dict(again.tasks[0].labels) == {"path": "x\\udc80"}
    assert again.tasks[1:] == report.tasks[1:]
