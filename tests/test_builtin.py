"""The shipped built-in model and demo adapters answer held-out prompts through the server (issue 5), and
`loraplex build-default` runs end to end (shortened)."""
import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clients.client import AsyncClient
from loader.builtin_tasks import BASE_TASKS, DEMO_TASKS, examples
from loader.default_model import BUILTIN_DIR
from tests.helpers import run_cli, start_server

REPO = Path(__file__).resolve().parent.parent
PER_TASK = 40


@pytest.fixture(scope="module")
def server():
    s = start_server("default", None, max_batch_size=64, max_lora_rank=64, max_queue_size=1024)
    yield s
    s.stop()


def test_every_task_through_the_server_in_mixed_batches(server):
    """Base tasks on the base model, each demo task on its adapter, all requests interleaved in one run."""
    jobs = [(adapter_id, task) for adapter_id, (_, tasks) in DEMO_TASKS.items() for task in tasks]
    jobs += [("", task) for task in BASE_TASKS]
    requests = [(adapter_id, task, row) for adapter_id, task in jobs
                for row in examples([task], PER_TASK, seed=1234, evaluation=True)]
    requests = requests[::2] + requests[1::2]  # interleave kinds so batches mix them

    async def run():
        async with AsyncClient(server.target, timeout=120) as client:
            replies = await asyncio.gather(*[client.generate(row["prompt"], adapter_id, max_new_tokens=16)
                                             for adapter_id, _, row in requests])
        return replies
    replies = asyncio.run(run())
    correct: dict[str, list[bool]] = {}
    for (adapter_id, task, row), reply in zip(requests, replies):
        correct.setdefault(f"{adapter_id or 'base'}/{task}", []).append(reply.text == row["completion"])
    accuracy = {k: sum(v) / len(v) for k, v in correct.items()}
    assert all(a >= 0.95 for a in accuracy.values()), accuracy


def test_base_model_fails_the_demo_tasks(server):
    async def run():
        async with AsyncClient(server.target, timeout=120) as client:
            rows = [row for _, tasks in DEMO_TASKS.values() for task in tasks
                    for row in examples([task], 20, seed=99, evaluation=True)]
            replies = await asyncio.gather(*[client.generate(r["prompt"], max_new_tokens=16) for r in rows])
            return sum(reply.text == r["completion"] for reply, r in zip(replies, rows)) / len(rows)
    assert asyncio.run(run()) <= 0.02  # README: the base model fails their tasks (<= 2%)


def test_shipped_files_and_build_report():
    report = json.loads((BUILTIN_DIR / "BUILD.json").read_text())
    assert report["seconds"] <= 30 * 60  # built on 2 CPU cores within the budget
    assert all(v >= 0.95 for k, v in report["accuracy"].items()
               if not k.startswith("base/") or k.split("/")[1] in BASE_TASKS)
    size = sum(f.stat().st_size for f in BUILTIN_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2 ** 20, size
    for adapter_id in DEMO_TASKS:  # no path that exists only on the machine that built them
        config = json.loads((BUILTIN_DIR / "adapters" / adapter_id / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] is None, adapter_id


def test_build_command_runs_end_to_end_in_quick_mode(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from clients.cli import main; main()", "build-default",
                             "--quick", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    for adapter_id in DEMO_TASKS:
        config = json.loads((tmp_path / "b" / "adapters" / adapter_id / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] is None, adapter_id
    assert "reverse/reverse" in json.loads((tmp_path / "b" / "BUILD.json").read_text())["accuracy"]


def test_build_command_refuses_unknown_adapters_and_an_out_without_a_base_model(tmp_path):
    """`--adapters revers` (a typo) retrained nothing, rewrote BUILD.json and exited 0; `--adapters reverse` on an
    --out without a built base model (or without the other demo adapters, which BUILD.json measures too) trained,
    then ended in a traceback. Each is one line now, exit code 2, and changes nothing."""
    def build_default(*args):
        return run_cli("build-default", "--quick", *args)
    built = tmp_path / "built"
    shutil.copytree(BUILTIN_DIR / "model", built / "model")
    shutil.copy(BUILTIN_DIR / "BUILD.json", built / "BUILD.json")
    typo = build_default("--out", str(built), "--adapters", "reverse", "revers")
    assert typo.returncode == 2 and typo.stderr.splitlines() == [
        "error: --adapters: revers is not among the demo adapters: reverse, sort, wordplay, caesar"], typo.stderr
    assert (built / "BUILD.json").read_bytes() == (BUILTIN_DIR / "BUILD.json").read_bytes()
    assert not (built / "adapters").exists()
    others = build_default("--out", str(built), "--adapters", "reverse")  # BUILD.json measures every demo adapter
    assert others.returncode == 2 and others.stderr.splitlines() == [
        f"error: --adapters retrains some demo adapters and measures them all, and {built / 'adapters'} lacks sort, "
        f"wordplay, caesar: name them too, or build without --adapters"], others.stderr
    assert (built / "BUILD.json").read_bytes() == (BUILTIN_DIR / "BUILD.json").read_bytes()
    bare = tmp_path / "bare"
    no_base = build_default("--out", str(bare), "--adapters", "reverse")
    assert no_base.returncode == 2 and no_base.stderr.splitlines() == [
        f"error: --adapters retrains demo adapters on the base model already built in --out, and {bare / 'model'} "
        f"holds none (no config.json): build it first, without --adapters"], no_base.stderr
    assert not bare.exists()


def test_build_is_deterministic_for_a_seed(tmp_path):
    from loader.builtin import QUICK, build
    from safetensors.torch import load_file
    for name in ("x", "y"):
        build(tmp_path / name, QUICK)
    for rel in ["model/model.safetensors", *[f"adapters/{a}/adapter_model.safetensors" for a in DEMO_TASKS]]:
        a, b = load_file(tmp_path / "x" / rel), load_file(tmp_path / "y" / rel)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), rel
