"""The Triton kernel (GPUs), run here in Triton's interpreter (tests/conftest.py) against the per-row reference:
every kind of row, dimensions across block boundaries, fp32, bf16 and fp16 factors; a row's delta does not depend
on its batch; prompts go through the torch path; the server serves with it and refuses it where it cannot run."""
import pytest
import torch

from adapters import triton_kernel
from adapters.layer import reference_delta
from adapters.slot_bank import ModuleShape, SlotBank
from clients import cli
from clients.client import Client
from loader.hydra_files import save_hydralora
from tests.helpers import (LLAMA_TARGETS, Fake, assert_delta_equals_per_row_reference, layer_delta, make_hydra_model,
                           make_peft_adalora, make_peft_adapter, rounded, start_server, tokens_alone_and_together)

if triton_kernel.problem(torch.device("cpu")):
    pytest.skip(f"triton kernel: {triton_kernel.problem(torch.device('cpu'))}", allow_module_level=True)


def bank_of(d_in: int, d_out: int, dtype=torch.float32, max_rank: int = 12, max_heads: int = 4) -> SlotBank:
    return SlotBank([ModuleShape("m", d_in, d_out)], num_slots=6, max_rank=max_rank, device=torch.device("cpu"),
                    dtype=dtype, max_heads=max_heads, kernel="triton", compute_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out", [(24, 40), (70, 33), (300, 130)])  # (300, 130): 3 input blocks, 2 tiles
@pytest.mark.parametrize("tokens", [1, 5])
def test_delta_equals_per_row_reference(dtype, d_in, d_out, tokens):
    """Decode (one token: the kernel) and prompts (the torch path), across block boundaries."""
    assert_delta_equals_per_row_reference("triton", dtype, d_in, d_out, tokens)


def test_a_bank_of_rank_1_without_heads():
    """The smallest bank: blocks are padded to at least 2 (rank and heads), padding reads nothing."""
    torch.manual_seed(2)
    bank = bank_of(20, 30, max_rank=1, max_heads=1)
    lora = Fake(1, 20, 30, 1)
    x = torch.randn(3, 1, 20)
    got = layer_delta(bank, [bank.acquire(lora), 0, 1], x)
    torch.testing.assert_close(got, reference_delta(x, [lora.modules["m"], None, lora.modules["m"]], 30))


def test_a_wide_bank_with_many_heads():
    """--max-lora-rank 2048: the expand runs head by head over [rank, features] tiles (it selected each column's
    head and shrink column with [R, R] one-hot tensors: over Triton's element limit here, and slow to compile)."""
    torch.manual_seed(3)
    bank = bank_of(40, 24, max_rank=2048, max_heads=8)
    hydra, lora = Fake(1, 40, 24, 256, 8, bias=True), Fake(2, 40, 24, 2048)
    x = torch.randn(3, 1, 40)
    got = layer_delta(bank, [bank.acquire(hydra), bank.acquire(lora), 0], x)
    want = reference_delta(x, [hydra.modules["m"], lora.modules["m"], None], 24)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_a_rows_delta_is_bitwise_the_same_in_any_batch():
    torch.manual_seed(0)
    d_in, d_out = 150, 140
    bank = bank_of(d_in, d_out, max_rank=16)
    lora, hydra, narrow = Fake(1, d_in, d_out, 16), Fake(2, d_in, d_out, 4, 4), Fake(3, d_in, d_out, 2)
    slots = [bank.acquire(a) for a in (lora, hydra, narrow)]
    x = torch.randn(7, 1, d_in)

    def delta(slots, x):  # straight into zeros: the base matmul's own blocking may differ with the batch size
        return bank.gather(slots).add_delta(0, x, torch.zeros(*x.shape[:-1], d_out))
    mixed = delta([slots[0], slots[1], 0, slots[2], slots[1], slots[0], slots[2]], x)
    for row, slot in ((0, slots[0]), (1, slots[1]), (3, slots[2]), (4, slots[1])):
        assert torch.equal(mixed[row], delta([slot], x[row:row + 1])[0])


def test_half_precision_activations_are_added_in_their_own_dtype():
    """A GPU model in bf16/fp16: the delta is computed in fp32 and added into y in y's dtype (rounded once: within
    the dtype's own tolerance of the fp32 sum)."""
    torch.manual_seed(1)
    bank = bank_of(40, 24, torch.bfloat16)
    hydra = Fake(1, 40, 24, 3, 3, bias=True)
    rows = bank.gather([bank.acquire(hydra), 0])
    x, y = torch.randn(2, 1, 40), torch.randn(2, 1, 24)
    for dtype in (torch.bfloat16, torch.float16):
        got = rows.add_delta(0, x.to(dtype), y.to(dtype).clone())
        want = y.to(dtype).float() + reference_delta(x.to(dtype).float(), [rounded(hydra, torch.bfloat16), None], 24)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype))


def test_activations_that_do_not_fit_the_batch_are_refused():
    bank = bank_of(32, 48, max_rank=4, max_heads=2)
    rows = bank.gather([bank.acquire(Fake(1, 32, 48, 4)), 0])
    for x, y in ((torch.randn(3, 1, 32), torch.zeros(3, 1, 48)),     # a row too many
                 (torch.randn(2, 1, 33), torch.zeros(2, 1, 48)),     # wrong d_in
                 (torch.randn(2, 1, 32), torch.zeros(2, 1, 47))):    # wrong d_out
        with pytest.raises(ValueError, match="do not fit 2 rows of module m"):
            rows.add_delta(0, x, y)


def test_server_serves_every_kind_with_it_as_the_torch_path_does(model_dirs, tmp_path):
    llama = model_dirs["llama"]
    make_peft_adapter(llama, tmp_path / "lora", 1, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    make_peft_adalora(llama, tmp_path / "adalora", 2, target_modules=["q_proj", "v_proj", "up_proj"])
    _, layers = make_hydra_model(llama, 3, heads=3, r=4, alpha=8, targets=["q_proj", "down_proj"])
    save_hydralora(layers, tmp_path / "hydra", {"r": 4, "lora_alpha": 8, "lora_nums": 3})
    prompts = [[(3 * i + j) % 200 + 4 for j in range(2 + i)] for i in range(8)]
    per_row = [["", "lora", "adalora", "hydra"][i % 4] for i in range(len(prompts))]
    outputs = {}
    for kernel in ("triton", "torch"):
        server = start_server(llama, tmp_path, adapter_kernel=kernel)
        try:
            with Client(server.target, timeout=60) as client:
                assert client.server_info().adapter_kernel == kernel
            alone, mixed = tokens_alone_and_together(server.target, prompts, per_row, 6)
            assert mixed == alone
            outputs[kernel] = alone
        finally:
            server.stop()
    assert outputs["triton"] == outputs["torch"]


def test_triton_kernel_where_it_cannot_run_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--port", "0", "--metrics-port", "0", "--adapter-kernel", "triton"])
    assert exit_info.value.code == 2
    assert "--adapter-kernel triton cannot run: it runs on CUDA GPUs" in capsys.readouterr().err


def test_every_modules_slot_tables_start_16_byte_aligned():
    """Triton compiles a variant per pointer alignment, and the warm-up launches one module per shape: each module's
    row of the per-slot rank and head tables must be aligned alike, or a module of a warmed shape compiled mid-request
    (33 slots: a row of 33 int32s put module i at 132·i bytes)."""
    bank = SlotBank([ModuleShape(f"m{i}", 8, 8) for i in range(5)], 32, 4, torch.device("cpu"), torch.float32)
    assert all(t[i].data_ptr() % 16 == 0 for t in (bank.device_ranks, bank.device_heads) for i in range(5))
