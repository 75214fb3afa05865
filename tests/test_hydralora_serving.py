"""HydraLoRA served with its router evaluated per token, in prefill and decode, mixed with other rows."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.slot_bank import SlotBank
from clients.client import Client
from loader.base_model import load_base_model
from loader.hydra_files import save_hydralora
from loader.inject import inject
from loader.peft_files import read_adapter
from protos.loraplex.v1 import inference_pb2 as pb
from server.batch import Row, Runner
from tests.helpers import KERNELS, assert_load_refused, make_hydra_model, start_server

PROMPTS = [[5, 17, 99, 3, 42], [200, 11, 12], [64, 65, 66, 67, 68, 69, 70, 71]]
SPECS = {  # id: (heads, r, alpha, targets, router_bias, use_rslora)
    "hydra3": (3, 4, 8, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], False, False),
    "hydra2-bias": (2, 6, 12, ["o_proj", "down_proj"], True, False),
    "hydra1": (1, 4, 8, ["q_proj", "v_proj"], False, False),
    "hydra2-rslora": (2, 4, 16, ["k_proj", "up_proj"], False, True),  # alpha / sqrt(r): 8, not alpha / r: 4
}


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = {}
    for seed, (adapter_id, (heads, r, alpha, targets, bias, rslora)) in enumerate(SPECS.items()):
        model, layers = make_hydra_model(model_dirs["llama"], seed, heads, r, alpha, targets, bias, rslora)
        save_hydralora(layers, root / adapter_id, {"r": r, "lora_alpha": alpha, "lora_nums": heads,
                                                   "use_rslora": rslora})
        models[adapter_id] = model
    # hydra1's exact LoRA equivalent, written by PEFT: same A, B; K=1 makes the gate identically 1.
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in models["hydra1"].named_modules():
            if hasattr(layer, "lora_route"):
                target = peft.base_model.model.get_submodule(name)
                target.lora_A["default"].weight.copy_(layer.lora_A.weight)
                target.lora_B["default"].weight.copy_(layer.lora_B[0].weight)
    peft.save_pretrained(root / "lora-twin")
    return root, models


def _runner(model_dir, kernel: str = "torch"):
    base = load_base_model(str(model_dir), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=4, max_rank=16, device=torch.device("cpu"), dtype=torch.float32, kernel=kernel)
    return Runner(base.model, context, bank, base.pad_token_id, base.max_context), {s.name: s for s in shapes}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("adapter_id", list(SPECS))
def test_served_logits_equal_the_trainable_module(model_dirs, adapters, adapter_id, kernel):
    root, models = adapters
    runner, shapes = _runner(model_dirs["llama"], kernel)
    slot = runner.bank.acquire(read_adapter(root / adapter_id, adapter_id, shapes, 16, 1))
    batch, logits = runner.prefill([Row(p, slot) for p in PROMPTS])
    sequences = [list(p) for p in PROMPTS]
    with torch.no_grad():
        for _ in range(4):  # prefill, then decode steps: the router runs for every new token
            for i, seq in enumerate(sequences):
                want = models[adapter_id](torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(logits[i], want, atol=1e-5, rtol=0)
            for row, seq, lg in zip(batch.rows, sequences, logits):
                row.last_token = int(lg.argmax())
                seq.append(row.last_token)
            logits = runner.decode_step(batch)


def test_router_really_mixes_heads_per_token(adapters):
    _, models = adapters
    layer = models["hydra3"].get_submodule("model.layers.0.mlp.gate_proj")
    x = torch.randn(1, 6, layer.lora_A.in_features)
    gate = layer.gate(x)[0]
    torch.testing.assert_close(gate.sum(-1), torch.ones(6))
    assert gate.argmax(-1).unique().numel() > 1  # different tokens prefer different heads


def test_through_server_mixed_with_lora_and_base(model_dirs, adapters):
    root, models = adapters
    server = start_server(model_dirs["llama"], root)
    try:
        with Client(server.target, timeout=60) as client:
            info = client.load_adapter("hydra3")
            assert info.kind == pb.ADAPTER_KIND_HYDRALORA and info.heads == 3 and info.rank == 4
            for adapter_id in ("hydra3", "hydra2-bias"):
                for p in PROMPTS:
                    want = models[adapter_id].generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                                       pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
                    assert list(client.generate(p, adapter_id, max_new_tokens=8, ignore_eos=True).token_ids) == want
            for p in PROMPTS:  # K=1 HydraLoRA equals its LoRA twin
                assert (client.generate(p, "hydra1", max_new_tokens=8, ignore_eos=True).token_ids ==
                        client.generate(p, "lora-twin", max_new_tokens=8, ignore_eos=True).token_ids)
    finally:
        server.stop()


def _corrupt(root, source, name, edit_tensors=None, edit_config=None):
    (root / name).mkdir()
    tensors = load_file(root / source / "adapter_model.safetensors")
    config = json.loads((root / source / "adapter_config.json").read_text())
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    config.update(edit_config or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / name / "adapter_model.safetensors"))
    (root / name / "adapter_config.json").write_text(json.dumps(config))


def test_invalid_hydra_files_name_the_problem(model_dirs, adapters):
    root, _ = adapters
    router = "base_model.model.model.layers.0.self_attn.q_proj.lora_route.weight"
    _corrupt(root, "hydra3", "bad-router", lambda t: {**t, router: t[router][:2]})
    _corrupt(root, "hydra3", "missing-head", lambda t: {k: v for k, v in t.items() if "q_proj.lora_B.2" not in k})
    _corrupt(root, "hydra3", "extra-head", edit_config={"lora_nums": 2})
    _corrupt(root, "hydra3", "too-many-heads", edit_config={"lora_nums": 9})
    _, layers = make_hydra_model(model_dirs["llama"], 9, heads=5, r=4, alpha=8, targets=["q_proj"])
    save_hydralora(layers, root / "too-wide", {"r": 4, "lora_alpha": 8, "lora_nums": 5})  # 5·4 = 20 > 16
    assert_load_refused(model_dirs["llama"], root, {
        "bad-router": "lora_route.weight has shape (2, 64), expected (3, 64)",
        "missing-head": "missing key base_model.model.model.layers.0.self_attn.q_proj.lora_B.2.weight",
        "extra-head": "lora_B.2.weight does not fit lora_nums=2",
        "too-many-heads": "--max-hydra-heads 8",
        "too-wide": "expand width lora_nums·r = 20, above the server's --max-lora-rank 16"}, max_lora_rank=16)
