"""ResLoRA adapters are merged into plain LoRA at load: block-shortcut exactly, is/ms approximately."""
import json

import pytest
import torch

from adapters.reslora import ResLoraLinear, _Chain, merge_chain
from adapters.slot_bank import SlotBank
from clients.client import Client
from loader.base_model import load_base_model
from loader.inject import base_weight, inject
from loader.peft_files import read_adapter
from loader.reslora_files import save_reslora
from protos.loraplex.v1 import inference_pb2 as pb
from server.batch import Row, Runner
from tests.helpers import KERNELS, assert_load_refused, make_reslora_model, start_server

PROMPTS = [[5, 17, 99, 3, 42], [200, 11, 12], [64, 65, 66, 67, 68, 69, 70, 71]]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = {}
    for seed, (adapter_id, structure, pre_num, extra) in enumerate([
            ("bs2", "bs", 2, {}), ("bs-all", "bs", 99, {}), ("is", "is", 1, {"merge_error": {"input_norm": 0.0123}}),
            ("is-wn", "is", 1, {"merge_method": "weight_norm"}), ("ms", "ms", 2, {}),
            ("ms-ma", "ms", 1, {"merge_method": "modified_a"})]):
        model, layers = make_reslora_model(model_dirs["llama"], seed, structure, pre_num, TARGETS)
        save_reslora(layers, root / adapter_id, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **extra})
        models[adapter_id] = model
    return root, models


def _served_logits(model_dir, root, adapter_id, sequences, kernel: str = "torch"):
    base = load_base_model(str(model_dir), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=16, device=torch.device("cpu"), dtype=torch.float32, kernel=kernel)
    adapter = read_adapter(root / adapter_id, adapter_id, {s.name: s for s in shapes}, 16, 1,
                           base_weight=lambda name: base_weight(base.model, name))
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    slot = bank.acquire(adapter)
    return adapter, runner.prefill([Row(s, slot) for s in sequences])[1]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("adapter_id", ["bs2", "bs-all"])
def test_block_shortcut_merge_is_exact(model_dirs, adapters, adapter_id, kernel):
    root, models = adapters
    adapter, served = _served_logits(model_dirs["llama"], root, adapter_id, PROMPTS, kernel)
    ranks = {m: f.rank for m, f in adapter.modules.items()}
    assert ranks["model.layers.1.self_attn.q_proj"] == 8  # (m_n + 1)·r: the merged block carries its predecessor
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(served[i], models[adapter_id](torch.tensor([p])).logits[0, -1],
                                       atol=1e-5, rtol=0)


def test_input_shortcut_merge_is_exact_with_unit_alphas_and_equal_inputs():
    torch.manual_seed(0)
    chain, blocks = _Chain(), []
    for n in range(4):
        block = ResLoraLinear(torch.nn.Linear(16, 12), r=3, alpha=6, dropout=0.0, structure="is", pre_num=1)
        torch.nn.init.normal_(block.lora_B.weight)
        block._chain, block.index = chain, n
        chain.blocks.append(block)
        blocks.append(block)
    x = torch.randn(5, 16)
    stats = [{"input_norm": 2.0, "shrunk_norm": 1.0}] * 4  # every α_n = 1
    merged = merge_chain("is", "input_norm", 1, blocks[0].scaling, [b.lora_A.weight for b in blocks],
                         [b.lora_B.weight for b in blocks], stats)
    with torch.no_grad():
        for block, f in zip(blocks, merged):  # the same input at every depth, so x_{n-1} = x_n exactly
            torch.testing.assert_close(block(x) - block.base(x), x @ f.a.t() @ f.b.t(), atol=1e-5, rtol=0)


def test_weight_norm_merge_follows_the_merged_weights_norms():
    """is + weight_norm from the third block on: α_n = ‖W_{n-2} + s B A‖ / ‖W_{n-1} + s B A‖, with the base
    weights in the model's dtype (bf16 here) and the factors in fp32, each norm where its weight is."""
    torch.manual_seed(1)
    a = [torch.randn(3, 16) for _ in range(4)]
    b = [torch.randn(12, 3) * 0.1 for _ in range(4)]
    w = [torch.randn(12, 16).bfloat16() * (n + 1) for n in range(4)]  # norms that differ from block to block
    s = 2.0
    merged = merge_chain("is", "weight_norm", 1, s, a, b, [{}] * 4, w)
    norm = [float((w[k].float() + s * b[k] @ a[k]).norm()) for k in range(4)]
    for n, f in enumerate(merged):
        alpha = norm[n - 2] / norm[n - 1] if n >= 2 else 1.0
        torch.testing.assert_close(f.a, a[n])
        torch.testing.assert_close(f.b, (1 + alpha) * s * b[n])
    assert abs(norm[1] / norm[2] - 1) > 0.1  # the α of the 4th block is not 1 by chance


def test_a_merged_rank_above_the_limit_is_refused_before_merging(model_dirs, adapters, monkeypatch):
    """bs stacks pre_num blocks into each merged one: the rank is known from the config, so an adapter above
    --max-lora-rank is refused before its factors are stacked (memory grew with pre_num x layers first)."""
    import loader.reslora_files
    from server.errors import FailedPrecondition
    root, _ = adapters
    base = load_base_model(str(model_dirs["llama"]), "cpu", "float32")
    shapes = {s.name: s for s in inject(base.model)[1]}
    monkeypatch.setattr(loader.reslora_files, "merge_chain", lambda *a: pytest.fail("merged before the check"))
    with pytest.raises(FailedPrecondition, match="has merged rank 8, above the server.s --max-lora-rank 4"):
        read_adapter(root / "bs2", "bs2", shapes, 4, 1)


@pytest.mark.parametrize("adapter_id", ["is", "is-wn", "ms", "ms-ma"])
def test_approximate_merges_are_finite_and_not_exact(model_dirs, adapters, adapter_id):
    """methods.md §7.14: the is/ms error is nonzero but bounded; record it, never gate on a value."""
    root, models = adapters
    _, served = _served_logits(model_dirs["llama"], root, adapter_id, PROMPTS)
    with torch.no_grad():
        errors = [float((served[i] - models[adapter_id](torch.tensor([p])).logits[0, -1]).norm())
                  for i, p in enumerate(PROMPTS)]
    assert torch.isfinite(served).all() and max(errors) > 1e-4


@pytest.mark.parametrize("adapter_id", ["is", "ms", "ms-ma"])
def test_approximate_merges_follow_the_saved_statistics(model_dirs, adapters, adapter_id):
    """The served factors are the paper's merge computed from the statistics saved at training."""
    root, models = adapters
    config = json.loads((root / adapter_id / "adapter_config.json").read_text())
    adapter, _ = _served_logits(model_dirs["llama"], root, adapter_id, PROMPTS[:1])
    chain = next(c for c in config["chains"] if c[0].endswith("q_proj"))
    layers = {name: models[adapter_id].get_submodule(name) for name in chain}
    stats = config["statistics"]
    s = layers[chain[0]].scaling
    for n, name in enumerate(chain[1:], start=1):
        a, b = layers[name].lora_A.weight, layers[name].lora_B.weight
        prev = chain[n - 1]
        assert stats[name]["input_norm"] > 0 and stats[name]["shrunk_norm"] > 0
        if adapter_id == "is":
            want_a, want_b = a, (1 + stats[prev]["input_norm"] / stats[name]["input_norm"]) * s * b
        elif adapter_id == "ms":  # pre_num 2: both predecessors' activation norms
            alpha = sum(stats[chain[n - k]]["shrunk_norm"] / stats[name]["shrunk_norm"]
                        for k in range(1, min(2, n) + 1))
            want_a, want_b = a, (1 + alpha) * s * b
        else:
            want_a = a + stats[prev]["input_norm"] / stats[name]["input_norm"] * layers[prev].lora_A.weight
            want_b = s * b
        torch.testing.assert_close(adapter.modules[name].a, want_a.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(adapter.modules[name].b, want_b.detach(), atol=1e-6, rtol=1e-6)
    # first block of an input-shortcut chain: 2·s·B_0 A_0 exactly
    if adapter_id == "is":
        torch.testing.assert_close(adapter.modules[chain[0]].b, (2 * s * layers[chain[0]].lora_B.weight).detach())


def test_served_through_server_and_reported(model_dirs, adapters):
    root, models = adapters
    server = start_server(model_dirs["llama"], root)
    try:
        with Client(server.target, timeout=60) as client:
            info = client.load_adapter("bs2")
            assert info.kind == pb.ADAPTER_KIND_RESLORA
            assert (info.reslora.structure, info.reslora.pre_num, info.reslora.merge_method) == ("bs", 2, "exact")
            assert info.reslora.HasField("merge_error") and info.reslora.merge_error == 0.0
            info = client.load_adapter("is")
            assert info.reslora.merge_method == "input_norm" and info.reslora.merge_error == pytest.approx(0.0123)
            assert not client.load_adapter("ms").reslora.HasField("merge_error")  # none recorded
            for p in PROMPTS:
                want = models["bs2"].generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                              pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
                assert list(client.generate(p, "bs2", max_new_tokens=8, ignore_eos=True).token_ids) == want
    finally:
        server.stop()


def test_invalid_reslora_configs_are_refused(model_dirs, adapters):
    root, _ = adapters
    import shutil
    cases = [("no-stats", {"statistics": {}}, "statistics for"),
             ("bad-structure", {"structure": "xs"}, "structure must be one of"),
             ("bad-method", {"merge_method": "weight_norm"}, "does not apply to structure 'ms'"),
             ("bad-chains", {"chains": [["model.layers.0.self_attn.q_proj"]]}, "disagree on modules"),
             # reported in AdapterInfo (a float and a uint32): refused at load, not met by GetAdapter/ListAdapters
             ("text-error", {"merge_error": {"input_norm": "0.1"}}, "merge_error['input_norm'] must be a finite"),
             ("huge-pre-num", {"pre_num": 2 ** 40}, "pre_num must be a non-negative integer")]
    for name, edit, _ in cases:
        shutil.copytree(root / "ms", root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        config.update(edit)
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    assert_load_refused(model_dirs["llama"], root, {name: needle for name, _, needle in cases})
