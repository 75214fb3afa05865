"""AdaLoRA adapters saved by PEFT (pruned to different per-layer ranks, some to 0) are served folded, exactly."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.slot_bank import SlotBank
from clients.client import Client
from loader.base_model import load_base_model
from loader.inject import inject
from loader.peft_files import read_adapter
from protos.loraplex.v1 import inference_pb2 as pb
from server.batch import Row, Runner
from tests.helpers import KERNELS, LLAMA_TARGETS, assert_load_refused, make_peft_adalora, start_server

PROMPTS = [[5, 17, 99, 3, 42], [200, 11, 12], [64, 65, 66, 67, 68, 69, 70, 71]]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adalora(model_dirs["llama"], root / "ada-qvd", 1, target_modules=["q_proj", "v_proj", "down_proj"])
    make_peft_adalora(model_dirs["llama"], root / "ada-all", 2, init_r=8, target_r=3, target_modules=LLAMA_TARGETS)
    make_peft_adalora(model_dirs["qwen2"], root / "ada-qwen", 3, target_modules=["k_proj", "o_proj", "up_proj"])
    # trained with PEFT's default init_r (12), its config without the key: PEFT reads the default, and so must we
    trained = make_peft_adalora(model_dirs["llama"], root / "ada-r12", 4, init_r=12, target_r=4,
                                target_modules=["q_proj", "v_proj"])
    (root / "ada-init-r-absent").mkdir()
    config = json.loads((trained / "adapter_config.json").read_text())
    (root / "ada-init-r-absent" / "adapter_config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k != "init_r"}))
    (root / "ada-init-r-absent" / "adapter_model.safetensors").write_bytes(
        (trained / "adapter_model.safetensors").read_bytes())
    return root


def kept_ranks(adapter_dir):
    masks = json.loads((adapter_dir / "adapter_config.json").read_text())["rank_pattern"]
    return {k.removesuffix(".lora_E"): sum(v) for k, v in masks.items()}


def test_ranks_really_differ_and_budget_is_exact(adapter_root):
    ranks = kept_ranks(adapter_root / "ada-qvd")
    assert len(set(ranks.values())) > 1 and 0 in ranks.values()  # pruned layers included
    assert sum(ranks.values()) == 2 * len(ranks)  # target_r * n


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch,adapter_id", [("llama", "ada-qvd"), ("llama", "ada-all"), ("qwen2", "ada-qwen"),
                                             ("llama", "ada-init-r-absent")])
def test_logits_match_peft_adalora(model_dirs, adapter_root, arch, adapter_id, kernel):
    base = load_base_model(str(model_dirs[arch]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=16, device=torch.device("cpu"), dtype=torch.float32, kernel=kernel)
    adapter = read_adapter(adapter_root / adapter_id, adapter_id, {s.name: s for s in shapes}, 16, 1)
    assert {m: f.rank for m, f in adapter.modules.items()} == {m: r for m, r in kept_ranks(
        adapter_root / adapter_id).items() if r > 0}
    if adapter_id == "ada-init-r-absent":
        assert adapter.metadata["init_r"] == 12
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs[arch]),
                                     adapter_root / adapter_id).eval()
    _, logits = runner.prefill([Row(p, bank.acquire(adapter)) for p in PROMPTS])
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(logits[i], peft(torch.tensor([p])).logits[0, -1], atol=1e-4, rtol=0)


def test_greedy_tokens_and_info_through_server(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root)
    try:
        with Client(server.target, timeout=60) as client:
            info = client.load_adapter("ada-qvd")
            assert info.kind == pb.ADAPTER_KIND_ADALORA
            assert dict(info.module_ranks) == {m: r for m, r in kept_ranks(adapter_root / "ada-qvd").items() if r}
            for adapter_id in ("ada-qvd", "ada-all"):
                peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
                                                 adapter_root / adapter_id).eval()
                for p in PROMPTS:
                    want = peft.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
                    assert list(client.generate(p, adapter_id, max_new_tokens=8, ignore_eos=True).token_ids) == want
    finally:
        server.stop()


def test_invalid_adalora_files_name_the_problem(model_dirs, adapter_root):
    from safetensors.torch import load_file, save_file
    source = adapter_root / "ada-qvd"
    tensors = load_file(source / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text())
    e_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_E"
    a_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A"
    cases = {
        "ada-no-e": ({k: v for k, v in tensors.items() if k != e_key}, {}, f"missing key {e_key}"),
        "ada-shape": ({**tensors, a_key: tensors[a_key][:, :-1].contiguous()}, {}, f"{a_key} has shape"),
        "ada-alpha0": (tensors, {"lora_alpha": 0}, "lora_alpha must be > 0"),
        "ada-no-init-r": (tensors, {"init_r": None}, "init_r must be a positive integer"),
    }
    for name, (t, edit, _) in cases.items():
        (adapter_root / name).mkdir()
        save_file(t, str(adapter_root / name / "adapter_model.safetensors"))
        (adapter_root / name / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    assert_load_refused(model_dirs["llama"], adapter_root, {name: needle for name, (_, _, needle) in cases.items()})
