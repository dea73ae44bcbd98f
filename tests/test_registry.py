"""lars.registry: the agent's registrations and their LeaseUpdates, with plain numbers."""

from __future__ import annotations

from collections import Counter

import pytest

from lars import wire
from lars.core.model import ip_to_int
from lars.errors import InvalidValue
from lars.registry import (
    HEARTBEAT_MAX,
    REPLY_TIMEOUT,
    RegistrationSpec,
    Registry,
    check_register_ip,
    drain_ms,
    registration_spec,
)

IP = ip_to_int("10.0.0.1")
SUCC = wire.RetCode.SUCC
BAD = wire.RetCode.BAD_REQUEST
SYSTEM = wire.RetCode.SYSTEM_ERROR
CLIENT = "client"  # where replies go: opaque to the registry


def request(seq: int, port: int = 7001, ttl: int = 3, weight: int = -1) -> wire.RegisterRequest:
    return wire.RegisterRequest(seq, 1, 1, IP, port, weight, None, ttl)


def registry(limit: int = 10) -> tuple[Registry, Counter[str]]:
    counts: Counter[str] = Counter()

    def count(name: str, n: int) -> None:
        counts[name] += n

    return Registry(limit, count=count), counts


def ok(update: wire.LeaseUpdate) -> wire.LeaseReply:
    return wire.LeaseReply(update.seq, SUCC, ())


def registered(reg: Registry, port: int = 7001, ttl: int = 3, now: float = 0.0) -> None:
    assert reg.register(request(port, port, ttl), IP, CLIENT, now) is None
    (update,) = reg.updates(now)
    answers = reg.replied(ok(update), now)
    assert [reply.retcode for _, reply in answers] == [SUCC]


# --- the rules of address and arguments ------------------------------------------------------


@pytest.mark.parametrize("ip", ["0.0.0.0", "255.255.255.255", "224.0.0.1", "239.255.255.255"])
def test_addresses_that_name_no_single_host_are_refused(ip: str) -> None:
    with pytest.raises(InvalidValue, match="cannot register address"):
        check_register_ip(ip_to_int(ip))


@pytest.mark.parametrize("ip", ["10.0.0.1", "127.0.0.1", "223.255.255.255", "240.0.0.1"])
def test_unicast_addresses_are_taken(ip: str) -> None:
    assert check_register_ip(ip_to_int(ip)) == ip_to_int(ip)


def test_a_registration_spec_in_wire_form() -> None:
    assert registration_spec(1, 2, 7001) == RegistrationSpec(1, 2, 0, 7001, -1, None, 10)
    spec = registration_spec(1, 2, 7001, "10.0.0.1", 0, "eu", 60)
    assert spec == RegistrationSpec(1, 2, IP, 7001, 0, "eu", 60)
    assert spec.describe() == "10.0.0.1:7001 for module 1/2"
    assert registration_spec(1, 2, 7001).describe() == "port 7001 for module 1/2"
    with pytest.raises(InvalidValue, match="ip must be"):
        registration_spec(1, 2, 7001, IP)


def test_drains_are_seconds_up_to_an_hour() -> None:
    assert (drain_ms(0), drain_ms(2.5), drain_ms(3600)) == (0, 2500, 3_600_000)
    for bad in (-0.1, 3600.5, True, "1"):
        with pytest.raises(InvalidValue, match="drain"):
            drain_ms(bad)


# --- registering -----------------------------------------------------------------------------


def test_a_new_registration_waits_for_the_dns_and_a_renewal_does_not() -> None:
    reg, counts = registry()
    assert reg.register(request(1, weight=5), IP, CLIENT, 0.0) is None
    assert reg.has_updates
    (update,) = reg.updates(0.1)
    assert update.leases == (wire.Lease(1, 1, IP, 7001, 5, None, 3, 100),)
    assert not reg.has_updates  # in flight: not sent twice
    assert reg.register(request(1, weight=5), IP, CLIENT, 0.2) is None  # a resend
    assert reg.register(request(2, weight=5), IP, "other", 0.2) is None  # a second client
    answers = reg.replied(ok(update), 0.3)
    assert [(to, r.seq, r.retcode, r.ip) for to, r in answers] == [
        (CLIENT, 1, SUCC, IP),
        ("other", 2, SUCC, IP),
    ]
    reply = reg.register(request(3, weight=5), IP, CLIENT, 0.4)
    assert reply == wire.RegisterReply(3, SUCC, IP, "")
    assert counts == Counter(
        registrations_registered=1, registrations_renewed=1, lease_updates_sent=1
    )


def test_a_renewal_that_changes_the_weight_is_sent_at_once() -> None:
    reg, _ = registry()
    registered(reg)
    assert reg.register(request(9, weight=7), IP, CLIENT, 1.0) is not None
    (update,) = reg.updates(1.0)
    assert [(lease.weight, lease.age_ms) for lease in update.leases] == [(7, 0)]


def test_the_limit_counts_pending_and_held_and_renewals_still_go() -> None:
    reg, counts = registry(limit=2)
    registered(reg, 7001)
    assert reg.register(request(2, 7002), IP, CLIENT, 0.0) is None  # pending
    refusal = reg.register(request(3, 7003), IP, CLIENT, 0.0)
    assert refusal is not None and refusal.retcode == BAD and "limit" in refusal.reason
    renewal = reg.register(request(4, 7001), IP, CLIENT, 0.0)
    assert renewal is not None and renewal.retcode == SUCC
    assert counts["registrations_refused"] == 1
    off, _ = registry(limit=0)
    refusal = off.register(request(1), IP, CLIENT, 0.0)
    assert refusal is not None and "off" in refusal.reason


def test_bad_addresses_and_zones_are_refused_before_anything_is_held() -> None:
    reg, _ = registry()
    for ip in (0, 0xFFFF_FFFF, ip_to_int("230.1.1.1")):
        refusal = reg.register(request(1), ip, CLIENT, 0.0)
        assert refusal is not None and refusal.retcode == BAD
    bad_zone = wire.RegisterRequest(1, 1, 1, IP, 7001, -1, "tab\there", 3)
    refusal = reg.register(bad_zone, IP, CLIENT, 0.0)
    assert refusal is not None and "zone" in refusal.reason
    assert len(reg) == 0 and not reg.has_updates


# --- the DNS's answers -----------------------------------------------------------------------


def test_refused_items_get_the_dns_reason_and_the_others_are_taken() -> None:
    reg, _ = registry()
    for port in (7001, 7002):
        reg.register(request(port, port), IP, CLIENT, 0.0)
    (update,) = reg.updates(0.0)
    answers = reg.replied(wire.LeaseReply(update.seq, SUCC, ((1, "not this one"),)), 0.0)
    assert sorted((r.seq, r.retcode, r.reason) for _, r in answers) == [
        (7001, SUCC, ""),
        (7002, BAD, "the DNS refused: not this one"),
    ]
    assert len(reg) == 1


def test_a_store_outage_fails_new_ones_and_keeps_held_ones_for_the_next_heartbeat() -> None:
    reg, _ = registry()
    registered(reg, 7001)
    reg.register(request(2, 7002), IP, CLIENT, 0.5)
    reg.expire(HEARTBEAT_MAX)  # the heartbeat is due
    updates = reg.updates(HEARTBEAT_MAX)
    assert sorted(lease.port for u in updates for lease in u.leases) == [7001, 7002]
    answers = []
    for update in updates:
        answers += reg.replied(wire.LeaseReply(update.seq, SYSTEM, ()), 1.0)
    assert [(r.seq, r.retcode) for _, r in answers] == [(2, SYSTEM)]
    assert "store" in answers[0][1].reason
    assert len(reg) == 1  # 7001 is kept


def test_a_refused_heartbeat_forgets_the_registration() -> None:
    reg, counts = registry()
    registered(reg)
    reg.expire(HEARTBEAT_MAX)
    (update,) = reg.updates(HEARTBEAT_MAX)
    assert reg.replied(wire.LeaseReply(update.seq, SUCC, ((0, "gone"),)), 1.0) == []
    assert len(reg) == 0 and counts["registrations_refused"] == 1


def test_an_error_reply_refuses_the_whole_update() -> None:
    reg, _ = registry()
    reg.register(request(1, 7001), IP, CLIENT, 0.0)
    reg.register(request(2, 7002), IP, CLIENT, 0.0)
    (update,) = reg.updates(0.0)
    assert reg.expects(update.seq) and not reg.expects(0)
    answers = reg.replied(wire.ErrorReply(update.seq, BAD, "no leases here"), 0.0)
    assert [(r.retcode, r.reason) for _, r in answers] == [
        (BAD, "the DNS refused: no leases here")
    ] * 2
    assert len(reg) == 0


def test_a_late_reply_to_an_update_given_up_on_changes_nothing() -> None:
    reg, counts = registry()
    reg.register(request(1), IP, CLIENT, 0.0)
    (update,) = reg.updates(0.0)
    answers = reg.expire(REPLY_TIMEOUT)
    assert [(r.retcode, r.seq) for _, r in answers] == [(SYSTEM, 1)]
    assert "did not answer" in answers[0][1].reason
    assert reg.replied(ok(update), REPLY_TIMEOUT + 0.1) == []
    assert len(reg) == 0 and counts["lease_timeouts"] == 1


# --- heartbeats and expiry -------------------------------------------------------------------


def test_heartbeats_follow_the_shortest_ttl_and_carry_the_age() -> None:
    reg, _ = registry()
    registered(reg, 7001, ttl=30)
    assert reg.heartbeat_interval() == HEARTBEAT_MAX
    registered(reg, 7002, ttl=1, now=0.0)
    assert reg.heartbeat_interval() == pytest.approx(1 / 3)
    assert reg.next_deadline() == pytest.approx(1 / 3)
    reg.register(request(5, 7001, ttl=30), IP, CLIENT, 0.2)  # a renewal
    reg.expire(1 / 3)
    assert reg.has_updates
    (update,) = reg.updates(0.4)
    assert sorted((lease.port, lease.age_ms) for lease in update.leases) == [
        (7001, 200),
        (7002, 400),
    ]


def test_a_registration_not_renewed_for_its_ttl_is_forgotten() -> None:
    reg, counts = registry()
    registered(reg, ttl=1)
    assert reg.next_deadline() == pytest.approx(1 / 3)
    reg.expire(1.0)
    assert len(reg) == 1  # not yet: exactly the ttl
    reg.expire(1.01)
    assert len(reg) == 0 and counts["registrations_expired"] == 1
    assert reg.next_deadline() is None


def test_a_new_session_gets_everything_and_what_was_in_flight_again() -> None:
    reg, _ = registry()
    registered(reg, 7001)
    reg.register(request(2, 7002), IP, CLIENT, 0.0)
    reg.deregister(wire.DeregisterRequest(3, 1, 1, IP, 7003, 10), IP, CLIENT, 0.0)
    first = reg.updates(0.0)
    assert len(first) == 2
    reg.session_lost()
    reg.session_started()
    again = reg.updates(0.1)
    assert [u.drops for u in again] == [(wire.Drop(1, 1, IP, 7003, 10),), ()]
    assert sorted(lease.port for lease in again[1].leases) == [7001, 7002]


def test_updates_are_split_at_the_wire_limit() -> None:
    reg, _ = registry(limit=3000)
    for port in range(1, 2501):
        reg.register(request(port, port), IP, CLIENT, 0.0)
    updates = reg.updates(0.0)
    assert [len(u.leases) for u in updates] == [1024, 1024, 452]
    for update in updates:
        assert len(wire.encode_frame(update)) < wire.DEFAULT_MAX_FRAME


# --- deregistering ---------------------------------------------------------------------------


def test_a_deregistration_forgets_at_once_and_is_answered_after_the_dns() -> None:
    reg, counts = registry()
    registered(reg)
    drop = wire.DeregisterRequest(8, 1, 1, IP, 7001, 2500)
    assert reg.deregister(drop, IP, CLIENT, 1.0) == (None, [])
    assert len(reg) == 0
    (update,) = reg.updates(1.0)
    assert update.drops == (wire.Drop(1, 1, IP, 7001, 2500),) and update.leases == ()
    answers = reg.replied(ok(update), 1.1)
    assert [(r.seq, r.retcode) for _, r in answers] == [(8, SUCC)]
    assert counts["registrations_deregistered"] == 1


def test_drops_go_before_leases_so_the_later_request_wins() -> None:
    reg, _ = registry()
    registered(reg)
    reg.deregister(wire.DeregisterRequest(2, 1, 1, IP, 7001, 0), IP, CLIENT, 1.0)
    reg.register(request(3), IP, CLIENT, 1.0)
    kinds = ["drop" if u.drops else "lease" for u in reg.updates(1.0)]
    assert kinds == ["drop", "lease"]


def test_deregistering_a_registration_the_dns_has_not_taken_refuses_it() -> None:
    reg, _ = registry()
    reg.register(request(1), IP, CLIENT, 0.0)
    reply, answers = reg.deregister(wire.DeregisterRequest(2, 1, 1, IP, 7001, 0), IP, "x", 0.0)
    assert reply is None
    assert [(to, r.seq, r.retcode) for to, r in answers] == [(CLIENT, 1, BAD)]
