"""Fuzz soak: the attacks of the fuzz suite, in turn, against dns, reporter and agent for N minutes.

Starts the three daemons as separate ``lars run --role`` processes on a SQLite store in a
temporary directory, on free loopback ports, then runs every attack of
``tests/e2e/fuzzing.py`` (malformed, misshapen and out-of-range datagrams and frames, the agent
state query for a module of 2,000 hosts, floods of unknown modules, peers that never read,
crowds of stalled connections) round-robin until the time is up. After each batch the
attacked daemon must be alive, answer a correct request, stay under its memory bound and send
only well-formed replies; the others must be alive and within their bounds. A failure is
reported (what failed, the batch's seed and saved bytes, the exceptions in the daemon's log)
and the soak goes on,
with the daemon restarted if it died, stopped answering or passed its memory bound.

Prints one line every 10 s with each daemon's resident memory and the messages sent to it,
then a summary: messages sent, batches, crashes (must be 0) and other failures per daemon.
Exit status: 0 clean, 1 if a daemon died, 2 if one failed a check without dying. The
directory (logs, saved batches, ``failures.txt`` with each failure and the daemon's
traceback) is kept when something failed.

Runs after a plain ``pip install .`` (no pytest, no hypothesis); run it from the repository.

Usage: python benchmarks/fuzz_soak.py --minutes N [--seed S] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.fuzzing import ATTACKS, Daemon, DaemonFailure, Fleet

#: Seconds between two lines of the memory curve.
SAMPLE_INTERVAL = 10.0


class Tally:
    """What happened to one daemon during the soak."""

    def __init__(self) -> None:
        self.messages = 0
        self.batches = 0
        self.crashes = 0
        self.failures = 0
        self.rss: list[float] = []


async def soak(minutes: float, seed: str, workdir: Path) -> int:
    fleet = Fleet(workdir, seed)
    tallies = {name: Tally() for name in fleet.daemons}
    schedule = [(name, attack) for name, attacks in ATTACKS.items() for attack in attacks]
    started = time.monotonic()
    deadline = started + minutes * 60

    def sample() -> str:
        parts = []
        for name, daemon in fleet.daemons.items():
            tally = tallies[name]
            try:
                rss = daemon.memory()[0]
            except (AssertionError, OSError, KeyError):  # not running (or just exiting)
                parts.append(f"{name}   down    {tally.messages:>10,} msgs")
                continue
            tally.rss.append(rss)
            parts.append(f"{name} {rss:6.1f} MB {tally.messages:>10,} msgs")
        return f"{time.monotonic() - started:6.0f} s  " + "  |  ".join(parts)

    async def curve() -> None:
        while True:
            print(sample(), flush=True)
            await trio.sleep(SAMPLE_INTERVAL)

    async def record(daemon: Daemon, failure: DaemonFailure) -> None:
        tally = tallies[daemon.name]
        if failure.died:
            tally.crashes += 1
        else:
            tally.failures += 1
        with (workdir / "failures.txt").open("a") as out:
            out.write(f"{failure}\n\n")
        print(f"*** {failure.summary}", flush=True)
        if failure.broken:  # else it only sent bad replies: keep it, and its memory curve
            print(f"*** restarting the {daemon.name}", flush=True)
            await daemon.restart()

    async with fleet.running(*fleet.daemons):
        print(f"fuzz soak for {minutes:g} min, seed {seed!r}, files in {workdir}", flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(curve)
            index = 0
            while time.monotonic() < deadline:
                name, attack = schedule[index % len(schedule)]
                daemon = fleet[name]
                try:
                    batch = await fleet.run_batch(daemon, attack, index)
                except DaemonFailure as failure:
                    batch = failure.batch
                    await record(fleet[failure.daemon], failure)
                tallies[name].messages += batch.sent
                tallies[name].batches += 1
                index += 1
            nursery.cancel_scope.cancel()
        print(sample())

    heading = "RSS MB at the samples: first -> peak -> last"
    print(
        f"\n{'daemon':10} {'messages':>12} {'batches':>8} {'crashes':>8} {'failures':>9}  {heading}"
    )
    for name, t in tallies.items():
        rss = f"{t.rss[0]:.0f} -> peak {max(t.rss):.0f} -> {t.rss[-1]:.0f}" if t.rss else "-"
        print(f"{name:10} {t.messages:>12,} {t.batches:>8} {t.crashes:>8} {t.failures:>9}  {rss}")
    if any(t.crashes for t in tallies.values()):
        return 1
    return 2 if any(t.failures for t in tallies.values()) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long to run")
    parser.add_argument("--seed", default=None, help="seed of every batch (default: random)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    args = parser.parse_args()
    seed = args.seed or secrets.token_hex(4)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lars-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    status = trio.run(soak, args.minutes, seed, workdir)
    if status == 0 and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs and saved batches in {workdir}")
    sys.exit(status)


if __name__ == "__main__":
    main()
