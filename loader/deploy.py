"""Deploy a trained adapter to a running server: optionally copy it under the server's adapter root, then
LoadAdapter(replace=True) so the next Generate with that id uses it."""
from __future__ import annotations

import shutil
from pathlib import Path

from clients.client import Client
from loader.peft_files import CONFIG_FILE, WEIGHTS_FILE


def deploy(adapter_dir: Path, target: str, adapter_id: str | None = None, copy_to_root: Path | None = None,
           timeout: float = 120, **connection) -> object:
    """`connection`: Client's token= and tls= (LoadAdapter needs the admin token where one is configured)."""
    adapter_id = adapter_id or adapter_dir.name
    if copy_to_root is not None:
        dest = copy_to_root / adapter_id
        staging = copy_to_root / f".{adapter_id}.incoming"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(adapter_dir / name, staging / name)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)  # the server never sees a half-copied adapter directory
    with Client(target, timeout=timeout, **connection) as client:
        return client.load_adapter(adapter_id, replace=True)
