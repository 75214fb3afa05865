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
from tests.helpers import start_server

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
