"""The state file: which adapters were loaded with LoadAdapter (and pinned), so a restart loads them again.

Written atomically (a unique temporary file, fsync, rename) after every change: a crash leaves the old file or the
new one, never half of one."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from loader import json_input

log = logging.getLogger("loraplex.registry")  # the registry's records, under its name in the logs


class UnreadableStateFile(Exception):
    """The state file exists but is not a list of loaded adapters; nothing was changed."""


class StateFile:
    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: nothing is recorded
        self._lock = threading.Lock()  # serialises writes, apart from the registry's lock (fsync is slow)
        self._frozen = False

    def read(self) -> dict[str, bool]:
        """id -> pinned, as recorded ({} when there is no file). UnreadableStateFile for a file that is not one."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            entries = json_input.loads(self.path.read_text())["adapters"]
            return {e["id"]: bool(e.get("pinned")) for e in entries if isinstance(e["id"], str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Refused, and left as it is: the server writes this file atomically, so one it cannot read is most
            # likely not its own (a mistyped --state-file naming someone's file, or a directory such as /tmp).
            raise UnreadableStateFile(
                f"the adapter state file {self.path} is not one this server wrote ({type(exc).__name__}: {exc}); "
                f"it is left untouched: fix or remove it, or give --state-file another path") from None

    def write(self, snapshot: Callable[[], dict[str, bool]]) -> None:
        """Record `snapshot()` (id -> pinned), taken under this file's lock: of two changes writing at once, the
        file ends with the newer state, whichever writes last."""
        if self.path is None:
            return
        with self._lock:
            if self._frozen:
                return
            body = json.dumps({"adapters": [{"id": i, "pinned": p} for i, p in sorted(snapshot().items())]}, indent=1)
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
                with os.fdopen(fd, "w") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError as exc:  # the change itself took effect; only its survival across restarts is lost
                log.error("could not record loaded adapters in %s (%s): a restart will not load them again",
                          self.path, exc)

    def freeze(self) -> None:
        """From now on the file is left as it is: the server is stopping, and a LoadAdapter/UnloadAdapter still
        running was just told UNAVAILABLE, so the restart must not see it as done."""
        with self._lock:
            self._frozen = True
