"""Adapter ids that are symbolic links: a loop is NOT_FOUND, a link to anything but a directory directly under the
root is INVALID_ARGUMENT saying where it points, on LoadAdapter and on Generate (auto-load) alike; never INTERNAL."""
import os
import shutil

import grpc
import pytest

from clients.client import Client
from tests.helpers import make_peft_adapter, start_server, status_of

C = grpc.StatusCode


@pytest.fixture(scope="module")
def client(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "good", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    os.symlink("loop", root / "loop")  # resolving it raised RuntimeError (Python 3.11): INTERNAL before
    (root / "sub").mkdir()
    shutil.copytree(root / "good", root / "sub" / "x")
    os.symlink("sub/x", root / "nested")  # inside the root, which the message denied before
    os.symlink("good", root / "flip")  # what deploys do: served
    (root / "plain").write_text("not an adapter")
    os.symlink("plain", root / "to-file")  # these three were NOT_FOUND, saying nothing of the link
    os.mkfifo(root / "fifo")
    os.symlink("fifo", root / "to-fifo")
    os.symlink("gone", root / "dangling")
    server = start_server(model_dirs["llama"], root)
    try:
        with Client(server.target, timeout=60) as c:
            yield c
    finally:
        server.stop()


@pytest.mark.parametrize("call", ["load", "generate"])
def test_symlinks_that_loop_or_point_below_the_root_are_named(client, call):
    run = client.load_adapter if call == "load" else lambda i: client.generate([5, 6, 7], i, max_new_tokens=2)
    code, details = status_of(run, "loop")
    assert code == C.NOT_FOUND and "adapter 'loop' not found" in details and "symbolic link that loops" in details
    code, details = status_of(run, "nested")
    assert code == C.INVALID_ARGUMENT and "'nested'" in details, details
    assert "'sub/x', inside the adapter root but not directly under it" in details, details
    for name, what in (("to-file", "something that is not a directory"), ("to-fifo", "something that is not a "
                       "directory"), ("dangling", "nothing (its target does not exist)")):
        code, details = status_of(run, name)
        assert code == C.INVALID_ARGUMENT and f"{name!r}: it is a symbolic link to {what}" in details, details
    assert status_of(run, "plain")[0] == C.NOT_FOUND  # a file, no link: there is no such adapter
    run("flip")
