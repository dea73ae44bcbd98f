"""The reporter role: call statistics from agents into ``ServerCallStatus``.

Agents send one ``ReportStatusRequest`` per module and interval. Readers put each on a
bounded queue; when it is full they stop reading, TCP fills up, and the agents wait: memory
never grows with the load. A few writer tasks take up to ``batch_size`` host results at a
time and upsert them in one transaction (latest counts replace, totals add up); only after
the commit is each report acknowledged (``ReportStatusAck``). An agent keeps its counts
until acknowledged, so a reporter outage or crash loses nothing; at worst a report whose
ack was lost is stored twice.

Store errors: an unreachable store (or missing tables) is retried with capped backoff for
as long as it takes; the queue and the agents hold the data meanwhile. Any other error is
retried a few times, then the batch is written report by report so that only the reports
the store refuses are dropped, each logged and counted, and acknowledged so the agent does
not send them forever.
"""

from __future__ import annotations

import logging

import trio

from lars import wire
from lars.config import ReporterConfig
from lars.errors import ProtocolError, SchemaMissing, StoreError, StoreUnavailable
from lars.roles.common import (
    MessageOutbox,
    Metrics,
    RateLimitedLog,
    backoff,
    bound_address,
    open_listener,
    peer_name,
    receive_messages,
    refuse,
    write_loop,
)
from lars.store import CallStatus, RouteStore

log = logging.getLogger("lars.reporter")

#: Attempts for a batch failing with an error other than "store unreachable".
BAD_BATCH_ATTEMPTS = 3


#: A queued report and the connection to acknowledge it on.
Item = tuple[wire.ReportStatusRequest, MessageOutbox]


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
        self.store_ok: bool | None = None

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
        conn = MessageOutbox(peer_name(stream))
        self.metrics.incr("connections_accepted")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_loop, stream, conn, nursery.cancel_scope)
                await self._read(stream, conn)
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            await trio.aclose_forcefully(stream)

    async def _read(self, stream: trio.abc.Stream, conn: MessageOutbox) -> None:
        decoder = wire.FrameDecoder(self.config.max_frame)
        while (items := await receive_messages(stream, decoder)) is not None:
            for item in items:
                if isinstance(item, ProtocolError):
                    reply = refuse(item, conn.peer, self.metrics, self._bad_input_log)
                    if reply is None:
                        return
                    conn.send(reply)
                else:
                    await self._dispatch(item, conn)

    async def _dispatch(self, msg: wire.Message, conn: MessageOutbox) -> None:
        if isinstance(msg, wire.ReportStatusRequest):
            self.metrics.incr("reports_received")
            self.metrics.incr("results_received", len(msg.results))
            await self._send.send((msg, conn))  # blocks while the queue is full
        elif isinstance(msg, wire.StatsRequest):
            self.metrics.set("queued", self._receive.statistics().current_buffer_used)
            conn.send(self.metrics.response(msg.seq))
        else:
            self.metrics.incr("invalid_requests")
            reason = f"the reporter does not serve {type(msg).__name__}"
            conn.send(wire.ErrorReply(getattr(msg, "seq", 0), wire.RetCode.BAD_REQUEST, reason))

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
        rows = [row for report, _ in batch for row in rows_of(report)]
        delays = None
        attempts = 0
        while True:
            try:
                await self.store.upsert_call_status(rows)
                break
            except (StoreUnavailable, SchemaMissing) as exc:
                self._store_down(exc)
            except StoreError as exc:
                attempts += 1
                self.metrics.incr("store_errors")
                if attempts >= BAD_BATCH_ATTEMPTS:
                    await self._write_one_by_one(batch, exc)
                    return
                log.warning("writing %d results failed (%s); retrying", len(rows), exc)
            delays = delays or backoff(cap=self.config.retry_max)
            await trio.sleep(next(delays))
        self._store_up()
        self.metrics.incr("batches_written")
        self.metrics.incr("results_written", len(rows))
        for report, conn in batch:
            conn.send(wire.ReportStatusAck(report.seq))

    async def _write_one_by_one(self, batch: list[Item], error: StoreError) -> None:
        """Store what the store accepts; drop (logged, counted, acknowledged) what it refuses."""
        log.error(
            "a batch of %d reports keeps failing (%s); writing them one by one", len(batch), error
        )
        for report, conn in batch:
            try:
                await self.store.upsert_call_status(rows_of(report))
            except StoreError as exc:
                self.metrics.incr("reports_dropped")
                self.metrics.incr("results_dropped", len(report.results))
                log.error(
                    "dropped the report of module %d/%d from caller %d (%d results): %s",
                    report.modid,
                    report.cmdid,
                    report.caller,
                    len(report.results),
                    exc,
                )
            else:
                self.metrics.incr("results_written", len(report.results))
            conn.send(wire.ReportStatusAck(report.seq))

    def _store_down(self, exc: StoreError) -> None:
        self.metrics.incr("store_errors")
        if self.store_ok is not False:
            log.error("statistics store unavailable (%s); holding reports and retrying", exc)
        self.store_ok = False
        self.metrics.set("store_ok", 0)

    def _store_up(self) -> None:
        if self.store_ok is False:
            log.warning("statistics store is back")
        self.store_ok = True
        self.metrics.set("store_ok", 1)
