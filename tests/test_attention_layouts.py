"""Sliding-window models (every layer windowed, or windowed and full layers mixed) give HF's own logits and tokens
past the window, in left-padded batches; attention this server cannot mask (ALiBi, chunked) is refused at start."""
import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.slot_bank import SlotBank
from clients.client import AsyncClient, Client
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from loader.inject import inject
from server.background import BackgroundServer
from server.attention import AttentionLayout, UnsupportedAttention
from server.batch import Row, Runner
from server.config import ServerConfig
from tests.helpers import KERNELS, make_peft_adapter, start_server, tokens_alone_and_together

WINDOW = 6
SMALL = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
MODELS = {  # every layer windowed (no layer_types) / Qwen2's upper layers windowed / Gemma-3's alternating types
    "mistral": ("mistral", dict(SMALL, sliding_window=WINDOW)),
    "phi3": ("phi3", dict(SMALL, sliding_window=WINDOW)),
    "starcoder2": ("starcoder2", dict(SMALL, sliding_window=WINDOW)),
    "qwen2": ("qwen2", dict(SMALL, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma3_text": ("gemma3_text", dict(SMALL, head_dim=12, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"])),
    # no SDPA in transformers (attention soft-capping): served with its eager attention
    "gemma2": ("gemma2", dict(SMALL, head_dim=12, sliding_window=WINDOW)),
    # a key Llama never reads (left by a conversion from Mistral): HF ignores it, and so must the server
    "llama-stray-window": ("llama", dict(SMALL, sliding_window=WINDOW)),
}
PROMPTS = [[(7 * j) % 250 + 3 for j in range(19)], [40, 41, 42], [(5 * j) % 200 + 9 for j in range(11)]]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")
    return {name: build_model_dir(root / name, arch, seed=3, **overrides) for name, (arch, overrides) in MODELS.items()}


def test_layouts_follow_the_config(windowed):
    layouts = {arch: AttentionLayout.of(AutoModelForCausalLM.from_pretrained(d).config) for arch, d in windowed.items()}
    assert layouts["mistral"] == layouts["phi3"] == layouts["starcoder2"] == AttentionLayout(WINDOW, None)
    assert layouts["qwen2"] == AttentionLayout(WINDOW, ("full_attention", "sliding_attention"))
    assert layouts["gemma3_text"] == AttentionLayout(WINDOW, ("sliding_attention", "full_attention"))
    assert layouts["llama-stray-window"] == AttentionLayout(None, None)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_hf_past_the_window(windowed, name):
    """Prompts longer and shorter than the window, left-padded in one batch, then decode steps that carry
    every row past it: each row's logits equal the HF model's on that row alone."""
    base = load_base_model(str(windowed[name]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    hf = AutoModelForCausalLM.from_pretrained(windowed[name]).eval()
    batch, logits = runner.prefill([Row(p, bank.acquire(None)) for p in PROMPTS])
    sequences = [list(p) for p in PROMPTS]
    with torch.no_grad():
        for _ in range(2 * WINDOW):
            for i, seq in enumerate(sequences):
                torch.testing.assert_close(logits[i], hf(torch.tensor([seq])).logits[0, -1], atol=1e-4, rtol=0)
            for row, seq, lg in zip(batch.rows, sequences, logits):
                row.last_token = int(lg.argmax())
                seq.append(row.last_token)
            logits = runner.decode_step(batch)
    # the window matters for these weights: a full-attention forward of the longest row gives other logits
    full = hf(torch.tensor([sequences[0]]), attention_mask=torch.ones(1, 1, len(sequences[0]), len(sequences[0])).tril()
              .log()).logits[0, -1]
    windowed_gap = (full - hf(torch.tensor([sequences[0]])).logits[0, -1]).abs().max()
    assert windowed_gap > 1e-3 if runner.attention.window is not None else windowed_gap < 1e-5


def test_server_tokens_match_hf_generate_alone_and_batched(windowed):
    """Through the real server, each prompt alone and all of them at once (left-padded together, rows leaving as
    they finish) give HF generate's greedy tokens on a model with windowed and full layers."""
    server = start_server(windowed["gemma3_text"], None)
    try:
        hf = AutoModelForCausalLM.from_pretrained(windowed["gemma3_text"]).eval()
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist() for p, n in zip(PROMPTS, (12, 4, 9))]
        with Client(server.target, timeout=60) as client:
            alone = [list(client.generate(p, "", max_new_tokens=len(e), ignore_eos=True).token_ids)
                     for p, e in zip(PROMPTS, expected)]

        async def together():
            async with AsyncClient(server.target, timeout=60) as client:
                return await asyncio.gather(*[client.generate(p, "", max_new_tokens=len(e), ignore_eos=True)
                                              for p, e in zip(PROMPTS, expected)])
        assert alone == expected
        assert [list(r.token_ids) for r in asyncio.run(together())] == expected
    finally:
        server.stop()


@pytest.mark.parametrize("arch,overrides,needle", [
    ("falcon", dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, alibi=True), "ALiBi"),
    ("bloom", dict(hidden_size=48, n_head=4, n_layer=2), "ALiBi"),
    ("qwen2", dict(SMALL, layer_types=["full_attention", "chunked_attention"]), "chunked_attention layers"),
])
def test_unmaskable_attention_is_refused_at_start(tmp_path, arch, overrides, needle):
    model = build_model_dir(tmp_path / arch, arch, seed=0, **overrides)
    with pytest.raises(RuntimeError, match=f"ConfigError.*{needle}"):
        BackgroundServer(ServerConfig(model=str(model), port=0, metrics_port=0)).start()
    with pytest.raises(UnsupportedAttention):
        AttentionLayout.of(AutoModelForCausalLM.from_pretrained(model).config)


@pytest.mark.parametrize("arch,needle", [
    ("rwkv", "the model's forward takes no past_key_values: it keeps no KV cache"),
    ("recurrent_gemma", "linear_attention layers"),  # its layer_types is an alias (attribute_map)
    ("mamba", "linear_attention layers"),  # its layer_types is a property
    ("xlstm", "the model's forward takes no past_key_values"),
    ("openai-gpt", "the model's forward takes no past_key_values"),  # was a raw error about a sparse permute
])
def test_models_whose_state_is_not_the_kv_cache_are_refused_at_start(tmp_path, arch, needle):
    """Rows join and leave a batch through the KV cache: a model keeping other state (recurrent, state-space, RWKV)
    was served, wrongly after its first token and with INTERNAL errors once requests shared a batch."""
    model = build_model_dir(tmp_path / arch, arch, seed=0)
    with pytest.raises(RuntimeError, match=f"ConfigError.*{needle}"):
        BackgroundServer(ServerConfig(model=str(model), port=0, metrics_port=0)).start()


def test_a_model_whose_own_forward_fails_is_refused_as_such(tmp_path):
    """(QA) A config whose forward fails in HF alone (CodeGen's rotary_dim left at 64 on 16-wide heads; HF's generate
    fails too) was refused as if its state were outside the KV cache ("not recurrent, state-space ... layers")."""
    model = build_model_dir(tmp_path / "codegen", "codegen", seed=0)
    with pytest.raises(RuntimeError, match=r"ConfigError.*the model's own forward fails on 8 tokens, without this "
                                           r"server's KV cache or masks \(RuntimeError: The size of tensor a \(16\) "
                                           r"must match .*\): its config or weights do not make a working model"):
        BackgroundServer(ServerConfig(model=str(model), port=0, metrics_port=0)).start()


def test_keys_and_values_of_different_widths_join_a_running_batch(tmp_path):
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) caches keys wider than values: a row joining a running
    batch gets what it gets alone (a merge built values as wide as keys: INTERNAL), and the cache's bytes count both."""
    model = build_model_dir(tmp_path / "mla", "deepseek_v3", seed=0, n_routed_experts=4, num_experts_per_tok=2,
                            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_group=1, topk_group=1,
                            num_key_value_heads=4)
    base = load_base_model(str(model), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    runner.check_cache()
    first, joining = PROMPTS[0], PROMPTS[2]

    def steps(batch, logits, n):
        out = [logits]
        for _ in range(n):
            for row, token in zip(batch.rows, out[-1].argmax(-1).tolist()):
                row.last_token = token
            out.append(runner.decode_step(batch))
        return out

    alone = steps(*runner.prefill([Row(joining, 0)]), 3)
    running, logits = runner.prefill([Row(first, 0)])
    steps(running, logits, 2)
    late, late_logits = runner.prefill([Row(joining, 0)])
    merged = runner.merge(running, late, base.max_context)
    together = steps(merged, torch.cat([torch.zeros_like(late_logits), late_logits]), 3)
    for a, b in zip(alone[1:], together[1:]):
        torch.testing.assert_close(b[1], a[0], atol=1e-5, rtol=0)
    k, v = merged.cache.layers[0].k, merged.cache.layers[0].v
    assert k.shape[-1] != v.shape[-1]
    assert merged.cache.allocated()[1] == sum(t.numel() * 4 for layer in merged.cache.layers for t in (layer.k, layer.v))


@pytest.fixture(scope="module")
def mla_with_adapter(tmp_path_factory):
    """A tiny DeepSeek-V3 and a PEFT LoRA on all its linear layers but the experts', kv_b_proj included (PEFT's
    all-linear adapts it), which expands the cached latents [rows, 1, T, rank] of every step, 4-D."""
    work = tmp_path_factory.mktemp("mla")
    model = build_model_dir(work / "mla", "deepseek_v3", seed=0, n_routed_experts=4, num_experts_per_tok=2,
                            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_group=1, topk_group=1,
                            num_key_value_heads=4)
    make_peft_adapter(model, work / "adapters" / "lora", 7, r=4, lora_alpha=16,
                      target_modules=["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
    return model, work / "adapters"


@pytest.mark.parametrize("kernel", KERNELS)
def test_an_adapter_on_mlas_kv_b_proj_gives_pefts_tokens_alone_and_batched(mla_with_adapter, kernel):
    """QA: with the native or triton kernel every request on such an adapter failed with INTERNAL (they took 3-D
    input only), and so did the base rows batched with it."""
    from peft import PeftModel
    model, root = mla_with_adapter
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), root / "lora").eval()
    expected = [peft.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    with peft.disable_adapter():
        plain = [peft.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    assert expected != plain
    server = start_server(model, root, adapter_kernel=kernel)
    try:
        alone, together = tokens_alone_and_together(server.target, PROMPTS * 2, ["lora"] * len(PROMPTS) +
                                                    [""] * len(PROMPTS), 6)
        assert alone == together == expected + plain
    finally:
        server.stop()


def test_a_model_reading_an_adapted_layers_weight_is_served(tmp_path):
    """Hunyuan-MoE's router casts to `self.wg.weight.dtype`: with `wg` adapted the model was refused at start (its
    forward failed, blamed on attention or state). An adapted layer shows its base layer's weight and bias, as
    PEFT's layers do; an adapter on the router too gives PEFT's tokens."""
    from peft import PeftModel
    model = build_model_dir(tmp_path / "hunyuan", "hunyuan_v1_moe", seed=0, head_dim=16, num_experts=4, moe_topk=2)
    make_peft_adapter(model, tmp_path / "adapters" / "lora", 3, r=4, lora_alpha=16, target_modules=["wg", "q_proj"])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "adapters" / "lora")
    expected = [peft.eval().generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                                     eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    with peft.disable_adapter():
        plain = [peft.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    server = start_server(model, tmp_path / "adapters")
    try:
        assert "model.layers.0.mlp.gate.wg" in [s.name for s in server.serving.engine.bank.shapes]
        alone, together = tokens_alone_and_together(server.target, PROMPTS * 2, ["lora"] * len(PROMPTS) +
                                                    [""] * len(PROMPTS), 6)
        assert alone == together == expected + plain and expected != plain
    finally:
        server.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "mixtral"])
def test_attention_models_pass_the_cache_check_in_every_dtype(model_dirs, tmp_path, arch, dtype):
    """The start-up check compares a decode step with a whole-sequence prefill: half precision rounds the two
    differently in every layer, and a mixture of experts routes each token alone; neither may be refused."""
    path = model_dirs.get(arch) or build_model_dir(tmp_path / arch, arch, seed=2, num_local_experts=4,
                                                   num_experts_per_tok=2)
    base = load_base_model(str(path), "cpu", dtype)
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=4, device=torch.device("cpu"), dtype=getattr(torch, dtype))
    Runner(base.model, context, bank, base.pad_token_id, base.max_context).check_cache()


def test_layers_sharing_keys_and_values_are_served_as_one_batch(tmp_path):
    """Gemma-3n's and Gemma-4's last layers read keys and values an earlier layer cached and keep none of their own:
    the start-up check refused them as recurrent, and before it a row joining or leaving a batch failed (INTERNAL)."""
    model = build_model_dir(tmp_path / "gemma4", "gemma4_text", seed=0, num_hidden_layers=4, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                            head_dim=16, global_head_dim=16, hidden_size_per_layer_input=8,
                            vocab_size_per_layer_input=259)
    server = start_server(model, None)
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    lengths = [9, 3, 6]  # rows leave the batch at different steps

    async def together():
        async with AsyncClient(server.target, timeout=60) as client:
            first = asyncio.create_task(client.generate(PROMPTS[0], max_new_tokens=lengths[0], ignore_eos=True))
            await asyncio.sleep(0.2)  # the others join it running
            rest = [client.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS[1:], lengths[1:])]
            return [list(r.token_ids) for r in await asyncio.gather(first, *rest)]
    try:
        for prompt, n, tokens in zip(PROMPTS, lengths, asyncio.run(together())):
            assert hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(prompt):].tolist() == tokens
    finally:
        server.stop()
