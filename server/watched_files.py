"""Files the server reads again when they change, so that credentials rotate without a restart (cert-manager
renewing a certificate; an operator revoking a token)."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Generic, TypeVar

from server.config import ConfigError

log = logging.getLogger("loraplex.files")
T = TypeVar("T")
CHECK_SECONDS = 1.0  # how stale a rotated file may be served: one stat per file per second, whatever the traffic


def _identity(paths: tuple[str, ...]) -> tuple:
    """What changes when a file is rewritten or replaced (a Kubernetes secret swaps a symlink): stat follows it."""
    found = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
        else:
            found.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


class WatchedFiles(Generic[T]):
    """`read()`'s value of `paths`, read again once any of them changed (looked at most every CHECK_SECONDS, by
    whichever thread asks). A read that fails (ConfigError: a half-written pair, a deleted file) keeps the last good
    value in force and is logged once per change of the files; `version` counts the values read."""

    def __init__(self, paths: list[str], read: Callable[[], T], what: str) -> None:
        self._paths, self._read, self.what = tuple(paths), read, what
        self._seen = _identity(self._paths)
        self.value = read()  # at start a bad file is the ConfigError that stops the server
        self.version = 0
        self._checked = time.monotonic()
        self._lock = threading.Lock()  # gRPC's TLS fetcher runs on its own threads, the token check on the loop

    def current(self) -> T:
        if time.monotonic() - self._checked >= CHECK_SECONDS and self._lock.acquire(blocking=False):
            try:
                self._checked = time.monotonic()
                identity = _identity(self._paths)
                if identity != self._seen:
                    self._seen = identity  # a bad change is reported once, and read again when it changes again
                    self._reload()
            finally:
                self._lock.release()
        return self.value

    def _reload(self) -> None:
        try:
            value = self._read()
        except ConfigError as exc:
            log.error("%s changed, but the new files cannot be used (the previous ones stay in force): %s",
                      self.what, exc)
            return
        self.value, self.version = value, self.version + 1
        log.warning("%s changed: read again", self.what)
