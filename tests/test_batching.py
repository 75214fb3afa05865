"""Mixed batches and continuous batching: a request gets exactly what it gets alone, and nobody waits for a batch."""
import asyncio
import time

import pytest
import torch

from adapters.canonical import ModuleFactors
from adapters.layer import reference_delta
from adapters.slot_bank import AdapterContext, ModuleShape, SlotBank
from clients.client import AsyncClient
from loader.base_model import load_base_model
from loader.default_model import build_model_dir
from loader.inject import inject
from loader.peft_files import read_adapter
from server.batch import Row, Runner
from tests.helpers import (LLAMA_TARGETS, decode_forced, make_peft_adapter, scrape, start_server,
                           tokens_alone_and_together)

ADAPTERS = {
    "a-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b-all": dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
    "c-mlp": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "down_proj"]),
}
ORDER = ["", "a-qv", "b-all", "c-mlp"]  # "" is the base model
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(3 + (5 * i) % 13)] for i in range(12)]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (adapter_id, lora) in enumerate(ADAPTERS.items()):
        make_peft_adapter(model_dirs["llama"], root / adapter_id, 10 + seed, **lora)
    return root


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    s = start_server(model_dirs["llama"], adapter_root)
    yield s
    s.stop()


def test_batched_layer_equals_per_row_reference():
    torch.manual_seed(0)
    shapes = [ModuleShape("m", 24, 40)]
    bank = SlotBank(shapes, num_slots=3, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)

    class Fake:
        def __init__(self, i, r):
            self.key = ("x", i)
            self.modules = {"m": ModuleFactors(torch.randn(r, 24), torch.randn(40, r))}
    adapters = [Fake(1, 2), Fake(2, 8), Fake(3, 5)]
    slots = [bank.acquire(a) for a in adapters]
    per_row = [None, adapters[1], adapters[0], None, adapters[2], adapters[1]]
    row_slots = [0, slots[1], slots[0], 0, slots[2], slots[1]]
    x = torch.randn(len(row_slots), 3, 24)
    from adapters.layer import MultiAdapterLinear
    context = AdapterContext()
    layer = MultiAdapterLinear(torch.nn.Linear(24, 40), 0, context)
    context.rows = bank.gather(row_slots)
    got = layer(x) - layer.base(x)
    want = reference_delta(x, [None if a is None else a.modules["m"] for a in per_row], 40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[0].abs().max() == 0 and got[3].abs().max() == 0  # base rows get exactly nothing


def test_mixed_batch_logits_equal_each_alone(model_dirs, adapter_root):
    """Engine level: an interleaved batch of base + 3 adapters equals each row run alone, logits within 1e-5."""
    base = load_base_model(str(model_dirs["llama"]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=4, max_rank=16, device=torch.device("cpu"), dtype=torch.float32)
    by_name = {s.name: s for s in shapes}
    slot = {"": 0}
    for i, adapter_id in enumerate(ADAPTERS):
        slot[adapter_id] = bank.acquire(read_adapter(adapter_root / adapter_id, adapter_id, by_name, 16, i + 1))
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)

    mixed, tokens = decode_forced(runner, [Row(p, slot[ORDER[i % 4]]) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        alone, _ = decode_forced(runner, [Row(p, slot[ORDER[i % 4]])], forced=tokens[i:i + 1])
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0)


FAMILY_ADAPTERS = {  # per family: two adapters on different modules (attention, and the MLP a family may flatten)
    "qwen2": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(r=8, lora_alpha=8, target_modules=["up_proj", "down_proj", "o_proj"])],
    "gpt2": [dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
             dict(r=8, lora_alpha=8, target_modules=["c_fc", "mlp.c_proj"], fan_in_fan_out=True)],
    "opt": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            dict(r=8, lora_alpha=8, target_modules=["fc1", "fc2", "out_proj"])],  # OPT flattens its MLP's input
}


@pytest.mark.parametrize("family", list(FAMILY_ADAPTERS))
def test_mixed_batch_logits_equal_each_alone_in_other_families(model_dirs, tmp_path, family):
    """As above, on families whose layers lay tokens out otherwise (GPT-2's Conv1D, OPT's MLP on [rows x T, d]):
    with one adapter per batch, rows whose tokens were mixed up would still agree; with two and the base, not."""
    base = load_base_model(str(model_dirs[family]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=2, max_rank=16, device=torch.device("cpu"), dtype=torch.float32)
    by_name = {s.name: s for s in shapes}
    slots = [0]
    for i, lora in enumerate(FAMILY_ADAPTERS[family]):
        make_peft_adapter(model_dirs[family], tmp_path / f"a{i}", 20 + i, **lora)
        slots.append(bank.acquire(read_adapter(tmp_path / f"a{i}", f"a{i}", by_name, 16, i + 1)))
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    prompts = PROMPTS[:9]
    mixed, tokens = decode_forced(runner, [Row(p, slots[i % 3]) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        alone, _ = decode_forced(runner, [Row(p, slots[i % 3])], forced=tokens[i:i + 1])
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0)
    for kind in (1, 2):  # each adapter really changes its rows
        other, _ = decode_forced(runner, [Row(prompts[kind], 0)], forced=tokens[kind:kind + 1])
        assert (other[0] - mixed[kind]).abs().max() > 1e-3


def test_linear_subclasses_are_adapted_only_where_their_output_is_the_linear_map(tmp_path):
    """PhiMoE's router subclasses nn.Linear but returns (scores, experts): wrapped like a projection, every batch with
    an adapter row failed (INTERNAL), the base rows beside them too. It is no adaptable module (an adapter naming it
    is refused as incompatible), and FalconLinear, the same map computed its own way, still is."""
    import grpc
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from adapters.targets import linear_modules
    from tests.helpers import status_of
    from clients.client import Client
    falcon = build_model_dir(tmp_path / "falcon", "falcon", seed=0, hidden_size=48, num_attention_heads=4)
    assert "transformer.h.1.self_attention.query_key_value" in \
        dict(linear_modules(AutoModelForCausalLM.from_pretrained(falcon)))
    phimoe = build_model_dir(tmp_path / "phimoe", "phimoe", seed=0, hidden_size=48, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    root = tmp_path / "adapters"
    make_peft_adapter(phimoe, root / "qv", 5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(phimoe, root / "router", 6, r=4, lora_alpha=8, target_modules=["router"])
    prompts, ids = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], ["", "qv", ""]
    server = start_server(phimoe, root)
    try:
        alone, together = tokens_alone_and_together(server.target, prompts, ids, 6)
        with Client(server.target, timeout=30) as client:
            code, message = status_of(client.load_adapter, "router")
    finally:
        server.stop()
    assert together == alone
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(phimoe), root / "qv").eval()
    assert alone[1] == peft.generate(torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "router" in message, (code, message)


def test_mixed_batch_tokens_equal_each_alone_through_server(server):
    before = scrape(server)
    alone, mixed = tokens_alone_and_together(server.target, PROMPTS, [ORDER[i % 4] for i in range(len(PROMPTS))], 12)
    assert mixed == alone
    after = scrape(server)
    steps, rows = (after[name] - before.get(name, 0)
                   for name in ('loraplex_batch_size_count{phase="decode"}', 'loraplex_batch_size_sum{phase="decode"}'))
    # the "together" rows really shared decode steps: 12 alone and 12 together take 24 x 11 rows in all; one
    # step per row would be 264 steps
    assert rows == 2 * len(PROMPTS) * 11 and steps < rows - 100
    # the four kinds of row really differ, so equality above is not vacuous
    assert len({tuple(alone[i]) for i in range(4)}) == 4


def test_newcomer_gets_first_token_before_long_request_finishes(server):
    async def scenario():
        async with AsyncClient(server.target, timeout=120) as client:
            long_done = asyncio.get_running_loop().create_future()

            async def long_request():
                async for message in client.generate_stream([3, 4, 5], "b-all", max_new_tokens=400, ignore_eos=True):
                    if message.finish_reason:
                        long_done.set_result(time.monotonic())
            task = asyncio.create_task(long_request())
            await asyncio.sleep(0.3)  # the long one is decoding by now
            async for message in client.generate_stream([9, 10], "a-qv", max_new_tokens=3, ignore_eos=True):
                first_short = time.monotonic()
                break
            assert not long_done.done(), "the short request waited for the long one to finish"
            await task
            assert first_short < long_done.result()
    asyncio.run(scenario())


def test_routed_layer_equals_per_row_reference():
    """HydraLoRA rows with different head counts and ranks, LoRA rows and base rows in one batch."""
    torch.manual_seed(1)
    d_in, d_out = 24, 40
    bank = SlotBank([ModuleShape("m", d_in, d_out)], num_slots=4, max_rank=12, device=torch.device("cpu"),
                    dtype=torch.float32, max_heads=4)

    class Fake:
        def __init__(self, i, r, k=None, bias=False):
            self.key = ("x", i)
            router = None if k is None else torch.randn(k, d_in)
            self.modules = {"m": ModuleFactors(torch.randn(r, d_in), torch.randn(d_out, r * (k or 1)), router,
                                               torch.randn(k) if bias else None)}
    hydra2, hydra4, lora, hydra3b = Fake(1, 3, 2), Fake(2, 2, 4), Fake(3, 5), Fake(4, 4, 3, bias=True)
    per_row = [hydra2, None, lora, hydra4, hydra3b, hydra2, None]
    row_slots = [0 if a is None else bank.acquire(a) for a in per_row]
    x = torch.randn(len(per_row), 5, d_in)
    from adapters.layer import MultiAdapterLinear
    context = AdapterContext()
    layer = MultiAdapterLinear(torch.nn.Linear(d_in, d_out), 0, context)
    context.rows = bank.gather(row_slots)
    got = layer(x) - layer.base(x)
    want = reference_delta(x, [None if a is None else a.modules["m"] for a in per_row], d_out)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A LoRA row beside routed rows gets what it gets in a batch without any router: its gate is exactly
    # one-hot, so only rounding may differ. Not bitwise: torch's CPU bmm rounds a row differently with the
    # batch size and padded width (seen on AMD EPYC Zen 4, torch 2.13); the native kernel's bitwise batch
    # invariance is tested in test_cpu_kernel.
    context.rows = bank.gather([row_slots[2]])
    torch.testing.assert_close(got[2], (layer(x[2:3]) - layer.base(x[2:3]))[0], atol=1e-5, rtol=1e-5)


def test_vocabulary_projection_sees_only_contiguous_last_positions(server):
    """Prefill projects only each row's last position, as one matmul: a strided slice of the hidden states is not
    folded by torch.matmul against a frozen weight and ran as a bmm against the vocabulary matrix expanded per
    row (5x slower for 31 rows and a 32k vocabulary)."""
    seen = []
    head = server.serving.base.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape, args[0].is_contiguous())))
    try:
        tokens_alone_and_together(server.target, PROMPTS, [""] * len(PROMPTS), 2)
    finally:
        handle.remove()
    assert any(shape[0] > 1 for shape, _ in seen)  # a prefill of several rows went through
    assert all(shape[1] == 1 and contiguous for shape, contiguous in seen), seen
