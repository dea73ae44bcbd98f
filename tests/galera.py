"""A real MariaDB Galera cluster on loopback for tests and benchmarks (Debian's ``galera-4``).

:class:`GaleraCluster` starts ``nodes`` ``mariadbd`` processes as the ``mysql`` user, each
with its own datadir under a temporary directory and its own ports (SQL, gcomm, IST, SST),
all on 127.0.0.1 with ``--skip-name-resolve``. The first node bootstraps the cluster
(``--wsrep-new-cluster``) and the others join it by rsync SST. ``root@127.0.0.1`` logs in
with an empty password. With ``wsrep=False`` (and one node) the same server runs without
Galera: the "one server" of the benchmark, configured alike.

:meth:`GaleraCluster.isolate` cuts a node off from the others (``gmcast.isolate=1``): it
turns non-primary and refuses queries with errors 1047/1180 while the other two keep the
quorum; :meth:`GaleraCluster.rejoin` lets it back (it catches up by IST). :meth:`kill`
kills a node outright. Everything started is killed in :meth:`stop`.

Used as a context manager (``with GaleraCluster() as cluster``) or by the session fixture in
``tests/e2e/test_galera.py``. Needs root (to run mariadbd as ``mysql``), ``mariadb-server``,
``galera-4`` and ``rsync``; ``.ci/run`` installs them. A missing piece is an error here,
never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.netutil import free_tcp_port

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
CLIENT = "/usr/bin/mariadb"
PROVIDER = "/usr/lib/galera/libgalera_smm.so"
#: Seconds a node may take to start (a joiner includes its SST).
START_TIMEOUT = 120.0
#: Galera's cluster-wide SYNCED state (wsrep_local_state).
SYNCED = 4


class GaleraError(RuntimeError):
    """The cluster could not be started or did not reach the state asked for."""


def missing_components() -> list[str]:
    """What this machine lacks to run a cluster (empty when it has everything)."""
    missing = [path for path in (MARIADBD, INSTALL_DB, CLIENT, PROVIDER) if not Path(path).exists()]
    if shutil.which("rsync") is None:
        missing.append("rsync")
    if os.geteuid() != 0:
        missing.append("root (to run mariadbd as the mysql user)")
    return missing


class Node:
    """One mariadbd of the cluster."""

    def __init__(self, base: Path, index: int, *, wsrep: bool, cluster_ports: list[int]):
        self.index = index
        self.dir = base / f"node{index}"
        self.datadir = self.dir / "data"
        self.socket = self.dir / "mysqld.sock"
        self.log_path = self.dir / "error.log"
        self.cnf = self.dir / "my.cnf"
        self.port = free_tcp_port()
        self.gcomm_port = cluster_ports[index]
        self.ist_port = free_tcp_port()
        self.sst_port = free_tcp_port()
        self.wsrep = wsrep
        self.process: subprocess.Popen[bytes] | None = None
        self._cluster_ports = cluster_ports

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "[mysqld]",
            f"datadir={self.datadir}",
            f"socket={self.socket}",
            f"pid-file={self.dir / 'mysqld.pid'}",
            f"log-error={self.log_path}",
            f"port={self.port}",
            "bind-address=127.0.0.1",
            "skip-name-resolve",
            "user=mysql",
            "binlog_format=ROW",
            "default_storage_engine=InnoDB",
            "innodb_autoinc_lock_mode=2",
            "innodb_buffer_pool_size=64M",
            "innodb_log_file_size=32M",
            "innodb_flush_log_at_trx_commit=2",
            "max_connections=300",
            "performance_schema=OFF",
        ]
        if self.wsrep:
            members = ",".join(f"127.0.0.1:{port}" for port in self._cluster_ports)
            options = ";".join(
                [
                    f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}",
                    f"ist.recv_addr=127.0.0.1:{self.ist_port}",
                    "gcache.size=64M",
                    # A cut-off node is declared gone quickly, so the others keep going.
                    "evs.suspect_timeout=PT3S",
                    "evs.inactive_timeout=PT6S",
                    "evs.install_timeout=PT6S",
                    "pc.wait_prim_timeout=PT30S",
                ]
            )
            lines += [
                "wsrep_on=ON",
                f"wsrep_provider={PROVIDER}",
                f"wsrep_cluster_address=gcomm://{members}",
                "wsrep_cluster_name=lars_test",
                f"wsrep_node_name=node{self.index}",
                f"wsrep_node_address=127.0.0.1:{self.gcomm_port}",
                f"wsrep_provider_options={options}",
                "wsrep_sst_method=rsync",
                f"wsrep_sst_receive_address=127.0.0.1:{self.sst_port}",
                "wsrep_slave_threads=2",
            ]
        self.cnf.write_text("\n".join(lines) + "\n")

    def install(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir, "mysql", "mysql")
        shutil.chown(self.datadir, "mysql", "mysql")
        result = subprocess.run(
            [
                INSTALL_DB,
                f"--defaults-file={self.cnf}",
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise GaleraError(
                f"mariadb-install-db failed for node {self.index}:\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
            )

    def start(self, *, bootstrap: bool = False) -> None:
        argv = [MARIADBD, f"--defaults-file={self.cnf}"]
        if bootstrap:
            argv.append("--wsrep-new-cluster")
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sql(self, statement: str, *, timeout: float = 30.0) -> list[list[str]]:
        """Run SQL over the node's unix socket as root; rows as lists of text."""
        result = subprocess.run(
            [CLIENT, f"--socket={self.socket}", "-uroot", "-N", "-B", "-e", statement],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise GaleraError(
                f"node {self.index}: {statement!r} failed: {result.stderr.decode(errors='replace')}"
            )
        return [line.split("\t") for line in result.stdout.decode().splitlines()]

    def status(self) -> dict[str, str]:
        """The node's wsrep status variables (empty while it does not answer)."""
        try:
            rows = self.sql("SHOW GLOBAL STATUS LIKE 'wsrep_%'", timeout=5)
        except (GaleraError, subprocess.TimeoutExpired):
            return {}
        return {row[0].lower(): row[1] if len(row) > 1 else "" for row in rows}

    def accepts_tcp(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.settimeout(2)
                return bool(sock.recv(1))
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class GaleraCluster:
    """``nodes`` mariadbd on loopback: a Galera cluster, or one plain server (``wsrep=False``)."""

    def __init__(self, nodes: int = 3, *, wsrep: bool = True, base: Path | None = None):
        missing = missing_components()
        if missing:
            raise GaleraError(
                "a Galera cluster needs " + ", ".join(missing) + " (apt-get install"
                " mariadb-server galera-4 rsync; .ci/run does it)"
            )
        if not wsrep and nodes != 1:
            raise GaleraError("a server without Galera is one node")
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="lars-galera-")) if base is None else base
        os.chmod(self.base, 0o755)
        cluster_ports = [free_tcp_port() for _ in range(nodes)]
        self.nodes = [
            Node(self.base, i, wsrep=wsrep, cluster_ports=cluster_ports) for i in range(nodes)
        ]
        self.wsrep = wsrep

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> GaleraCluster:
        try:
            for node in self.nodes:
                node.write_config()
            self.nodes[0].install()
            self.nodes[0].start(bootstrap=self.wsrep)
            self.wait_synced(self.nodes[0])
            # root over TCP from 127.0.0.1 with no password (replicated to the joiners by SST).
            self.nodes[0].sql(
                "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';"
                " GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION"
            )
            for node in self.nodes[1:]:
                node.datadir.mkdir(parents=True, exist_ok=True)
                shutil.chown(node.dir, "mysql", "mysql")
                shutil.chown(node.datadir, "mysql", "mysql")
                node.start()
                self.wait_synced(node)
            if self.wsrep:
                self.wait_size(len(self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every mariadbd this cluster started and remove its directories."""
        for node in self.nodes:
            node.kill()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> GaleraCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- addresses -----------------------------------------------------------------------------

    def server_url(self, *indexes: int) -> str:
        """``mysql://root@127.0.0.1:P1,127.0.0.1:P2`` (no database) for the nodes named, in
        that order (every node when none is)."""
        chosen = [self.nodes[i] for i in indexes] if indexes else self.nodes
        return "mysql://root@" + ",".join(node.address for node in chosen)

    def create_database(self, name: str) -> None:
        self.nodes[0].sql(f"CREATE DATABASE IF NOT EXISTS `{name}`")

    def drop_database(self, name: str) -> None:
        for node in self.nodes:
            if node.alive() and node.status().get("wsrep_ready", "ON") == "ON":
                node.sql(f"DROP DATABASE IF EXISTS `{name}`")
                return

    # --- faults --------------------------------------------------------------------------------

    def isolate(self, index: int) -> None:
        """Cut node ``index`` off from the cluster (it becomes non-primary)."""
        self.nodes[index].sql("SET GLOBAL wsrep_provider_options='gmcast.isolate=1'")

    def rejoin(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Let an isolated node back in and wait until it is synced and the cluster whole."""
        self.nodes[index].sql("SET GLOBAL wsrep_provider_options='gmcast.isolate=0'")
        self.wait_synced(self.nodes[index], timeout)
        self.wait_size(len([n for n in self.nodes if n.alive()]), timeout)

    def wait_primary_without(self, index: int, timeout: float = 60.0) -> None:
        """Wait until node ``index`` says it is not primary and the others form the cluster."""
        deadline = time.monotonic() + timeout
        others = [n for n in self.nodes if n.index != index and n.alive()]
        while time.monotonic() < deadline:
            cut = self.nodes[index].status()
            if cut.get("wsrep_cluster_status", "") != "Primary" and all(
                n.status().get("wsrep_cluster_size") == str(len(others)) for n in others
            ):
                return
            time.sleep(0.2)
        raise GaleraError(f"node {index} was not cut off within {timeout}s")

    def restart(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Start a killed node again: it rejoins the cluster (IST, or SST if need be)."""
        node = self.nodes[index]
        node.kill()
        node.start()
        self.wait_synced(node, timeout)
        self.wait_size(len(self.nodes), timeout)

    def kill(self, index: int) -> None:
        """Kill node ``index`` (SIGKILL): no goodbye to the cluster."""
        self.nodes[index].kill()

    # --- waiting ------------------------------------------------------------------------------

    def wait_synced(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive():
                raise GaleraError(f"node {node.index} exited:\n{node.log()}")
            if node.accepts_tcp():
                status = node.status()
                if not self.wsrep and status is not None:
                    return
                if (
                    status.get("wsrep_local_state") == str(SYNCED)
                    and status.get("wsrep_ready") == "ON"
                ):
                    return
            time.sleep(0.2)
        raise GaleraError(f"node {node.index} not synced within {timeout}s:\n{node.log()}")

    def wait_size(self, size: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        alive = [n for n in self.nodes if n.alive()]
        while time.monotonic() < deadline:
            if all(n.status().get("wsrep_cluster_size") == str(size) for n in alive):
                return
            time.sleep(0.2)
        raise GaleraError(f"the cluster did not reach {size} nodes within {timeout}s")

    def query_all(self, database: str, statement: str) -> list[list[list[str]]]:
        """The rows of ``statement`` on every live node, in node order."""
        return [node.sql(f"USE `{database}`; {statement}") for node in self.nodes if node.alive()]


def describe(cluster: GaleraCluster) -> dict[str, Any]:
    """Each node's address and state, for failure messages."""
    return {
        node.address: {k: v for k, v in node.status().items() if k in _SHOWN}
        for node in cluster.nodes
    }


_SHOWN = ("wsrep_local_state_comment", "wsrep_cluster_status", "wsrep_cluster_size", "wsrep_ready")
