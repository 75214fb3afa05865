"""Decode attention per group of rows of similar length (server/attention_buckets.py) gives each row what one call
over the batch's whole width gives, on every attention layout the server serves."""
import pytest
import torch

from adapters.slot_bank import SlotBank
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from loader.inject import inject
from server import attention_buckets
from server.attention_buckets import plan
from server.batch import Row, Runner
from tests.helpers import make_peft_adapter, start_server, tokens_alone_and_together

SMALL = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama-gqa": ("llama", SMALL),
    "qwen2-sliding": ("qwen2", dict(SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "gemma3_text": ("gemma3_text", dict(SMALL, head_dim=12, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention"])),
    "gpt2": ("gpt2", {}),
    "mla": ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                                q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                moe_intermediate_size=32, n_group=1, topk_group=1, num_key_value_heads=4)),
}


def test_the_plan_groups_rows_far_apart_and_leaves_close_ones_alone():
    assert plan([100] * 16) is None  # one call over the width is what every row needs
    assert plan([100] * 8 + [120] * 8) is None
    short, long = list(range(15)), [15]
    assert plan([100] * 15 + [2000]) == [short, long]  # the long row alone (a view), the short ones gathered
    assert plan([2000] + [100] * 15) == [[i + 1 for i in range(15)], [0]]
    groups = plan([100] * 14 + [2000, 1990])
    assert groups == [list(range(14)), [15], [14]]
    assert plan([100] * 12 + [2000] * 4) == [list(range(12)), [12], [13], [14], [15]]  # long rows alone: views
    # halves of 100 and 1000: the long half's calls (or their copies) cost about what the short half's columns save
    assert plan([100] * 8 + [1000] * 8) is None


def _batch(runner, bank, prompts):
    batch = None
    for prompt in prompts:
        joining, _ = runner.prefill([Row(prompt, bank.acquire(None))])
        batch = joining if batch is None else runner.merge(batch, joining, runner.max_context)
    return batch


@pytest.mark.parametrize("name", list(MODELS))
def test_grouped_decode_gives_the_logits_of_one_call(tmp_path, name, monkeypatch):
    """Rows of 2, 5, 9 and 40 tokens, decoded 4 steps: per group (forced here: the calls' cost set to 0) and in one
    call over the width, the logits of every row agree to float rounding."""
    arch, overrides = MODELS[name]
    base = load_base_model(str(build_model_dir(tmp_path / name, arch, seed=1, **overrides)), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=1, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    assert runner.grouped
    monkeypatch.setattr(attention_buckets, "CALL", 0)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):  # the rows and columns each SDPA call of the model gets
        calls.append((query.shape[0], key.shape[2]))
        return sdpa(query, key, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompts = [[(5 * j + n) % 200 + 3 for j in range(n)] for n in (40, 2, 9, 5)]
    grouped, whole = _batch(runner, bank, prompts), _batch(runner, bank, prompts)
    for step in range(4):
        tokens = [(11 * step + i) % 200 + 3 for i in range(len(prompts))]
        for batch in (grouped, whole):
            for row, token in zip(batch.rows, tokens):
                row.last_token = token
        calls.clear()
        got = runner.decode_step(grouped)
        assert calls and all(rows < len(prompts) for rows, _ in calls), calls  # groups ran, no call took all rows
        runner.grouped = False
        want = runner.decode_step(whole)
        runner.grouped = True
        assert grouped.groups is not None and len(grouped.groups) > 1 and whole.groups is None
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (step, (got - want).abs().max())


def test_served_rows_far_apart_in_length_give_what_they_give_alone(model_dirs, tmp_path, monkeypatch):
    """Through the server, with the default cost: a 400-token prompt among short ones makes groups (seen here), and
    every request's greedy tokens, with an adapter or not, are those it gets alone."""
    root = tmp_path / "adapters"
    make_peft_adapter(model_dirs["llama"], root / "a", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    seen = []
    inner = attention_buckets.grouped

    def spy(groups):
        seen.append(groups)
        return inner(groups)
    monkeypatch.setattr(attention_buckets, "grouped", spy)
    server = start_server(model_dirs["llama"], root, max_batch_size=8)
    try:
        prompts = [[(7 * j) % 250 + 3 for j in range(400)]] + [[40 + i, 41, 42 + i] for i in range(7)]
        adapters = ["a", "", "a", "", "a", "", "a", ""]
        alone, together = tokens_alone_and_together(server.target, prompts, adapters, 8)
        assert alone == together
        assert any(g is not None and len(g) > 1 for g in seen)
    finally:
        server.stop()
