"""Webhook notifications: each alarm notification POSTed as JSON to every configured URL.

Design:

* **One queue and one worker per URL.** A webhook that hangs (accepts the connection and
  never answers) or is down holds up its own notifications only, for at most
  ``timeout`` seconds per attempt and ``retries`` retries with backoff; every other URL
  keeps receiving its notifications promptly, in order. A single shared queue would let
  the slowest receiver set the pace for all.
* **Submitting never waits.** :meth:`WebhookNotifier.submit` is called by the alarm round
  right after the store transaction commits; it appends to each URL's bounded queue and
  rings the worker's bell. When a queue is full the *oldest* notification goes: the newest
  says what holds now, and a receiver that comes back wants that first. Drops are counted
  and logged at a rate limit.
* **In order, one at a time.** A worker POSTs its queue's notifications one after another,
  so a receiver sees an alarm's "firing" before its "resolved".
* **Retries for what may pass.** Connection errors, timeouts, 5xx and 429 are retried
  ``retries`` times with exponential backoff (``backoff_base`` seconds, doubling, capped
  at ``backoff_max``); another 4xx will not get better by asking again, so it is not
  retried. After the last failure the notification is dropped, counted and logged. A
  worker never raises: anything but cancellation costs the one notification.
* **Counted for people.** :meth:`WebhookNotifier.status` gives each URL's counters and
  last error for the console and the metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import httpx
import trio

from lars._version import __version__
from lars.errors import InvalidValue
from lars.roles.common import RateLimitedLog

log = logging.getLogger("lars.alarms.notify")

#: Seconds before the first retry; each further retry waits twice as long as the last.
BACKOFF_BASE = 1.0
#: Seconds allowed to close the HTTP connections when the notifier stops.
CLOSE_TIMEOUT = 1.0
#: What every POST says it is.
USER_AGENT = f"lars/{__version__}"


def check_webhook_url(url: object) -> str:
    """Return ``url`` if it is an ``http://`` or ``https://`` URL with a host, else raise
    :class:`InvalidValue` saying what is wrong."""
    if not isinstance(url, str):
        raise InvalidValue(f"a webhook URL must be text, got {url!r}")
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it has no host"
        elif any(c.isspace() or not c.isprintable() for c in url):
            problem = "it contains spaces or control characters"
    if problem is not None:
        raise InvalidValue(f"bad webhook URL {url!r}: {problem}")
    return url


def retry_delays(retries: int, base: float, cap: float) -> list[float]:
    """The waits before each of ``retries`` retries: ``base``, doubling, at most ``cap``."""
    return [min(cap, base * 2**attempt) for attempt in range(retries)]


def redact_url(url: str) -> str:
    """``url`` as the console, the logs and the metrics show it: scheme, host and port, and a
    short hash of the whole URL to tell webhooks apart. The rest is hidden, since receivers
    carry their secret in the password, the path (Slack, Teams) or the query string."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    rest = "/…" if parts.path not in ("", "/") or parts.query else "/"
    return f"{parts.scheme}://{host}{port}{rest} #{digest}"


@attrs.frozen
class WebhookStatus:
    """One webhook's counters, for the console and the metrics. Times are epoch seconds."""

    url: str
    #: Notifications waiting, including the one being sent.
    queued: int
    #: Notifications delivered (a 2xx answer).
    sent: int
    #: Notifications given up after the last attempt failed.
    failed: int
    #: Notifications pushed out of a full queue, unsent.
    dropped: int
    last_error: str | None
    last_error_at: float | None
    last_ok_at: float | None


class _Webhook:
    """One URL's queue of encoded notifications, its doorbell and its counters."""

    def __init__(self, url: str, queue_size: int) -> None:
        self.url = url
        #: The URL as logs and the console show it (see :func:`redact_url`).
        self.shown = redact_url(url)
        self.queue_size = queue_size
        self.pending: deque[bytes] = deque()
        self.in_flight = False
        self.sent = self.failed = self.dropped = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_ok_at: float | None = None
        self._bell_send, self.bell = trio.open_memory_channel[None](1)
        #: Told of each notification this webhook gives up (see WebhookNotifier.on_give_up).
        self.gave_up: Callable[[bytes], None] = lambda body: None
        self.drop_log = RateLimitedLog(log)
        self.fail_log = RateLimitedLog(log)

    def put(self, body: bytes) -> None:
        if len(self.pending) >= self.queue_size:
            self.gave_up(self.pending.popleft())
            self.dropped += 1
            self.drop_log.warning(
                "webhook %s: %d notifications waiting, dropped the oldest",
                self.shown,
                self.queue_size,
            )
        self.pending.append(body)
        with contextlib.suppress(trio.WouldBlock):  # the worker is already due to look
            self._bell_send.send_nowait(None)

    def status(self) -> WebhookStatus:
        return WebhookStatus(
            url=self.shown,
            queued=len(self.pending) + self.in_flight,
            sent=self.sent,
            failed=self.failed,
            dropped=self.dropped,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            last_ok_at=self.last_ok_at,
        )


class WebhookNotifier:
    """POSTs each submitted notification to every URL: one bounded queue and one worker
    per URL (see the module docstring). ``transport`` replaces the network (httpx's mock
    or ASGI transports); ``backoff_base`` is the wait before the first retry."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff_max: float = 30.0,
        queue_size: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        if len(set(urls)) != len(urls):
            raise InvalidValue("a webhook URL appears twice")
        if queue_size < 1:
            raise InvalidValue(f"queue_size must be at least 1, got {queue_size!r}")
        if retries < 0:
            raise InvalidValue(f"retries must be 0 or more, got {retries!r}")
        self.timeout = timeout
        self.retries = retries
        self.delays = retry_delays(retries, backoff_base, backoff_max)
        self.transport = transport
        self._hooks = [_Webhook(check_webhook_url(url), queue_size) for url in urls]
        self._running = False
        #: Called with each notification given up (dropped from a full queue, or failed
        #: after its last retry), decoded; the alarm engine sends the alarm's state again.
        self.on_give_up: Callable[[dict[str, Any]], None] | None = None
        for hook in self._hooks:
            hook.gave_up = self._gave_up

    def _gave_up(self, body: bytes) -> None:
        if self.on_give_up is not None:
            self.on_give_up(json.loads(body))

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue ``event`` for every URL, and return at once. The event is encoded here, so
        one that is not JSON (a bug) raises ``TypeError`` or ``ValueError`` to the caller
        rather than failing later in a worker."""
        body = json.dumps(dict(event), allow_nan=False).encode()
        for hook in self._hooks:
            hook.put(body)

    def status(self) -> list[WebhookStatus]:
        """Each URL's counters, in the order of the URLs."""
        return [hook.status() for hook in self._hooks]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver notifications until cancelled, one worker per URL. Notifications still
        queued then wait for the next run; one being sent at that moment is lost."""
        if self._running:
            raise RuntimeError("this WebhookNotifier is already running")
        self._running = True
        clients = [
            httpx.AsyncClient(
                transport=self.transport,
                timeout=self.timeout,
                headers={"User-Agent": USER_AGENT},
                follow_redirects=False,
            )
            for _ in self._hooks
        ]
        try:
            async with trio.open_nursery() as nursery:
                for hook, client in zip(self._hooks, clients, strict=True):
                    nursery.start_soon(self._work, hook, client)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._running = False
            # Close the connections even when cancelled (their sockets would leak).
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                for client in clients:
                    await client.aclose()

    async def _work(self, hook: _Webhook, client: httpx.AsyncClient) -> None:
        while True:
            if not hook.pending:
                await hook.bell.receive()
                continue
            body = hook.pending.popleft()
            hook.in_flight = True
            try:
                await self._deliver(hook, client, body)
            finally:
                hook.in_flight = False

    async def _deliver(self, hook: _Webhook, client: httpx.AsyncClient, body: bytes) -> None:
        """POST ``body`` with the retries it deserves; count the outcome."""
        attempt = 0
        while True:
            error, retry = await self._post(client, hook.url, body)
            if error is None:
                hook.sent += 1
                hook.last_ok_at = time.time()
                return
            hook.last_error = error
            hook.last_error_at = time.time()
            if not retry or attempt >= self.retries:
                hook.failed += 1
                hook.gave_up(body)
                attempts = "1 attempt" if attempt == 0 else f"{attempt + 1} attempts"
                hook.fail_log.warning(
                    "webhook %s: dropped a notification after %s: %s", hook.shown, attempts, error
                )
                return
            log.debug("webhook %s: %s; retrying", hook.shown, error)
            await trio.sleep(self.delays[attempt])
            attempt += 1

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes
    ) -> tuple[str | None, bool]:
        """One POST: ``(None, _)`` on success, else ``(what went wrong, worth retrying)``."""
        try:
            # httpx's timeout bounds each step (connect, each read...); this bounds the
            # whole exchange, so a receiver that trickles its answer is cut off too.
            with trio.fail_after(self.timeout):
                response = await client.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
        except (trio.TooSlowError, httpx.TimeoutException):
            return f"no answer within {self.timeout:g} s", True
        except httpx.ConnectError as exc:
            return f"cannot connect: {_reason(exc)}", True
        except httpx.TransportError as exc:  # the connection broke, a bad HTTP answer...
            return f"{type(exc).__name__}: {exc}", True
        except Exception as exc:  # a bug; it must not stop the worker, but must be seen
            log.exception("webhook %s: unexpected error", redact_url(url))
            return f"{type(exc).__name__}: {exc}", False
        if 200 <= response.status_code < 300:
            return None, False
        code = response.status_code
        reason = response.reason_phrase or httpx.codes.get_reason_phrase(code)
        error = f"HTTP {code} {reason}".rstrip()
        return error, code >= 500 or code == httpx.codes.TOO_MANY_REQUESTS


def _reason(exc: BaseException) -> str:
    """The most specific reason in an error's chain: "Connection refused" rather than
    trio's "all attempts to connect to 127.0.0.1:80 failed" that wraps it."""
    reason = str(exc) or type(exc).__name__
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    return reason
