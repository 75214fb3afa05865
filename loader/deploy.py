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


def install(adapter_dir: Path, root: Path, adapter_id: str) -> Path:
    """Copy the adapter's files under `root` and point `root/adapter_id` at them atomically; returns the copy."""
    stamp = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    version = root / f".{adapter_id}@{stamp}"
    version.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(adapter_dir / name, version / name)
    dest = root / adapter_id
    link = root / f".{adapter_id}.link-{stamp}"
    os.symlink(version.name, link)  # relative: the root can move or be mounted elsewhere
    if dest.is_dir() and not dest.is_symlink():  # a plain directory from before: one short swap, then links only
        dest.rename(root / f".{adapter_id}@0-replaced-{stamp}")
    os.replace(link, dest)
    versions = sorted(root.glob(f".{adapter_id}@*"), key=lambda p: p.stat().st_mtime_ns)
    for old in versions[:-2]:  # keep the new version and the one before it
        shutil.rmtree(old, ignore_errors=True)
    return version


def deploy(adapter_dir: Path, target: str, adapter_id: str | None = None, copy_to_root: Path | None = None,
           timeout: float = 120, **connection) -> object:
    """`connection`: Client's token= and tls= (LoadAdapter needs the admin token where one is configured)."""
    adapter_id = adapter_id or adapter_dir.name
    if copy_to_root is not None:
        install(adapter_dir, copy_to_root, adapter_id)
    with Client(target, timeout=timeout, **connection) as client:
        return client.load_adapter(adapter_id, replace=True)
