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

from collections import OrderedDict
from collections.abc import Iterable, Iterator

import attrs

from lars.core.model import HostKey

# Return codes of get_host (the same numbers as on the wire).
SUCC = 0
OVERLOAD = 1
NOEXIST = 3


def _count(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{attr.name} must be a whole number >= 0, got {value!r}")


def _rate(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attr.name} must be between 0 and 1, got {value!r}")


def _seconds(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be greater than 0, got {value!r}")


@attrs.frozen
class BalancerParams:
    """``[agent.loadbalance]``: the load balancer's thresholds (original Lars defaults)."""

    probe_num: int = attrs.field(default=10, validator=_count)
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


class HostState:
    """The balancer's view of one host. Mutable; owned by one :class:`LoadBalancer`."""

    __slots__ = (
        "contin_err",
        "contin_succ",
        "flight_err",
        "flight_succ",
        "idle_since",
        "key",
        "overload_since",
        "overloaded",
        "rerr",
        "rsucc",
        "stat_err",
        "stat_succ",
        "verr",
        "vsucc",
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
        # Reporter statistics: counted since the last send / sent and not yet acknowledged.
        self.stat_succ = 0
        self.stat_err = 0
        self.flight_succ = 0
        self.flight_err = 0

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
        self.to_overload = {"err_rate": 0, "contin_err": 0, "window": 0}
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
            del self._overload[st.key]
            del self._overload_order[st.key]
            self._idle[st.key] = st
            st.overloaded = False
            self.tally.overloaded -= 1
            if reason is not None:
                self.tally.to_idle[reason] += 1
        st.vsucc = self.params.init_succ_cnt
        st.verr = 0
        st.rsucc = st.rerr = 0
        st.contin_succ = st.contin_err = 0
        st.idle_since = now

    def _become_overloaded(self, st: HostState, now: float, reason: str) -> None:
        if not st.overloaded:
            del self._idle[st.key]
            self._overload[st.key] = st
            self._overload_order[st.key] = st
            st.overloaded = True
            self.tally.overloaded += 1
            self.tally.to_overload[reason] += 1
        st.vsucc = 0
        st.verr = self.params.init_err_cnt
        st.rsucc = st.rerr = 0
        st.contin_succ = st.contin_err = 0
        st.overload_since = now

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

    def get_host(self, now: float) -> tuple[int, HostKey | None]:
        """Choose a host: ``(SUCC, host)``, ``(OVERLOAD, None)`` or ``(NOEXIST, None)``."""
        if not self.hosts:
            return NOEXIST, None
        if self._overload_order:
            self.expire_overloads(now)
        idle = self._idle
        if idle and not self._overload:
            ring = idle
        elif self.access_cnt >= self.params.probe_num:
            self.access_cnt = 0
            ring = self._overload
            self.tally.probes += 1
        else:
            self.access_cnt += 1
            if not idle:
                return OVERLOAD, None
            ring = idle
        key, st = ring.popitem(last=False)
        ring[key] = st
        return SUCC, key

    def report(self, key: HostKey, success: bool, now: float) -> None:
        """Record the result of one call to ``key``; unknown hosts are ignored."""
        st = self.hosts.get(key)
        if st is None:
            return
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

    def update_route(self, keys: Iterable[HostKey], now: float) -> None:
        """Replace the route: add new hosts as idle, keep the rest, remove vanished hosts."""
        new = set(keys)
        hosts = self.hosts
        tally = self.tally
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
                tally.hosts += 1
        self.last_update = now

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
