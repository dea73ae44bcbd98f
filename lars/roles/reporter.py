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

Store errors: an unreachable store (or missing tables) is retried with capped backoff for
as long as it takes; the queue and the agents hold the data meanwhile. Any other error is
retried a few times, then the batch is written report by report so that only the reports
the store refuses are dropped, each logged and counted, and acknowledged so the agent does
not send them forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lars import wire
from lars.config import ReporterConfig
from lars.core.model import UINT32_MAX, format_host, int_to_ip
from lars.errors import ProtocolError, SchemaMissing, StoreError, StoreUnavailable
from lars.roles.common import (
    Metrics,
    Outbox,
    RateLimitedLog,
    backoff,
    bound_address,
    open_listener,
    peer_name,
    receive_messages,
    refuse,
    write_loop,
)
from lars.roles.http import Observed
from lars.store import CallStatus, ColumnLimits, RouteStore

log = logging.getLogger("lars.reporter")

#: Attempts for a batch failing with an error other than "store unreachable".
BAD_BATCH_ATTEMPTS = 3
#: Bytes of encoded replies that may wait for one peer (about 100,000 acknowledgements, on top
#: of what the kernel buffers hold); a peer with more unread is disconnected.
MAX_QUEUED_REPLY_BYTES = 1 << 20
#: Seconds after which the column types of ServerCallStatus are read again.
COLUMN_TYPES_MAX_AGE = 60.0


class ReplyOutbox(Outbox):
    """One agent connection's replies, encoded as they are queued so that their bytes can be
    bounded. :meth:`close` ends the connection (its reader and writer) from any task."""

    def __init__(self, peer: str) -> None:
        super().__init__(peer)
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


#: A queued report and the connection to acknowledge it on.
Item = tuple[wire.ReportStatusRequest, ReplyOutbox]


def rows_of(report: wire.ReportStatusRequest) -> list[CallStatus]:
    """The ServerCallStatus rows of one report."""
    return [
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


class Reporter:
    """The statistics sink. ``await nursery.start(reporter.serve)`` returns its address."""

    def __init__(self, config: ReporterConfig, store: RouteStore) -> None:
        self.config = config
        self.store = store
        self.metrics = Metrics("reporter")
        self._send, self._receive = trio.open_memory_channel[Item](config.queue_size)
        self._busy = 0
        self._idle = trio.Event()
        self._bad_input_log = RateLimitedLog(log)
        self._overflow_log = RateLimitedLog(log)
        self._out_of_range_log = RateLimitedLog(log)
        self._limits: ColumnLimits | None = None
        self._limits_read: float | None = None
        self.store_ok: bool | None = None
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
            await nursery.start(trio.serve_listeners, self.handle_connection, [listener])
            log.info("reporter listening on %s:%d, store %s", *address, self.store.display_url)
            task_status.started(address)

    async def drain(self) -> None:
        """Wait until every queued report is written (used at shutdown)."""
        while self._receive.statistics().current_buffer_used or self._busy:
            self._idle = trio.Event()
            await self._idle.wait()

    # --- connections -----------------------------------------------------------------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Read reports from one agent and write back their acknowledgements."""
        conn = ReplyOutbox(peer_name(stream))
        self.connections.add(conn)
        self.metrics.incr("connections_accepted")
        self.metrics.set("connections", len(self.connections))
        try:
            async with trio.open_nursery() as nursery:
                conn.attach(nursery.cancel_scope)
                nursery.start_soon(write_loop, stream, conn, nursery.cancel_scope)
                await self._read(stream, conn)
                nursery.cancel_scope.cancel()
        finally:
            conn.close()
            self.connections.discard(conn)
            self.metrics.set("connections", len(self.connections))
            await trio.aclose_forcefully(stream)

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

    async def _read(self, stream: trio.abc.Stream, conn: ReplyOutbox) -> None:
        decoder = wire.FrameDecoder(self.config.max_frame)
        while (items := await receive_messages(stream, decoder)) is not None:
            for item in items:
                if conn.closed:
                    return
                if isinstance(item, ProtocolError):
                    reply = refuse(item, conn.peer, self.metrics, self._bad_input_log)
                    if reply is None:
                        return
                    self._reply(conn, reply)
                else:
                    await self._dispatch(item, conn)

    async def _dispatch(self, msg: wire.Message, conn: ReplyOutbox) -> None:
        if isinstance(msg, wire.ReportStatusRequest):
            self.metrics.incr("reports_received")
            self.metrics.incr("results_received", len(msg.results))
            await self._send.send((msg, conn))  # blocks while the queue is full
        elif isinstance(msg, wire.StatsRequest):
            self.metrics.set("queued", self._receive.statistics().current_buffer_used)
            self._reply(conn, self.metrics.response(msg.seq))
        else:
            self.metrics.incr("invalid_requests")
            reason = f"the reporter does not serve {type(msg).__name__}"
            seq = getattr(msg, "seq", 0)  # some messages carry a 64-bit seq, ErrorReply 32 bits
            seq = seq if 0 <= seq <= UINT32_MAX else 0
            self._reply(conn, wire.ErrorReply(seq, wire.RetCode.BAD_REQUEST, reason))

    # --- writing ---------------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            batch = [await self._receive.receive()]
            self._busy += 1
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
                self._busy -= 1
                self._idle.set()

    async def _write(self, batch: list[Item]) -> None:
        # Each report's rows that fit the columns; known once the column types are.
        fitting: list[list[CallStatus]] | None = None
        rows: list[CallStatus] = []
        delays = None
        attempts = 0
        while True:
            try:
                if fitting is None:
                    fitting = self._fitting_rows(batch, await self._column_limits())
                    rows = [row for report_rows in fitting for row in report_rows]
                if rows:
                    started = time.perf_counter()
                    await self.store.upsert_call_status(rows)
                    self._write_seconds.observe(time.perf_counter() - started)
                    self._batch_results.observe(len(rows))
                break
            except (StoreUnavailable, SchemaMissing) as exc:
                self._store_down(exc)
            except StoreError as exc:
                attempts += 1
                self.metrics.incr("store_errors")
                if attempts >= BAD_BATCH_ATTEMPTS:
                    await self._write_one_by_one(batch, fitting, exc)
                    return
                log.warning("writing %d reports failed (%s); retrying", len(batch), exc)
            delays = delays or backoff(cap=self.config.retry_max)
            await trio.sleep(next(delays))
        self._store_up()
        self.metrics.incr("batches_written")
        self.metrics.incr("results_written", len(rows))
        for report, conn in batch:
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
        self, batch: list[Item], fitting: list[list[CallStatus]] | None, error: StoreError
    ) -> None:
        """Store what the store accepts; drop (logged, counted, acknowledged) what it refuses."""
        log.error(
            "a batch of %d reports keeps failing (%s); writing them one by one", len(batch), error
        )
        for i, (report, conn) in enumerate(batch):
            rows = rows_of(report) if fitting is None else fitting[i]
            try:
                if rows:
                    await self.store.upsert_call_status(rows)
            except StoreError as exc:
                self.metrics.incr("reports_dropped")
                self.metrics.incr("results_dropped", len(rows))
                log.error(
                    "dropped the report of module %d/%d from caller %d (%d results): %s",
                    report.modid,
                    report.cmdid,
                    report.caller,
                    len(rows),
                    exc,
                )
            else:
                self.metrics.incr("results_written", len(rows))
            self._reply(conn, wire.ReportStatusAck(report.seq))

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

        async def not_ready() -> str | None:
            try:
                await self.store.route_version()
            except StoreError as exc:
                return f"store unreachable: {exc}"
            return None

        return Observed("reporter", self.registry, not_ready)

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
        yield counter("malformed_frames", "Frames that did not decode (connection closed).")
        yield counter("invalid_requests", "Requests with invalid values.")
        yield counter("reply_overflows", "Connections closed for not reading their replies.")
