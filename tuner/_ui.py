"""``--ui``: an ``mlflow ui`` on 127.0.0.1 for the search's local store, for the search's length.

The UI is a child process in its own process group (``mlflow ui`` runs uvicorn as a grandchild,
and both must go): :meth:`LocalUI.stop` terminates the group, and the search calls it in a
``finally``, so an error or Ctrl-C in the driver stops the UI too. Ctrl-C in a terminal does not
reach the group itself (its own session): the driver decides when the UI ends, after Tune has
stopped its trials. Only a driver killed with SIGKILL leaves the UI running (``kill PID``, the
pid printed at the start, ends it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalUI", "local_store", "port_free", "free_port"]

HOST = "127.0.0.1"  # never another interface: the UI has no authentication
#: how long the search waits for the UI to answer before its first trial (it starts in ~10 s on
#: a quiet 2-core machine); past that the search goes on and the UI keeps starting
START_TIMEOUT_S = 120.0
#: how long a terminated UI may take to exit before it is killed
STOP_TIMEOUT_S = 10.0


def local_store(tracking_uri: str) -> bool:
    """Whether ``mlflow ui`` can serve this store from this machine (SQLite file or folder)."""
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalUI:
    """``mlflow ui --backend-store-uri URI --host 127.0.0.1 --port PORT`` as a child process."""

    def __init__(self, tracking_uri: str, port: int | None = None,
                 log_path: str | Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        if log_path is None:
            # a private file (mode 0600, a name no one can guess or place beforehand), not a
            # predictable name in /tmp that another user could link elsewhere
            fd, name = tempfile.mkstemp(prefix="mlflow-ui-", suffix=".log")
            self.log_path = Path(name)
            self._log = os.fdopen(fd, "wb")
        else:
            self.log_path = Path(log_path).resolve()
            self._log = open(self.log_path, "wb")
        # its artifacts: each experiment's artifact location is an absolute file:// folder
        # (tuner.tracking.Tracker), which the UI serves from there
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
             "--host", HOST, "--port", str(self.port), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str | None:
        """None once the UI answers; else why not (it exited, or it is still starting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                return (f"mlflow ui exited with code {self.process.returncode}"
                        f"{': ' + tail[0][:200] if tail else ''} (log: {self.log_path})")
            if self.answers():
                return None
            if time.monotonic() > deadline:
                return (f"mlflow ui does not answer after {timeout_s:.0f} s; it keeps starting "
                        f"(log: {self.log_path})")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate the UI's process group (SIGTERM, then SIGKILL) and wait until every process
        of it has gone (uvicorn's workers outlive ``mlflow ui`` by a moment); safe to call twice."""
        try:
            self._signal_group(signal.SIGTERM)
            if not self._wait_group(STOP_TIMEOUT_S):
                self._signal_group(signal.SIGKILL)
                self._wait_group(STOP_TIMEOUT_S)
        finally:
            self._log.close()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_group(self, timeout_s: float) -> bool:
        """Whether the group is empty within ``timeout_s`` (its leader reaped here)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.process.poll()
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False
