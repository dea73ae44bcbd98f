"""Hostile input against real daemons: no datagram, frame or peer may crash one, stop it
answering, or grow its memory past a bound (issue 8, "How it is checked").

Each test starts the daemons it needs as separate ``lars run`` processes on free loopback
ports (see :mod:`tests.e2e.fuzzing`), throws batches of one kind of hostile input at one of
them, and after each batch checks that it is alive, answers a correct request, stayed under
its memory bound and sent only well-formed replies. A failure names the daemon, the input
(attack, batch, seed, the file its bytes were saved to) and ends with the daemon's traceback.

The batches are seeded: the same seed sends the same bytes. ``LARS_FUZZ_SEED=...`` runs the
suite with another seed; ``benchmarks/fuzz_soak.py`` runs the same attacks for minutes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lars import wire, wire_original
from lars.errors import ProtocolError
from tests import hostile
from tests.e2e.fuzzing import (
    Fleet,
    agent_big_state,
    agent_malformed,
    agent_misshapen,
    agent_original,
    agent_out_of_range,
    agent_unknown_modules,
    tcp_crowd,
    tcp_malformed,
    tcp_misshapen,
    tcp_never_read,
    tcp_original,
    tcp_out_of_range,
)

pytestmark = pytest.mark.e2e

SEED = os.environ.get("LARS_FUZZ_SEED", "lars-fuzz")


# --- the generators ------------------------------------------------------------------------


def test_a_seed_regenerates_its_batch() -> None:
    """What a failure report relies on: the seed it names sends the same bytes again."""
    for kind in hostile.KINDS:
        first = hostile.bodies(random.Random(f"{SEED}/{kind}"), (kind,), 200, 1 << 20)
        again = hostile.bodies(random.Random(f"{SEED}/{kind}"), (kind,), 200, 1 << 20)
        assert first == again


@pytest.mark.parametrize("kind", list(hostile.KINDS))
def test_the_decoders_raise_protocol_error_and_nothing_else(kind: str) -> None:
    """wire's contract, on the suite's own input and through every decoder a daemon uses: a
    body decodes to a message or raises ProtocolError; a valid one decodes."""
    rng = random.Random(f"{SEED}/decode/{kind}")
    for body in hostile.bodies(rng, (kind,), 500, 1 << 20):
        for decode in (wire.decode_datagram, wire.decode_agent_request, _decode_frame):
            try:
                decode(body)
            except ProtocolError as exc:
                assert kind != "valid", f"{body.hex()} did not decode: {exc}"


def _decode_frame(body: bytes) -> list[wire.Message]:
    decoder = wire.FrameDecoder()
    decoder.feed(hostile.frame(body))
    return list(decoder)


@pytest.mark.parametrize("kind", list(hostile.ORIGINAL_KINDS))
def test_the_original_decoders_raise_protocol_error_and_nothing_else(kind: str) -> None:
    """The same contract for the original Lars format, through every decoder a daemon uses on
    it: the datagram decoders (the agent's and the general one) and the TCP frame decoder."""
    rng = random.Random(f"{SEED}/decode/{kind}")
    for message in hostile.original_messages(rng, (kind,), 500):
        for decode in (
            wire_original.decode_datagram,
            wire_original.decode_agent_request,
            _decode_original_stream,
        ):
            try:
                decode(message)
            except ProtocolError as exc:
                agent_ids = (4, 6, 7)
                assert kind != "original_valid" or (
                    decode is wire_original.decode_agent_request and message[0] not in agent_ids
                ), f"{message.hex()} did not decode: {exc}"


def _decode_original_stream(message: bytes) -> list[wire.Message]:
    decoder = wire_original.FrameDecoder(1 << 20)
    decoder.feed(message)
    return list(decoder)


# --- the agent: datagrams on its UDP API ports ----------------------------------------------


async def test_agent_survives_malformed_datagrams(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns", "agent") as fleet:
        await fleet.run("agent", agent_malformed, batches=3)


async def test_agent_survives_misshapen_datagrams(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns", "agent") as fleet:
        await fleet.run("agent", agent_misshapen, batches=3)


async def test_agent_survives_values_out_of_range(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns", "agent") as fleet:
        await fleet.run("agent", agent_out_of_range, batches=3)


async def test_agent_survives_datagrams_in_the_original_format(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns", "agent") as fleet:
        await fleet.run("agent", agent_original, batches=2)


async def test_agent_answers_the_state_query_for_a_module_of_2000_hosts(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns", "agent") as fleet:
        await fleet.run("agent", agent_big_state, batches=1)


async def test_agent_survives_a_flood_of_unknown_modules(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns", "agent") as fleet:
        await fleet.run("agent", agent_unknown_modules, batches=2)


async def test_agent_survives_a_flood_of_unknown_modules_while_the_dns_is_down(
    tmp_path: Path,
) -> None:
    async with Fleet(tmp_path, SEED).running("agent") as fleet:
        [batch] = await fleet.run("agent", agent_unknown_modules, batches=1)
        await fleet["dns"].start()
        await fleet["agent"].check(batch, "within 10 s of the dns coming up", patience=10.0)


# --- the DNS: frames and peers on its TCP port ------------------------------------------------


async def test_dns_survives_malformed_frames(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns") as fleet:
        await fleet.run("dns", tcp_malformed, batches=2)


async def test_dns_survives_misshapen_frames(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns") as fleet:
        await fleet.run("dns", tcp_misshapen, batches=2)


async def test_dns_survives_values_out_of_range(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns") as fleet:
        await fleet.run("dns", tcp_out_of_range, batches=2)


async def test_dns_survives_frames_in_the_original_format(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns") as fleet:
        await fleet.run("dns", tcp_original, batches=2)


async def test_dns_survives_peers_that_never_read(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns") as fleet:
        await fleet.run("dns", tcp_never_read, batches=1)


async def test_dns_survives_a_crowd_of_stalled_peers(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("dns") as fleet:
        await fleet.run("dns", tcp_crowd, batches=1)


# --- the reporter: frames and peers on its TCP port -------------------------------------------


async def test_reporter_survives_malformed_frames(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("reporter") as fleet:
        await fleet.run("reporter", tcp_malformed, batches=2)


async def test_reporter_survives_misshapen_frames(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("reporter") as fleet:
        await fleet.run("reporter", tcp_misshapen, batches=2)


async def test_reporter_survives_values_out_of_range(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("reporter") as fleet:
        await fleet.run("reporter", tcp_out_of_range, batches=2)


async def test_reporter_survives_frames_in_the_original_format(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("reporter") as fleet:
        await fleet.run("reporter", tcp_original, batches=2)


async def test_reporter_survives_peers_that_never_read(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("reporter") as fleet:
        await fleet.run("reporter", tcp_never_read, batches=1)


async def test_reporter_survives_a_crowd_of_stalled_peers(tmp_path: Path) -> None:
    async with Fleet(tmp_path, SEED).running("reporter") as fleet:
        await fleet.run("reporter", tcp_crowd, batches=1)
