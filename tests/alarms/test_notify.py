"""The webhook notifier over real loopback sockets: a small HTTP receiver (h11 on trio), a
server that accepts and never answers, and a port nobody listens on."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio

from lars._version import __version__
from lars.alarms.evaluate import Observation, decide
from lars.alarms.notify import (
    WebhookNotifier,
    WebhookStatus,
    check_webhook_url,
    retry_delays,
)
from lars.alarms.rules import ErrorRateRule
from lars.errors import InvalidValue

#: Retry waits for tests: real sockets, so no MockClock, but tiny real waits.
QUICK = 0.01
#: How long a test waits for what should be prompt.
PROMPT = 5.0


@attrs.frozen
class Received:
    """One request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that answers ``statuses`` in turn (then 200) and
    keeps every request it got."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.statuses = list(statuses)
        self.requests: list[Received] = []
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        task_status.started(f"http://127.0.0.1:{port}/hook")
        await trio.serve_listeners(self._handle, listeners)

    async def wait_for(self, count: int) -> list[Received]:
        """Wait until ``count`` requests have arrived (at most PROMPT seconds)."""
        with trio.fail_after(PROMPT):
            while len(self.requests) < count:
                await self._changed.wait()
        return self.requests

    async def _handle(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the notifier hung up
            await self._exchange(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        method = path = ""
        headers: dict[str, str] = {}
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Request):
                method, path = event.method.decode(), event.target.decode()
                headers = {k.decode(): v.decode() for k, v in event.headers}
                body = b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.requests.append(Received(method, path, headers, body))
                self._changed.set()
                self._changed = trio.Event()
                status = self.statuses.pop(0) if self.statuses else 200
                response = h11.Response(status_code=status, headers=[("Content-Length", "2")])
                await stream.send_all(conn.send(response) or b"")
                await stream.send_all(conn.send(h11.Data(data=b"ok")) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                conn.start_next_cycle()
            else:  # ConnectionClosed
                return


async def serve_silently(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """A server that accepts every connection and never answers."""

    async def hang(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    task_status.started(f"http://127.0.0.1:{port}/hook")
    await trio.serve_listeners(hang, listeners)


def closed_port_url() -> str:
    """A URL whose port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> AsyncIterator[tuple[Receiver, str]]:
    rx = Receiver()
    url = await nursery.start(rx.serve)
    yield rx, url


async def start(nursery: trio.Nursery, notifier: WebhookNotifier) -> WebhookNotifier:
    await nursery.start(notifier.run)
    return notifier


async def wait_status(notifier: WebhookNotifier, index: int, done: Any) -> WebhookStatus:
    """Poll a webhook's status until ``done(status)`` (at most PROMPT seconds)."""
    with trio.fail_after(PROMPT):
        while not done(status := notifier.status()[index]):
            await trio.sleep(0.005)
    return status


EVENT = {"source": "lars", "alarm": "api-errors", "state": "firing", "value": 0.52}


# --- URLs and delays ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://hooks.example/x", "https://10.0.0.1:8443/a?b=c", "http://[::1]:80/"]
)
def test_check_webhook_url_accepts_http_and_https(url: str) -> None:
    assert check_webhook_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example/x", "must start with http:// or https://"),
        ("hooks.example/x", "must start with http:// or https://"),
        ("http:///x", "has no host"),
        ("http://hooks.example:99999/", "out of range"),
        ("http://hooks.example/a b", "spaces"),
        ("", "must start with http"),
    ],
)
def test_check_webhook_url_refuses_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(InvalidValue, match=f"bad webhook URL {url!r}: .*{why}"):
        check_webhook_url(url)


def test_check_webhook_url_refuses_non_text() -> None:
    with pytest.raises(InvalidValue, match="must be text"):
        check_webhook_url(None)


def test_retry_delays_double_from_the_base_up_to_the_cap() -> None:
    assert retry_delays(6, 1.0, 10.0) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert retry_delays(0, 1.0, 10.0) == []


def test_notifier_refuses_a_url_twice_and_bad_sizes() -> None:
    with pytest.raises(InvalidValue, match="appears twice"):
        WebhookNotifier(["http://a.example/", "http://a.example/"])
    with pytest.raises(InvalidValue, match="queue_size"):
        WebhookNotifier(["http://a.example/"], queue_size=0)
    with pytest.raises(InvalidValue, match="bad webhook URL"):
        WebhookNotifier(["file:///etc/passwd"])


def test_submit_refuses_what_is_not_json() -> None:
    notifier = WebhookNotifier(["http://a.example/"])
    with pytest.raises(ValueError, match="JSON"):
        notifier.submit({"value": float("nan")})
    assert notifier.status()[0].queued == 0


# --- delivery -------------------------------------------------------------------------------


async def test_the_payload_is_posted_as_json_exactly(
    nursery: trio.Nursery, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    notifier = await start(nursery, WebhookNotifier([url]))
    notifier.submit(EVENT)
    (request,) = await rx.wait_for(1)
    assert request.method == "POST"
    assert request.path == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"lars/{__version__}"
    assert request.json() == EVENT
    status = await wait_status(notifier, 0, lambda s: s.sent == 1)
    assert status.queued == status.failed == status.dropped == 0
    assert status.last_error is None
    assert status.last_ok_at is not None


async def test_a_notification_from_decide_arrives_as_made(
    nursery: trio.Nursery, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    rule = ErrorRateRule(name="api-errors", threshold=0.2)
    observation = Observation(
        rule="api-errors",
        subject="12/3",
        kind="error_rate",
        breaching=True,
        value=0.52,
        threshold=0.2,
        summary="error rate 52.0% > 20.0% over 5 min (1,234 calls) on 12/3",
        modid=12,
        cmdid=3,
    )
    _decision, notes = decide([rule], [], {observation.key: observation}, 1000.0, 300.0)
    notifier = await start(nursery, WebhookNotifier([url]))
    for note in notes:
        notifier.submit(note)
    (request,) = await rx.wait_for(1)
    assert request.json() == notes[0]
    assert request.json()["state"] == "firing"


async def test_notifications_arrive_in_order(
    nursery: trio.Nursery, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    notifier = await start(nursery, WebhookNotifier([url]))
    for number in range(20):
        notifier.submit({"n": number})
    requests = await rx.wait_for(20)
    assert [r.json()["n"] for r in requests] == list(range(20))


async def test_a_503_is_retried_until_it_succeeds(
    nursery: trio.Nursery,
) -> None:
    rx = Receiver(statuses=[503, 503])
    url = await nursery.start(rx.serve)
    notifier = await start(nursery, WebhookNotifier([url], retries=3, backoff_base=QUICK))
    notifier.submit(EVENT)
    requests = await rx.wait_for(3)
    assert [r.json() for r in requests] == [EVENT] * 3
    status = await wait_status(notifier, 0, lambda s: s.sent == 1)
    assert status.failed == 0
    assert status.last_error == "HTTP 503 Service Unavailable"
    assert status.last_ok_at is not None and status.last_error_at is not None
    assert status.last_ok_at >= status.last_error_at


async def test_a_429_is_retried_and_the_last_failure_drops_the_notification(
    nursery: trio.Nursery,
) -> None:
    rx = Receiver(statuses=[429, 429, 429])
    url = await nursery.start(rx.serve)
    notifier = await start(nursery, WebhookNotifier([url], retries=2, backoff_base=QUICK))
    notifier.submit({"n": 1})
    notifier.submit({"n": 2})
    requests = await rx.wait_for(4)  # three tries of the first, then the second
    assert [r.json()["n"] for r in requests] == [1, 1, 1, 2]
    status = await wait_status(notifier, 0, lambda s: s.sent == 1)
    assert status.failed == 1
    assert status.last_error == "HTTP 429 Too Many Requests"


async def test_a_400_is_not_retried(nursery: trio.Nursery) -> None:
    rx = Receiver(statuses=[400])
    url = await nursery.start(rx.serve)
    notifier = await start(nursery, WebhookNotifier([url], retries=3, backoff_base=QUICK))
    notifier.submit({"n": 1})
    notifier.submit({"n": 2})
    requests = await rx.wait_for(2)
    assert [r.json()["n"] for r in requests] == [1, 2]
    status = await wait_status(notifier, 0, lambda s: s.sent == 1)
    assert status.failed == 1
    assert status.last_error == "HTTP 400 Bad Request"


async def test_a_full_queue_drops_the_oldest(
    nursery: trio.Nursery, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    notifier = WebhookNotifier([url], queue_size=3)
    for number in range(5):
        notifier.submit({"n": number})  # not running yet: everything waits
    status = notifier.status()[0]
    assert (status.queued, status.dropped, status.sent) == (3, 2, 0)
    await start(nursery, notifier)
    requests = await rx.wait_for(3)
    assert [r.json()["n"] for r in requests] == [2, 3, 4]
    status = await wait_status(notifier, 0, lambda s: s.sent == 3)
    assert (status.queued, status.dropped, status.failed) == (0, 2, 0)


async def test_an_unreachable_port_counts_as_failed_with_a_clear_error(
    nursery: trio.Nursery,
) -> None:
    url = closed_port_url()
    notifier = await start(nursery, WebhookNotifier([url], retries=2, backoff_base=QUICK))
    notifier.submit(EVENT)
    status = await wait_status(notifier, 0, lambda s: s.failed == 1)
    assert (status.sent, status.queued, status.dropped) == (0, 0, 0)
    assert status.last_error is not None
    assert status.last_error is not None
    assert status.last_error.startswith("cannot connect: ")
    assert status.last_error.endswith("Connection refused")
    assert status.last_ok_at is None


async def test_a_hanging_webhook_times_out_and_counts_as_failed(nursery: trio.Nursery) -> None:
    url = await nursery.start(serve_silently)
    notifier = await start(
        nursery, WebhookNotifier([url], timeout=0.2, retries=1, backoff_base=QUICK)
    )
    notifier.submit(EVENT)
    status = await wait_status(notifier, 0, lambda s: s.failed == 1)
    assert status.last_error == "no answer within 0.2 s"


async def test_a_hanging_webhook_delays_only_its_own_queue(
    nursery: trio.Nursery, receiver: tuple[Receiver, str]
) -> None:
    rx, good = receiver
    hanging = await nursery.start(serve_silently)
    down = closed_port_url()
    # The hanging webhook would hold each notification for a minute.
    notifier = WebhookNotifier([hanging, down, good], timeout=60.0, backoff_base=QUICK)
    await start(nursery, notifier)
    for number in range(3):
        notifier.submit({"n": number})
    requests = await rx.wait_for(3)  # within PROMPT seconds, not minutes
    assert [r.json()["n"] for r in requests] == [0, 1, 2]
    working = await wait_status(notifier, 2, lambda s: s.sent == 3)
    assert working.queued == working.failed == 0
    stuck = notifier.status()[0]
    assert stuck.queued == 3 and stuck.sent == stuck.failed == 0  # 1 in flight, 2 waiting


async def test_run_can_be_cancelled_and_run_again(
    nursery: trio.Nursery, receiver: tuple[Receiver, str]
) -> None:
    rx, url = receiver
    notifier = WebhookNotifier([url])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(notifier.run)
            notifier.submit({"n": 1})
            await rx.wait_for(1)
            scope.cancel()
    notifier.submit({"n": 2})  # waits for the next run
    assert notifier.status()[0].queued == 1
    await start(nursery, notifier)
    requests = await rx.wait_for(2)
    assert [r.json()["n"] for r in requests] == [1, 2]


async def test_a_notifier_without_urls_runs_until_cancelled() -> None:
    notifier = WebhookNotifier([])
    notifier.submit(EVENT)
    assert notifier.status() == []
    with trio.move_on_after(0.05) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
    assert scope.cancelled_caught


async def test_an_unexpected_error_costs_one_notification_not_the_worker(
    nursery: trio.Nursery,
) -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if len(seen) == 1:
            raise RuntimeError("a bug in the transport")
        return httpx.Response(204)

    transport = httpx.MockTransport(handler)
    notifier = WebhookNotifier(["http://hooks.example/"], transport=transport, retries=3)
    await start(nursery, notifier)
    notifier.submit({"n": 1})
    notifier.submit({"n": 2})
    status = await wait_status(notifier, 0, lambda s: s.sent == 1)
    assert seen == [{"n": 1}, {"n": 2}]  # the bug is not retried
    assert status.failed == 1
    assert status.last_error == "RuntimeError: a bug in the transport"


def test_urls_are_shown_without_their_secrets() -> None:
    from lars.alarms.notify import redact_url

    slack = redact_url("https://hooks.slack.com/services/T0001/B0002/XXXXSECRET")
    assert "XXXXSECRET" not in slack and slack.startswith("https://hooks.slack.com/…")
    assert "s3cret" not in redact_url("http://bot:s3cret@10.0.0.5:8080/hook?token=abc")
    assert redact_url("http://10.0.0.5:8080/").startswith("http://10.0.0.5:8080/ #")
    # Two webhooks on one host stay apart.
    assert redact_url("http://h/a") != redact_url("http://h/b")
