"""--deploy proves the root is the server's before training, and checks that what the server loaded is what was
trained: a wrong --deploy-root used to report 'deployed' while the server kept serving its own root."""
import json
from dataclasses import replace

import pytest

from adapters.training import TrainSettings
from clients.client import Client
from loader.deploy import DeployError, check, deploy
from loader.train_job_spec import TrainJob
from loader.training_job import run_job
from tests.helpers import run_cli, start_server, write_task


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    server = start_server(model_dirs["llama"], root, max_hydra_heads=4)
    yield server, root
    server.stop()


def test_a_root_that_is_not_the_servers_is_refused_before_training(model_dirs, served, tmp_path):
    server, root = served
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(DeployError, match=f"--deploy-root {other} is not the adapter root of {server.target}"):
        check(server.target, other, [tmp_path / "out" / "reverse"])
    check(server.target, root, [tmp_path / "out" / "reverse"])  # the server's own root passes
    assert list(other.iterdir()) == [] and list(root.iterdir()) == []  # the probes are gone
    with Client(server.target, timeout=30) as client:
        assert client.list_adapters() == []  # and nothing stays loaded
    data = write_task(tmp_path / "train.jsonl", 16, 0)
    result = run_cli("train", "--method", "lora", "--model", model_dirs["llama"], "--data", data, "--out",
                     tmp_path / "out" / "reverse", "--max-steps", "2", "--deploy", server.target, "--deploy-root", other)
    assert result.returncode == 2 and "is not the adapter root of" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "reverse").exists() and list(other.iterdir()) == []


@pytest.mark.parametrize("method, extra", [("lora", {"rank": 2}), ("adalora", {"init_r": 4, "target_r": 2}),
                                           ("hydralora", {"heads": 2, "rank": 2}),
                                           ("reslora", {"structure": "is", "rank": 2})])
def test_what_the_server_loads_is_compared_with_what_was_trained(model_dirs, served, tmp_path, method, extra):
    """served_form agrees with the server's AdapterInfo for every kind (AdaLoRA's kept ranks, Hydra's heads,
    ResLoRA's merge); an AdapterInfo that differs fails the deploy and rolls the root back."""
    from loader.deploy import _differences
    server, root = served
    data = write_task(tmp_path / "train.jsonl", 16, 0)
    out = tmp_path / f"{method}-x"
    summary = run_job(TrainJob(method=method, data=str(data), out=str(out), model=str(model_dirs["llama"]),
                               target_modules=["q_proj", "v_proj"], settings=replace(TrainSettings(), max_steps=3,
                                                                                     batch_size=4), **extra))
    assert json.loads((out / "training_log.json").read_text())["served"] == summary["served"]
    info, _ = deploy(out, server.target, root, expected=summary["served"])
    assert _differences(info, summary["served"]) == []
    wrong = {**summary["served"], "size_bytes": summary["served"]["size_bytes"] + 4,
             "module_ranks": {**summary["served"]["module_ranks"],
                              "model.layers.0.self_attn.q_proj": 99}}
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(DeployError, match=r"is not the adapter trained in .*q_proj rank \d+, trained 99; "
                                          r"\d+ bytes, trained \d+.* \(the root is as it was\)"):
        deploy(out, server.target, root, expected=wrong)
    assert sorted(p.name for p in root.iterdir()) == before
