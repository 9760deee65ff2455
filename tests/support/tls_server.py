"""Real HTTPS servers for tests: an ASGI app served by uvicorn on 127.0.0.1, certificates from trustme.

The server runs in a thread with its own event loop, so both sync tests (a gateway subprocess, a
browser) and async tests (clients in the test's loop) can talk to it over a real TLS socket.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trustme
import uvicorn


class LocalCA:
    """A throwaway certificate authority and the PEM file that trusts it (``ca_bundle``)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.ca = trustme.CA()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="mcpb-ca-")
        self.directory = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pem_path = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.pem_path))
        self._issued = 0

    def issue(self, *names: str) -> Path:
        """A PEM file holding a key and certificate chain for ``names`` (default 127.0.0.1, localhost)."""
        self._issued += 1
        path = self.directory / f"server-{self._issued}.pem"
        cert = self.ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
        cert.private_key_and_cert_chain_pem.write_to_path(str(path))
        return path

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class TlsServer:
    """``app`` over HTTPS on 127.0.0.1 (``port`` 0: a free one, known before start via :attr:`port`)."""

    def __init__(self, app: Any, ca: LocalCA, *, names: tuple[str, ...] = (), port: int = 0) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port: int = self._sock.getsockname()[1]
        certfile = ca.issue(*names)
        config = uvicorn.Config(
            app,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(certfile),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def base_url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}"

    def start(self) -> TlsServer:
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"tls-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test HTTPS server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[TlsServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
