"""``lars bench`` and ``lars simulate``: load and behaviour tools run against a live agent."""

from __future__ import annotations

import multiprocessing
import queue
import random
import statistics
import time
from array import array
from collections.abc import Sequence
from typing import Any

import attrs

from lars.client import DEFAULT_BUSY_POLL, DEFAULT_REPORT_DELAY, LarsClient
from lars.core.model import Host
from lars.errors import LarsError, Overloaded

#: Seconds a bench worker may take to start and get its first host.
WORKER_START_TIMEOUT = 30.0


@attrs.frozen
class AgentAddress:
    """Where the agent listens and how patient a client is."""

    host: str
    base_port: int
    ports: int
    timeout: float
    retries: int
    busy_poll: float = DEFAULT_BUSY_POLL
    report_delay: float = DEFAULT_REPORT_DELAY

    def client(self) -> LarsClient:
        return LarsClient(
            self.host,
            self.base_port,
            self.ports,
            timeout=self.timeout,
            retries=self.retries,
            busy_poll=self.busy_poll,
            report_delay=self.report_delay,
        )


# --- bench -----------------------------------------------------------------------------------


@attrs.frozen
class WorkerResult:
    modid: int
    cmdid: int
    loops: int
    seconds: float
    errors: int
    latencies: bytes  # array('d') of get_host latencies, seconds

    @property
    def loops_per_s(self) -> float:
        return self.loops / self.seconds if self.seconds else 0.0


def _bench_worker(
    agent: AgentAddress,
    modid: int,
    cmdid: int,
    duration: float,
    ready: Any,
    start: Any,
    results: Any,
    keys: bool = False,
    latency: bool = False,
) -> None:
    """One bench process: loop get_host + report on one module for ``duration`` seconds
    (``keys``: each get_host with a hash key out of 1024; ``latency``: each report with
    the get_host's latency, for the hash and p2c policies)."""
    client = agent.client()
    try:
        client.get_host(modid, cmdid)  # the route is loaded (bench checked): warm up
    except LarsError as exc:
        ready.put(f"module {modid}/{cmdid}: {exc}")
        return
    ready.put(None)
    start.wait()
    get_host, report, perf = client.get_host, client.report, time.perf_counter
    latencies = array("d")
    record = latencies.append
    loops = errors = 0
    began = perf()
    end = began + duration
    now = began
    if keys or latency:
        names = [b"user-%d" % i for i in range(1024)] if keys else [None] * 1024
        while now < end:
            try:
                host = get_host(modid, cmdid, names[loops & 1023])
            except LarsError:
                errors += 1
                now = perf()
                continue
            done = perf()
            if latency:
                report(modid, cmdid, host, ok=True, latency=done - now)
            else:
                report(modid, cmdid, host, ok=True)
            record(done - now)
            loops += 1
            now = perf()
    while now < end:
        try:
            host = get_host(modid, cmdid)
        except LarsError:
            errors += 1
            now = perf()
            continue
        done = perf()
        report(modid, cmdid, host, ok=True)
        record(done - now)
        loops += 1
        now = perf()
    client.close()
    results.put(WorkerResult(modid, cmdid, loops, now - began, errors, latencies.tobytes()))


@attrs.frozen
class BenchResult:
    workers: int
    duration: float
    per_worker: list[WorkerResult]
    p50_us: float
    p99_us: float

    @property
    def loops_per_s(self) -> float:
        return sum(w.loops_per_s for w in self.per_worker)

    def as_json(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "duration": self.duration,
            "loops_per_s": round(self.loops_per_s, 1),
            "per_worker": [
                {
                    "modid": w.modid,
                    "cmdid": w.cmdid,
                    "loops": w.loops,
                    "loops_per_s": round(w.loops_per_s, 1),
                    "errors": w.errors,
                }
                for w in self.per_worker
            ],
            "p50_us": round(self.p50_us, 1),
            "p99_us": round(self.p99_us, 1),
        }


def bench(
    agent: AgentAddress,
    modid: int,
    cmdid: int,
    workers: int,
    duration: float,
    keys: bool = False,
    latency: bool = False,
) -> BenchResult:
    """Run ``workers`` processes, worker i on module (modid, cmdid + i), all started at once.

    Every module's route is loaded first, here: no agent or no route fails within the
    client's timeout, before a worker process is started."""
    with agent.client() as client:
        for i in range(workers):
            try:
                client.reg_init(modid, cmdid + i)
            except LarsError as exc:
                raise LarsError(f"bench needs module {modid}/{cmdid + i}: {exc}") from None
    ctx = multiprocessing.get_context("spawn")
    ready: Any = ctx.Queue()
    results: Any = ctx.Queue()
    start = ctx.Event()
    processes = [
        ctx.Process(
            target=_bench_worker,
            args=(agent, modid, cmdid + i, duration, ready, start, results, keys, latency),
            daemon=True,
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            try:
                problem = ready.get(timeout=WORKER_START_TIMEOUT)
            except queue.Empty:
                raise LarsError("bench workers did not start in time") from None
            if problem is not None:
                raise LarsError(f"bench worker could not get a host for {problem}")
        start.set()
        collected = [results.get(timeout=duration + WORKER_START_TIMEOUT) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    collected.sort(key=lambda w: w.cmdid)
    samples = array("d")
    for w in collected:
        samples.frombytes(w.latencies)
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1e6 if ordered else 0.0
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6 if ordered else 0.0
    return BenchResult(workers, duration, collected, p50, p99)


# --- simulate --------------------------------------------------------------------------------


@attrs.define
class HostTally:
    host: Host
    failing: bool
    calls: int = 0
    succ: int = 0
    err: int = 0


@attrs.frozen
class SimulationResult:
    modid: int
    cmdid: int
    count: int
    err_rate: float
    hosts: list[HostTally]
    overloaded: int

    @property
    def failing_share(self) -> float:
        calls = sum(t.calls for t in self.hosts)
        return sum(t.calls for t in self.hosts if t.failing) / calls if calls else 0.0

    @property
    def even_share(self) -> float:
        return sum(t.failing for t in self.hosts) / len(self.hosts) if self.hosts else 0.0


def simulate(
    agent: AgentAddress,
    modid: int,
    cmdid: int,
    count: int,
    err_rate: float,
    failing: Sequence[Host] = (),
    seed: int | None = None,
) -> SimulationResult:
    """Call through the agent ``count`` times; calls to the failing hosts fail with
    probability ``err_rate`` (default failing host: the first of the route). Healthy hosts
    always succeed, so the tallies show how much traffic the failing ones still get."""
    rng = random.Random(seed)
    with agent.client() as client:
        route = sorted(client.reg_init(modid, cmdid))
        bad = set(failing) if failing else set(route[:1])
        unknown = bad - set(route)
        if unknown:
            raise LarsError(
                f"not in the route of {modid}/{cmdid}: " + ", ".join(map(str, sorted(unknown)))
            )
        tallies = {h: HostTally(h, h in bad) for h in route}
        overloaded = 0
        for _ in range(count):
            try:
                host = client.get_host(modid, cmdid)
            except Overloaded:
                overloaded += 1
                continue
            tally = tallies.get(host)
            if tally is None:  # the route changed meanwhile
                tally = tallies[host] = HostTally(host, False)
            tally.calls += 1
            ok = not (tally.failing and rng.random() < err_rate)
            if ok:
                tally.succ += 1
            else:
                tally.err += 1
            client.report(modid, cmdid, host, ok=ok)
    return SimulationResult(modid, cmdid, count, err_rate, list(tallies.values()), overloaded)
