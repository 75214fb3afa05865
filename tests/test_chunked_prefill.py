"""A prefill runs its queries in chunks that bound its attention masks (server/batch.py MASK_ELEMENTS), so a long
prompt's memory grows with its length, not with its square. Chunked, every row gets the logits and the next tokens of
one pass: full and sliding-window attention, per-layer mask types, LongRoPE factors chosen by the whole prompt (not by
the chunk), an adapter, and rows of different lengths left-padded together."""
import pytest
import torch

import server.batch
from loader.default_model import build_model_dir
from server.batch import Row
from tests.helpers import decode_forced, random_lora_runner

SMALL = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=32,
                short_factor=[1.0] * 6, long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
MODELS = {
    "llama": ("llama", SMALL),
    "mistral-window": ("mistral", dict(SMALL, sliding_window=5)),
    "gemma3-types": ("gemma3_text", dict(SMALL, head_dim=12, sliding_window=5,
                                         layer_types=["sliding_attention", "full_attention"])),
    # the 45-token prompt takes the long factors, the others the short ones, chunk by chunk as in one pass
    "phi3-longrope": ("phi3", dict(SMALL, original_max_position_embeddings=32, rope_parameters=LONGROPE)),
}
PROMPTS = [[(7 * i) % 250 + 5 for i in range(45)], [40, 41, 42, 43, 44, 45, 46], [(5 * i) % 200 + 9 for i in range(30)]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    return {name: build_model_dir(root / name, arch, seed=3, **cfg) for name, (arch, cfg) in MODELS.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_chunked_prefill_gives_what_one_pass_gives(models, name, monkeypatch):
    runner, slot = random_lora_runner(models[name])
    rows = lambda: [Row(p, s) for p, s in zip(PROMPTS, (slot, 0, slot))]  # noqa: E731
    whole, fed = decode_forced(runner, rows(), steps=4)

    seen = []  # (query columns, mask elements) of each forward
    forward = runner._forward

    def spy(ids, masks, *args):
        mask = next(iter(masks.values())) if isinstance(masks, dict) else masks
        seen.append((ids.shape[1], mask.numel()))
        return forward(ids, masks, *args)

    monkeypatch.setattr(runner, "_forward", spy)
    monkeypatch.setattr(server.batch, "MASK_ELEMENTS", 1000)
    monkeypatch.setattr(server.batch, "MIN_CHUNK", 4)
    chunked, _ = decode_forced(runner, rows(), forced=fed, steps=4)
    assert [q for q, _ in seen[:7]] == [7] * 6 + [3]  # 1000 // (3 rows x 45 columns) = 7 query columns a forward
    assert max(n for _, n in seen) <= 1000  # decode steps, and phi3's recompute of the row crossing 32, included
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
