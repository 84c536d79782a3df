"""A small asyncio service with a memory leak, to try the profiler on.

``memscope-async demo`` profiles it; ``python -m memscope_async.demo`` runs it plainly.
It needs no network beyond loopback and finishes by itself in about three seconds.

What runs:

* ``load_generator`` opens a loopback TCP connection and sends JSON requests, one a line
  (~32 KiB each); ``collect_responses`` reads the answers.
* ``accept_loop`` serves the connection: one ``handle_request`` task per request, which
  parses the payload, renders the answer in a child ``render_response`` task (labelled
  with the request's ``route``) and starts a ``session_tracker`` task.
* ``cache_refresher`` rebuilds the product cache every 250 ms: churn, each rebuild frees
  the previous cache.
* ``metrics_flusher`` summarises request latencies in a worker thread
  (``asyncio.to_thread``).

The bug to find: ``session_tracker`` keeps a decoded copy of every payload in the
module-level :data:`SESSION_LOG`, which nothing ever clears.  Its tasks finish in a
millisecond, yet their memory (about 5 MiB by the end) outlives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import memscope_async as ms

__all__ = ["SESSION_LOG", "main", "run"]

ROUTES = ("/api/search", "/api/checkout")
REQUESTS = 160  # requests sent by load_generator
INTERVAL = 0.015  # seconds between two requests
ITEMS_PER_REQUEST = 240  # ~32 KiB of JSON per request
CATALOGUE = 4000  # products in the cache
CACHE_PERIOD = 0.25  # seconds between two cache rebuilds
METRICS_PERIOD = 0.5  # seconds between two metric summaries
LINE_LIMIT = 1 << 20  # longest request or response line, bytes

# Every request's payload, decoded, "for analytics".  Never cleared: the leak.
SESSION_LOG: list[dict[str, str]] = []


@dataclass
class Service:
    """What the service's tasks share."""

    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    background: set[asyncio.Task] = field(default_factory=set)
    served: int = 0

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task:
        """Fire and forget, keeping a reference so the task is not garbage-collected."""
        task = asyncio.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


# -- the service -------------------------------------------------------------------------


async def accept_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, service: Service) -> None:
    """Serve one connection: each request line gets its own handle_request task."""
    in_flight: set[asyncio.Task] = set()
    try:
        while line := await reader.readline():
            task = asyncio.create_task(handle_request(line, writer, service))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def handle_request(raw: bytes, writer: asyncio.StreamWriter, service: Service) -> None:
    """Parse one request, start its session_tracker, render and send the response."""
    started = time.perf_counter()
    request = json.loads(raw)
    service.spawn(session_tracker(request["session"], request["route"], raw))
    with ms.labels(route=request["route"]):
        body = await asyncio.create_task(render_response(request, service.cache))
    writer.write(body)
    await writer.drain()
    service.served += 1
    service.latencies.append(time.perf_counter() - started)


async def render_response(request: dict[str, Any], cache: dict[str, dict[str, Any]]) -> bytes:
    """Build the response document for one request, as one JSON line."""
    await asyncio.sleep(0)  # where a real renderer would await a template or a database
    products = [(item, cache.get(f"sku-{item['sku']}")) for item in request["items"]]
    if request["route"] == "/api/search":
        hits = [{"sku": item["sku"], **product} for item, product in products if product][:40]
        document = {"id": request["id"], "hits": hits}
    else:
        total = sum(item["qty"] * product["price"] for item, product in products if product)
        document = {"id": request["id"], "total": round(total, 2), "lines": len(products)}
    return json.dumps(document).encode() + b"\n"


async def session_tracker(session_id: str, route: str, raw: bytes) -> None:
    """Record the request for analytics.  THE LEAK: the copy is kept forever."""
    await asyncio.sleep(0.001)
    SESSION_LOG.append({"session": session_id, "route": route, "payload": raw.decode()})


async def cache_refresher(service: Service, stop: asyncio.Event) -> None:
    """Rebuild the product cache periodically; the previous one is freed each time."""
    rng = random.Random(1)
    while not stop.is_set():
        service.cache = {
            f"sku-{i}": {"price": round(rng.uniform(1, 500), 2), "stock": rng.randrange(100),
                         "tags": ["demo", f"category-{i % 17}"]}
            for i in range(CATALOGUE)
        }
        await _sleep_unless(stop, CACHE_PERIOD)


async def metrics_flusher(service: Service, stop: asyncio.Event) -> None:
    """Summarise latencies off the loop (asyncio.to_thread), then once more at shutdown."""
    while True:
        if service.latencies:
            service.metrics = await asyncio.to_thread(summarise, list(service.latencies))
        if stop.is_set():
            return
        await _sleep_unless(stop, METRICS_PERIOD)


def summarise(samples: list[float]) -> dict[str, Any]:
    """Latency percentiles (seconds), a bootstrapped p99 and a text histogram: CPU work
    for a worker thread."""
    ordered = sorted(samples)
    rng = random.Random(len(ordered))
    resampled = [sorted(rng.choices(ordered, k=len(ordered))) for _ in range(40)]
    p99s = [r[int(len(r) * 0.99) - 1 if len(r) > 1 else 0] for r in resampled]
    histogram = Counter(round(s * 1000) for s in ordered)
    return {
        "count": len(ordered),
        "p50": ordered[len(ordered) // 2],
        "p99": sum(p99s) / len(p99s),
        "histogram": "\n".join(f"{ms:4d} ms {'#' * n}" for ms, n in sorted(histogram.items())),
    }


# -- the traffic -------------------------------------------------------------------------


async def load_generator(port: int, requests: int, interval: float) -> int:
    """Send ``requests`` requests over one loopback connection; return the answers read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=LINE_LIMIT)
    answers = asyncio.create_task(collect_responses(reader), name="collect_responses")
    rng = random.Random(42)
    for i in range(requests):
        writer.write(_payload(i, rng))
        await writer.drain()
        await asyncio.sleep(interval)
    writer.write_eof()
    count = await answers
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return count


async def collect_responses(reader: asyncio.StreamReader) -> int:
    count = 0
    while await reader.readline():
        count += 1
    return count


def _payload(i: int, rng: random.Random) -> bytes:
    request = {
        "id": i,
        "session": f"session-{i % 40}",
        "route": ROUTES[i % 3 == 0],
        "items": [
            {"sku": rng.randrange(CATALOGUE), "qty": rng.randint(1, 5), "note": "gift wrap, " * 9}
            for _ in range(ITEMS_PER_REQUEST)
        ],
    }
    return json.dumps(request).encode() + b"\n"


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# -- entry points ------------------------------------------------------------------------


async def main(requests: int = REQUESTS, interval: float = INTERVAL) -> Service:
    """Run the service against ``requests`` requests and shut it down; return its state."""
    service = Service()
    stop = asyncio.Event()
    server = await asyncio.start_server(functools.partial(accept_loop, service=service), "127.0.0.1", 0,
                                        limit=LINE_LIMIT)
    port = server.sockets[0].getsockname()[1]
    workers = [
        asyncio.create_task(cache_refresher(service, stop), name="cache_refresher"),
        asyncio.create_task(metrics_flusher(service, stop), name="metrics_flusher"),
    ]
    async with server:
        await asyncio.create_task(load_generator(port, requests, interval), name="load_generator")
        stop.set()
        await asyncio.gather(*workers)
        await asyncio.gather(*service.background)
    return service


def run() -> None:
    """Run the demo (``python -m memscope_async.demo``) and print one line about it."""
    started = time.perf_counter()
    service = asyncio.run(main())
    kept = sum(len(entry["payload"]) for entry in SESSION_LOG)
    print(f"demo: served {service.served} requests in {time.perf_counter() - started:.1f} s; "
          f"the session log keeps {len(SESSION_LOG)} payloads ({kept / 2**20:.1f} MiB) and is never cleared")
