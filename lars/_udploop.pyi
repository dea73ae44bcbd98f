import socket
from collections.abc import Callable
from typing import Any

def serve(
    socks: list[socket.socket],
    handle: Callable[[bytes, Any, socket.socket], bytes | None],
    local_only: list[bool],
    poll_budget: float,
    reply_budget: float,
    skip_first: int,
    skip_max: int,
    stopping: Callable[[], bool],
    foreign: Callable[[Any], object],
    dropped: Callable[[], object],
    stop_check: float,
    /,
) -> None: ...
