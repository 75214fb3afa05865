"""The `loraplex` command line against a real server."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_peft_adapter, start_server

LORAPLEX = [sys.executable, "-c", "from clients.cli import main; main()"]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "demo", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    s = start_server(model_dirs["llama"], root, autoload_adapters=False)
    yield s
    s.stop()


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*LORAPLEX, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)


def test_generate_streams_text_and_reports_usage(server):
    result = run("generate", "--target", server.target, "--max-new-tokens", "5", "hello")
    assert result.returncode == 0, result.stderr
    assert "[length; 5 prompt + 5 completion tokens]" in result.stderr


def test_adapters_load_list_unload_and_errors(server):
    missing = run("generate", "--target", server.target, "--adapter", "demo", "hi")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "LoadAdapter" in missing.stderr
    loaded = run("adapters", "load", "--target", server.target, "demo")
    assert loaded.returncode == 0 and loaded.stdout.startswith("demo\tlora\trank=4")
    listed = run("adapters", "list", "--target", server.target)
    assert "demo\tlora" in listed.stdout
    ok = run("generate", "--target", server.target, "--adapter", "demo", "--max-new-tokens", "3", "hi")
    assert ok.returncode == 0 and "3 completion tokens" in ok.stderr
    assert run("adapters", "unload", "--target", server.target, "demo").stdout.strip() == "unloaded demo"
    again = run("adapters", "unload", "--target", server.target, "demo")
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr
