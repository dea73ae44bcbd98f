"""The per-module load balancer: idle and overload lists. Pure: no I/O, the clock is passed in.

Every method that depends on time takes ``now`` (seconds, monotonic). The rules, from
DESIGN.md §6 (parameters in :class:`BalancerParams`, defaults from the original Lars):

Host state
    Each host is in exactly one list: **idle** (healthy, served round robin) or **overload**
    (failing, only probed). Per host: virtual counters ``vsucc/verr`` (decide transitions),
    window counters ``rsucc/rerr`` (real calls in the current window), streaks
    ``contin_succ/contin_err``, and ``idle_since`` / ``overload_since``.

New host
    Enters idle as if it had just become idle (below).

Becoming idle
    ``vsucc = init_succ_cnt``, ``verr = 0``, window and streaks 0, ``idle_since = now``.

Becoming overloaded
    ``vsucc = 0``, ``verr = init_err_cnt``, window and streaks 0, ``overload_since = now``.

get_host (``access_cnt`` is per module)
    * no hosts -> NOEXIST.
    * idle empty: if ``access_cnt >= probe_num``: reset it, return the next overloaded host
      (round robin, a probe); else count and answer OVERLOAD.
    * idle non-empty, overload empty: the next idle host (round robin).
    * both non-empty: if ``access_cnt >= probe_num``: reset it and probe the next overloaded
      host; else count and return the next idle host.
    Before choosing, every overloaded host whose ``overload_since`` is ``overload_timeout``
    old returns to idle, so the timeout holds even for hosts nobody reports on.

report(host, success) -- unknown hosts are ignored
    1. Count: success -> ``vsucc++ rsucc++ contin_succ++ contin_err = 0``;
       failure -> ``verr++ rerr++ contin_err++ contin_succ = 0``.
    2. An idle host that just failed becomes overloaded if ``verr/(vsucc+verr) > err_rate``
       or ``contin_err >= contin_err_limit``. An overloaded host that just succeeded becomes
       idle if ``vsucc/(vsucc+verr) > succ_rate`` or ``contin_succ >= contin_succ_limit``.
       A transition ends the call.
    3. Windows: an idle host whose ``idle_since`` is ``idle_timeout`` old becomes overloaded if
       ``rerr/(rsucc+rerr) >= window_err_rate``, otherwise it becomes idle afresh (its window
       resets). An overloaded host whose ``overload_since`` is ``overload_timeout`` old
       becomes idle.

Route update
    New hosts enter idle; hosts that stay keep their state; vanished hosts leave every list
    and the host map.

Scheduling (DESIGN §13, :mod:`lars.core.policy`)
    A module with the default :class:`PolicySpec` (rr, no zone affinity, no panic, no slow
    start) and no drained host takes the §6 path above unchanged. Any other takes
    :meth:`LoadBalancer._choose`, layered: (1) §6 decides idle I, overloaded O and the probe
    (drained hosts, weight 0, are neither chosen nor probed); (2) panic: if |I| / (|I| + |O|) <
    ``panic_threshold``, candidates are I and O, else I; (3) zone affinity: with local hosts L
    and h = |I ∩ L| / |L|, everything stays in the zone while h >= ``zone_failover``, else a
    share h / zone_failover does and the rest goes to the other zones (h = 0: all of it);
    (4) the policy picks among the candidates, with each weight ramped over ``slow_start``
    seconds after a host is new or back from overload. While ``lars query --explain`` asked
    lately (:meth:`LoadBalancer.explain`), every module takes that path and records its
    last choices with their reasons; otherwise nothing is recorded.

Cost: get_host and report are O(1) (amortised). The lists are ordered dicts used as rings:
the head is served and moved to the tail; a host moves between lists in O(1). Overload
expiry uses a second ordered dict in the order hosts became overloaded, so the oldest is
always at its head.

Counts for the metrics: every balancer of one agent adds to one shared :class:`Tally`
(transitions by reason, probes, hosts by state), and keeps its own cumulative report counts;
plain integer increments in the calls that already run, read at scrape time.

Call statistics for the reporter ride along: each host counts the successes and failures
reported since the last acknowledged send (:meth:`LoadBalancer.take_stats`,
:meth:`~LoadBalancer.stats_sent`, :meth:`~LoadBalancer.stats_failed`). Counts stay in place
until the reporter acknowledges them, so an outage loses nothing and costs no extra memory.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

import attrs

from lars.core import policy as pol
from lars.core.model import POLICIES, HostKey, HostMeta, PolicySpec

# Return codes of get_host (the same numbers as on the wire).
SUCC = 0
OVERLOAD = 1
NOEXIST = 3

DEFAULT_WEIGHT = HostMeta().weight
DEFAULT_SPEC = PolicySpec()
#: Choices kept for ``lars query --explain``, and for how long after it asked.
CHOICES_KEPT = 32
EXPLAIN_SECONDS = 60.0
#: Seconds a plan holds while a host ramps up (its weight changes with time).
PLAN_TTL = 0.05

#: A group of candidates: keys, effective weights, states (parallel).
#: A group of candidates: keys, effective weights, states, smooth-weighted scores (parallel),
#: and the total weight.
_Group = tuple[tuple[HostKey, ...], tuple[float, ...], list["HostState"], list[float], float]


class _Plan:
    """The candidates of layers (2) and (3) for one version of the host states."""

    __slots__ = ("expires", "local", "panic", "ramping", "remote", "ring", "share", "version")

    def __init__(
        self,
        version: int,
        expires: float,
        panic: bool,
        share: float,
        local: _Group,
        remote: _Group,
        ring: bool,
    ) -> None:
        self.version = version
        self.expires = expires
        self.panic = panic
        self.share = share
        self.local = local
        self.remote = remote
        self.ring = ring
        self.ramping = False


def _mean_latency(states: Sequence[HostState], now: float) -> float | None:
    """The mean peak-EWMA latency, as of ``now``, of the hosts that have one (p2c's cost
    of a host without samples), or None if none has."""
    known = [c for c in (st.latency.cost(now) for st in states) if c is not None]
    return sum(known) / len(known) if known else None


def _ms(latency: float | None) -> str:
    return "?" if latency is None else f"{latency * 1000:.1f}ms"


def _count(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{attr.name} must be a whole number >= 0, got {value!r}")


def _rate(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attr.name} must be between 0 and 1, got {value!r}")


def _seconds(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be greater than 0, got {value!r}")


def _policy(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if value not in POLICIES:
        raise ValueError(f"{attr.name} must be one of {', '.join(POLICIES)}, got {value!r}")


def _ramp(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if type(value) not in (int, float) or not 0 <= value <= 3600:
        raise ValueError(f"{attr.name} must be 0 to 3600 seconds, got {value!r}")


@attrs.frozen
class BalancerParams:
    """``[agent.loadbalance]``: the load balancer's thresholds (original Lars defaults)."""

    probe_num: int = attrs.field(default=10, validator=_count)
    #: Lars addition: at most one probe of each overloaded host per this many seconds
    #: (0 = off: every probe_num-th request probes, as in the original).
    probe_interval: float = attrs.field(default=0.0, validator=_ramp)
    init_succ_cnt: int = attrs.field(default=180, validator=_count)
    init_err_cnt: int = attrs.field(default=5, validator=_count)
    err_rate: float = attrs.field(default=0.1, validator=_rate)
    succ_rate: float = attrs.field(default=0.5, validator=_rate)
    contin_err_limit: int = attrs.field(default=15, validator=_count)
    contin_succ_limit: int = attrs.field(default=15, validator=_count)
    window_err_rate: float = attrs.field(default=0.7, validator=_rate)
    idle_timeout: float = attrs.field(default=15.0, validator=_seconds)
    overload_timeout: float = attrs.field(default=15.0, validator=_seconds)
    update_timeout: float = attrs.field(default=15.0, validator=_seconds)
    # The scheduling policy of modules without their own (DESIGN §13; defaults keep §6).
    policy: str = attrs.field(default="rr", validator=_policy)
    zone_affinity: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    zone_failover: float = attrs.field(default=0.7, validator=_rate)
    panic_threshold: float = attrs.field(default=0.0, validator=_rate)
    slow_start: float = attrs.field(default=0.0, validator=_ramp)

    def policy_spec(self) -> PolicySpec:
        """The default :class:`PolicySpec` these parameters give."""
        return PolicySpec(
            self.policy,
            self.zone_affinity,
            float(self.zone_failover),
            float(self.panic_threshold),
            float(self.slow_start),
        )


class HostState:
    """The balancer's view of one host. Mutable; owned by one :class:`LoadBalancer`."""

    __slots__ = (
        "called",
        "contin_err",
        "contin_succ",
        "demoted",
        "flight_err",
        "flight_succ",
        "idle_since",
        "key",
        "latency",
        "overload_since",
        "overloaded",
        "probed_at",
        "ramp_since",
        "reason",
        "rerr",
        "rsucc",
        "stat_err",
        "stat_succ",
        "verr",
        "vsucc",
        "weight",
        "zone",
    )

    def __init__(self, key: HostKey) -> None:
        self.key = key
        self.overloaded = False
        self.vsucc = 0
        self.verr = 0
        self.rsucc = 0
        self.rerr = 0
        self.contin_succ = 0
        self.contin_err = 0
        self.idle_since = 0.0
        self.overload_since = 0.0
        #: When it was last probed, or became overloaded (for ``probe_interval``).
        self.probed_at = 0.0
        # Reporter statistics: counted since the last send / sent and not yet acknowledged.
        self.stat_succ = 0
        self.stat_err = 0
        self.flight_succ = 0
        self.flight_err = 0
        # Scheduling: the route's weight and zone, when the slow start began, the rule
        # that last made it overloaded, and its peak-EWMA latency.
        self.weight = DEFAULT_WEIGHT
        self.zone = ""
        self.ramp_since = 0.0
        self.reason = ""
        self.latency = pol.PeakEwma()
        # The fleet view (DESIGN §14): whether the DNS says enough callers see this host
        # overloaded, and whether this agent has had a report on it yet.
        self.demoted = False
        self.called = False

    @property
    def since(self) -> float:
        """When the host entered its current state."""
        return self.overload_since if self.overloaded else self.idle_since

    def __repr__(self) -> str:
        state = "overload" if self.overloaded else "idle"
        return (
            f"<HostState {self.key} {state} v={self.vsucc}/{self.verr} "
            f"r={self.rsucc}/{self.rerr} c={self.contin_succ}/{self.contin_err}>"
        )


class Tally:
    """Counts shared by the balancers of one agent, for its metrics.

    Transitions count by the rule that caused them: to overload by ``err_rate``,
    ``contin_err`` or ``window``; to idle by ``succ_rate``, ``contin_succ`` or ``timeout``.
    """

    __slots__ = ("hosts", "overloaded", "probes", "to_idle", "to_overload")

    def __init__(self) -> None:
        self.to_overload = {"err_rate": 0, "contin_err": 0, "window": 0, "demoted": 0}
        self.to_idle = {"succ_rate": 0, "contin_succ": 0, "timeout": 0}
        #: Probes: overloaded hosts chosen by get_host.
        self.probes = 0
        #: Hosts of every route, and how many of them are overloaded now.
        self.hosts = 0
        self.overloaded = 0


#: One host's line in a statistics send: (state, successes, failures).
StatLine = tuple[HostState, int, int]


class LoadBalancer:
    """Idle/overload load balancer of one module. See the module docstring for the rules."""

    def __init__(self, params: BalancerParams, tally: Tally | None = None) -> None:
        self.params = params
        self.tally = tally if tally is not None else Tally()
        #: Every host of the current route.
        self.hosts: dict[HostKey, HostState] = {}
        self._idle: OrderedDict[HostKey, HostState] = OrderedDict()
        self._overload: OrderedDict[HostKey, HostState] = OrderedDict()
        # Overloaded hosts in the order they became overloaded: the head expires first.
        self._overload_order: OrderedDict[HostKey, HostState] = OrderedDict()
        self.access_cnt = 0
        # How many hosts the route says are demoted.
        self._demoted = 0
        #: When the route was last set from DNS; ``None`` while no answer has arrived.
        self.last_update: float | None = None
        # Hosts removed from the route whose statistics are not yet sent.
        self._retired: list[HostState] = []
        # States whose counts are in flight (sent, not yet acknowledged).
        self._in_flight: list[HostState] | None = None
        #: True when reports arrived since the last statistics send.
        self.stats_pending = False
        #: Reports on this module's hosts since it was created: successes, failures.
        self.reports_ok = 0
        self.reports_failed = 0
        # Scheduling (DESIGN §13): the module's policy, the agent's zone; ``plain`` while
        # the §6 path alone decides (default policy, no drained host, no explain).
        self.spec = DEFAULT_SPEC
        self.zone = ""
        self.plain = True
        self.drained = 0
        self.rng = random.Random()
        # Bumped by every change of host states: the cached plan (_make_plan) is stale.
        self._version = 0
        self._plan: _Plan | None = None
        self._rr = 0
        self._swrr = pol.SmoothWeighted()
        self._ring = pol.HashRing()
        self._spill = pol.Spill()
        #: Monotonic time until which choices are recorded (explain), and the record.
        self.explain_until = 0.0
        self.choices: deque[tuple[float, HostKey | None, str]] = deque(maxlen=CHOICES_KEPT)
        #: The last panic / zone spill state seen by a choice (for explain).
        self.panic = False
        self.spill = 1.0

    # --- queries ---------------------------------------------------------------------------

    @property
    def idle(self) -> list[HostKey]:
        """Idle hosts, in round-robin order (next served first)."""
        return list(self._idle)

    @property
    def overloaded(self) -> list[HostKey]:
        """Overloaded hosts, in probe order (next probed first)."""
        return list(self._overload)

    def route(self) -> list[HostKey]:
        """Every host of the module's route, in no particular order."""
        return list(self.hosts)

    @property
    def overloaded_count(self) -> int:
        """How many hosts are overloaded."""
        return len(self._overload)

    def states(self) -> Iterator[HostState]:
        """The state of every host, idle first, each list in serving order."""
        yield from self._idle.values()
        yield from self._overload.values()

    def needs_update(self, now: float) -> bool:
        """True if the route was never received or is older than ``update_timeout``."""
        return self.last_update is None or now - self.last_update >= self.params.update_timeout

    # --- transitions -----------------------------------------------------------------------

    def _become_idle(self, st: HostState, now: float, reason: str | None = None) -> None:
        """Make ``st`` idle afresh; ``reason`` names the rule when it was overloaded."""
        if st.overloaded:
            self._version += 1
            del self._overload[st.key]
            del self._overload_order[st.key]
            self._idle[st.key] = st
            st.overloaded = False
            self.tally.overloaded -= 1
            if reason is not None:
                self.tally.to_idle[reason] += 1
            st.ramp_since = now
        st.vsucc = self.params.init_succ_cnt
        st.verr = 0
        st.rsucc = st.rerr = 0
        st.contin_succ = st.contin_err = 0
        st.idle_since = now

    def _become_overloaded(self, st: HostState, now: float, reason: str) -> None:
        if not st.overloaded:
            self._version += 1
            del self._idle[st.key]
            self._overload[st.key] = st
            self._overload_order[st.key] = st
            st.overloaded = True
            self.tally.overloaded += 1
            self.tally.to_overload[reason] += 1
            st.reason = reason
        st.vsucc = 0
        st.verr = self.params.init_err_cnt
        st.rsucc = st.rerr = 0
        st.contin_succ = st.contin_err = 0
        st.overload_since = st.probed_at = now

    def expire_overloads(self, now: float) -> None:
        """Return to idle every overloaded host whose ``overload_timeout`` has passed."""
        order = self._overload_order
        timeout = self.params.overload_timeout
        while order:
            st = next(iter(order.values()))
            if now - st.overload_since < timeout:
                return
            self._become_idle(st, now, "timeout")

    # --- the two hot calls -----------------------------------------------------------------

    def get_host(self, now: float, hkey: bytes | None = None) -> tuple[int, HostKey | None]:
        """Choose a host: ``(SUCC, host)``, ``(OVERLOAD, None)`` or ``(NOEXIST, None)``.
        ``hkey`` is the caller's key for the hash policy."""
        if not self.plain:
            return self._choose(now, hkey)
        if not self.hosts:
            return NOEXIST, None
        if self._overload_order:
            self.expire_overloads(now)
        idle = self._idle
        if idle and not self._overload:
            ring = idle
        elif self.access_cnt >= self.params.probe_num and (
            not self.params.probe_interval or self._probe_due(now)
        ):
            self.access_cnt = 0
            ring = self._overload
            next(iter(ring.values())).probed_at = now
            self.tally.probes += 1
        else:
            self.access_cnt += 1
            if not idle:
                return OVERLOAD, None
            ring = idle
        key, st = ring.popitem(last=False)
        ring[key] = st
        return SUCC, key

    def _probe_due(self, now: float) -> bool:
        """With ``probe_interval``: whether the next overloaded host in probe order was
        last probed long enough ago (it is the one probed longest ago)."""
        st = next(iter(self._overload.values()))
        return now - st.probed_at >= self.params.probe_interval

    def report(self, key: HostKey, success: bool, now: float, latency: float | None = None) -> None:
        """Record the result of one call to ``key`` (``latency``: its seconds, if known);
        unknown hosts are ignored."""
        st = self.hosts.get(key)
        if st is None:
            return
        if latency is not None:
            st.latency.observe(latency, now)
        st.called = True
        self.stats_pending = True
        p = self.params
        if success:
            self.reports_ok += 1
            st.stat_succ += 1
            st.vsucc += 1
            st.rsucc += 1
            st.contin_succ += 1
            st.contin_err = 0
        else:
            self.reports_failed += 1
            st.stat_err += 1
            st.verr += 1
            st.rerr += 1
            st.contin_err += 1
            st.contin_succ = 0
        if not st.overloaded:
            if not success and st.verr / (st.vsucc + st.verr) > p.err_rate:
                self._become_overloaded(st, now, "err_rate")
            elif not success and st.contin_err >= p.contin_err_limit:
                self._become_overloaded(st, now, "contin_err")
            elif now - st.idle_since >= p.idle_timeout:
                window = st.rsucc + st.rerr
                if window and st.rerr / window >= p.window_err_rate:
                    self._become_overloaded(st, now, "window")
                else:
                    self._become_idle(st, now)
        elif success and st.vsucc / (st.vsucc + st.verr) > p.succ_rate:
            self._become_idle(st, now, "succ_rate")
        elif success and st.contin_succ >= p.contin_succ_limit:
            self._become_idle(st, now, "contin_succ")
        elif now - st.overload_since >= p.overload_timeout:
            self._become_idle(st, now, "timeout")

    # --- route updates ---------------------------------------------------------------------

    def update_route(
        self, keys: Iterable[HostKey], now: float, demoted: Collection[HostKey] = ()
    ) -> None:
        """Replace the route: add new hosts as idle, keep the rest, remove vanished hosts.

        ``demoted`` (the fleet view, DESIGN §14): hosts that enough callers see overloaded.
        One this agent has not called yet starts overloaded (reason ``demoted``); it is
        probed and recovers by the usual rules."""
        new = set(keys)
        hosts = self.hosts
        tally = self.tally
        self._version += 1
        for key in [k for k in hosts if k not in new]:
            st = hosts.pop(key)
            tally.hosts -= 1
            if st.overloaded:
                del self._overload[key]
                del self._overload_order[key]
                tally.overloaded -= 1
            else:
                del self._idle[key]
            if st.stat_succ or st.stat_err or st.flight_succ or st.flight_err:
                self._retired.append(st)
        for key in new:
            if key not in hosts:
                st = HostState(key)
                hosts[key] = st
                self._idle[key] = st
                self._become_idle(st, now)
                st.ramp_since = now
                tally.hosts += 1
        if demoted or self._demoted:
            self._demoted = 0
            for key, st in hosts.items():
                st.demoted = key in demoted
                if st.demoted:
                    self._demoted += 1
                    if not st.called and not st.overloaded:
                        self._become_overloaded(st, now, "demoted")
        self.last_update = now
        if len(self._swrr.scores) > len(hosts):
            self._swrr.forget(hosts)
            self._ring.forget(hosts)

    # --- scheduling (DESIGN §13) -------------------------------------------------------------

    def set_policy(
        self, spec: PolicySpec, meta: Mapping[HostKey, HostMeta] | None, zone: str
    ) -> None:
        """Set the module's policy, the hosts' weights and zones (a host missing from
        ``meta`` has the defaults) and the agent's zone. Call after :meth:`update_route`."""
        self.spec = spec
        self.zone = zone
        drained = 0
        for key, st in self.hosts.items():
            m = meta.get(key) if meta else None
            if m is None:
                st.weight, st.zone = DEFAULT_WEIGHT, ""
            else:
                st.weight, st.zone = m.weight, m.zone
            drained += st.weight == 0
        self.drained = drained
        self._version += 1
        self._replan(0.0)

    def _replan(self, now: float) -> None:
        """Whether the §6 path alone decides: rr, no layer in play, nothing to record."""
        spec = self.spec
        self.plain = (
            spec.policy == "rr"
            and not (spec.zone_affinity and self.zone)
            and not spec.panic_threshold
            and not spec.slow_start
            and not self.drained
            and now >= self.explain_until
        )

    def explain(self, now: float, seconds: float = EXPLAIN_SECONDS) -> None:
        """Record choices and their reasons for the next ``seconds``."""
        self.explain_until = now + seconds
        self.plain = False

    def _record(self, now: float, key: HostKey | None, reason: str) -> None:
        if now < self.explain_until:
            self.choices.append((now, key, reason))
        elif self.explain_until:
            self.explain_until = 0.0
            self._replan(now)

    def effective_weight(self, st: HostState, now: float) -> float:
        """The host's weight with its slow start applied."""
        return pol.ramp(float(st.weight), st.ramp_since, now, self.spec.slow_start)

    def plan(self, now: float) -> tuple[dict[HostKey, float], bool, float]:
        """What the layers give now, without choosing: each host's expected share of the
        requests that are not probes (rr, p2c: equal within a group; weighted, hash: by
        effective weight), whether panic is on, and the share staying in the agent's zone
        (1.0 when zone affinity is off or not in play)."""
        spec = self.spec
        healthy = [st for st in self._idle.values() if st.weight]
        failing = [st for st in self._overload.values() if st.weight]
        total = len(healthy) + len(failing)
        panic = bool(spec.panic_threshold and total and len(healthy) / total < spec.panic_threshold)
        cands = healthy + failing if panic else healthy
        groups: list[tuple[list[HostState], float]] = [(cands, 1.0)]
        stay = 1.0
        if spec.zone_affinity and self.zone:
            local_all = [st for st in (*healthy, *failing) if st.zone == self.zone]
            if local_all:
                local = [st for st in cands if st.zone == self.zone]
                remote = [st for st in cands if st.zone != self.zone]
                healthy_local = sum(not st.overloaded for st in local)
                stay = pol.local_share(healthy_local, len(local_all), spec.zone_failover)
                if not remote:
                    groups = [(local, 1.0)]
                elif not local:
                    groups = [(remote, 1.0)]
                else:
                    groups = [(local, stay), (remote, 1.0 - stay)]
        shares: dict[HostKey, float] = dict.fromkeys(self.hosts, 0.0)
        for group, part in groups:
            if not group:
                continue
            if spec.policy in ("weighted", "hash"):
                weights = [self.effective_weight(st, now) for st in group]
            else:
                weights = [pol.ramp(1.0, st.ramp_since, now, spec.slow_start) for st in group]
            total_weight = sum(weights)
            for st, weight in zip(group, weights, strict=True):
                shares[st.key] += part * weight / total_weight
        return shares, panic, stay

    def _make_plan(self, now: float) -> _Plan:
        """Layers (2) and (3) for the current host states: the candidate groups (one, or
        local and remote with the share that stays local), kept until a state changes
        (or, while a host ramps up, for PLAN_TTL seconds)."""
        spec = self.spec
        idle = self._idle
        if self.drained:
            healthy = [st for st in idle.values() if st.weight]
            failing = [st for st in self._overload.values() if st.weight]
        else:
            healthy = list(idle.values())
            failing = list(self._overload.values())
        total = len(healthy) + len(failing)
        panic = bool(spec.panic_threshold and total and len(healthy) / total < spec.panic_threshold)
        cands = healthy + failing if panic else healthy
        ring = cands is healthy and not self.drained  # rr may rotate §6's own idle ring
        share = 1.0
        local: list[HostState] = cands
        remote: list[HostState] = []
        if spec.zone_affinity and self.zone:
            zone = self.zone
            local_all = sum(st.zone == zone for st in healthy) + sum(
                st.zone == zone for st in failing
            )
            if local_all:
                local = [st for st in cands if st.zone == zone]
                remote = [st for st in cands if st.zone != zone]
                healthy_local = sum(not st.overloaded for st in local)
                share = pol.local_share(healthy_local, local_all, spec.zone_failover)
                ring = ring and not remote
        slow = spec.slow_start
        ramp_until = 0.0
        if slow > 0:
            ramp_until = max((st.ramp_since + slow for st in cands), default=0.0)
        groups: list[_Group] = []
        saved = self._swrr.scores
        old = self._plan
        if old is not None:  # the smooth-weighted scores carry over
            for keys_, _, _, scores_, _ in (old.local, old.remote):
                saved.update(zip(keys_, scores_, strict=True))
        for group in (local, remote):
            if spec.policy == "rr":
                weights = tuple(pol.ramp(100.0, st.ramp_since, now, slow) for st in group)
            else:
                weights = tuple(self.effective_weight(st, now) for st in group)
            keys = tuple(st.key for st in group)
            scores = [saved.get(k, 0.0) for k in keys]
            groups.append((keys, weights, group, scores, sum(weights)))
        self.panic = panic
        self.spill = share
        expires = now + PLAN_TTL if ramp_until > now else math.inf
        plan = _Plan(self._version, expires, panic, share, groups[0], groups[1], ring)
        plan.ramping = ramp_until > now
        self._plan = plan
        return plan

    def _choose(self, now: float, hkey: bytes | None) -> tuple[int, HostKey | None]:
        """get_host through the layers of DESIGN §13 (see the module docstring)."""
        if not self.hosts:
            return NOEXIST, None
        if self._overload_order:
            self.expire_overloads(now)
        over = self._overload
        if over:
            if self.access_cnt >= self.params.probe_num:
                # (1) §6: a probe is due; drained hosts are not probed, and with
                # probe_interval nor are hosts probed less than that long ago.
                interval = self.params.probe_interval
                for key, st in over.items():
                    if st.weight and (not interval or now - st.probed_at >= interval):
                        over.move_to_end(key)
                        st.probed_at = now
                        self.access_cnt = 0
                        self.tally.probes += 1
                        if self.explain_until:
                            self._record(now, key, "probe (every probe_num-th request)")
                        return SUCC, key
            else:
                self.access_cnt += 1
        plan = self._plan
        if plan is None or plan.version != self._version or now >= plan.expires:
            plan = self._make_plan(now)
        # (3) zone affinity: local or remote
        group = plan.local
        where = ""
        position = None
        if plan.remote[0]:
            if hkey is not None:
                position = pol.key_position(hkey)
                stay = pol.stays_local(position, plan.share)
            else:
                stay = self._spill.stay(plan.share)
            if not stay or not group[0]:
                group = plan.remote
                where = "zone: spill; " if group is plan.remote and plan.local[0] else ""
                if not plan.local[0]:
                    where = "zone: spill (no healthy local host); "
            elif plan.share < 1.0:
                where = f"zone: local ({plan.share:.0%} stay); "
        keys, weights, states, scores, total = group
        if not keys:
            if self.explain_until:
                self._record(now, None, "overload: no idle host")
            return OVERLOAD, None
        # (4) the policy
        name = self.spec.policy
        if name == "rr" and not plan.ramping:
            if plan.ring:
                idle = self._idle
                key, st = idle.popitem(last=False)  # §6's own ring: the same order
                idle[key] = st
            else:
                self._rr += 1
                key = keys[self._rr % len(keys)]
            if self.explain_until:
                self._record(now, key, self._why(plan, where) + "rr")
            return SUCC, key
        if name == "p2c":
            n = len(keys)
            if n == 1:
                i = a = b = 0
            else:
                rand = self.rng.random
                a = int(rand() * n)
                b = int(rand() * (n - 1))
                if b >= a:
                    b += 1
                ea, eb = states[a].latency, states[b].latency
                la, lb = ea.value, eb.value
                if la is not None and lb is not None:
                    # PeakEwma.cost of both, compared: each value decays by
                    # exp((at - now) / TAU), so only the older sample's lag behind the
                    # newer one matters (one exp, none when both are as old).
                    lag = ea.at - eb.at
                    if lag > 0:
                        lb *= math.exp(-lag / pol.TAU)
                    elif lag < 0:
                        la *= math.exp(lag / pol.TAU)
                else:  # unknown: the candidates' mean
                    la, lb = ea.cost(now), eb.cost(now)
                    mean = _mean_latency(states, now)
                    la = mean if la is None else la
                    lb = mean if lb is None else lb
                i = a
                if la is None or lb is None:
                    if weights[b] > weights[a]:
                        i = b
                elif lb / weights[b] < la / weights[a]:
                    i = b
            if self.explain_until:
                why = f"p2c: {_ms(states[a].latency.value)} vs {_ms(states[b].latency.value)}"
                self._record(now, keys[i], self._why(plan, where) + why)
            return SUCC, keys[i]
        if name == "hash" and hkey is not None:
            if position is None:
                position = pol.key_position(hkey)
            i = self._ring.lookup(keys, weights, position)
            if self.explain_until:
                self._record(now, keys[i], self._why(plan, where) + "hash")
            return SUCC, keys[i]
        i = pol.swrr_pick(scores, weights, total)
        if self.explain_until:
            label = "weighted" if name == "weighted" else f"{name} (slow start)"
            if name == "hash":
                label = "hash: no key, weighted round robin"
            self._record(now, keys[i], self._why(plan, where) + label)
        return SUCC, keys[i]

    @staticmethod
    def _why(plan: _Plan, where: str) -> str:
        return ("panic: all hosts serve; " if plan.panic else "") + where

    # --- reporter statistics ---------------------------------------------------------------

    @property
    def stats_in_flight(self) -> bool:
        """True while a statistics send awaits its acknowledgement."""
        return self._in_flight is not None

    @property
    def has_unsent_stats(self) -> bool:
        """True if some counts are neither sent nor in flight."""
        return self.stats_pending or any(st.stat_succ or st.stat_err for st in self._retired)

    def take_stats(self) -> list[StatLine]:
        """Mark every host's counts since the last send as in flight and return them.

        One line per host: a host removed from the route and added back before its counts
        were sent has two states (the retired one and the current one); their counts are
        summed on one line, which carries the current state. Returns an empty list while a
        previous send is unacknowledged or nothing happened. Follow with :meth:`stats_sent`
        once the reporter acknowledges, or :meth:`stats_failed` if the send is lost.
        """
        if self._in_flight is not None:
            return []
        lines: dict[HostKey, StatLine] = {}
        states: list[HostState] = []
        for st in (*self.hosts.values(), *self._retired):  # current states first
            if st.stat_succ or st.stat_err:
                st.flight_succ, st.flight_err = st.stat_succ, st.stat_err
                st.stat_succ = st.stat_err = 0
                states.append(st)
                first, succ, err = lines.get(st.key, (st, 0, 0))
                lines[st.key] = (first, succ + st.flight_succ, err + st.flight_err)
        self.stats_pending = False
        if states:
            self._in_flight = states
        return list(lines.values())

    def stats_sent(self) -> None:
        """The in-flight counts are stored: forget them."""
        for st in self._in_flight or ():
            st.flight_succ = st.flight_err = 0
        self._in_flight = None
        self._retired = [st for st in self._retired if st.stat_succ or st.stat_err]

    def stats_failed(self) -> None:
        """The in-flight send was lost: put its counts back to be sent again."""
        for st in self._in_flight or ():
            st.stat_succ += st.flight_succ
            st.stat_err += st.flight_err
            st.flight_succ = st.flight_err = 0
            self.stats_pending = True
        self._in_flight = None

    @property
    def is_drained(self) -> bool:
        """True when no statistics are waiting to be sent or acknowledged."""
        return self._in_flight is None and not self.has_unsent_stats
