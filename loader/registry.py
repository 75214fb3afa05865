"""Adapter registry: disk (the adapter root) -> host memory (an LRU bounded in bytes) -> device slots.

Thread-safe; file reads run on the caller's thread (never the engine's) outside the registry lock.
Device slots are the engine's business (adapters.slot_bank.SlotBank); requests carry the exact
CanonicalAdapter they resolved, so eviction or hot-swap never changes a running request's weights.
The host-memory budget is a hard limit: it counts the weights that requests in flight hold (`resolve` ..
`release`), which eviction cannot free, and an adapter that would go beyond it is AdapterMemoryFull.

Adapters loaded with LoadAdapter (not those auto-loaded on first use) are recorded in a state file
(loader.state_file) after every change, and loaded again by `restore` on restart.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from adapters.canonical import CanonicalAdapter
from loader.peft_files import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE
from loader.state_file import StateFile
from server.errors import AdapterMemoryFull, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("loraplex.registry")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE)  # what the readers read (the pickle: to refuse it)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ID_RULE = ("use 1-128 characters from [A-Za-z0-9._-], starting with a letter or digit, without '..'; ids name a "
           "directory directly under the adapter root")
Reader = Callable[[Path, str, int], CanonicalAdapter]  # (directory, adapter_id, load_serial)


def valid_id(adapter_id: str) -> bool:
    return bool(_ID.fullmatch(adapter_id)) and ".." not in adapter_id


@dataclasses.dataclass
class AdapterRecord:
    adapter_id: str
    path: Path
    version: int
    pinned: bool
    weights: CanonicalAdapter | None  # None: evicted from host memory, read again on next use
    size_bytes: int
    last_used: float
    kind: str
    module_ranks: dict[str, int]
    heads: int
    metadata: dict
    files: tuple = ()  # identity of the files read (inode, size, mtime, ctime): changed files are a new version


def _files_identity(path: Path) -> tuple:
    """What tells one set of adapter files from another without reading them. The change time too: a file rewritten
    in place at the same size keeps its inode, and its modification time where a tool sets it back (cp -p, rsync -t
    --inplace), but no tool can set the change time, which every write moves."""
    out = []
    for child in sorted(path.iterdir()):
        if child.name in ADAPTER_FILES and child.is_file():  # (a training log rewritten beside them changes nothing)
            st = child.stat()
            out.append((child.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _unchanged(path: Path, files: tuple) -> bool:
    try:
        return _files_identity(path) == files
    except OSError:
        return False


class AdapterRegistry:
    def __init__(self, root: Path | None, reader: Reader, cache_bytes: int, autoload: bool,
                 on_evict: Callable[[CanonicalAdapter], None] = lambda adapter: None,
                 on_change: Callable[[int, int], None] = lambda in_memory, on_disk: None,
                 state_file: Path | None = None) -> None:
        self.root = root.resolve() if root is not None else None
        self._reader = reader
        self.cache_bytes = cache_bytes
        self.autoload = autoload
        self._on_evict = on_evict
        self._on_change = on_change  # (adapters in host memory, adapters evicted to disk) after every change
        self._lock = threading.Lock()
        self._records: dict[str, AdapterRecord] = {}
        self._id_locks: dict[str, threading.RLock] = {}  # per id: reads, loads, unloads and their state records
        self._serial = itertools.count(1)
        self._state = StateFile(state_file)
        self._loaded: dict[str, bool] = {}  # ids loaded with LoadAdapter -> pinned; what the state file records
        self._held: dict[tuple, list] = {}  # weights key -> [weights, requests holding them] (resolve .. release)
        self._refused: dict[str, tuple] = {}  # id -> (files, size) of a read refused for want of room
        self._gone: dict[str, int] = {}  # id -> version of a record dropped as its directory was gone (_drop_gone)
        # New files are measured against the budget only once read, so reads at once are few: each may hold up to
        # --max-adapter-bytes beyond the budget while it lasts (the server waits for ids on many more threads).
        self.reads_at_once = min(32, (os.cpu_count() or 1) + 4)
        self._reads = threading.BoundedSemaphore(self.reads_at_once)

    def path_for(self, adapter_id: str) -> Path:
        """The adapter's directory, confined to the root: no separators, no '..', no symlink escapes."""
        if not valid_id(adapter_id):
            shown = adapter_id if len(adapter_id) <= 140 else adapter_id[:128] + f"... ({len(adapter_id)} characters)"
            raise InvalidArgument(f"invalid adapter_id {shown!r}: {ID_RULE}")
        if self.root is None:
            raise NotFound(f"adapter {adapter_id!r} not found: the server has no --adapter-root")
        try:
            path = (self.root / adapter_id).resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError up to Python 3.12, OSError after
            why = "loops" if isinstance(exc, RuntimeError) else f"cannot be followed ({exc.strerror})"
            raise NotFound(f"adapter {adapter_id!r} not found under the adapter root: it is a symbolic link that "
                           f"{why}") from None
        if path.parent != self.root:  # a link to anywhere else, inside the root (root/sub/x) or not
            where = ("the adapter root itself" if path == self.root else
                     f"{str(path.relative_to(self.root))!r}, inside the adapter root but not directly under it"
                     if self.root in path.parents else "a path outside the adapter root")
            raise InvalidArgument(f"invalid adapter_id {adapter_id!r}: it is a symbolic link to {where}; ids name "
                                  f"directories directly under the root")
        return path

    def _no_directory(self, adapter_id: str, path: Path) -> Exception:
        """What to answer for an id whose path (resolved by path_for) is no directory: a link there to a file, a
        FIFO or nothing is the operator's mistake to name, as a link elsewhere is; otherwise there is no adapter."""
        if (self.root / adapter_id).is_symlink():
            what = "nothing (its target does not exist)" if not path.exists() else "something that is not a directory"
            return InvalidArgument(f"invalid adapter_id {adapter_id!r}: it is a symbolic link to {what}; ids name "
                                   f"directories directly under the root")
        return NotFound(f"adapter {adapter_id!r} not found under the adapter root")

    # -- request path ---------------------------------------------------------------------------
    def resolve(self, adapter_id: str) -> CanonicalAdapter:
        """Weights for a request, loading on first use when auto-load is on; held (never evicted, counted in the
        budget) until `release`, which every resolve must be paired with. Blocking: call off the event loop."""
        path = self.path_for(adapter_id)
        with self._lock:
            record = self._records.get(adapter_id)
            if record is not None and record.weights is not None:
                record.last_used = time.monotonic()
                return self._hold(record.weights)
        if record is None and not self.autoload:
            raise NotFound(f"adapter {adapter_id!r} is not loaded and auto-load is off; call LoadAdapter first")
        started = time.monotonic()
        read = self._read(adapter_id, path, pin=None, reread=True, hold=True)
        log.info("read adapter %r from disk (%s): version %d, %s, %d bytes, %.0f ms", adapter_id,
                 "first use" if record is None else "after eviction", read.version, read.kind, read.size_bytes,
                 1000 * (time.monotonic() - started))
        return read.weights

    def release(self, weights: CanonicalAdapter) -> bool:
        """A request that resolved `weights` is done with them. True when that frees their memory for others."""
        with self._lock:
            entry = self._held[weights.key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[weights.key]
            return entry[1] == 0

    def might_fit(self, adapter_id: str) -> bool:
        """Whether the adapter, at the size it had when last read, would fit the budget now: a cheap gate (no I/O,
        the files are not looked at) before a request waiting for room tries again."""
        with self._lock:
            record = self._records.get(adapter_id)
            if record is not None and record.weights is not None:
                return True  # in memory already
            try:
                self._check_fits(adapter_id, (self._last_seen(adapter_id) or ((), 0))[1])
            except AdapterMemoryFull:
                return False
            return True  # (an adapter that never fits beside the pins: trying says so)

    def _last_seen(self, adapter_id: str) -> tuple | None:
        """(files, size in memory) of the adapter's latest read, refused or not (under self._lock)."""
        if adapter_id in self._refused:  # newer than the record: it is dropped when a read succeeds
            return self._refused[adapter_id]
        record = self._records.get(adapter_id)
        return (record.files, record.size_bytes) if record is not None else None

    # -- admin ----------------------------------------------------------------------------------
    def load(self, adapter_id: str, replace: bool, pin: bool | None) -> AdapterRecord:
        """pin None: a replace keeps the id's pin (a hot-swap must not make a pinned adapter evictable)."""
        path = self.path_for(adapter_id)
        with self.hold(adapter_id):  # the record and the state file change together (NOT_FOUND: no lock made)
            with self._lock:  # checked under the id's lock: of two concurrent first loads, the second is told
                if adapter_id in self._records and not replace:
                    how = "pinned" if self._records[adapter_id].pinned else "not pinned"
                    raise AlreadyExists(f"adapter {adapter_id!r} is already loaded ({how}); set replace to swap in "
                                        f"new files, and pin with it to pin them")
                current = self._records.get(adapter_id)
            pin = bool(current and current.pinned) if pin is None else pin
            record = self._repin(adapter_id, path, pin) if current is not None else None
            if record is None:
                record = self._read(adapter_id, path, pin=pin, reread=False, budget=not pin)  # pins: the operator's call
            self._record_state(adapter_id, record.pinned)
        return record

    def _repin(self, adapter_id: str, path: Path, pin: bool) -> AdapterRecord | None:
        """A replace whose files are the ones in memory: a new version of the same weights, with the pin asked for,
        and nothing read. So an unpin (or pin) needs no room for a second copy, which under memory pressure it
        would not get, and the device keeps its slot. None when there is something to read."""
        try:
            files = _files_identity(path)
        except OSError:
            return None  # the read says why
        with self._lock:
            current = self._records.get(adapter_id)
            if current is None or current.weights is None or current.files != files:
                return None
            record = dataclasses.replace(current, version=current.version + 1, pinned=pin, last_used=time.monotonic())
            self._records[adapter_id] = record
            self._refused.pop(adapter_id, None)  # a read refused for want of room is not what is loaded now
            evicted = self._evict_over_budget(keep=adapter_id)  # an unpinned adapter may now be over the budget
        for old in evicted:
            self._on_evict(old)
        self._report()
        return record

    def unload(self, adapter_id: str) -> AdapterRecord:
        self.path_for(adapter_id)
        with self._id_lock(adapter_id):
            with self._lock:
                record = self._records.pop(adapter_id, None)
                self._refused.pop(adapter_id, None)  # nothing of the id is known any more
            if record is None:
                raise NotFound(f"adapter {adapter_id!r} is not loaded")
            if record.weights is not None:
                self._on_evict(record.weights)
            self._record_state(adapter_id, None)
        self._report()
        return record

    def restore(self) -> list[str]:
        """Load again what the state file records (at start-up). Every entry stays recorded until it has been
        tried, so a restart interrupted mid-way loses nothing; entries that fail (directory gone or changed while
        the server was down) are logged, dropped, and returned. A file that cannot be read as a state file is
        UnreadableStateFile."""
        entries = self._state.read()
        failed = []
        for adapter_id, pinned in entries.items():  # the file is left as is until every entry has been tried
            try:
                with self._id_lock(adapter_id):
                    # nothing is in flight yet: the unpinned are evicted by LRU as ever, the pinned stay
                    self._read(adapter_id, self.path_for(adapter_id), pin=pinned, reread=False, budget=False)
                with self._lock:
                    self._loaded[adapter_id] = pinned
                log.info("restored adapter %r from the state file (%s)", adapter_id,
                         "pinned" if pinned else "not pinned")
            except Exception as exc:  # one broken adapter must not keep the server down
                log.error("could not load adapter %r again from the state file: %s", adapter_id, exc)
                failed.append(adapter_id)
        if failed:
            self._write_state()
        return failed

    def hold(self, adapter_id: str) -> threading.RLock:
        """The id's lock: load, replace and unload of this id wait while it is held. The server resolves and
        queues a request under it, and counts and unloads under it, so no request slips between the two.
        An id that is neither registered nor a directory is NOT_FOUND here: locks are kept per id, so ids that name
        nothing must not create them (a flood of made-up ids would grow the table without bound)."""
        path = self.path_for(adapter_id)
        with self._lock:
            known = adapter_id in self._records or adapter_id in self._id_locks
        if not known and not path.is_dir():
            raise self._no_directory(adapter_id, path)
        return self._id_lock(adapter_id)

    def get(self, adapter_id: str) -> AdapterRecord:
        self.path_for(adapter_id)
        with self._lock:
            record = self._records.get(adapter_id)
        if record is None:
            raise NotFound(f"adapter {adapter_id!r} is not loaded")
        return record

    def touch(self, adapter_id: str) -> None:
        """A request for the id came (and waits for room): its weights, if in memory, are the last the LRU evicts.
        No I/O."""
        with self._lock:
            record = self._records.get(adapter_id)
            if record is not None and record.weights is not None:
                record.last_used = time.monotonic()

    def in_memory(self, adapter_id: str) -> bool:
        """Whether a request for the id would find its weights in host memory now (nothing to read). No I/O."""
        with self._lock:
            record = self._records.get(adapter_id)
            return record is not None and record.weights is not None

    def known(self, adapter_id: str) -> bool:
        """Whether the id has been read as an adapter (loaded, evicted, or refused for want of room). No I/O."""
        with self._lock:
            return adapter_id in self._records or adapter_id in self._refused

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.adapter_id)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(r.size_bytes for r in self._records.values() if r.weights is not None)

    # -- internals ------------------------------------------------------------------------------
    def _id_lock(self, adapter_id: str) -> threading.RLock:
        with self._lock:
            return self._id_locks.setdefault(adapter_id, threading.RLock())

    def _hold(self, weights: CanonicalAdapter) -> CanonicalAdapter:  # under self._lock
        self._held.setdefault(weights.key, [weights, 0])[1] += 1
        return weights

    def _read(self, adapter_id: str, path: Path, pin: bool | None, reread: bool, hold: bool = False,
              budget: bool = True) -> AdapterRecord:
        with self._id_lock(adapter_id):  # one read per id at a time; concurrent first uses share the result
            with self._lock:
                current = self._records.get(adapter_id)
                if reread and current is not None and current.weights is not None:
                    if hold:
                        self._hold(current.weights)
                    return current
            if not path.is_dir():
                if current is not None and current.weights is None and self.autoload:
                    self._drop_gone(adapter_id)
                raise self._no_directory(adapter_id, path)
            try:
                files = _files_identity(path)
            except OSError as exc:
                raise FailedPrecondition(f"adapter {adapter_id!r}: cannot read its directory: {exc.strerror}") from None
            with self._lock:  # the same files read before take the same memory: refuse before reading them again
                known = self._last_seen(adapter_id)
                if budget and known is not None and known[0] == files:
                    self._check_fits(adapter_id, known[1])
            with self._reads:
                weights = self._reader(path, adapter_id, next(self._serial))  # (new files: checked once read)
            if _unchanged(path, files):
                weights = dataclasses.replace(weights, source=files)  # the prefix cache's blocks follow the files
            else:  # replaced while waiting for a read or being read (a deploy's link flipped): which files these
                files = ()  # weights are is not known; nothing counts them as any files' (a replace reads again)
            with self._lock:
                current = self._records.get(adapter_id)
                try:
                    if budget:
                        self._check_fits(adapter_id, weights.size_bytes)
                except (AdapterMemoryFull, FailedPrecondition):
                    self._refused[adapter_id] = (files, weights.size_bytes)  # a retry need not read them again
                    del weights  # the error's traceback keeps this frame alive until the RPC is answered
                    raise
                self._refused.pop(adapter_id, None)
                # a re-read after eviction is the same version only if the files are the same files
                same = reread and current is not None and bool(files) and current.files == files
                previous = current.version if current is not None else self._gone.pop(adapter_id, 0)
                version = previous + (0 if same else 1)
                record = AdapterRecord(adapter_id, path, version,
                                       pinned=(current.pinned if current and pin is None else bool(pin)),
                                       weights=weights, size_bytes=weights.size_bytes, last_used=time.monotonic(),
                                       kind=weights.kind.value,
                                       module_ranks={m: f.rank for m, f in weights.modules.items()},
                                       heads=weights.max_heads, metadata=dict(weights.metadata), files=files)
                self._records[adapter_id] = record
                if hold:
                    self._hold(weights)
                evicted = self._evict_over_budget(keep=adapter_id)
            if current is not None and current.weights is not None and not reread:
                evicted.append(current.weights)
            for old in evicted:
                self._on_evict(old)
            self._report()
            return record

    def _drop_gone(self, adapter_id: str) -> None:
        """With auto-load on, an evicted adapter whose directory is gone (removed to take it out of service, as the
        README advises) has nothing to read: it leaves the list and the tier gauges (under the id's lock). Should
        the directory come back (a swap, a remount), the next request loads it again; the state file is left as it
        is (a restart drops what is still gone). With auto-load off it stays listed: an operator's load, which only
        UnloadAdapter undoes (a directory briefly away must not unload it)."""
        with self._lock:
            self._gone[adapter_id] = self._records.pop(adapter_id).version  # files that come back are a new version
            self._refused.pop(adapter_id, None)
        log.warning("adapter %r: evicted, and its directory is gone: no longer listed", adapter_id)
        self._report()

    def _record_state(self, adapter_id: str, pinned: bool | None) -> None:
        with self._lock:
            if pinned is None:
                self._loaded.pop(adapter_id, None)
            else:
                self._loaded[adapter_id] = pinned
        self._write_state()

    def freeze_state(self) -> None:
        self._state.freeze()

    def _write_state(self) -> None:
        def snapshot() -> dict[str, bool]:
            with self._lock:  # the newest state, whichever change writes it
                return dict(self._loaded)
        self._state.write(snapshot)

    def _report(self) -> None:
        with self._lock:
            in_memory = sum(r.weights is not None for r in self._records.values())
            total = len(self._records)
        self._on_change(in_memory, total - in_memory)

    def _check_fits(self, adapter_id: str, size: int) -> None:
        """AdapterMemoryFull unless `size` more bytes fit the budget beside what eviction cannot free (under
        self._lock); FailedPrecondition if they never will, beside the pinned adapters. An adapter alone may exceed
        the budget, as before: there is nothing to wait for."""
        # unfreeable: weights requests hold, resident or not (an old version after a hot-swap, an unloaded adapter
        # still draining), and pinned adapters other than the one being replaced
        pinned = {r.weights.key: r.size_bytes for r in self._records.values()
                  if r.weights is not None and r.pinned and r.adapter_id != adapter_id}
        pinned_bytes = sum(pinned.values())
        if pinned_bytes and pinned_bytes + size > self.cache_bytes:  # finishing requests would not make room
            raise FailedPrecondition(
                f"adapter {adapter_id!r} ({size} bytes) does not fit the host-memory budget --adapter-cache-bytes "
                f"{self.cache_bytes} beside the pinned adapters ({pinned_bytes} bytes); unpin some or raise the "
                f"budget")
        unfreeable = sum({**{key: w.size_bytes for key, (w, _) in self._held.items()}, **pinned}.values())
        if unfreeable and unfreeable + size > self.cache_bytes:
            raise AdapterMemoryFull(
                f"adapter {adapter_id!r} ({size} bytes) does not fit the host-memory budget --adapter-cache-bytes "
                f"{self.cache_bytes}: {unfreeable} bytes are held by requests in flight and pinned adapters; retry "
                f"when requests finish")

    def _evict_over_budget(self, keep: str) -> list[CanonicalAdapter]:
        """Least recently used first; never pinned, held (evicting would free nothing and read them twice) or `keep`."""
        evicted = []
        resident = sorted((r for r in self._records.values() if r.weights is not None), key=lambda r: r.last_used)
        keys = {r.weights.key for r in resident}
        total = sum(r.size_bytes for r in resident) + sum(
            weights.size_bytes for key, (weights, _) in self._held.items() if key not in keys)
        for record in resident:
            if total <= self.cache_bytes:
                break
            if record.pinned or record.adapter_id == keep or record.weights.key in self._held:
                continue
            evicted.append(record.weights)
            record.weights = None
            total -= record.size_bytes
        return evicted
