"""The real server on its own event loop thread, for tests and benchmarks (`python -m server` is the real entry)."""
from __future__ import annotations

import asyncio
import threading

from server.app import Ports, serve
from server.config import ServerConfig
from server.serving import Serving


class BackgroundServer:
    """The real server on its own event loop thread (tests, benchmarks)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.ports: Ports | None = None  # set once bound; `start` returns when the model is ready
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.serving = Serving()  # the live engine, registry and model once started
        self._thread = threading.Thread(target=self._main, name="loraplex-server", daemon=True)

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.config, on_ready=lambda ports: self._ready.set(), stop_event=self._stop,
                        on_listening=self._on_listening, serving=self.serving)
        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def _on_listening(self, ports: Ports) -> None:
        self.ports = ports

    def start(self, timeout: float = 300) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.ports.grpc}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
