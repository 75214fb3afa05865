"""LongRoPE models (Phi-3-mini-128k, Phi-3.5, Phi-4-mini, Phi-3.5-MoE) pick short or long rotary factors from the
sequence length: in a batch each row gets what it gets alone (HF generate on that request alone), in prefill, in
decode, and when a row crosses the original length mid-generation. `rope_type: dynamic` stays as it was."""
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from adapters.slot_bank import SlotBank
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from loader.inject import inject
from server.batch import Row, Runner
from server.rope import RECOMPUTING_FAMILIES
from tests.helpers import decode_forced, start_server, tokens_alone_and_together

ORIGINAL = 32  # original_max_position_embeddings: longer sequences take the long factors
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=ORIGINAL,
                short_factor=[1.0] * 8, long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 48.0, 64.0])
SETTINGS = dict(max_position_embeddings=128, initializer_range=0.15)
MODELS = {
    "phi3": ("phi3", dict(SETTINGS, original_max_position_embeddings=ORIGINAL, rope_parameters=LONGROPE)),
    "phimoe": ("phimoe", dict(SETTINGS, original_max_position_embeddings=ORIGINAL, num_local_experts=2,
                              num_experts_per_tok=1, rope_parameters=dict(LONGROPE, short_mscale=1.0,
                                                                          long_mscale=1.3))),
    # a family whose HF generate keeps its cached keys when a sequence crosses the original length
    "llama-longrope": ("llama", dict(SETTINGS, rope_parameters=LONGROPE)),
    "llama-dynamic": ("llama", dict(SETTINGS, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                   factor=4.0,
                                                                   original_max_position_embeddings=ORIGINAL))),
}
SHORT = [17, 99, 140, 33, 250]
LONG = [(7 * i) % 250 + 5 for i in range(40)]         # long factors from its prefill on
CROSSING = [(3 * i) % 250 + 5 for i in range(29)]     # crosses the original length at its 4th decode step
AT_EDGE = [(11 * i) % 250 + 5 for i in range(ORIGINAL)]  # crosses at its first decode step
PROMPTS = [SHORT, LONG, CROSSING, AT_EDGE]
STEPS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("longrope")
    return {name: build_model_dir(root / name, arch, seed=5, **overrides) for name, (arch, overrides) in MODELS.items()}


def runner_for(model_dir: Path) -> Runner:
    base = load_base_model(str(model_dir), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    return Runner(base.model, context, bank, base.pad_token_id, base.max_context)


def hf_generate_alone(hf, prompt: list[int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF generate's greedy tokens [steps] and raw logits [steps, V] for `prompt` alone."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):], torch.cat(out.logits).float()


@pytest.mark.parametrize("name", list(MODELS))
def test_each_row_gets_what_it_gets_alone(models, name):
    """Short, long and crossing prompts left-padded in one batch, then decode steps: each row's logits equal that row
    alone through the runner and HF generate on that request alone, within 1e-5, at every step."""
    runner = runner_for(models[name])
    assert (runner.longrope is None) == (name == "llama-dynamic")
    assert runner.recompute_at == (ORIGINAL if name in ("phi3", "phimoe") else None)
    hf = AutoModelForCausalLM.from_pretrained(models[name]).eval()
    expected = [hf_generate_alone(hf, p, STEPS + 1) for p in PROMPTS]
    forced = torch.stack([tokens[:STEPS] for tokens, _ in expected])
    mixed, _ = decode_forced(runner, [Row(p, 0) for p in PROMPTS], forced=forced, steps=STEPS)
    for i, (prompt, (_, logits)) in enumerate(zip(PROMPTS, expected)):
        alone, _ = decode_forced(runner, [Row(prompt, 0)], forced=forced[i:i + 1], steps=STEPS)
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[i], logits, atol=1e-5, rtol=0)


def test_the_factors_and_the_recompute_matter(models):
    """On these weights HF's own batched forward moves the short row (the defect this guards against), and keeping
    the crossing row's short-factor keys, as a plain cache would, gives other logits than HF generate."""
    hf = AutoModelForCausalLM.from_pretrained(models["phi3"]).eval()
    with torch.no_grad():
        alone = hf(torch.tensor([SHORT])).logits[0, -1]
        ids = torch.tensor([[0] * (len(LONG) - len(SHORT)) + SHORT, LONG])
        mask = torch.tensor([[0] * (len(LONG) - len(SHORT)) + [1] * len(SHORT), [1] * len(LONG)])
        batched = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, -1]
        assert (batched - alone).abs().max() > 1e-2

        tokens, logits = hf_generate_alone(hf, CROSSING, STEPS)
        cache = DynamicCache(config=hf.config)
        kept = [hf(torch.tensor([CROSSING]), past_key_values=cache).logits[0, -1]]
        for t in tokens[:-1].tolist():
            kept.append(hf(torch.tensor([[t]]), past_key_values=cache,
                           position_ids=torch.tensor([[cache.get_seq_length()]])).logits[0, -1])
    crossed = ORIGINAL - len(CROSSING) + 1  # the first logits computed after the crossing
    torch.testing.assert_close(torch.stack(kept[:crossed]), logits[:crossed], atol=1e-5, rtol=0)
    assert (torch.stack(kept[crossed:]) - logits[crossed:]).abs().max() > 1e-2


def test_server_tokens_alone_and_batched_equal_hf_generate(models):
    """Through the real server: a short request gets the same greedy tokens alone and beside a long one and a row that
    crosses the original length mid-generation, and every request's tokens are HF generate's on it alone."""
    model_dir = models["phi3"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = [hf_generate_alone(hf, p, 12)[0].tolist() for p in PROMPTS]
    server = start_server(model_dir, None)
    try:
        alone, together = tokens_alone_and_together(server.target, PROMPTS, [""] * len(PROMPTS), 12)
    finally:
        server.stop()
    assert alone == expected
    assert together == expected


def test_recomputing_families_are_those_whose_generate_drops_the_cache():
    """server/rope.py recomputes a crossing row's cache for exactly the families whose HF generate does."""
    models_dir = Path(transformers.__file__).parent / "models"
    dropping = {path.parent.name for path in models_dir.glob("*/modeling_*.py")
                if re.search(r"original_max_position_embeddings \+ 1[^\n]*\n(.*\n){0,4}.*past_key_values = None",
                             path.read_text())}
    assert dropping == set(RECOMPUTING_FAMILIES)


def test_a_prefix_cache_is_refused_at_start(models):
    """A LongRoPE model's keys depend on the whole prompt's length (its short or long factors), not on the tokens
    before them alone: no prompt may take another's."""
    with pytest.raises(RuntimeError, match="ConfigError.*--prefix-cache-tokens: a LongRoPE model"):
        start_server(models["phi3"], None, prefix_cache_tokens=64)
