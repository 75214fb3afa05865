"""Deploy a trained adapter to a running server: optionally copy it under the server's adapter root, then
LoadAdapter(replace=True) so the next Generate with that id uses it.

Copies land in a hidden, versioned directory next to the id (`.<id>@<stamp>`: ids start with a letter or
digit, so it is never an id itself), and `<root>/<id>` becomes a symlink to it in one atomic rename. A reader
(an auto-load after eviction, another replica) sees the old files or the new ones, never a missing or
half-copied directory. The previous version is kept for readers that resolved it a moment ago; older ones go.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from clients.client import Client
from loader.peft_files import CONFIG_FILE, WEIGHTS_FILE


def install(adapter_dir: Path, root: Path, adapter_id: str) -> tuple[Path, Path | None]:
    """Copy the adapter's files under `root` and point `root/adapter_id` at them atomically. Returns the copy and
    what the id pointed at before (None for a new id), for `roll_back`; every other version of the id is removed."""
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
    elif dest.is_dir():  # a plain directory from before: one short swap, then links only
        previous = root / f".{adapter_id}@0-replaced-{stamp}"
        dest.rename(previous)
    _point(root, adapter_id, version)
    for old in root.glob(f".{adapter_id}@*"):  # keep the new version and the one readers may have just resolved
        if old not in (version, previous):
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


def deploy(adapter_dir: Path, target: str, adapter_id: str | None = None, copy_to_root: Path | None = None,
           timeout: float = 120, **connection) -> object:
    """`connection`: Client's token= and tls= (LoadAdapter needs the admin token where one is configured). With
    `copy_to_root`, a LoadAdapter the server refuses (files it cannot serve, a missing admin token) rolls the root
    back: the files it refused never become what the id's next auto-load or a restart would read."""
    adapter_id = adapter_id or adapter_dir.name
    installed = install(adapter_dir, copy_to_root, adapter_id) if copy_to_root is not None else None
    try:
        with Client(target, timeout=timeout, **connection) as client:
            return client.load_adapter(adapter_id, replace=True)
    except BaseException:
        if installed is not None:
            roll_back(copy_to_root, adapter_id, *installed)
        raise
