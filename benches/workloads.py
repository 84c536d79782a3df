"""The timed workloads: plain asyncio programs that know nothing about profilers.

Each workload is an ``async def`` taking its size parameters and returning a small,
deterministic result (a count or checksum).  The child process checks that result against
:meth:`Workload.expected`, so a profiler that changes what a program does (drops a task,
loses a response) shows up as a failed row rather than as a suspiciously fast one.

Sizes: ``full`` is what the published table uses (about one to a few seconds plain on a
2-core machine); ``quick`` is about ten times smaller, for a smoke run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

__all__ = ["WORKLOADS", "Workload", "alloc", "server", "to_thread", "tree"]

# The server never listens anywhere but here, and every client connects only here.
LOOPBACK = "127.0.0.1"


# -- 1. alloc: allocation-bound ---------------------------------------------------------
async def _alloc_worker(i: int, steps: int, per_step: int) -> int:
    total = 0
    for step in range(steps):
        batch: list[Any] = []
        for k in range(per_step):
            batch.append({"task": i, "step": step, "k": k, "name": f"task-{i}-{k}"})
            batch.append([k, k + 1, str(k), (i, k)])
            batch.append(b"x" * (k % 48 + 1))
        # one larger buffer per step, so the MEM domain and the byte-based sampler see
        # something besides pymalloc-sized objects
        batch.append(bytearray(2048 + step))
        # keep the batch alive across a suspension: live bytes belong to a task that is
        # not running, which is the case attribution has to get right
        await asyncio.sleep(0)
        total += len(batch)
        del batch
    return total


async def alloc(tasks: int, steps: int, per_step: int) -> int:
    """``tasks`` concurrent tasks, each ``steps`` times building ``per_step`` x (dict, list,
    tuple, str, bytes) plus one 2 KiB bytearray, awaiting, then dropping it all.

    Returns the number of objects built (``tasks * steps * (3 * per_step + 1)``)."""
    workers = [asyncio.create_task(_alloc_worker(i, steps, per_step)) for i in range(tasks)]
    return sum(await asyncio.gather(*workers))


# -- 2. server: I/O-bound loopback HTTP-ish server ----------------------------------------
async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # client closed
            lines = head.decode("latin-1").split("\r\n")
            _method, path, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    key, value = line.split(":", 1)
                    headers[key.strip().lower()] = value.strip()
            seq = int(headers["x-seq"])
            body = json.dumps({"path": path, "seq": seq, "items": [seq, seq + 1, seq + 2], "ok": True}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
    finally:
        writer.close()


async def _client(port: int, cid: int, requests: int) -> int:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    checksum = 0
    try:
        for n in range(requests):
            seq = cid * 1_000_000 + n
            writer.write(
                f"GET /items/{cid}/{n}?q=bench HTTP/1.1\r\nHost: localhost\r\nX-Seq: {seq}\r\n"
                f"Accept: application/json\r\n\r\n".encode()
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            doc = json.loads(await reader.readexactly(length))
            if doc["seq"] != seq:
                raise AssertionError(f"client {cid}: asked for {seq}, got {doc['seq']}")
            checksum += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return checksum


async def server(requests: int, clients: int, time_limit_s: float = 300.0) -> int:
    """An HTTP-ish JSON server on 127.0.0.1 (ephemeral port) and ``clients`` keep-alive
    clients in the same loop making ``requests`` round trips in total, then shutting down.

    Bounded in count and in time (``time_limit_s``).  Returns the number of responses."""
    srv = await asyncio.start_server(_handle, LOOPBACK, 0)
    port = srv.sockets[0].getsockname()[1]
    per_client = requests // clients
    try:
        async with asyncio.timeout(time_limit_s):
            done = await asyncio.gather(*(_client(port, c, per_client) for c in range(clients)))
    finally:
        srv.close()
        await srv.wait_closed()
    return sum(done)


# -- 3. to_thread: executor round trips ---------------------------------------------------
def _job(i: int) -> int:
    # a little allocation in the worker thread, so there is something to attribute
    return len(str(i) * 3) + len([i, i])


async def _thread_worker(first: int, count: int) -> int:
    total = 0
    for i in range(first, first + count):
        total += await asyncio.to_thread(_job, i)
    return total


async def to_thread(jobs: int, tasks: int) -> int:
    """``jobs`` small ``asyncio.to_thread`` calls, spread over ``tasks`` concurrent tasks
    (each awaits its calls one after another).  Returns a checksum of the results."""
    per_task = jobs // tasks
    return sum(await asyncio.gather(*(_thread_worker(t * per_task, per_task) for t in range(tasks))))


def _to_thread_expected(jobs: int, tasks: int) -> int:
    per_task = jobs // tasks
    return sum(_job(i) for i in range(per_task * tasks))


# -- 4. tree: a task tree -----------------------------------------------------------------
async def _node_gather(depth: int, branches: int) -> int:
    if depth == 0:
        return 1
    counts = await asyncio.gather(*(_node_gather(depth - 1, branches) for _ in range(branches)))
    return 1 + sum(counts)


async def _node_taskgroup(depth: int, branches: int) -> int:
    if depth == 0:
        return 1
    async with asyncio.TaskGroup() as tg:
        children = [tg.create_task(_node_taskgroup(depth - 1, branches)) for _ in range(branches)]
    return 1 + sum(c.result() for c in children)


def _tree(node: Callable[[int, int], Awaitable[int]], eager: bool) -> Callable[..., Awaitable[int]]:
    async def tree(depth: int, branches: int, rounds: int) -> int:
        # The eager factory is installed the way a user would, from inside the program;
        # an instrumented loop has to compose it with its own factory, not lose either.
        if eager:
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        total = 0
        for _ in range(rounds):
            # each node is a task of its own: gather/TaskGroup wrap the coroutines
            total += await node(depth, branches)
        return total

    tree.__qualname__ = tree.__name__ = f"tree_{node.__name__.removeprefix('_node_')}{'_eager' if eager else ''}"
    return tree


def _tree_expected(depth: int, branches: int, rounds: int) -> int:
    return rounds * sum(branches**d for d in range(depth + 1))


def _needs_eager() -> str | None:
    if sys.version_info < (3, 12):
        return "asyncio.eager_task_factory needs Python 3.12+"
    return None


# -- registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A timed workload and how big to make it.

    ``kind`` picks the targets and the configs: ``"alloc"`` and ``"tree"`` are held to the
    allocation-bound budget, ``"server"`` to the I/O-bound one, ``"threads"`` runs only the
    thread-wrapper comparison."""

    name: str
    kind: str
    main: Callable[..., Awaitable[int]]
    full: Mapping[str, Any]
    quick: Mapping[str, Any]
    expected: Callable[..., int]
    description: str
    unavailable: Callable[[], str | None] = lambda: None

    def params(self, quick: bool) -> dict[str, Any]:
        return dict(self.quick if quick else self.full)

    def describe(self, quick: bool) -> str:
        """The description at the size run (its fields are the parameters, and for a
        tree ``tasks``: every node but the root, which is awaited directly)."""
        params = self.params(quick)
        if "depth" in params:
            params["tasks"] = sum(params["branches"] ** d for d in range(1, params["depth"] + 1))
        return self.description.format(**params)


tree = _tree(_node_gather, eager=False)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "alloc", "alloc", alloc,
            full={"tasks": 2000, "steps": 30, "per_step": 40},
            quick={"tasks": 200, "steps": 30, "per_step": 40},
            expected=lambda tasks, steps, per_step: tasks * steps * (3 * per_step + 1),
            description="{tasks:,} tasks x {steps} awaits; each step builds, holds across the await, and drops 3 x {per_step} + 1 objects",
        ),
        Workload(
            "server", "server", server,
            full={"requests": 40_000, "clients": 50},
            quick={"requests": 4_000, "clients": 50},
            expected=lambda requests, clients, time_limit_s=0: (requests // clients) * clients,
            description="HTTP-ish JSON server on 127.0.0.1 + {clients} keep-alive clients, {requests:,} round trips",
        ),
        Workload(
            "to_thread", "threads", to_thread,
            full={"jobs": 100_000, "tasks": 200},
            quick={"jobs": 10_000, "tasks": 200},
            expected=_to_thread_expected,
            description="{jobs:,} small asyncio.to_thread jobs over {tasks} tasks",
        ),
        Workload(
            "tree-gather", "tree", tree,
            full={"depth": 6, "branches": 6, "rounds": 3},
            quick={"depth": 6, "branches": 4, "rounds": 3},
            expected=_tree_expected,
            description="task tree {depth} levels x {branches} branches ({tasks:,} tasks) built {rounds} times, asyncio.gather",
        ),
        Workload(
            "tree-taskgroup", "tree", _tree(_node_taskgroup, eager=False),
            full={"depth": 6, "branches": 6, "rounds": 3},
            quick={"depth": 6, "branches": 4, "rounds": 3},
            expected=_tree_expected,
            description="same tree, asyncio.TaskGroup",
        ),
        Workload(
            "tree-gather-eager", "tree", _tree(_node_gather, eager=True),
            full={"depth": 6, "branches": 6, "rounds": 3},
            quick={"depth": 6, "branches": 4, "rounds": 3},
            expected=_tree_expected,
            description="same tree, gather, asyncio.eager_task_factory (3.12+)",
            unavailable=_needs_eager,
        ),
        Workload(
            "tree-taskgroup-eager", "tree", _tree(_node_taskgroup, eager=True),
            full={"depth": 6, "branches": 6, "rounds": 3},
            quick={"depth": 6, "branches": 4, "rounds": 3},
            expected=_tree_expected,
            description="same tree, TaskGroup, asyncio.eager_task_factory (3.12+)",
            unavailable=_needs_eager,
        ),
    ]
}
