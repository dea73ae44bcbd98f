"""``lars simulate --scenario``: synthetic hosts whose error rate and latency change over
time, called through a real agent, to compare the scheduling policies (DESIGN §13).

Each run starts an :class:`~lars.roles.agent.Agent` in this process (its real UDP API,
DNS session, module table and balancers, on a free loopback port) and a tiny DNS that
serves the scenario's route, with its weights, zones and policy, and pushes its changes.
One caller thread then loops get_host + report through
:class:`~lars.client.LarsClient` as fast as it can for the scenario's duration: each call
"happens" on the chosen synthetic host, fails with that host's current error rate and
takes a latency drawn from its current distribution (reported with the call; nothing
sleeps). Measured per run: the error rate callers saw (OVERLOAD answers count as errors),
p50/p99 of the call latencies, the time from the fault to the agent's overloading every
faulty host (eject) and from the fault's end to all of them serving again (recover), and
each host's share of the calls.

The agent runs with ``probe_num`` 100 and 2-second idle and overload windows so that a
few seconds show a whole fault and its recovery; §6 still probes every overloaded host,
so about 1% of calls keep going to a host that is down.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import attrs
import trio

from lars import wire
from lars.client import LarsClient
from lars.config import AgentConfig
from lars.core.balancer import BalancerParams
from lars.core.model import POLICIES, Host, HostKey, HostMeta, PolicySpec, ip_to_int
from lars.errors import LarsError, Overloaded
from lars.roles.agent import Agent

SCENARIOS = ("zone-outage", "slow-host", "flapping", "error-burst", "scale-out")
MODULE = (1, 1)
#: Seconds per bucket of the timeline the eject / recover times are read from.
BUCKET = 0.05


@attrs.frozen
class Phase:
    """A host's behaviour from ``start`` seconds on: error rate, median latency (seconds),
    and whether it is in the route at all."""

    start: float
    err_rate: float = 0.0
    latency: float = 0.002
    present: bool = True


@attrs.frozen
class SimHost:
    name: str
    key: HostKey
    zone: str = ""
    weight: int = 100
    phases: tuple[Phase, ...] = (Phase(0.0),)
    #: True for a host the scenario harms (its eject and recover times are measured).
    faulty: bool = False

    def at(self, t: float) -> Phase:
        current = self.phases[0]
        for phase in self.phases:
            if phase.start <= t:
                current = phase
        return current


@attrs.frozen
class Scenario:
    name: str
    summary: str
    hosts: tuple[SimHost, ...]
    duration: float
    #: When the fault begins and ends (seconds from the start), for eject / recover.
    fault: tuple[float, float]
    agent_zone: str = ""
    zone_affinity: bool = False
    slow_start: float = 0.0


def _host(i: int) -> HostKey:
    return ip_to_int(f"10.9.0.{i}"), 8000 + i


def scenario(name: str, duration: float = 6.0) -> Scenario:
    """The named scenario, its timeline scaled to ``duration`` seconds."""
    d = duration
    if name == "zone-outage":
        down = (Phase(0.0), Phase(d / 3, err_rate=1.0), Phase(2 * d / 3))
        hosts = tuple(
            SimHost(f"a{i}", _host(i), "a", phases=down, faulty=True) for i in (1, 2, 3)
        ) + tuple(SimHost(f"b{i}", _host(i + 3), "b") for i in (1, 2, 3))
        return Scenario(
            name,
            "zone a (the agent's) fails completely for a third of the run",
            hosts,
            d,
            (d / 3, 2 * d / 3),
            agent_zone="a",
            zone_affinity=True,
        )
    if name == "slow-host":
        slow = (Phase(0.0), Phase(d / 6, latency=0.020), Phase(5 * d / 6))
        hosts = (
            SimHost("h1", _host(1), phases=slow, faulty=True),
            *tuple(SimHost(f"h{i}", _host(i)) for i in (2, 3, 4)),
        )
        return Scenario(name, "one host of four turns 10x slower", hosts, d, (d / 6, 5 * d / 6))
    if name == "flapping":
        step = d / 12
        flap = tuple(
            Phase(step * i, err_rate=1.0 if i % 2 and 2 <= i < 10 else 0.0) for i in range(12)
        )
        hosts = (
            SimHost("h1", _host(1), phases=flap, faulty=True),
            *tuple(SimHost(f"h{i}", _host(i)) for i in (2, 3, 4)),
        )
        return Scenario(
            name,
            "one host fails and recovers every few hundred ms",
            hosts,
            d,
            (3 * step, 10 * step),
        )
    if name == "error-burst":
        burst = (Phase(0.0), Phase(d / 3, err_rate=0.5), Phase(d / 2))
        hosts = (
            SimHost("h1", _host(1), phases=burst, faulty=True),
            *tuple(SimHost(f"h{i}", _host(i)) for i in (2, 3, 4)),
        )
        return Scenario(
            name, "one host fails half its calls for a sixth of the run", hosts, d, (d / 3, d / 2)
        )
    if name == "scale-out":
        late = (Phase(0.0, present=False), Phase(d / 3))
        hosts = (
            SimHost("h1", _host(1)),
            SimHost("h2", _host(2)),
            *tuple(SimHost(f"h{i}", _host(i), phases=late) for i in (3, 4)),
        )
        return Scenario(
            name,
            "two hosts join two, with a slow start of a sixth of the run",
            hosts,
            d,
            (d / 3, d / 3),
            slow_start=d / 6,
        )
    raise LarsError(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")


# --- the result ------------------------------------------------------------------------------


@attrs.define
class RunResult:
    scenario: str
    policy: str
    calls: int = 0
    errors: int = 0
    latencies: list[float] = attrs.field(factory=list)
    shares: dict[str, float] = attrs.field(factory=dict)
    eject_s: float | None = None
    recover_s: float | None = None
    #: Error rate of callers from the fault on, per bucket (for "back under 1% within").
    timeline: list[tuple[float, int, int]] = attrs.field(factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        if q == 0.5:
            return statistics.median(ordered)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "policy": self.policy,
            "calls": self.calls,
            "error_rate": round(self.error_rate, 5),
            "p50_ms": round(self.percentile(0.5) * 1000, 3),
            "p99_ms": round(self.percentile(0.99) * 1000, 3),
            "eject_s": None if self.eject_s is None else round(self.eject_s, 3),
            "recover_s": None if self.recover_s is None else round(self.recover_s, 3),
            "shares": {k: round(v, 4) for k, v in self.shares.items()},
        }


# --- the stage: an agent and a DNS in a background trio thread -------------------------------


class _Stage:
    """A real agent and a one-module DNS, in a trio run on a background thread."""

    def __init__(self, params: BalancerParams, zone: str) -> None:
        self.params = params
        self.zone = zone
        self.route: tuple[HostKey, ...] = ()
        self.meta: dict[HostKey, HostMeta] = {}
        self.policy: PolicySpec | None = None
        self.agent: Agent | None = None
        self.port = 0
        self._streams: list[trio.SocketStream] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="lars-simulate")

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10.0) or self._error is not None:
            raise LarsError(f"simulate: the agent did not start: {self._error}")

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None:
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(5.0)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as cancel:
            self._cancel = cancel
            async with trio.open_nursery() as nursery:
                serve = functools.partial(trio.serve_tcp, self._dns_session, 0, host="127.0.0.1")
                listeners = await nursery.start(serve)
                dns_port = listeners[0].socket.getsockname()[1]
                config = AgentConfig(
                    base_port=_free_udp_port(),
                    ports=1,
                    dns=[f"127.0.0.1:{dns_port}"],
                    reporter="127.0.0.1:9",  # none: the statistics wait, as in an outage
                    http_listen="",
                    zone=self.zone,
                    loadbalance=self.params,
                    busy_poll=0.0,  # the caller shares this process (and its GIL)
                    busy_poll_reply=0.0,
                )
                agent = self.agent = Agent(config)
                ports = await nursery.start(agent.serve)
                self.port = ports[0]
                self._ready.set()

    async def _dns_session(self, stream: trio.SocketStream) -> None:
        self._streams.append(stream)
        decoder = wire.FrameDecoder()
        try:
            async for data in stream:
                decoder.feed(data)
                for msg in decoder:
                    if isinstance(msg, wire.GetRouteRequest):
                        await stream.send_all(self._route_frame())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._streams.remove(stream)

    def _route_frame(self) -> bytes:
        meta = tuple(self.meta.get(k, HostMeta()) for k in self.route)
        route = wire.GetRouteResponse(MODULE[0], MODULE[1], self.route, meta, self.policy)
        return wire.encode_frame(route)

    def set_route(self, route: tuple[HostKey, ...]) -> None:
        """Serve ``route`` from now on and push it to the agent (from the caller thread)."""

        async def push() -> None:
            self.route = route
            for stream in list(self._streams):
                await stream.send_all(self._route_frame())

        assert self._token is not None
        trio.from_thread.run(push, trio_token=self._token)

    def overloaded(self) -> set[HostKey]:
        """The hosts the agent holds overloaded now (read in process, under its lock)."""
        agent = self.agent
        assert agent is not None
        with agent._lock:
            lb = agent.table.modules.get(MODULE)
            return set() if lb is None else set(lb.overloaded)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def _quiet() -> Iterator[None]:
    """The agent's reconnect warnings (no reporter) would only drown the result."""
    logger = logging.getLogger("lars")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- one run ---------------------------------------------------------------------------------


def sim_params(policy: str, sc: Scenario, **changes: Any) -> BalancerParams:
    """The agent's [agent.loadbalance] for a scenario run (see the module docstring)."""
    base: dict[str, Any] = {
        "probe_num": 100,
        "idle_timeout": 2.0,
        "overload_timeout": 2.0,
        "update_timeout": 600.0,
        "policy": policy,
        "zone_affinity": sc.zone_affinity,
        "slow_start": sc.slow_start,
    }
    base.update(changes)
    return BalancerParams(**base)


def run(
    sc: Scenario,
    policy: str,
    seed: int = 1,
    params: BalancerParams | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Run scenario ``sc`` with ``policy`` through a fresh agent; see the module docstring."""
    if policy not in POLICIES:
        raise LarsError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
    params = params or sim_params(policy, sc)
    rng = random.Random(seed)
    stage = _Stage(params, sc.agent_zone)
    stage.meta = {h.key: HostMeta(h.weight, h.zone) for h in sc.hosts}
    stage.policy = params.policy_spec()
    present = tuple(h.key for h in sc.hosts if h.at(0.0).present)
    stage.route = present
    by_key = {h.key: h for h in sc.hosts}
    faulty = {h.key for h in sc.hosts if h.faulty}
    result = RunResult(sc.name, policy)
    calls: dict[HostKey, int] = dict.fromkeys(by_key, 0)
    keys = [b"user-%d" % i for i in range(1000)]
    with _quiet():
        stage.start()
        try:
            # busy_poll off: the agent answers from a thread of this very process
            client = LarsClient("127.0.0.1", stage.port, 1, timeout=0.5, retries=4, busy_poll=0)
            with client:
                client.reg_init(*MODULE)
                began = time.monotonic()
                end = began + sc.duration
                bucket_end = began + BUCKET
                b_calls = b_errors = 0
                ejected_at: dict[HostKey, float] = {}
                recovered_at: dict[HostKey, float] = {}
                latencies = result.latencies
                while True:
                    now = time.monotonic()
                    if now >= bucket_end:
                        t = bucket_end - began
                        result.timeline.append((t, b_calls, b_errors))
                        b_calls = b_errors = 0
                        bucket_end += BUCKET
                        route = tuple(h.key for h in sc.hosts if h.at(t).present)
                        if route != stage.route:
                            stage.set_route(route)
                        if faulty:
                            down = stage.overloaded()
                            for k in faulty:
                                if sc.fault[0] <= t and k in down and k not in ejected_at:
                                    ejected_at[k] = t
                                if t >= sc.fault[1] and k in ejected_at and k not in down:
                                    recovered_at.setdefault(k, t)
                        if now >= end:
                            break
                    t = now - began
                    b_calls += 1
                    result.calls += 1
                    try:
                        host = client.get_host(
                            *MODULE, rng.choice(keys) if policy == "hash" else None
                        )
                    except Overloaded:
                        b_errors += 1
                        result.errors += 1
                        continue
                    key = (ip_to_int(host.ip), host.port)
                    sim = by_key.get(key)
                    phase = sim.at(t) if sim is not None else Phase(0.0, err_rate=1.0)
                    ok = rng.random() >= phase.err_rate
                    latency = phase.latency * math.exp(rng.gauss(0.0, 0.3))
                    if not ok:
                        b_errors += 1
                        result.errors += 1
                    calls[key] = calls.get(key, 0) + 1
                    latencies.append(latency)
                    client.report(*MODULE, host, ok=ok, latency=latency)
        finally:
            stage.stop()
    total = sum(calls.values()) or 1
    result.shares = {by_key[k].name: calls[k] / total for k in by_key}
    if faulty and len(ejected_at) == len(faulty):
        result.eject_s = max(ejected_at.values()) - sc.fault[0]
        if len(recovered_at) == len(faulty):
            result.recover_s = max(recovered_at.values()) - sc.fault[1]
    if progress is not None:
        progress(f"{sc.name} {policy}: {result.calls} calls")
    return result


def format_results(results: list[RunResult]) -> str:
    """A table: one line per run."""
    lines = [
        f"{'SCENARIO':<12} {'POLICY':<9} {'CALLS':>7} {'ERRORS':>8} {'P50 ms':>7} "
        f"{'P99 ms':>7} {'EJECT s':>8} {'RECOVER s':>9}  SHARES"
    ]
    for r in results:
        shares = " ".join(f"{name}={share:.0%}" for name, share in r.shares.items())
        lines.append(
            f"{r.scenario:<12} {r.policy:<9} {r.calls:>7} {r.error_rate:>8.2%} "
            f"{r.percentile(0.5) * 1000:>7.2f} {r.percentile(0.99) * 1000:>7.2f} "
            f"{_secs(r.eject_s):>8} {_secs(r.recover_s):>9}  {shares}"
        )
    return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def host_of(sc: Scenario, name: str) -> Host:
    """The address of the scenario's host ``name`` (for people reading the shares)."""
    for h in sc.hosts:
        if h.name == name:
            return Host(socket.inet_ntoa(h.key[0].to_bytes(4, "big")), h.key[1])
    raise KeyError(name)
