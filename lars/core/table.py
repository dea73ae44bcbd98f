"""The agent's module table: one load balancer per module, and the route lifecycle around it.

Pure: no I/O, no trio, the clock passed in. The agent role feeds it requests and DNS answers
and carries out what it asks for: the modules in :attr:`ModuleTable.want` are to be
requested from DNS, and the replies it returns are to be sent.

Rules (DESIGN §6, "Routes in the agent"):

* The first request for an unknown module creates it *pending* and asks DNS. The request
  waits up to ``route_wait`` seconds for the answer (it is a *waiter*); when the route
  arrives every waiter is answered from it, when the wait runs out they get NOEXIST.
  Later requests for a module still pending get NOEXIST at once. A module DNS does not
  answer within ``update_timeout`` stops being pending (its next use asks again), and at
  most ``MAX_PENDING`` modules are pending at once: past that, new ones get NOEXIST
  without asking DNS, so a flood of lookups for made-up modules costs bounded memory.
* A DNS answer adds new hosts as idle, keeps the state of hosts that stay and removes
  vanished hosts everywhere (see :mod:`lars.core.balancer`).
* An empty route drops the module. It is remembered as absent for ``update_timeout`` (the
  *negative cache*) so lookups of a missing module answer NOEXIST without asking DNS each
  time; a later push with hosts brings it back.
* A module whose route is older than ``update_timeout`` is requested again on its next use,
  and served from the cache meanwhile.
* A dropped module's balancer is kept aside until its call statistics are sent.

Statistics: a module enters :attr:`ModuleTable.stats_due` on its first report since its
counts were last taken, so a statistics send touches only the modules with calls, never
all of them (:meth:`ModuleTable.take_due`, :meth:`ModuleTable.collect_stats`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import attrs

from lars.core.balancer import NOEXIST, SUCC, BalancerParams, LoadBalancer, Tally
from lars.core.model import HostKey, HostMeta, ModuleKey, PolicySpec, format_host

#: Waiter kinds: the wire type ids of the requests that can wait.
GET_HOST = 4
GET_ROUTE = 7

#: Most modules one agent process tracks; beyond it new modules get NOEXIST.
MAX_MODULES = 200_000
#: Most absent modules remembered.
MAX_NEGATIVE = 100_000
#: Most requests waiting for one module's first route.
MAX_WAITERS = 1024
#: Most modules asked of DNS and not answered yet.
MAX_PENDING = 10_000


@attrs.frozen
class Waiter:
    """A request waiting for its module's first route: what it asked, who to answer."""

    kind: int
    seq: int
    address: Any
    #: The caller's key for the hash policy (GET_HOST).
    hkey: bytes | None = None


#: An answer to a waiter: (module, waiter, retcode, host for GET_HOST / hosts for GET_ROUTE).
Answer = tuple[ModuleKey, Waiter, int, Any]


def _nothing(waiter: Waiter) -> Any:
    """The payload of a NOEXIST answer: no host, or an empty route."""
    return None if waiter.kind == GET_HOST else ()


@attrs.define
class Pending:
    """A module asked for but not yet answered by DNS."""

    #: When its waiters get NOEXIST.
    deadline: float
    #: When the module stops being pending if DNS has not answered.
    gives_up: float
    waiters: list[Waiter] = attrs.field(factory=list)
    expired: bool = False


#: One module's lines in a statistics send: (host, successes, failures, overloaded).
StatsLine = tuple[HostKey, int, int, bool]


class ModuleTable:
    """Every module this agent serves. See the module docstring for the rules."""

    def __init__(
        self, params: BalancerParams, route_wait: float, max_modules: int = MAX_MODULES
    ) -> None:
        self.params = params
        #: The agent's zone (``[agent] zone``, set by the agent), and the policy of modules
        #: whose route brings none.
        self.zone = ""
        self.default_policy = params.policy_spec()
        self.route_wait = route_wait
        self.max_modules = max_modules
        #: Modules with a route, by key.
        self.modules: dict[ModuleKey, LoadBalancer] = {}
        #: Modules asked for and not answered yet, oldest first.
        self.pending: dict[ModuleKey, Pending] = {}
        # Pending modules whose waiters still wait, earliest deadline first (route_wait is
        # the same for all, so creation order is deadline order).
        self._waiting: OrderedDict[ModuleKey, Pending] = OrderedDict()
        # Pending modules in creation order, for giving up on them in O(1) each.
        self._by_age: OrderedDict[ModuleKey, Pending] = OrderedDict()
        #: Modules to request from DNS (the agent drains this set).
        self.want: set[ModuleKey] = set()
        #: Modules known absent, with the time the knowledge expires.
        self.negative: OrderedDict[ModuleKey, float] = OrderedDict()
        #: Balancers of dropped modules that still hold unsent statistics.
        self.draining: list[tuple[ModuleKey, LoadBalancer]] = []
        #: Modules with call counts to send (reported since their counts were last taken).
        self.stats_due: dict[ModuleKey, LoadBalancer] = {}
        self._refreshing: set[ModuleKey] = set()
        #: Counts for the metrics, shared by every balancer.
        self.tally = Tally()
        #: Requests answered, by return code: get_host (SUCC, OVERLOAD, -, NOEXIST) and
        #: get_route (SUCC, -, -, NOEXIST); reports by outcome (failure, success).
        self.get_host_answers = [0, 0, 0, 0]
        self.get_route_answers = [0, 0, 0, 0]
        self.reports = [0, 0]

    # --- requests --------------------------------------------------------------------------

    def get_host(
        self,
        key: ModuleKey,
        now: float,
        seq: int = 0,
        address: Any = None,
        hkey: bytes | None = None,
    ) -> tuple[int, Any]:
        """``(retcode, host)`` now, or ``(-1, None)`` when the request (``seq`` from
        ``address``) was queued to wait for the module's route. Without an address it never
        waits. ``hkey`` is the caller's key for the hash policy."""
        lb = self.modules.get(key)
        if lb is not None:
            if lb.needs_update(now):
                self._refresh(key)
            answer = lb.get_host(now, hkey)
        else:
            answer = self._absent(key, now, GET_HOST, seq, address, hkey)
            if answer[0] < 0:
                return answer  # counted when answered
        self.get_host_answers[answer[0]] += 1
        return answer

    def get_route(
        self, key: ModuleKey, now: float, seq: int = 0, address: Any = None
    ) -> tuple[int, Any]:
        """``(SUCC, hosts)``, ``(NOEXIST, ())``, or ``(-1, None)`` when queued to wait (as
        :meth:`get_host`)."""
        lb = self.modules.get(key)
        if lb is not None:
            if lb.needs_update(now):
                self._refresh(key)
            answer: tuple[int, Any] = (SUCC, lb.route())
        else:
            answer = self._absent(key, now, GET_ROUTE, seq, address)
            if answer[0] < 0:
                return answer  # counted when answered
        self.get_route_answers[answer[0]] += 1
        return answer

    def report(
        self,
        key: ModuleKey,
        host: HostKey,
        success: bool,
        now: float,
        latency: float | None = None,
    ) -> None:
        """Record a call result (``latency``: the call's seconds, if known); unknown
        modules and hosts are ignored."""
        self.reports[success] += 1
        lb = self.modules.get(key)
        if lb is not None:
            if not lb.stats_pending:
                self.stats_due[key] = lb
            lb.report(host, success, now, latency)

    def _refresh(self, key: ModuleKey) -> None:
        if key not in self._refreshing:
            self._refreshing.add(key)
            self.want.add(key)

    def _absent(
        self,
        key: ModuleKey,
        now: float,
        kind: int,
        seq: int,
        address: Any,
        hkey: bytes | None = None,
    ) -> tuple[int, Any]:
        expires = self.negative.get(key)
        if expires is not None:
            if now < expires:
                return NOEXIST, None
            del self.negative[key]
        pending = self.pending.get(key)
        if pending is None:
            if (
                len(self.pending) >= MAX_PENDING
                or len(self.modules) + len(self.pending) >= self.max_modules
            ):
                return NOEXIST, None
            pending = Pending(now + self.route_wait, now + self.params.update_timeout)
            self.pending[key] = self._by_age[key] = pending
            self.want.add(key)
            if self.route_wait <= 0:
                pending.expired = True
            else:
                self._waiting[key] = pending
        if address is None or pending.expired or len(pending.waiters) >= MAX_WAITERS:
            return NOEXIST, None
        pending.waiters.append(Waiter(kind, seq, address, hkey))
        return -1, None

    def expire_waits(self, now: float) -> list[Answer]:
        """Answer NOEXIST to waiters whose ``route_wait`` ran out, and stop waiting for DNS
        to answer modules pending for ``update_timeout``. O(1) per expiry."""
        answers: list[Answer] = []
        waiting = self._waiting
        while waiting:
            key, pending = next(iter(waiting.items()))
            if now < pending.deadline:
                break
            del waiting[key]
            pending.expired = True
            answers += [(key, w, NOEXIST, _nothing(w)) for w in pending.waiters]
            pending.waiters = []
        by_age = self._by_age
        while by_age:
            key, pending = next(iter(by_age.items()))
            if now < pending.gives_up:
                break
            self._forget_pending(key)
            self.want.discard(key)
        return self._counted(answers)

    def next_deadline(self) -> float | None:
        """When :meth:`expire_waits` next has something to do, if ever."""
        times = []
        if self._waiting:
            times.append(next(iter(self._waiting.values())).deadline)
        if self._by_age:
            times.append(next(iter(self._by_age.values())).gives_up)
        return min(times, default=None)

    def _forget_pending(self, key: ModuleKey) -> Pending | None:
        pending = self.pending.pop(key, None)
        if pending is not None:
            self._waiting.pop(key, None)
            self._by_age.pop(key, None)
        return pending

    # --- routes from DNS -------------------------------------------------------------------

    def apply_route(
        self,
        key: ModuleKey,
        hosts: Iterable[HostKey],
        now: float,
        meta: Mapping[HostKey, HostMeta] | None = None,
        policy: PolicySpec | None = None,
        demoted: Collection[HostKey] = (),
    ) -> list[Answer]:
        """Apply a DNS answer or push; returns the answers for the module's waiters.
        ``meta`` gives hosts' weights and zones (None, or a host missing: the defaults);
        ``policy`` the module's policy (None: the agent's ``[agent.loadbalance]``);
        ``demoted`` the hosts the fleet view demotes (DESIGN §14)."""
        return self._counted(self._apply_route(key, tuple(hosts), now, meta, policy, demoted))

    def _counted(self, answers: list[Answer]) -> list[Answer]:
        """Count answers to waiters like direct ones."""
        for _, waiter, retcode, _ in answers:
            counts = self.get_host_answers if waiter.kind == GET_HOST else self.get_route_answers
            counts[retcode] += 1
        return answers

    def _apply_route(
        self,
        key: ModuleKey,
        hosts: tuple[HostKey, ...],
        now: float,
        meta: Mapping[HostKey, HostMeta] | None = None,
        policy: PolicySpec | None = None,
        demoted: Collection[HostKey] = (),
    ) -> list[Answer]:
        self._refreshing.discard(key)
        pending = self._forget_pending(key)
        waiters = pending.waiters if pending is not None else []
        if not hosts:
            self._drop(key, now)
            return [(key, w, NOEXIST, _nothing(w)) for w in waiters]
        lb = self.modules.get(key)
        if lb is None:
            if len(self.modules) >= self.max_modules:
                return [(key, w, NOEXIST, _nothing(w)) for w in waiters]
            lb = self.modules[key] = LoadBalancer(self.params, self.tally)
            self.negative.pop(key, None)
        lb.update_route(hosts, now, frozenset(demoted) if demoted else ())
        lb.set_policy(policy if policy is not None else self.default_policy, meta, self.zone)
        answers: list[Answer] = []
        for w in waiters:
            if w.kind == GET_HOST:
                retcode, host = lb.get_host(now, w.hkey)
                answers.append((key, w, retcode, host))
            else:
                answers.append((key, w, SUCC, lb.route()))
        return answers

    def _drop(self, key: ModuleKey, now: float) -> None:
        lb = self.modules.pop(key, None)
        if lb is not None:
            self.stats_due.pop(key, None)
            lb.update_route((), now)  # hosts leave every structure; unsent stats retire
            if not lb.is_drained:
                self.draining.append((key, lb))
        self.negative[key] = now + self.params.update_timeout
        self.negative.move_to_end(key)
        while len(self.negative) > MAX_NEGATIVE:
            self.negative.popitem(last=False)

    def known(self) -> list[ModuleKey]:
        """Every module to (re)request from DNS after connecting: served and pending."""
        return [*self.modules, *self.pending]

    def dns_unavailable(self) -> None:
        """DNS is gone: answers to outstanding refreshes will not come."""
        self._refreshing.clear()

    # --- statistics --------------------------------------------------------------------------

    def take_due(self) -> Iterator[tuple[ModuleKey, LoadBalancer]]:
        """The modules whose counts are to be sent: those with reports since their counts
        were last taken, then dropped modules still holding counts. Empties
        :attr:`stats_due` in O(1): the iterator runs over what it held, which nothing
        else touches, so it may be consumed without the table's lock. Pass it to
        :meth:`collect_stats` in slices so that no single call holds a lock for long."""
        due, self.stats_due = self.stats_due, {}
        return itertools.chain(due.items(), list(self.draining))

    def collect_stats(
        self, due: Iterable[tuple[ModuleKey, LoadBalancer]]
    ) -> list[tuple[ModuleKey, LoadBalancer, list[StatsLine]]]:
        """Take the unsent counts of ``due`` modules; they are in flight until
        :meth:`stats_done`. A module whose previous send is still in flight yields nothing
        now and is due again when that send is done."""
        out = []
        for key, lb in due:
            lines = lb.take_stats()
            if lines:
                out.append((key, lb, [(st.key, s, e, st.overloaded) for st, s, e in lines]))
        return out

    def stats_done(self, key: ModuleKey, lb: LoadBalancer, stored: bool) -> None:
        """The reporter stored a module's in-flight counts (``stored``), or the send was
        lost and they are to be sent again."""
        if stored:
            lb.stats_sent()
        else:
            lb.stats_failed()
        if lb.has_unsent_stats and self.modules.get(key) is lb:
            self.stats_due[key] = lb

    def requeue(self, due: Iterable[tuple[ModuleKey, LoadBalancer]]) -> None:
        """Make modules from :meth:`take_due` due again (their counts were not taken)."""
        for key, lb in due:
            if self.modules.get(key) is lb:
                self.stats_due[key] = lb

    def stats_settled(self) -> bool:
        """True when no counts wait to be sent (in-flight sends are the caller's)."""
        return not any(lb.has_unsent_stats for _, lb in (*self.stats_due.items(), *self.draining))

    def forget_drained(self) -> None:
        """Let go of dropped modules whose statistics are all sent."""
        self.draining = [(k, lb) for k, lb in self.draining if not lb.is_drained]

    # --- introspection ---------------------------------------------------------------------

    def describe(
        self,
        key: ModuleKey,
        now: float,
        wall_now: float,
        offset: int = 0,
        limit: int | None = None,
        explain: bool = False,
    ) -> dict[str, Any] | None:
        """The module's state for ``lars query`` (times as epoch seconds), or None.

        ``hosts`` holds the hosts from ``offset`` on (at most ``limit``), sorted by address
        so that pages of one route line up; ``host_count`` is the number of all of them.
        With ``explain`` (``lars query --explain``) it adds the scheduling: the policy in
        force, the agent's zone, whether panic and zone spill are on, and per host its
        weight, zone, expected share, peak-EWMA latency and the rule that last overloaded
        it and when; the first page adds the last choices and their reasons. Asking starts the
        recording of choices for the next minute (before it, nothing is recorded).
        """

        def wall(t: float | None) -> float | None:
            return None if t is None else wall_now - (now - t)

        lb = self.modules.get(key)
        if lb is None:
            if key in self.pending:
                return {"status": "pending", "last_update": None, "host_count": 0, "hosts": []}
            return None
        end = None if limit is None else offset + limit
        page = [lb.hosts[k] for k in sorted(lb.hosts)[offset:end]]
        hosts = [
            {
                "host": format_host(st.key),
                "state": "overload" if st.overloaded else "idle",
                "since": wall(st.since),
                "vsucc": st.vsucc,
                "verr": st.verr,
                "rsucc": st.rsucc,
                "rerr": st.rerr,
                "contin_succ": st.contin_succ,
                "contin_err": st.contin_err,
                "demoted": st.demoted,
            }
            for st in page
        ]
        state: dict[str, Any] = {
            "status": "ready",
            "last_update": wall(lb.last_update),
            "host_count": len(lb.hosts),
            "hosts": hosts,
        }
        if explain:
            lb.explain(now)
            shares, panic, stay = lb.plan(now)
            for line, st in zip(hosts, page, strict=True):
                latency = st.latency.value
                line.update(
                    weight=st.weight,
                    effective_weight=round(lb.effective_weight(st, now), 2),
                    zone=st.zone,
                    share=round(shares.get(st.key, 0.0), 4),
                    latency_ms=None if latency is None else round(latency * 1000, 3),
                    overload_rule=st.reason or None,
                    overloaded_at=wall(st.overload_since) if st.reason else None,
                )
            spec = lb.spec
            state.update(
                policy=dict(spec._asdict()),
                agent_zone=lb.zone,
                panic=panic,
                zone_spill=round(1.0 - stay, 4),
                drained=lb.drained,
            )
            if offset == 0:
                state["choices"] = [
                    {
                        "at": wall(at),
                        "host": None if host is None else format_host(host),
                        "reason": reason,
                    }
                    for at, host, reason in lb.choices
                ]
        return state
