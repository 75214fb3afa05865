"""Base, LoRA, AdaLoRA, HydraLoRA and merged-ResLoRA rows in one batch: each gets exactly what it gets alone."""

import pytest
import torch

from adapters.slot_bank import SlotBank
from loader.base_model import load_base_model
from loader.hydra_files import save_hydralora
from loader.inject import inject
from loader.peft_files import read_adapter
from loader.reslora_files import save_reslora
from server.batch import Row, Runner
from tests.helpers import (KERNELS, LLAMA_TARGETS, decode_forced, make_hydra_model, make_peft_adalora,
                           make_peft_adapter, make_reslora_model, start_server,
                           tokens_alone_and_together)

KINDS = ["", "lora", "adalora", "hydra", "hydra-wide", "reslora"]
PROMPTS = [[(11 * i + j) % 240 + 5 for j in range(2 + (7 * i) % 11)] for i in range(12)]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    llama = model_dirs["llama"]
    make_peft_adapter(llama, root / "lora", 1, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    make_peft_adalora(llama, root / "adalora", 2, target_modules=["q_proj", "v_proj", "up_proj"])
    _, layers = make_hydra_model(llama, 3, heads=3, r=4, alpha=8, targets=["q_proj", "gate_proj", "down_proj"])
    save_hydralora(layers, root / "hydra", {"r": 4, "lora_alpha": 8, "lora_nums": 3})
    _, layers = make_hydra_model(llama, 4, heads=2, r=6, alpha=6, targets=["v_proj", "up_proj"], router_bias=True)
    save_hydralora(layers, root / "hydra-wide", {"r": 6, "lora_alpha": 6, "lora_nums": 2})
    _, layers = make_reslora_model(llama, 5, "bs", 1, ["q_proj", "o_proj", "down_proj"])
    save_reslora(layers, root / "reslora", {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    return root


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_kinds_logits_equal_each_alone(model_dirs, adapter_root, kernel):
    base = load_base_model(str(model_dirs["llama"]), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=8, max_rank=16, device=torch.device("cpu"), dtype=torch.float32, kernel=kernel)
    by_name = {s.name: s for s in shapes}
    slot = {"": 0, **{k: bank.acquire(read_adapter(adapter_root / k, k, by_name, 16, i + 1))
                      for i, k in enumerate(KINDS[1:])}}
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)

    kind = lambda i: KINDS[i % len(KINDS)]  # noqa: E731
    mixed, tokens = decode_forced(runner, [Row(p, slot[kind(i)]) for i, p in enumerate(PROMPTS)], steps=4)
    for i, p in enumerate(PROMPTS):
        alone, _ = decode_forced(runner, [Row(p, slot[kind(i)])], forced=tokens[i:i + 1], steps=4)
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0)


def test_mixed_kinds_tokens_equal_each_alone_through_server(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root)
    try:
        alone, mixed = tokens_alone_and_together(server.target, PROMPTS,
                                                  [KINDS[i % len(KINDS)] for i in range(len(PROMPTS))], 10)
        assert mixed == alone
        assert len({tuple(alone[i]) for i in range(len(KINDS))}) == len(KINDS)  # the kinds really differ
    finally:
        server.stop()
