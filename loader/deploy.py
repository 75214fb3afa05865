"""Deploy a trained adapter to a running server: copy it under the server's adapter root, then
LoadAdapter(replace=True) so the next Generate with that id uses it.

The server reads adapters only from its own --adapter-root, so a deploy always names that root: loading
an id whose files were never copied there would report success and serve whatever the root held before.
Copies land in a hidden, versioned directory next to the id (`.<id>@<stamp>`: ids start with a letter or
digit, so it is never an id itself), and `<root>/<id>` becomes a symlink to it in one atomic rename. A reader
(an auto-load after eviction, another replica) sees the old files or the new ones, never a missing or
half-copied directory. The previous version is kept for readers that resolved it a moment ago; older ones go.
A plain directory found at `<root>/<id>` was not made by a deploy: it is moved aside and kept, never removed.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import grpc

from clients.client import Client
from loader.peft_files import CONFIG_FILE, WEIGHTS_FILE
from loader.registry import ID_RULE, valid_id

KEPT = "@0-replaced-"  # marks a plain directory a deploy moved aside: never pruned


class DeployError(Exception):
    """A deploy that cannot be done or was refused; the message says what to change."""


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
            try:  # may this client load adapters? An id no server accepts: INVALID_ARGUMENT, and nothing changes
                client.load_adapter("-")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
    except grpc.RpcError as exc:
        raise DeployError(f"cannot deploy to {target}: {exc.code().name}: {exc.details()}") from None
    return info


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
           **connection) -> tuple[object, Path | None]:
    """Copy `adapter_dir` under `root` (unless it already is `root/<id>`) and have the server at `target` load it,
    keeping the id's pin. Returns the server's AdapterInfo and where a plain directory found at `root/<id>` was
    moved (None when there was none). `connection`: Client's token= and tls= (LoadAdapter needs the admin token
    where one is configured). A LoadAdapter the server refuses (files it cannot serve, a missing admin token) rolls
    the root back: the refused files never become what the id's next auto-load or a restart would read."""
    adapter_id = adapter_id or adapter_id_for(adapter_dir)
    dest = root / adapter_id  # trained straight into the root (a plain directory there): served as it is
    in_place = not dest.is_symlink() and os.path.abspath(dest) == os.path.abspath(adapter_dir)
    installed = None if in_place else install(adapter_dir, root, adapter_id)
    try:
        with Client(target, timeout=timeout, **connection) as client:
            info = client.load_adapter(adapter_id, replace=True)  # pin unset: the id keeps its pin
    except BaseException as exc:
        if installed is not None:
            roll_back(root, adapter_id, *installed)
        if isinstance(exc, grpc.RpcError):
            state = "the root is as it was" if installed is not None else f"the refused files stay in {dest}"
            raise DeployError(f"{target} did not load {adapter_id!r} ({state}): {exc.code().name}: "
                              f"{exc.details()}") from None
        raise
    moved = installed[1] if installed and installed[1] is not None and KEPT in installed[1].name else None
    return info, moved
