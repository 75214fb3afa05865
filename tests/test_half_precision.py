"""Adapters on a half-precision model: float32 factors are computed in float32 (as PEFT keeps adapters on an fp16
or bf16 model), so an adapter whose factors overflow fp16 is served with `--adapter-dtype float32` and refused,
with that advice, under the default."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.canonical import CanonicalAdapter, ModuleFactors
from adapters.layer import reference_delta
from adapters.slot_bank import ModuleShape, SlotBank
from clients.client import Client
from tests.helpers import make_peft_adapter, start_server, status_of

PROMPT = [5, 17, 99, 3, 42]


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    """'loud': the same function as a plain LoRA, with B x 1e6 and A / 1e6: its scaled B is far beyond
    fp16's 65504, its products are not."""
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "plain", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    (root / "loud").mkdir()
    config = json.loads((root / "plain" / "adapter_config.json").read_text())
    (root / "loud" / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(root / "plain" / "adapter_model.safetensors")
    save_file({k: v * (1e6 if "lora_B" in k else 1e-6) for k, v in tensors.items()},
              str(root / "loud" / "adapter_model.safetensors"), metadata={"format": "pt"})
    return root


def _peft_tokens(model_dir, adapter_dir, dtype):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir)  # its adapters stay float32 (autocast_adapter_dtype)
    out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(PROMPT):].tolist()


def test_factors_beyond_fp16_are_served_in_float32_and_refused_in_fp16(model_dirs, adapter_root):
    want = _peft_tokens(model_dirs["llama"], adapter_root / "loud", torch.float16)
    assert want == _peft_tokens(model_dirs["llama"], adapter_root / "plain", torch.float16)
    fp16 = start_server(model_dirs["llama"], adapter_root, dtype="float16")
    try:
        with Client(fp16.target, timeout=60) as client:
            code, details = status_of(client.load_adapter, "loud")
            assert code.name == "FAILED_PRECONDITION" and "beyond float16" in details and \
                "--adapter-dtype float32" in details, details
    finally:
        fp16.stop()
    wide = start_server(model_dirs["llama"], adapter_root, dtype="float16", adapter_dtype="float32")
    try:  # the advice works: it was served, and every request failed with non-finite logits
        with Client(wide.target, timeout=60) as client:
            assert list(client.generate(PROMPT, "loud", max_new_tokens=6, ignore_eos=True).token_ids) == want
    finally:
        wide.stop()


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_float32_factors_on_a_half_model_are_computed_in_float32_and_rounded_once(model_dtype):
    torch.manual_seed(0)
    d_in, d_out, r = 24, 20, 4
    bank = SlotBank([ModuleShape("m", d_in, d_out)], 2, 8, torch.device("cpu"), torch.float32, kernel="torch",
                    compute_dtype=model_dtype)
    factors = ModuleFactors(torch.randn(r, d_in) / 3e4, torch.randn(d_out, r) * 3e4)  # B alone overflows fp16
    adapter = CanonicalAdapter("a", None, {"m": factors}, load_serial=1)
    slot = bank.acquire(adapter)
    x = torch.randn(3, 2, d_in).to(model_dtype)
    y = torch.randn(3, 2, d_out).to(model_dtype)
    got = bank.gather([slot, 0, slot]).add_delta(0, x, y.clone())
    delta = reference_delta(x.float(), [factors, None, factors], d_out)
    assert torch.equal(got, (y.float() + delta).to(model_dtype)) or \
        torch.allclose(got.float(), (y.float() + delta).to(model_dtype).float(), rtol=2 ** -9, atol=0)
    assert torch.isfinite(got).all()
