"""Starts the real radixkv-server on loopback for the tests that need it.

The binary is ``$RADIXKV_SERVER_BIN`` (default ``<repo>/target/debug/radixkv-server``).
Without it, the server tests are skipped, unless ``RADIXKV_REQUIRE_SERVER=1``
(set by ``scripts/python-client test``) makes that a failure.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
PAGE_SIZE = 16
BLOCK_BYTES = 4096
LAYOUT = "pytest-layout"

CONFIG = """\
admin_token = "admin-secret"

[[tenants]]
name = "alice"
token = "alice-token"
shm = true

[[tenants]]
name = "bob"
token = "bob-token"
"""


def _die_with_parent() -> None:
    """In the child: SIGTERM it if pytest dies, so no server outlives a
    killed test run (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def server_bin() -> Path:
    return Path(os.environ.get("RADIXKV_SERVER_BIN") or REPO / "target" / "debug" / "radixkv-server")


@dataclass
class Server:
    proc: subprocess.Popen
    tcp: str
    unix: Optional[str]
    metrics: Optional[str]
    shm_path: Path
    log: Path
    stdout: List[str] = field(default_factory=list)
    local: Optional[str] = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; kills it (and fails) if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored SIGTERM for {timeout}s; log:\n{self.log_text()[-4000:]}") from None
        return self.proc.returncode


def start_server(
    tmp: Path,
    config: str = CONFIG,
    *,
    shm: bool = True,
    block_bytes: int = BLOCK_BYTES,
    host_blocks: int = 256,
    disk_blocks: int = 1024,
    extra: Optional[List[str]] = None,
) -> Server:
    """Starts a server with its state under ``tmp`` (reused if it exists: a
    restart on the same directory comes back warm) and waits for READY."""
    binary = server_bin()
    if not binary.exists():
        msg = f"no server binary at {binary} (build it: cargo build -p cache-server --bin radixkv-server)"
        if os.environ.get("RADIXKV_REQUIRE_SERVER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.toml").write_text(config)
    shm_path = tmp / "host.shm"
    args = [
        str(binary),
        "--config", str(tmp / "config.toml"),
        "--listen", "127.0.0.1:0",
        "--unix-socket", str(tmp / "radixkv.sock"),
        "--metrics-listen", "127.0.0.1:0",
        "--data-dir", str(tmp / "data"),
        "--host-bytes", str(host_blocks * block_bytes),
        "--disk-bytes", str(disk_blocks * block_bytes),
        "--page-size", str(PAGE_SIZE),
        "--block-bytes", str(block_bytes),
        "--layout", LAYOUT,
    ]  # fmt: skip
    if shm:
        args += ["--shm-path", str(shm_path)]
    args += extra or []
    log = tmp / "server.log"
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            preexec_fn=_die_with_parent,
        )
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    seen: List[str] = []

    def pump() -> None:  # keeps reading so the server never blocks on stdout
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 60
    ready = None
    while ready is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not print READY (exit {proc.returncode}); log:\n{log.read_text(errors='replace')[-4000:]}")
        if line.startswith("READY"):
            ready = line
    fields: Dict[str, str] = dict(kv.split("=", 1) for kv in ready.split()[1:])
    return Server(proc, fields["tcp"], fields.get("unix"), fields.get("metrics"), shm_path, log, seen, fields.get("local"))


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = start_server(tmp_path_factory.mktemp("radixkv"))
    yield srv
    srv.stop()


@pytest.fixture
def model(request) -> str:
    """A model name of its own per test, so tests never share pages."""
    return f"model-{request.node.name}"
