"""Real Redis servers for tests: `start_server` (one redis-server, waited for until it answers),
and a Redis Cluster of three masters (`redis-server --cluster-enabled yes`) on free ports in a
temporary directory, joined with `redis-cli --cluster create`, each with an append-only file so
one can be stopped and started again with its data."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

import redis


def cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too and below 65536."""
    while True:
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def start_server(port: int, log: Path, *args: str, conf: Path | None = None,
                 timeout_s: float = 10) -> subprocess.Popen:
    """redis-server on 127.0.0.1:`port` with no snapshots (`args` add to that; `conf`: a config
    file first, e.g. a Sentinel's, with `--sentinel` among `args`), its output appended to `log`;
    returns once it answers PING, or raises with the log's tail."""
    command = ["redis-server", *([str(conf)] if conf else []), "--port", str(port), "--bind", "127.0.0.1",
               "--save", "", *args]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError(f"redis-server on port {port} did not answer: "
                                       f"{log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.05)
    finally:
        client.close()


class LocalCluster:
    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.dir = workdir
        self.ports = [cluster_port() for _ in range(masters)]
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = start_server(
            port, node_dir / "server.log", "--dir", str(node_dir), "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
            "--appendonly", "yes", "--appendfsync", "always")

    def stop_node(self, port: int) -> None:
        p = self.procs.pop(port)
        p.terminate()
        p.wait(10)

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every master says cluster_state:ok (all slots served)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for port in self.ports:
                client = redis.Redis(host="127.0.0.1", port=port)
                try:
                    states.append(client.execute_command("CLUSTER INFO"))
                except redis.RedisError:
                    states.append("")
                finally:
                    client.close()
            if all(_ok(s) for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become ok: {states}")
            time.sleep(0.1)

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot."""
        client = redis.Redis(host="127.0.0.1", port=self.ports[0])
        try:
            slot = client.execute_command("CLUSTER KEYSLOT", key)
            for start, stop, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= stop:
                    return int(primary[1])
        finally:
            client.close()
        raise LookupError(key)

    def close(self) -> None:
        for port in list(self.procs):
            self.stop_node(port)


def _ok(info) -> bool:
    if isinstance(info, dict):  # redis-py parses CLUSTER INFO
        return info.get("cluster_state") == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text
