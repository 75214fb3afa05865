"""Adapters saved by HF PEFT give PEFT's logits (<= 1e-4, fp32) and PEFT's greedy tokens through our server,
PiSSA/OLoRA ones saved unconverted included (PEFT rebuilds their residual base from the original weights)."""
import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.slot_bank import SlotBank
from clients.client import Client
from loader.base_model import load_base_model
from loader.inject import base_weight, inject
from loader.peft_files import read_adapter
from server.batch import Row, Runner
from tests.helpers import KERNELS, LLAMA_TARGETS, make_peft_adapter, start_server

# (arch, adapter id, LoraConfig kwargs): rsLoRA, rank/alpha patterns, different ranks and target sets.
CASES = {
    "llama": {
        "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "all-r8-rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_TARGETS),
        "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"model.layers.1.self_attn.v_proj": 2}, alpha_pattern={"v_proj": 16}),
        "regex-mlp-r16": dict(r=16, lora_alpha=4, target_modules=r".*\.mlp\.(gate|up)_proj"),
        # two keys match layer 1's v_proj: PEFT takes the first (alpha 1 there, 16 on layer 0's)
        "patterns-first-match": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     alpha_pattern={"layers.1.self_attn.v_proj": 1, "v_proj": 16}),
        # trained on a residual base PEFT rebuilds from the original weights at load, saved unconverted
        "pissa-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="pissa"),
        "olora-rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj"],
                             init_lora_weights="olora", rank_pattern={"up_proj": 6}),
    },
    "qwen2": {
        "qkvo-r6": dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "mlp-rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"],
                           alpha_pattern={"down_proj": 2}),
    },
    "opt": {  # OPT flattens its MLP's input to [rows x tokens, d] before fc1/fc2
        "attn-mlp-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "fc2"]),
    },
    "gpt2": {
        "c_attn-r4": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        "all-r8": dict(r=8, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                       rank_pattern={"transformer.h.0.mlp.c_fc": 3}),
        "c_attn-pissa": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             init_lora_weights="pissa"),
        # PEFT's OLoRA takes the QR of the Conv1D weight as stored, (d_in, d_out): square c_proj only (PEFT's own
        # init fails on the others)
        "c_proj-olora": dict(r=4, lora_alpha=8, target_modules=["attn.c_proj"], fan_in_fan_out=True,
                             init_lora_weights="olora"),
    },
}
PROMPTS = [[5, 17, 99, 3, 42, 8, 120], [200, 11], [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_roots(model_dirs, tmp_path_factory):
    roots = {}
    for arch, cases in CASES.items():
        root = tmp_path_factory.mktemp(f"adapters-{arch}")
        for seed, (adapter_id, lora) in enumerate(cases.items()):
            make_peft_adapter(model_dirs[arch], root / adapter_id, seed, **lora)
        roots[arch] = root
    return roots


def _peft_model(model_dir, adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch,adapter_id", [(a, i) for a, cases in CASES.items() for i in cases])
def test_logits_match_peft(model_dirs, adapter_roots, arch, adapter_id, kernel):
    base = load_base_model(str(model_dirs[arch]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=2, max_rank=16, device=torch.device("cpu"), dtype=torch.float32, kernel=kernel)
    adapter = read_adapter(adapter_roots[arch] / adapter_id, adapter_id, {s.name: s for s in shapes}, 16, 1,
                           base_weight=lambda name: base_weight(base.model, name))
    slot = bank.acquire(adapter)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    peft = _peft_model(model_dirs[arch], adapter_roots[arch] / adapter_id)
    plain = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()

    rows = [Row(p, slot) for p in PROMPTS]
    batch, logits = runner.prefill(rows)
    sequences = [list(p) for p in PROMPTS]
    with torch.no_grad():
        for step in range(4):
            for i, seq in enumerate(sequences):
                expected = peft(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=0)
                if step == 0:  # the adapter must really change the output
                    assert (expected - plain(torch.tensor([seq])).logits[0, -1]).abs().max() > 1e-2
            for row, seq, lg in zip(batch.rows, sequences, logits):
                row.last_token = int(lg.argmax())
                seq.append(row.last_token)
            logits = runner.decode_step(batch)


@pytest.mark.parametrize("arch", list(CASES))
def test_greedy_tokens_match_peft_generate_through_server(model_dirs, adapter_roots, arch):
    server = start_server(model_dirs[arch], adapter_roots[arch])
    try:
        with Client(server.target, timeout=60) as client:
            base_tokens = [list(client.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids)
                           for p in PROMPTS]
            changed = 0
            for adapter_id in CASES[arch]:
                peft = _peft_model(model_dirs[arch], adapter_roots[arch] / adapter_id)
                for prompt in PROMPTS:
                    expected = peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                             do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):]
                    got = client.generate(prompt, adapter_id, max_new_tokens=NEW_TOKENS, ignore_eos=True)
                    assert list(got.token_ids) == expected.tolist(), (adapter_id, prompt)
                    changed += list(got.token_ids) != base_tokens[PROMPTS.index(prompt)]
            assert changed > 0, "no adapter changed any greedy output: the comparison would be vacuous"
    finally:
        server.stop()


def test_a_pissa_adapter_read_again_takes_no_svd_again(model_dirs, adapter_roots, monkeypatch):
    """The registry reads an adapter again after an eviction: its residual terms (an SVD or QR of every adapted
    weight, minutes for a large model on a CPU) come from the server's cache, equal to those computed."""
    from loader import lora_files
    base = load_base_model(str(model_dirs["llama"]), "cpu", "float32")
    _, shapes = inject(base.model)
    computed = []
    real = lora_files.residual_term
    monkeypatch.setattr(lora_files, "residual_term", lambda *args: computed.append(args[0]) or real(*args))
    cache = lora_files.ResidualCache(variants=1)

    def read(adapter_id):
        return read_adapter(adapter_roots["llama"] / adapter_id, adapter_id, {s.name: s for s in shapes}, 16, 1,
                            base_weight=lambda name: base_weight(base.model, name), residuals=cache)
    first = read("pissa-r4")
    modules = len(computed)
    again = read("pissa-r4")
    assert modules == len(first.modules) and len(computed) == modules  # nothing computed the second time
    for name, f in first.modules.items():
        assert torch.equal(again.modules[name].a, f.a) and torch.equal(again.modules[name].b, f.b)
    olora = read("olora-rslora")  # other settings: computed, and with room for one they push the PiSSA terms out
    read("pissa-r4")
    assert len(computed) == 2 * modules + len(olora.modules)


@pytest.mark.parametrize("arch,adapter_id", [("llama", "olora-rslora"), ("gpt2", "c_proj-olora")])
def test_an_olora_residual_follows_the_weights_layout_not_the_configs_fan_in_fan_out(model_dirs, adapter_roots,
                                                                                      tmp_path, arch, adapter_id):
    """PEFT sets fan_in_fan_out from the module's type when it loads an adapter, and takes OLoRA's QR of the weight
    as the module stores it: a config that says otherwise (edited by hand or by another tool) is served as PEFT
    serves it (the server's residual followed the config: logits 0.06 off, other greedy tokens)."""
    edited = tmp_path / adapter_id
    shutil.copytree(adapter_roots[arch] / adapter_id, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = not config["fan_in_fan_out"]
    (edited / "adapter_config.json").write_text(json.dumps(config))
    base = load_base_model(str(model_dirs[arch]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=16, device=torch.device("cpu"), dtype=torch.float32)
    adapter = read_adapter(edited, adapter_id, {s.name: s for s in shapes}, 16, 1,
                           base_weight=lambda name: base_weight(base.model, name))
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    _, logits = runner.prefill([Row(p, bank.acquire(adapter)) for p in PROMPTS])
    peft = _peft_model(model_dirs[arch], edited)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(logits[i], peft(torch.tensor([prompt])).logits[0, -1], atol=1e-4, rtol=0)
