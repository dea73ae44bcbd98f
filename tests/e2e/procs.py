"""Real ``lars`` processes for end-to-end tests, and a TCP proxy that can cut a connection.

Each process gets its own config file and log file under the test's tmp_path; addresses are
bound to port 0 and learnt from the "running:" log line, so tests never fight over ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

LARS = [sys.executable, "-m", "lars"]
_RUNNING = re.compile(r"lars \S+ running: (.*)$", re.MULTILINE)
STARTUP_TIMEOUT = 20.0


def memory_mb(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of a process in MB: resident memory now, and its peak (0 for a
    process that is exiting and has released its memory)."""
    fields = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def toml_value(value: Any) -> str:
    if isinstance(value, dict):  # an inline table, such as one of [web] users
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # JSON strings, numbers and booleans are valid TOML


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML config: top-level keys first, then one table per nested dict."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in sections.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")

    def emit(name: str, table: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = []
        for key, value in table.items():
            if isinstance(value, dict):
                nested.append((f"{name}.{key}", value))
            else:
                lines.append(f"{key} = {toml_value(value)}")
        for sub_name, sub in nested:
            emit(sub_name, sub)

    for name, table in tables:
        emit(name, table)
    path.write_text("\n".join(lines) + "\n")
    return path


class LarsProcess:
    """One ``lars run`` process."""

    def __init__(self, workdir: Path, name: str, roles: Sequence[str], config: dict[str, Any]):
        self.workdir = workdir
        self.name = name
        self.roles = list(roles)
        # Metrics and the console on any free port unless the test says where: never a
        # default port.
        config = {**config}
        for role in ("dns", "reporter", "agent", "web"):
            section = config[role] = {**config.get(role, {})}
            section.setdefault("http_listen", "127.0.0.1:0")
        config["web"].setdefault("listen", "127.0.0.1:0")
        self.config_path = write_config(workdir / f"{name}.toml", config)
        self.log_path = workdir / f"{name}.log"
        self.process: trio.Process | None = None
        self.addresses: dict[str, str] = {}

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def start(self) -> None:
        argv = [*LARS, "run", "--config", str(self.config_path)]
        for role in self.roles:
            argv += ["--role", role]
        with open(self.log_path, "ab") as log:
            self.process = await trio.lowlevel.open_process(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        with trio.move_on_after(STARTUP_TIMEOUT):
            while True:
                match = _RUNNING.search(self.log)
                if match:
                    for part in match.group(1).split(", "):
                        role, _, address = part.partition(" on ")
                        self.addresses[role] = address
                    return
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.log}")
                await trio.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start in {STARTUP_TIMEOUT}s:\n{self.log}")

    async def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Signal the process and wait for it; returns its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        with trio.move_on_after(timeout):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        raise RuntimeError(f"{self.name} did not stop within {timeout}s:\n{self.log}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


@asynccontextmanager
async def lars_process(
    workdir: Path, name: str, roles: Sequence[str], config: dict[str, Any]
) -> AsyncIterator[LarsProcess]:
    """Start a ``lars run`` process; kill it on the way out if still running."""
    proc = LarsProcess(workdir, name, roles, config)
    try:
        await proc.start()
        yield proc
    finally:
        proc.kill()
        if proc.process is not None:
            with trio.CancelScope(shield=True):
                await proc.process.wait()


async def lars_cli(*argv: str, cwd: Path | None = None, check: bool = True) -> str:
    """Run one ``lars`` command to completion; returns stdout (raises on failure if check)."""
    result = await trio.run_process(
        [*LARS, *argv],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"lars {' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}"
        )
    return result.stdout.decode()


class LineReader:
    """Reads lines from a process's stdout pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("stream closed")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


@asynccontextmanager
async def watch_process(dns: str, modid: int, cmdid: int) -> AsyncIterator[LineReader]:
    """``lars query MOD CMD --dns ADDR --watch --json`` as a process, its stdout as lines."""
    process = await trio.lowlevel.open_process(
        [*LARS, "query", str(modid), str(cmdid), "--dns", dns, "--watch", "--json"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        yield LineReader(process.stdout)
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


class Proxy:
    """A TCP forwarder to ``target`` that can be switched off (cutting live connections)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.enabled = True
        self.port = 0
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def disable(self) -> None:
        self.enabled = False
        for scope in list(self._scopes):
            scope.cancel()

    def enable(self) -> None:
        self.enabled = True

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.enabled:
                return
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                    finally:
                        self._scopes.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()
