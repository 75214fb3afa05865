"""Deploy a trained adapter to a running server: copy it under the server's adapter root, then
LoadAdapter(replace=True) so the next Generate with that id uses it.

The server reads adapters only from its own --adapter-root, so a deploy always names that root: loading
an id whose files were never copied there would report success and serve whatever the root held before.
Copies land in a hidden, versioned directory next to the id (`.<id>@<stamp>`: ids start with a letter or
digit, so it is never an id itself), and `<root>/<id>` becomes a symlink to it in one atomic rename. A reader
(an auto-load after eviction, another replica) sees the old files or the new ones, never a missing or
half-copied directory. The previous version is kept for readers that resolved it a moment ago; older ones go.
A plain directory found at `<root>/<id>` was not made by a deploy: it is moved aside and kept, never removed.

A writable root and a server that answers do not make the root the server's: a probe proves it (`prove_root`),
before training and again before the copy, and the AdapterInfo the load returns is compared with what the trained
files make (`served_form`), so a deploy never reports success while the server serves something else.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import grpc

from adapters.layer import dense_weight, module_shape
from clients.client import Client
from loader.peft_files import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from loader.registry import ID_RULE, valid_id
from protos.loraplex.v1 import inference_pb2 as pb

KEPT = "@0-replaced-"  # marks a plain directory a deploy moved aside: never pruned
LOCK = ".deploy-lock"  # in the root: never an id (ids start with a letter or digit)


class DeployError(Exception):
    """A deploy that cannot be done or was refused; the message says what to change. `refused`: the server read the
    files and refused them (a limit, a bad file): trying again changes nothing until the server or the files do."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


# What a LoadAdapter answers when it read the files and will not serve them (a server limit, a file it refuses)
REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)


def adapter_id_for(out: Path) -> str:
    """The id a trained adapter deploys as: its output directory's name (as given, links not followed), which must
    be a valid id."""
    adapter_id = Path(os.path.abspath(out)).name
    if not valid_id(adapter_id):
        raise DeployError(f"--out {out} would deploy as adapter id {adapter_id!r}: {ID_RULE}; name the output "
                          f"directory after the id")
    return adapter_id


def check(target: str, root: Path, outs: list[Path], timeout: float = 10, **connection):
    """Before training: every output has its own valid id and is not a version the server reads, the root is a
    directory this user can write to, and the server answers: a deploy problem is found before the training time
    is spent, not after. Returns the server's ServerInfo (its limits)."""
    ids: dict[str, Path] = {}
    for out in outs:
        adapter_id = adapter_id_for(out)
        if adapter_id in ids:
            raise DeployError(f"--out {ids[adapter_id]} and {out} would both deploy as adapter id {adapter_id!r}")
        ids[adapter_id] = out
        if (root / adapter_id).is_symlink() and os.path.abspath(out) == os.path.abspath(root / adapter_id):
            raise DeployError(f"--out {out} is the version of {adapter_id!r} the server reads now (a deploy's link): "
                              f"train into another directory and deploy from there")
    if not root.is_dir():
        raise DeployError(f"--deploy-root {root} is not a directory: give the server's --adapter-root")
    if not os.access(root, os.W_OK | os.X_OK):
        raise DeployError(f"--deploy-root {root} is not writable by this user: the adapter is copied there")
    try:
        with Client(target, timeout=timeout, **connection) as client:
            info = client.server_info()
            prove_root(client, root, target)  # also proves this client may load adapters (the admin token)
    except grpc.RpcError as exc:
        raise DeployError(f"cannot deploy to {target}: {exc.code().name}: {exc.details()}") from None
    return info


def prove_root(client: Client, root: Path, target: str) -> None:
    """`root` is the directory the server reads adapters from: a throwaway id written there with a config that is
    not JSON, loaded, must be refused as unreadable (FAILED_PRECONDITION naming it); NOT_FOUND means the server
    reads another directory. The probe is removed either way, and a failed load leaves nothing loaded."""
    probe = f"deploy-probe-{uuid.uuid4().hex[:16]}"
    (root / probe).mkdir()
    try:
        (root / probe / CONFIG_FILE).write_text("a deploy's probe of the adapter root, not an adapter\n")
        try:
            client.load_adapter(probe)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and repr(probe) in (exc.details() or ""):
                return
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise DeployError(f"--deploy-root {root} is not the adapter root of {target}: an adapter written "
                                  f"there is not found by it ({exc.details()}); give the server's --adapter-root "
                                  f"(as this machine sees it)") from None
            raise
        client.unload_adapter(probe)
        raise DeployError(f"{target} loaded the probe {probe!r} written under --deploy-root {root}, a config that is "
                          f"not JSON: it is not a loraplex server this deploy can check")
    finally:
        shutil.rmtree(root / probe, ignore_errors=True)


def served_form(adapter_dir: Path, layers: dict) -> dict:
    """What a server reports once it loads this adapter (AdapterInfo: kind, per-module ranks, heads, size), from
    the files just written, read by the server's own reader: AdaLoRA's kept ranks, HydraLoRA's heads and ResLoRA's
    merge come out as served. `layers`: the trained layers by module path; their frozen `base` modules give the
    shapes (and the base weights a merge may need)."""
    shapes = {name: module_shape(name, layer.base) for name, layer in layers.items()}
    adapter = read_adapter(adapter_dir, adapter_dir.name, shapes, max_rank=1 << 30, load_serial=0, max_heads=1 << 30,
                           base_weight=lambda name: dense_weight(layers[name].base).cpu())
    return {"kind": adapter.kind.value, "module_ranks": {m: f.rank for m, f in sorted(adapter.modules.items())},
            "heads": adapter.max_heads, "size_bytes": adapter.size_bytes}


def _differences(info, expected: dict) -> list[str]:
    kind = pb.AdapterKind.Name(info.kind).removeprefix("ADAPTER_KIND_").lower()
    got, want = dict(info.module_ranks), expected["module_ranks"]
    found = []
    if kind != expected["kind"]:
        found.append(f"kind {kind}, trained {expected['kind']}")
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        found.append(f"target modules differ ({len(extra)} not trained, e.g. {extra[:2]}; {len(missing)} trained "
                     f"missing, e.g. {missing[:2]})")
    elif got != want:
        module = next(m for m in sorted(want) if got[m] != want[m])
        found.append(f"{module} rank {got[module]}, trained {want[module]}")
    if info.heads != expected["heads"]:
        found.append(f"{info.heads} head(s), trained {expected['heads']}")
    if info.size_bytes != expected["size_bytes"]:
        found.append(f"{info.size_bytes} bytes, trained {expected['size_bytes']}")
    return found


def install(adapter_dir: Path, root: Path, adapter_id: str) -> tuple[Path, Path | None]:
    """Copy the adapter's files under `root` and point `root/adapter_id` at them atomically. Returns the copy and
    what the id pointed at before (None for a new id), for `roll_back`; other deployed versions are removed."""
    stamp = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    version = root / f".{adapter_id}@{stamp}"
    version.mkdir(parents=True)
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(adapter_dir / name, version / name)
    except BaseException:  # a failed copy (disk full, interrupted) must not stay behind as a "version"
        shutil.rmtree(version, ignore_errors=True)
        raise
    dest = root / adapter_id
    previous = None
    if dest.is_symlink():
        previous = root / os.readlink(dest)
    elif dest.is_dir():  # someone else's directory: moved aside in one rename, kept (links only from now on)
        previous = root / f".{adapter_id}{KEPT}{stamp}"
        dest.rename(previous)
    _point(root, adapter_id, version)
    for old in root.glob(f".{adapter_id}@*"):  # keep the new version and the one readers may have just resolved
        if old not in (version, previous) and KEPT not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return version, previous


def roll_back(root: Path, adapter_id: str, version: Path, previous: Path | None) -> None:
    """Undo `install`: the id points at what it did before (or no longer exists), and the copy is removed."""
    if previous is not None:
        _point(root, adapter_id, previous)
    else:
        (root / adapter_id).unlink(missing_ok=True)
    shutil.rmtree(version, ignore_errors=True)


def _point(root: Path, adapter_id: str, target: Path) -> None:
    link = root / f".{adapter_id}.link-{uuid.uuid4().hex}"
    # relative where it can be: the root can move or be mounted elsewhere
    os.symlink(target.name if target.parent == root else target, link)
    os.replace(link, root / adapter_id)


def deploy(adapter_dir: Path, target: str, root: Path, adapter_id: str | None = None, timeout: float = 120,
           expected: dict | None = None, **connection) -> tuple[object, Path | None]:
    """Copy `adapter_dir` under `root` (unless it already is `root/<id>`) and have the server at `target` load it,
    keeping the id's pin. Returns the server's AdapterInfo and where a plain directory found at `root/<id>` was
    moved (None when there was none). `connection`: Client's token= and tls= (LoadAdapter needs the admin token
    where one is configured). The root is proved the server's first (training may have outlasted the server's
    configuration); `expected` (served_form) is compared with the AdapterInfo the load returns. A LoadAdapter the
    server refuses (files it cannot serve, a missing admin token) or answers with another adapter than the one
    trained rolls the root back: those files never become what the id's next auto-load or a restart would read."""
    adapter_id = adapter_id or adapter_id_for(adapter_dir)
    with _root_lock(root):
        return _deploy(adapter_dir, target, root, adapter_id, timeout, expected, connection)


@contextmanager
def _root_lock(root: Path):
    """One deploy into `root` at a time, across processes (a batch's ranks, two trainers): each install prunes the
    versions it did not make or replace, so two at once removed each other's, and left the id a link to nothing."""
    try:  # read-only: flock needs no more, and another user's lock file in a shared root opens so too
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DeployError(f"--deploy-root {root}: cannot open its lock file {LOCK} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race the next deploy's open)


def _deploy(adapter_dir: Path, target: str, root: Path, adapter_id: str, timeout: float, expected: dict | None,
            connection: dict) -> tuple[object, Path | None]:
    dest = root / adapter_id  # trained straight into the root (a plain directory there): served as it is
    in_place = not dest.is_symlink() and os.path.abspath(dest) == os.path.abspath(adapter_dir)
    installed = None
    try:
        with Client(target, timeout=timeout, **connection) as client:
            prove_root(client, root, target)
            installed = None if in_place else install(adapter_dir, root, adapter_id)
            info = client.load_adapter(adapter_id, replace=True)  # pin unset: the id keeps its pin
        differences = _differences(info, expected) if expected is not None else []
        if differences:
            raise DeployError(f"{target} loaded {adapter_id!r} (version {info.version}) but it is not the adapter "
                              f"trained in {adapter_dir}: {'; '.join(differences)}. Another deploy of this id may "
                              f"have raced this one; deploy again"
                              + (" (the root is as it was)" if installed is not None else ""))
    except BaseException as exc:
        if installed is not None:
            roll_back(root, adapter_id, *installed)
        if isinstance(exc, grpc.RpcError):
            state = f"the refused files stay in {dest}" if in_place else "the root is as it was"
            raise DeployError(f"{target} did not load {adapter_id!r} ({state}): {exc.code().name}: "
                              f"{exc.details()}", refused=exc.code() in REFUSALS) from None
        raise
    moved = installed[1] if installed and installed[1] is not None and KEPT in installed[1].name else None
    return info, moved
