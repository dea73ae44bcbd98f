"""Scheduling policies (DESIGN §13): which of a module's healthy hosts serves. Pure: no I/O,
the clock is passed in, randomness comes from a ``random.Random`` the caller owns.

The load balancer (:mod:`lars.core.balancer`) decides with §6 which hosts are idle and
overloaded and when a probe is due, applies the panic threshold and zone affinity, and
hands the remaining candidates to one of the pickers here:

``rr``
    The §6 round robin (kept in the balancer itself: it rotates the idle ring).
``weighted``
    :class:`SmoothWeighted`: smooth weighted round robin (nginx's): every pick adds each
    candidate's weight to its running score, takes the highest and subtracts the total from
    it. Over any run of picks each host's share is within one pick of its weight's share.
``p2c``
    :class:`PeakEwma` + :func:`p2c_pick`: two distinct random candidates, the one with the
    lower cost wins; cost = peak-EWMA latency / effective weight. A latency sample above
    the average replaces it at once (the peak), samples below pull it down with a decay of
    ``tau`` (10 s), and time without samples decays it towards 0. A host without samples
    costs the mean latency of the candidates that have some; if none has any, the higher
    weight wins (the first drawn on a tie).
``hash``
    :class:`HashRing`: consistent hashing of the caller's key on a ring with
    ``VNODES * weight / 100`` points per host (at most ``VNODES_MAX``), each host's points
    fixed by its address alone; only the keys of a host that leaves the candidates move.
    A request without a key takes the round robin.

Helpers for the layers around the pickers: :func:`ramp` (slow start) and
:func:`local_share` (zone failover).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Container, Sequence

from lars.core.model import HostKey

#: Seconds of the peak-EWMA latency decay.
TAU = 10.0
#: Share of its weight a host has when its slow start begins.
SLOW_START_FLOOR = 0.1
#: Ring points of a host of the default weight (100), and the most any host gets.
VNODES = 1024
VNODES_MAX = 4096
#: Ring positions are 64-bit.
_RING = 1 << 64


def ramp(weight: float, since: float, now: float, slow_start: float) -> float:
    """A host's effective weight ``slow_start`` seconds into its ramp from ``since``: from
    SLOW_START_FLOOR of ``weight`` up to all of it, linearly (all of it when off)."""
    if slow_start <= 0:
        return weight
    age = now - since
    if age >= slow_start:
        return weight
    if age <= 0:
        return weight * SLOW_START_FLOOR
    return weight * (SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * age / slow_start)


def local_share(healthy_local: int, local: int, failover: float) -> float:
    """The share of traffic that stays in the agent's zone (DESIGN §13): all of it while the
    zone's healthy share h = healthy_local / local is at least ``failover``, else
    h / failover (none when h = 0). A zone without hosts keeps nothing."""
    if local <= 0 or healthy_local <= 0:
        return 0.0
    h = healthy_local / local
    if h >= failover or failover <= 0:
        return 1.0
    return h / failover


class Spill:
    """Splits a stream of picks between the local zone and the others in a given share,
    deterministically (error diffusion): after n picks, local ones are within one of
    ``n * share``."""

    __slots__ = ("credit",)

    def __init__(self) -> None:
        self.credit = 0.0

    def stay(self, share: float) -> bool:
        """True if this pick stays local."""
        if share >= 1.0:
            return True
        if share <= 0.0:
            return False
        self.credit += share
        if self.credit >= 1.0:
            self.credit -= 1.0
            return True
        return False


_positions: dict[bytes, int] = {}
#: Most key positions remembered (a dict lookup is cheaper than hashing again).
POSITIONS_KEPT = 1 << 16


def key_position(key: bytes) -> int:
    """A caller key's position on the hash ring (64 bits, stable across processes)."""
    position = _positions.get(key)
    if position is None:
        if len(_positions) >= POSITIONS_KEPT:
            _positions.clear()
        position = _positions[key] = int.from_bytes(
            hashlib.blake2b(key, digest_size=8).digest(), "big"
        )
    return position


def stays_local(position: int, share: float) -> bool:
    """Zone failover for a hashed key: the same keys stay local as long as the share does,
    and a falling share sends away the keys with the highest positions first."""
    return position < share * _RING


# --- weighted --------------------------------------------------------------------------------


class SmoothWeighted:
    """Smooth weighted round robin over the candidates given to each :meth:`pick`."""

    __slots__ = ("scores",)

    def __init__(self) -> None:
        self.scores: dict[HostKey, float] = {}

    def pick(self, keys: Sequence[HostKey], weights: Sequence[float]) -> int:
        """The index of the chosen candidate (weights > 0, at least one candidate)."""
        scores = self.scores
        total = 0.0
        best = -1
        best_score = -math.inf
        for i, key in enumerate(keys):
            weight = weights[i]
            score = scores.get(key, 0.0) + weight
            scores[key] = score
            total += weight
            if score > best_score:
                best, best_score = i, score
        scores[keys[best]] = best_score - total
        return best

    def forget(self, keep: Container[HostKey]) -> None:
        """Drop the scores of hosts no longer in the route."""
        for key in [k for k in self.scores if k not in keep]:
            del self.scores[key]


def swrr_pick(scores: list[float], weights: Sequence[float], total: float) -> int:
    """:meth:`SmoothWeighted.pick` on scores kept in a list parallel to the weights
    (``total`` their sum): the balancer's form, without a dict lookup per candidate."""
    best = 0
    best_score = -math.inf
    for i, weight in enumerate(weights):
        score = scores[i] + weight
        scores[i] = score
        if score > best_score:
            best, best_score = i, score
    scores[best] = best_score - total
    return best


# --- p2c -------------------------------------------------------------------------------------


class PeakEwma:
    """Peak-EWMA latency of one host (seconds); ``value`` is None until a sample arrives."""

    __slots__ = ("at", "value")

    def __init__(self) -> None:
        self.value: float | None = None
        self.at = 0.0

    def observe(self, sample: float, now: float, tau: float = TAU) -> None:
        """Add one latency sample taken at ``now``."""
        value = self.value
        if value is None or sample >= value:
            self.value = sample
        else:
            w = math.exp(-max(now - self.at, 0.0) / tau)
            self.value = value * w + sample * (1.0 - w)
        self.at = now

    def cost(self, now: float, tau: float = TAU) -> float | None:
        """The value as of ``now``: it decays towards 0 while no sample comes (as if
        each instant without a call were a fast one), so a host that lost the
        comparisons for a while gets tried again instead of starving on one old peak."""
        value = self.value
        if value is None:
            return None
        return value * math.exp(-max(now - self.at, 0.0) / tau)


def p2c_pick(
    costs: Sequence[float | None], weights: Sequence[float], rng: random.Random
) -> tuple[int, int, int]:
    """Power of two choices: ``(chosen, first, second)`` indexes. Cost = latency / weight;
    unknown latency = the mean of the known ones among all candidates (DESIGN §13; none
    known: the higher weight; equal costs: the first).
    The balancer inlines this (LoadBalancer._choose), with PeakEwma.cost as the latency."""
    n = len(costs)
    if n == 1:
        return 0, 0, 0
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    if b >= a:
        b += 1
    la, lb = costs[a], costs[b]
    if la is None or lb is None:
        known = [c for c in costs if c is not None]
        mean = sum(known) / len(known) if known else None
        la = mean if la is None else la
        lb = mean if lb is None else lb
    if la is None or lb is None:
        return (b if weights[b] > weights[a] else a), a, b
    ca = la / weights[a]
    cb = lb / weights[b]
    return (b if cb < ca else a), a, b


# --- hash ------------------------------------------------------------------------------------


def vnodes(weight: float) -> int:
    """Ring points of a host of ``weight`` (> 0)."""
    return max(1, min(VNODES_MAX, round(VNODES * weight / 100)))


def _points(key: HostKey, count: int) -> list[int]:
    seed = hashlib.blake2b(f"{key[0]}:{key[1]}".encode(), digest_size=16).digest()
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(count)]


class HashRing:
    """Consistent hashing over the candidates of each lookup; the ring of the last
    candidate set is kept, and each host's points are kept while it has the same count."""

    __slots__ = ("_keys", "_owners", "_points", "_vnodes", "_weights")

    def __init__(self) -> None:
        self._vnodes: dict[HostKey, tuple[int, list[int]]] = {}
        self._keys: Sequence[HostKey] = ()
        self._weights: Sequence[float] = ()
        self._points: list[int] = []
        self._owners: list[int] = []

    def lookup(self, keys: Sequence[HostKey], weights: Sequence[float], position: int) -> int:
        """The index in ``keys`` of the host owning ``position`` (at least one candidate)."""
        if (keys is not self._keys or weights is not self._weights) and (
            tuple(keys) != tuple(self._keys) or tuple(weights) != tuple(self._weights)
        ):
            self._build(keys, weights)
        self._keys, self._weights = keys, weights
        points = self._points
        i = bisect.bisect_left(points, position)
        if i == len(points):
            i = 0
        return self._owners[i]

    def _build(self, keys: Sequence[HostKey], weights: Sequence[float]) -> None:
        cache = self._vnodes
        merged: list[tuple[int, int]] = []
        for index, key in enumerate(keys):
            count = vnodes(weights[index])
            cached = cache.get(key)
            if cached is None or cached[0] != count:
                cached = cache[key] = (count, _points(key, count))
            merged += [(p, index) for p in cached[1]]
        merged.sort()
        self._points = [p for p, _ in merged]
        self._owners = [i for _, i in merged]

    def forget(self, keep: Container[HostKey]) -> None:
        """Drop the cached points of hosts no longer in the route."""
        for key in [k for k in self._vnodes if k not in keep]:
            del self._vnodes[key]
