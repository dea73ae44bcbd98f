"""The reporter role: call statistics from agents into ``ServerCallStatus``.

Agents send one ``ReportStatusRequest`` per module and interval. Readers put each on a
bounded queue; when it is full they stop reading, TCP fills up, and the agents wait: memory
never grows with the load. A few writer tasks take up to ``batch_size`` host results at a
time and upsert them in one transaction (latest counts replace, totals add up); only after
the commit is each report acknowledged (``ReportStatusAck``). An agent keeps its counts
until acknowledged, so a reporter outage or crash loses nothing; at worst a report whose
ack was lost is stored twice.

Replies (acknowledgements, error replies, counters) wait in a per-connection outbox of at
most ``MAX_QUEUED_REPLY_BYTES``: a peer that lets more pile up is not reading, and its
connection is closed (counted in ``reply_overflows``, logged at a rate limit). Nothing is
lost: an agent sends again every report that was never acknowledged.

Before a batch is written, each row is checked against the integer ranges of the
``ServerCallStatus`` columns as the database declares them (read at the first write, after
an outage and every ``COLUMN_TYPES_MAX_AGE``): an original Lars schema has signed columns
that cannot hold ids above 2**31 - 1 or addresses such as 192.168.1.177, and SQLite holds
no count beyond 2**63 - 1. Such a row is dropped up front (logged at a rate limit, counted
in ``results_out_of_range``, its report acknowledged) and never fails the good rows of its
batch; ``lars db upgrade`` widens the columns.

Store errors: an unavailable store is retried with capped backoff (``retry_max``) for as
long as it takes; the queue and the agents hold the data meanwhile. Unavailable means
unreachable, missing tables, or a node that cannot take writes now (a Galera node out of
its cluster: 1047, 1180; a read-only server; a transaction still losing to deadlocks after
the store's own re-runs). Any other error is retried a few times, then the batch is written
report by report so that only the reports the store refuses are dropped, each logged and
counted, and acknowledged so the agent does not send them forever; a report that meets an
unavailable store on the way is held like a batch. No report is acknowledged before the
transaction holding its rows has committed.

A batch is counted once however often it is run: it draws a random token when formed and
keeps it through every re-run (the store's own after a failover, and the reporter's), and
its transaction stores the token first (``ReportBatch``). A COMMIT whose answer was lost
with its node (it may have gone through) is run again on the next node, finds its token,
and writes nothing. Tokens are deleted after ``BATCH_TOKEN_KEEP``.

Each batch also adds its calls to ``CallHistory`` (per module, host and minute, summed over
callers: :func:`history_of`) in the same transaction as its statistics, so an acknowledgement
still means both are stored, and a report stored twice counts twice in both. A background
task deletes the minutes older than ``history_retention`` every ``HISTORY_PURGE_INTERVAL``,
a chunk at a time; a store error there is logged and tried again next time.

Original Lars agents (``lars_lb_agent``) are served on the same port: the first bytes of a
connection tell its protocol (:func:`lars.wire_original.sniff_stream`). Their
ReportStatusRequests carry no seq and get no acknowledgement, and they mean something else:
see :class:`OriginalStatsLedger`, which turns them into the rows a Lars agent would have sent
for the same calls (the counts of the latest interval, added to the totals) before they join
the same queue and writers. A frame in the original format that does not decode is counted
and skipped; only a broken framing closes the connection.

Connections come through a :class:`lars.roles.common.ConnectionGate`, as the DNS's: at most
``max_connections`` with a reserve for admins, frame deadlines, and StatsRequests at most
``control_rate`` a second per connection. The time a reader waits for a full queue does not
count against its connection's frame deadline.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import attrs
import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lars import wire
from lars.config import ReporterConfig
from lars.core.model import UINT32_MAX, format_host, int_to_ip
from lars.errors import ProtocolError, SchemaMissing, StoreError, StoreUnavailable
from lars.roles.common import (
    ConnectionGate,
    Limits,
    Metrics,
    Outbox,
    RateLimitedLog,
    Session,
    backoff,
    bound_address,
    gate_metrics,
    open_listener,
    permitted,
    refuse,
    stream_decoder,
    write_loop,
)
from lars.roles.http import Observed, store_readiness
from lars.store import HISTORY_STEP, CallStatus, ColumnLimits, HistoryRow, RouteStore
from lars.store.sql import BATCH_TOKEN_SIZE, HISTORY_COUNT_MAX
from lars.tls import TlsContexts
from lars.wire_original import REPORT_STATUS_REQUEST

log = logging.getLogger("lars.reporter")

#: Attempts for a batch failing with an error other than "store unreachable".
BAD_BATCH_ATTEMPTS = 3
#: Bytes of encoded replies that may wait for one peer (about 100,000 acknowledgements, on top
#: of what the kernel buffers hold); a peer with more unread is disconnected.
MAX_QUEUED_REPLY_BYTES = 1 << 20
#: Seconds after which the column types of ServerCallStatus are read again.
COLUMN_TYPES_MAX_AGE = 60.0
#: Seconds between writes of the original agents' statistics (as a Lars agent's default
#: ``report_interval``).
ORIGINAL_FLUSH_INTERVAL = 1.0
#: (module, host, caller) the ledger of original statistics keeps running counts for (about
#: 400 bytes each).
MAX_ORIGINAL_HOSTS = 100_000
#: Flushes after which a (module, host, caller) no original report named is let go.
ORIGINAL_KEEP = 600
#: Seconds between purges of the CallHistory minutes older than ``history_retention``.
HISTORY_PURGE_INTERVAL = 60.0
#: CallHistory rows one purge statement deletes at most (a short transaction each).
HISTORY_PURGE_CHUNK = 10_000
#: Seconds a stored batch's token is kept: far longer than any batch waits for a re-run.
BATCH_TOKEN_KEEP = 86_400
#: Seconds a report's time may be ahead of the reporter's clock and still count at its own
#: minute in CallHistory; later ones count at the reporter's current minute.
HISTORY_FUTURE_SLACK = 60


class ReplyOutbox(Outbox):
    """One agent connection's replies, encoded as they are queued so that their bytes can be
    bounded. :meth:`close` ends the connection (its reader and writer) from any task."""

    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        #: True for an original Lars agent (no acknowledgements: its protocol has none).
        self.original = False
        #: The peer's role under TLS (lars.tls.ROLES); None without TLS.
        self.role: str | None = None
        self.queued_bytes = 0
        self._frames: list[bytes] = []
        self._scope: trio.CancelScope | None = None

    def attach(self, scope: trio.CancelScope) -> None:
        """The cancel scope that holds the connection's reader and writer."""
        self._scope = scope

    def queue(self, msg: wire.Message) -> bool:
        """Queue a reply (a no-op once closed). False if it would take the queued bytes over
        MAX_QUEUED_REPLY_BYTES: then nothing is queued and the caller closes the connection."""
        if self.closed:
            return True
        frame = wire.encode_frame(msg)
        if self.queued_bytes + len(frame) > MAX_QUEUED_REPLY_BYTES:
            return False
        self._frames.append(frame)
        self.queued_bytes += len(frame)
        self.ring()
        return True

    def close(self) -> None:
        """Drop what is queued and end the connection."""
        self.closed = True
        self._frames = []
        self.queued_bytes = 0
        if self._scope is not None:
            self._scope.cancel()

    def take(self) -> bytes:
        data = b"".join(self._frames)
        self._frames = []
        self.queued_bytes = 0
        return data


#: A queued report and the connection to acknowledge it on (None: an original agent's).
Item = tuple[wire.ReportStatusRequest, ReplyOutbox | None]


@attrs.frozen
class OriginalStatusReport(wire.ReportStatusRequest):
    """What :class:`OriginalStatsLedger` hands out: an original agent's latest window counts
    per host (``results``, stored as the latest counts, as the original did) and, in the
    same order, the calls since the last take (``added``, counted into the totals). Never
    encoded: it only travels the reporter's queue."""

    added: tuple[tuple[int, int], ...] = ()


def rows_of(report: wire.ReportStatusRequest) -> list[CallStatus]:
    """The ServerCallStatus rows of one report."""
    rows = [
        CallStatus(
            report.modid,
            report.cmdid,
            r.ip,
            r.port,
            report.caller,
            r.succ,
            r.err,
            report.ts,
            r.overload,
        )
        for r in report.results
    ]
    if isinstance(report, OriginalStatusReport):
        rows = [
            attrs.evolve(row, add_succ=succ, add_err=err)
            for row, (succ, err) in zip(rows, report.added, strict=True)
        ]
    return rows


def history_of(rows: Iterable[CallStatus], now: float, retention: float) -> list[HistoryRow]:
    """What ``rows`` add to ``CallHistory``: each row's calls (its ``add_succ``/``add_err``
    when set, as for the totals) at the minute of its report's time, summed by module, host
    and minute, in the table's key order (so that concurrent batches lock shared rows in one
    order and never deadlock on them).

    ``now`` is the reporter's clock (epoch seconds). A report more than
    HISTORY_FUTURE_SLACK seconds ahead of it counts at its current minute; a minute older than
    ``retention`` seconds, which the purge would delete at once, and a row without calls add
    nothing. Sums stop at HISTORY_COUNT_MAX.
    """
    latest = now + HISTORY_FUTURE_SLACK
    current = int(now) - int(now) % HISTORY_STEP
    oldest = now - retention
    sums: dict[tuple[int, int, int, int, int], list[int]] = {}
    for row in rows:
        succ = row.succ if row.add_succ is None else row.add_succ
        err = row.err if row.add_err is None else row.add_err
        if not (succ or err):
            continue
        ts = row.ts
        minute = current if ts > latest else ts - ts % HISTORY_STEP
        if minute < oldest:
            continue
        key = (row.modid, row.cmdid, row.ip, row.port, minute)
        counts = sums.get(key)
        if counts is None:
            sums[key] = [succ, err]
        else:
            counts[0] += succ
            counts[1] += err
    most = HISTORY_COUNT_MAX
    return [
        HistoryRow(*key, succ if succ < most else most, err if err < most else most)
        for key, (succ, err) in sorted(sums.items(), key=_history_lock_order)
    ]


def _history_lock_order(item: tuple[tuple[int, int, int, int, int], list[int]]) -> tuple[int, ...]:
    """CallHistory's primary key order (modid, cmdid, minute, ip, port)."""
    modid, cmdid, ip, port, minute = item[0]
    return (modid, cmdid, minute, ip, port)


class _RunningCount:
    """One host's counts as seen from one original caller."""

    __slots__ = ("err", "new_err", "new_succ", "overload", "seen", "succ", "ts")

    def __init__(self, seen: int) -> None:
        self.succ = self.err = 0  # the running counts last reported
        self.new_succ = self.new_err = 0  # the calls since the last take()
        self.overload = False
        self.ts = 0
        self.seen = seen  # the take() after which it was last reported


class OriginalStatsLedger:
    """Stores the original agents' statistics with the original's meaning, counted once.

    Pure: no I/O, no clock; the reporter feeds it and takes from it every
    ORIGINAL_FLUSH_INTERVAL.

    An original agent sends a ReportStatusRequest on *every* call its API reports, with
    every host of the module and each host's successes and failures in the host's current
    window (its ``rsucc/rerr``, zeroed whenever the host enters idle or overload, at the
    latest every ``idle_timeout``): running counts, not increments. Stored as they come,
    each row would be rewritten on every call, and ``succ_total/err_total`` would add the same
    calls again and again. So the ledger keeps, per (module, host, caller), the counts last
    seen and adds up the increments: a count that grew adds the difference, one that fell
    started a new window and adds itself. :meth:`take` hands out one
    :class:`OriginalStatusReport` per (module, caller), written once per take: each host's
    latest window counts become ``succ_cnt/err_cnt`` (what the original stored: the counts of
    the latest report), its calls since the last take are added to ``succ_total/err_total``,
    with its latest overload flag and the time of its latest report. A report lost on the way
    costs nothing (the next one carries the running count), except calls made between a lost
    report and the end of a window.

    A host's first report sets the base its later ones count from, and adds nothing: the
    counts in it may have been counted already (by this reporter before the host was let
    go, or by another one before a restart), and are never counted twice. (A fresh original
    agent reports zeros anyway: see below.) A host is let go when the ledger is full
    (``capacity``, the least recently reported first) or unreported for ``keep`` takes; the
    calls between its last report before and its first report after are not counted.

    The counts are what the original agent's own show: it zeroes a host's counts after
    counting the call that moves the host to idle or overload (or ends its window) and
    before it reports, so that call is not in them (nor, with its uninitialised
    ``idle_ts``, a host's first call).
    """

    def __init__(self, capacity: int = MAX_ORIGINAL_HOSTS, keep: int = ORIGINAL_KEEP) -> None:
        self.capacity = capacity
        self.keep = keep
        #: Running counts by (modid, cmdid, ip, port, caller), least recently reported first.
        self._hosts: OrderedDict[tuple[int, int, int, int, int], _RunningCount] = OrderedDict()
        #: The hosts with something to write since the last take().
        self._due: dict[tuple[int, int, int, int, int], _RunningCount] = {}
        self._takes = 0

    def __len__(self) -> int:
        return len(self._hosts)

    @property
    def due(self) -> bool:
        """True when :meth:`take` has something to hand out."""
        return bool(self._due)

    def feed(self, report: wire.ReportStatusRequest) -> bool:
        """Account one original report. False, and nothing accounted, when it names more new
        hosts than there is room for while the rest wait to be taken: take, then feed again."""
        hosts = self._hosts
        keys = [(report.modid, report.cmdid, r.ip, r.port, report.caller) for r in report.results]
        new = len({k for k in keys if k not in hosts})
        if len(hosts) + new > self.capacity:
            for key in keys:  # not these: their running counts are needed now
                if key in hosts:
                    hosts.move_to_end(key)
            if not self._make_room(new):
                return False
        for key, result in zip(keys, report.results, strict=True):
            count = hosts.get(key)
            if count is None:  # the base: written (0 calls, its overload flag), not counted
                count = hosts[key] = _RunningCount(self._takes)
                succ = err = 0
                self._due[key] = count
            else:
                hosts.move_to_end(key)
                count.seen = self._takes
                if result.succ < count.succ or result.err < count.err:  # a new window
                    succ, err = result.succ, result.err
                else:
                    succ, err = result.succ - count.succ, result.err - count.err
                if succ or err or result.overload != count.overload:
                    self._due[key] = count
            count.succ, count.err = result.succ, result.err
            count.new_succ += succ
            count.new_err += err
            count.overload = result.overload
            count.ts = report.ts
        return True

    def _make_room(self, needed: int) -> bool:
        """Let go of the least recently reported hosts that have nothing due."""
        hosts = self._hosts
        while len(hosts) + needed > self.capacity:
            oldest = next(iter(hosts), None)
            if oldest is None or oldest in self._due:
                return False
            del hosts[oldest]
        return True

    def take(self) -> list[OriginalStatusReport]:
        """The latest counts and the calls since the last take, one report per (module,
        caller) (seq 0)."""
        groups: dict[tuple[int, int, int], list[wire.HostResult]] = {}
        added: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        stamps: dict[tuple[int, int, int], int] = {}
        for (modid, cmdid, ip, port, caller), count in self._due.items():
            group = (modid, cmdid, caller)
            groups.setdefault(group, []).append(
                wire.HostResult(ip, port, count.succ, count.err, count.overload)
            )
            added.setdefault(group, []).append((count.new_succ, count.new_err))
            stamps[group] = max(stamps.get(group, count.ts), count.ts)
            count.new_succ = count.new_err = 0
        self._due = {}
        self._takes += 1
        hosts = self._hosts
        while hosts:  # let go of the hosts unreported for ``keep`` takes
            oldest, count = next(iter(hosts.items()))
            if count.seen >= self._takes - self.keep:
                break
            del hosts[oldest]
        return [
            OriginalStatusReport(
                modid,
                cmdid,
                caller,
                tuple(results),
                stamps[modid, cmdid, caller],
                added=tuple(added[modid, cmdid, caller]),
            )
            for (modid, cmdid, caller), results in groups.items()
        ]


class Reporter:
    """The statistics sink. ``await nursery.start(reporter.serve)`` returns its address."""

    def __init__(
        self,
        config: ReporterConfig,
        store: RouteStore,
        *,
        clock: Callable[[], float] = time.time,
        tls: TlsContexts | None = None,
    ) -> None:
        self.config = config
        #: Mutual TLS with agents and admins (None: plaintext; see lars.tls).
        self.tls = tls
        self.store = store
        #: The wall clock (epoch seconds): the minutes of CallHistory.
        self.clock = clock
        self.metrics = Metrics("reporter")
        #: Connection limits, deadlines and the control rate (see ConnectionGate).
        self.gate = ConnectionGate(
            "reporter", Limits.of(config), metrics=self.metrics, log=log, tls=tls
        )
        self._send, self._receive = trio.open_memory_channel[Item](config.queue_size)
        #: Reports put on the queue and not yet written (queued, or in a writer's hands).
        self._unwritten = 0
        self._idle = trio.Event()
        self._bad_input_log = RateLimitedLog(log)
        self._overflow_log = RateLimitedLog(log)
        self._out_of_range_log = RateLimitedLog(log)
        self._limits: ColumnLimits | None = None
        self._limits_read: float | None = None
        self.store_ok: bool | None = None
        #: The original agents' running counts (see OriginalStatsLedger).
        self.original = OriginalStatsLedger()
        self._original_log = RateLimitedLog(log)
        self._purge_log = RateLimitedLog(log)
        #: The open agent connections.
        self.connections: set[ReplyOutbox] = set()
        #: The reporter's metrics (see :meth:`observed`).
        self.registry = CollectorRegistry(auto_describe=False)
        self._batch_results = Histogram(
            "lars_reporter_batch_results",
            "Host results per batch written to the store.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=self.registry,
        )
        self._write_seconds = Histogram(
            "lars_reporter_write_seconds",
            "Time to write one batch to the store (one transaction, retries not included).",
            registry=self.registry,
        )
        self.registry.register(ReporterCollector(self))

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, start the writers, and serve agents until cancelled."""
        listener = await open_listener(self.config.listen, "reporter")
        address = bound_address(listener)
        async with trio.open_nursery() as nursery:
            for _ in range(self.config.writers):
                nursery.start_soon(self._writer)
            nursery.start_soon(self._original_flusher)
            nursery.start_soon(self._history_purger)
            await nursery.start(self.gate.serve, listener, self.handle_connection)
            log.info("reporter listening on %s:%d, store %s", *address, self.store.display_url)
            task_status.started(address)

    async def drain(self) -> None:
        """Wait until every queued report is written (used at shutdown)."""
        await self.flush_original()
        while self._unwritten:
            self._idle = trio.Event()
            await self._idle.wait()

    # --- connections -----------------------------------------------------------------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Read reports from one agent and write back their acknowledgements, until it
        closes, sends a malformed frame or misses a deadline (see ConnectionGate)."""
        session = await self.gate.open(stream)
        if session is None:
            return
        conn = ReplyOutbox(session.peer)
        conn.role = session.role
        self.connections.add(conn)
        self.metrics.incr("connections_accepted")
        self.metrics.set("connections", len(self.connections))
        try:
            async with trio.open_nursery() as nursery:
                conn.attach(nursery.cancel_scope)
                nursery.start_soon(write_loop, session.stream, conn, nursery.cancel_scope)
                await self._read(session, conn)
                nursery.cancel_scope.cancel()
        finally:
            conn.close()
            self.connections.discard(conn)
            self.metrics.set("connections", len(self.connections))
            await trio.aclose_forcefully(session.stream)

    def _reply(self, conn: ReplyOutbox, msg: wire.Message) -> None:
        """Queue a reply; close the connection of a peer that leaves too many unread."""
        if not conn.queue(msg):
            self.metrics.incr("reply_overflows")
            self._overflow_log.warning(
                "closing %s: over %d bytes of replies unread (the peer is not reading)",
                conn.peer,
                MAX_QUEUED_REPLY_BYTES,
            )
            conn.close()

    async def _read(self, session: Session, conn: ReplyOutbox) -> None:
        original = await session.sniff()
        if original is None:
            return
        if original:
            self.metrics.incr("original_connections_accepted")
        conn.original = original
        decoder = stream_decoder(original, self.config.max_frame, REPORT_STATUS_REQUEST)
        items: list[wire.Message | ProtocolError] | None = session.start(decoder)
        while items is not None:
            for item in items:
                if conn.closed:
                    return
                if isinstance(item, ProtocolError):
                    if original and item.msg_type is not None:  # the framing is intact
                        self.metrics.incr("malformed_frames")
                        self._bad_input_log.warning("skipped a frame from %s: %s", conn.peer, item)
                        continue
                    reply = refuse(item, conn.peer, self.metrics, self._bad_input_log)
                    if reply is None:
                        return
                    self._reply(conn, reply)
                elif original:
                    assert isinstance(item, wire.ReportStatusRequest)  # all the decoder takes
                    await self._original_report(item)
                else:
                    await self._dispatch(item, conn, session)
            items = await session.receive()

    async def _original_report(self, report: wire.ReportStatusRequest) -> None:
        self.metrics.incr("reports_received")
        self.metrics.incr("results_received", len(report.results))
        self.metrics.incr("original_reports_received")
        if self.original.feed(report):
            return
        await self.flush_original()  # make room
        if not self.original.feed(report):
            self.metrics.incr("reports_dropped")
            self.metrics.incr("results_dropped", len(report.results))
            self._original_log.error(
                "dropped an original report of module %d/%d with %d hosts: more than the %d"
                " the reporter keeps counts for",
                report.modid,
                report.cmdid,
                len(report.results),
                self.original.capacity,
            )

    async def flush_original(self) -> None:
        """Queue the original agents' calls since the last flush for the writers."""
        for report in self.original.take():
            await self._queue(report, None)

    async def _original_flusher(self) -> None:
        while True:
            await trio.sleep(ORIGINAL_FLUSH_INTERVAL)
            await self.flush_original()

    async def purge_history(self) -> int:
        """Delete the CallHistory minutes older than ``history_retention``, a chunk at a time;
        returns how many rows went. A store error is logged (at a rate limit) and counted,
        and what is left goes next time."""
        now = self.clock()
        older_than = int(now - self.config.history_retention)
        purged = 0
        try:
            while True:
                deleted = await self.store.purge_history(older_than, HISTORY_PURGE_CHUNK)
                purged += deleted
                self.metrics.incr("history_rows_purged", deleted)
                if deleted < HISTORY_PURGE_CHUNK:
                    break
                await trio.lowlevel.checkpoint()  # let the writers in between chunks
            # The tokens of batches stored long ago (stamped with time.time() when written).
            before = int(time.time()) - BATCH_TOKEN_KEEP
            while (
                await self.store.purge_batches(before, HISTORY_PURGE_CHUNK) >= HISTORY_PURGE_CHUNK
            ):
                await trio.lowlevel.checkpoint()
        except StoreError as exc:
            self.metrics.incr("store_errors")
            self._purge_log.warning(
                "purging old CallHistory rows failed (%s); trying again in %.0fs",
                exc,
                HISTORY_PURGE_INTERVAL,
            )
        return purged

    async def _history_purger(self) -> None:
        while True:
            await self.purge_history()
            await trio.sleep(HISTORY_PURGE_INTERVAL)

    async def _dispatch(self, msg: wire.Message, conn: ReplyOutbox, session: Session) -> None:
        if not permitted("reporter", conn.role, msg):
            self._reply(conn, self.gate.refuse_message(conn.peer, conn.role, msg))
            return
        if isinstance(msg, wire.ReportStatusRequest):
            self.metrics.incr("reports_received")
            self.metrics.incr("results_received", len(msg.results))
            await self._queue(msg, conn)
        elif isinstance(msg, wire.StatsRequest):
            if session.allow_control():  # else dropped
                self.metrics.set("queued", self._receive.statistics().current_buffer_used)
                self._reply(conn, self.metrics.response(msg.seq))
        else:
            self.metrics.incr("invalid_requests")
            reason = f"the reporter does not serve {type(msg).__name__}"
            seq = getattr(msg, "seq", 0)  # some messages carry a 64-bit seq, ErrorReply 32 bits
            seq = seq if 0 <= seq <= UINT32_MAX else 0
            self._reply(conn, wire.ErrorReply(seq, wire.RetCode.BAD_REQUEST, reason))

    # --- writing ---------------------------------------------------------------------------

    async def _queue(self, report: wire.ReportStatusRequest, conn: ReplyOutbox | None) -> None:
        """Hand a report to the writers; blocks while the queue is full."""
        self._unwritten += 1
        try:
            await self._send.send((report, conn))
        except BaseException:
            self._unwritten -= 1
            raise

    async def _writer(self) -> None:
        while True:
            batch = [await self._receive.receive()]
            try:
                rows = len(batch[0][0].results)
                while rows < self.config.batch_size:
                    try:
                        item = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(item)
                    rows += len(item[0].results)
                await self._write(batch)
            finally:
                self._unwritten -= len(batch)
                self._idle.set()

    async def _write(self, batch: list[Item]) -> None:
        # Each report's rows that fit the columns; known once the column types are.
        fitting: list[list[CallStatus]] | None = None
        rows: list[CallStatus] = []
        history: list[HistoryRow] = []
        token = os.urandom(BATCH_TOKEN_SIZE)
        delays = None
        attempts = 0
        while True:
            try:
                if fitting is None:
                    fitting = self._fitting_rows(batch, await self._column_limits())
                    rows = [row for report_rows in fitting for row in report_rows]
                    history = history_of(rows, self.clock(), self.config.history_retention)
                if rows:
                    started = time.perf_counter()
                    if not await self.store.record_calls(rows, history, token):
                        self.metrics.incr("batches_repeated")
                        log.warning(
                            "a batch of %d reports was already stored (its commit went"
                            " through before the store failed over); not counted again",
                            len(batch),
                        )
                    self._write_seconds.observe(time.perf_counter() - started)
                    self._batch_results.observe(len(rows))
                break
            except (StoreUnavailable, SchemaMissing) as exc:
                self._store_down(exc)
            except StoreError as exc:
                attempts += 1
                self.metrics.incr("store_errors")
                if attempts >= BAD_BATCH_ATTEMPTS:
                    await self._write_one_by_one(batch, fitting, token, exc)
                    return
                log.warning("writing %d reports failed (%s); retrying", len(batch), exc)
            delays = delays or backoff(cap=self.config.retry_max)
            await trio.sleep(next(delays))
        self._store_up()
        self.metrics.incr("batches_written")
        self.metrics.incr("results_written", len(rows))
        self.metrics.incr("history_rows_written", len(history))
        for report, conn in batch:
            if conn is not None:
                self._reply(conn, wire.ReportStatusAck(report.seq))

    async def _column_limits(self) -> ColumnLimits | None:
        """What ServerCallStatus's columns hold: read at the first write, again after a store
        outage and every COLUMN_TYPES_MAX_AGE (a `lars db upgrade` may have widened them)."""
        now = trio.current_time()
        if self._limits_read is None or now - self._limits_read >= COLUMN_TYPES_MAX_AGE:
            limits = await self.store.call_status_limits()
            narrower = limits.narrower if limits else ()
            if narrower and narrower != (self._limits.narrower if self._limits else ()):
                log.warning(
                    "ServerCallStatus has columns narrower than Lars's schema (%s): results"
                    " that do not fit them are dropped; `lars db upgrade` widens them",
                    ", ".join(narrower),
                )
            self._limits, self._limits_read = limits, now
        return self._limits

    def _fitting_rows(
        self, batch: list[Item], limits: ColumnLimits | None
    ) -> list[list[CallStatus]]:
        """Each report's rows, less those the columns cannot hold: dropped before the write
        (counted, logged at a rate limit) so that they never fail the batch of good rows."""
        fitting = []
        for report, _ in batch:
            rows = rows_of(report)
            if limits is not None:
                kept = []
                for row in rows:
                    reason = limits.refusal(row)
                    if reason is None:
                        kept.append(row)
                        continue
                    self.metrics.incr("results_dropped")
                    self.metrics.incr("results_out_of_range")
                    self._out_of_range_log.warning(
                        "dropped the result of module %d/%d for %s from caller %s: %s",
                        report.modid,
                        report.cmdid,
                        format_host((row.ip, row.port)),
                        int_to_ip(report.caller),
                        reason,
                    )
                if rows and not kept:
                    self.metrics.incr("reports_dropped")
                rows = kept
            fitting.append(rows)
        return fitting

    async def _write_one_by_one(
        self,
        batch: list[Item],
        fitting: list[list[CallStatus]] | None,
        token: bytes,
        error: StoreError,
    ) -> None:
        """Store what the store accepts; drop (logged, counted, acknowledged) what it refuses.
        Nothing, if a run of the whole batch (``token``) went through after all."""
        log.error(
            "a batch of %d reports keeps failing (%s); writing them one by one", len(batch), error
        )
        if await self._batch_recorded(token):
            self.metrics.incr("batches_repeated")
            for report, conn in batch:
                if conn is not None:
                    self._reply(conn, wire.ReportStatusAck(report.seq))
            return
        for i, (report, conn) in enumerate(batch):
            rows = rows_of(report) if fitting is None else fitting[i]
            history = history_of(rows, self.clock(), self.config.history_retention)
            refused = await self._write_report(rows, history)
            if refused is not None:
                self.metrics.incr("reports_dropped")
                self.metrics.incr("results_dropped", len(rows))
                log.error(
                    "dropped the report of module %d/%d from caller %d (%d results): %s",
                    report.modid,
                    report.cmdid,
                    report.caller,
                    len(rows),
                    refused,
                )
            else:
                self.metrics.incr("results_written", len(rows))
                self.metrics.incr("history_rows_written", len(history))
            if conn is not None:
                self._reply(conn, wire.ReportStatusAck(report.seq))

    async def _batch_recorded(self, token: bytes) -> bool:
        """Whether the batch with ``token`` is stored; False if the store cannot tell (an
        error other than unavailable), held while it is unavailable."""
        delays = None
        while True:
            try:
                return await self.store.batch_recorded(token)
            except (StoreUnavailable, SchemaMissing) as exc:
                self._store_down(exc)
            except StoreError:
                return False
            delays = delays or backoff(cap=self.config.retry_max)
            await trio.sleep(next(delays))

    async def _write_report(
        self, rows: list[CallStatus], history: list[HistoryRow]
    ) -> StoreError | None:
        """Write one report's rows; the error if the store refuses them. An unavailable
        store is not the report's fault: it is held (and the queue behind it) until stored."""
        token = os.urandom(BATCH_TOKEN_SIZE)
        delays = None
        while True:
            try:
                if rows:
                    await self.store.record_calls(rows, history, token)
                return None
            except (StoreUnavailable, SchemaMissing) as exc:
                self._store_down(exc)
            except StoreError as exc:
                return exc
            delays = delays or backoff(cap=self.config.retry_max)
            await trio.sleep(next(delays))

    def _store_down(self, exc: StoreError) -> None:
        self.metrics.incr("store_errors")
        self._limits_read = None  # the store may come back upgraded
        if self.store_ok is not False:
            log.error("statistics store unavailable (%s); holding reports and retrying", exc)
        self.store_ok = False
        self.metrics.set("store_ok", 0)

    def observed(self) -> Observed:
        """The reporter's registry and readiness check (store reachable) for the HTTP
        listener."""
        return Observed("reporter", self.registry, store_readiness(self.store))

    def _store_up(self) -> None:
        if self.store_ok is False:
            log.warning("statistics store is back")
        self.store_ok = True
        self.metrics.set("store_ok", 1)


class ReporterCollector(Collector):
    """The reporter's counters and gauges, read at scrape time."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterator[Metric]:
        r = self.reporter
        counters = r.metrics.counters

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"lars_reporter_{name}", doc, value=counters[name])

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"lars_reporter_{name}", doc, value=value)

        yield counter("reports_received", "Statistics reports received from agents.")
        yield counter("results_received", "Host results in the reports received.")
        yield counter("results_written", "Host results written to the store.")
        yield counter("batches_written", "Batches written to the store.")
        yield counter(
            "batches_repeated",
            "Batches found already stored when run again (a commit that went through before"
            " a failover): not counted twice.",
        )
        yield counter(
            "history_rows_written",
            "CallHistory rows added to: one per module, host and minute of each batch.",
        )
        yield counter(
            "history_rows_purged", "CallHistory rows deleted, older than history_retention."
        )
        queue = r._receive.statistics()
        yield gauge(
            "queue_depth", "Reports queued for the store writers.", queue.current_buffer_used
        )
        yield gauge("queue_capacity", "Reports the queue holds at most.", queue.max_buffer_size)
        yield counter("reports_dropped", "Reports dropped: refused by the store.")
        yield counter("results_dropped", "Host results dropped: refused, or too large to store.")
        yield counter("store_errors", "Failed writes to the store.")
        yield gauge("store_up", "1 while the store takes writes.", r.store_ok is not False)
        yield gauge("connections", "Agent connections.", len(r.connections))
        yield gauge(
            "original_connections",
            "Connections of original Lars agents (counted in connections too).",
            sum(1 for c in r.connections if c.original),
        )
        yield counter(
            "original_reports_received",
            "Reports from original Lars agents (counted in reports_received too).",
        )
        yield gauge(
            "original_hosts",
            "Hosts whose running counts from original agents the reporter keeps.",
            len(r.original),
        )
        yield counter("malformed_frames", "Frames that did not decode (connection closed).")
        yield counter("invalid_requests", "Requests with invalid values.")
        yield counter("reply_overflows", "Connections closed for not reading their replies.")
        yield from gate_metrics(counter, gauge, r.gate, "StatsRequests dropped over control_rate.")
