"""The native CPU kernel against the per-row reference: every kind of row, prefill and decode shapes, odd
dimensions, fp32, bf16 and fp16 factors; a row's delta does not depend on its batch; the server picks the kernel,
reports it, and refuses `--adapter-kernel native` where it cannot run."""
import logging

import pytest
import torch

from adapters import cpu_kernel
from adapters.layer import reference_delta
from adapters.slot_bank import ModuleShape, SlotBank
from clients import cli
from clients.client import Client
from loader.hydra_files import save_hydralora
from tests.helpers import (LLAMA_TARGETS, Fake, assert_delta_equals_per_row_reference, make_hydra_model, make_peft_adalora,
                           make_peft_adapter, start_server, tokens_alone_and_together)

try:
    cpu_kernel.isa()
except cpu_kernel.KernelUnavailable as exc:  # a CPU without AVX2 or AVX-512 cannot run it; anything else must work
    pytest.skip(f"native kernel: {exc}", allow_module_level=True)


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out", [(24, 40), (64, 96), (70, 33), (512, 1408)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_delta_equals_per_row_reference(kernel, dtype, d_in, d_out, tokens):
    """Dimensions that are and are not multiples of the vector width; factors stored in fp32, bf16 or fp16
    (computed in fp32 either way)."""
    assert_delta_equals_per_row_reference(kernel, dtype, d_in, d_out, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out", [(96, 160), (70, 33)])  # (70, 33): the tails past whole vectors too
def test_a_rows_delta_is_bitwise_the_same_in_any_batch(dtype, d_in, d_out):
    torch.manual_seed(0)
    bank = SlotBank([ModuleShape("m", d_in, d_out)], num_slots=4, max_rank=16, device=torch.device("cpu"),
                    dtype=dtype, max_heads=4, kernel="native", compute_dtype=torch.float32)
    lora, hydra, narrow = Fake(1, d_in, d_out, 16), Fake(2, d_in, d_out, 4, 4), Fake(3, d_in, d_out, 2)
    slots = [bank.acquire(a) for a in (lora, hydra, narrow)]
    x = torch.randn(7, 3, d_in)

    def delta(slots, x):  # straight into zeros: the base matmul's own blocking may differ with the batch size
        return bank.gather(slots).add_delta(0, x, torch.zeros(*x.shape[:-1], d_out))
    mixed = delta([slots[0], slots[1], 0, slots[2], slots[1], slots[0], slots[2]], x)
    for row, slot in ((0, slots[0]), (1, slots[1]), (3, slots[2])):
        assert torch.equal(mixed[row], delta([slot], x[row:row + 1])[0])
    # Prompts go through in blocks of tokens: a token's delta is the same whatever block it shares
    # (here 11 tokens: two full blocks and a partial one) as it is alone, as in a decode step.
    long = torch.randn(3, 11, d_in)
    prompt = delta(slots, long)
    for t in range(11):
        assert torch.equal(prompt[:, t], delta(slots, long[:, t:t + 1].contiguous())[:, 0])


def test_activations_that_do_not_fit_the_batch_are_refused_and_strided_ones_work():
    """The kernel trusts its arguments, so anything else is refused before the call; strided x and y are
    computed on contiguous copies."""
    torch.manual_seed(0)
    bank = SlotBank([ModuleShape("m", 32, 48)], num_slots=2, max_rank=4, device=torch.device("cpu"),
                    dtype=torch.float32, max_heads=2, kernel="native", compute_dtype=torch.float32)
    lora = Fake(1, 32, 48, 4)
    rows = bank.gather([bank.acquire(lora), 0])
    for x, y in ((torch.randn(3, 1, 32), torch.zeros(3, 1, 48)),     # a row too many
                 (torch.randn(2, 1, 33), torch.zeros(2, 1, 48)),     # wrong d_in
                 (torch.randn(2, 1, 32), torch.zeros(2, 1, 47)),     # wrong d_out
                 (torch.randn(2, 1, 32), torch.zeros(2, 2, 48)),     # tokens differ
                 (torch.randn(2, 32), torch.zeros(2, 48)),           # no token axis
                 (torch.randn(2, 1, 32).double(), torch.zeros(2, 1, 48))):
        with pytest.raises(ValueError, match="do not fit 2 rows of module m"):
            rows.add_delta(0, x, y)
    x = torch.randn(2, 32, 3).transpose(1, 2)                         # [2, 3, 32], not contiguous
    y = torch.randn(48, 3, 2).permute(2, 1, 0)                        # [2, 3, 48], not contiguous
    want = y + reference_delta(x, [lora.modules["m"], None], 48)
    torch.testing.assert_close(rows.add_delta(0, x, y.clone()), want, atol=1e-5, rtol=1e-5)


def test_native_and_torch_paths_agree_on_a_model(model_dirs, tmp_path):
    """The same LoRA, AdaLoRA and HydraLoRA rows through the whole model with either kernel."""
    from loader.base_model import load_base_model
    from loader.inject import inject
    from loader.peft_files import read_adapter
    from server.batch import Row, Runner
    from tests.helpers import decode_forced

    llama = model_dirs["llama"]
    make_peft_adapter(llama, tmp_path / "lora", 1, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    make_peft_adalora(llama, tmp_path / "adalora", 2, target_modules=["q_proj", "v_proj", "up_proj"])
    _, layers = make_hydra_model(llama, 3, heads=3, r=4, alpha=8, targets=["q_proj", "gate_proj", "down_proj"])
    save_hydralora(layers, tmp_path / "hydra", {"r": 4, "lora_alpha": 8, "lora_nums": 3})
    prompts = [[(5 * i + j) % 200 + 4 for j in range(3 + i)] for i in range(6)]
    logits = {}
    for kernel in ("torch", "native"):
        base = load_base_model(str(llama), "cpu", "float32")
        context, shapes = inject(base.model)
        bank = SlotBank(shapes, num_slots=4, max_rank=16, device=torch.device("cpu"), dtype=torch.float32,
                        kernel=kernel)
        by_name = {s.name: s for s in shapes}
        slots = [0] + [bank.acquire(read_adapter(tmp_path / k, k, by_name, 16, i + 1))
                       for i, k in enumerate(["lora", "adalora", "hydra"])]
        runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
        forced = None if not logits else logits["torch"][1]
        logits[kernel] = decode_forced(runner, [Row(p, slots[i % 4]) for i, p in enumerate(prompts)], forced=forced)
    for got, want in zip(logits["native"][0], logits["torch"][0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_unbuildable_kernel_is_reported_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither gcc nor cc: only $CC=false, which is not found either
    cpu_kernel.load.cache_clear()
    try:
        assert "no C compiler" in cpu_kernel.available()
        (tmp_path / "cc").write_text("#!/bin/sh\necho 'cc: fatal error: broken' >&2\nexit 1\n")
        (tmp_path / "cc").chmod(0o755)
        cpu_kernel.load.cache_clear()
        assert "failed to build cpu_kernel.c for" in cpu_kernel.available() and "broken" in cpu_kernel.available()
        assert not list((tmp_path / "empty").iterdir())  # no half-written library left behind
    finally:
        cpu_kernel.load.cache_clear()


def test_kernel_builds_into_a_fresh_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNEL_DIR", str(tmp_path))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.available() is None
        assert [p.name for p in tmp_path.iterdir()] == [cpu_kernel._library_name(cpu_kernel.isa())]
    finally:
        cpu_kernel.load.cache_clear()


def test_every_instruction_set_builds(tmp_path, monkeypatch):
    """Compiling needs no particular CPU, so the variant this machine cannot run is checked to build too (the
    Docker image ships both)."""
    monkeypatch.setenv("LORAPLEX_KERNEL_DIR", str(tmp_path))
    paths = [cpu_kernel.build(each) for each in cpu_kernel.ISAS]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert [each.name for each in cpu_kernel.ISAS] == ["avx512", "avx2"] and len(set(paths)) == 2


def test_the_best_instruction_set_the_cpu_has_is_chosen(monkeypatch):
    zen3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
    for flags, want in ((zen3, "avx2"), (zen3 | {"avx512f", "avx512bw", "avx512vl"}, "avx512"),
                        (zen3 | {"avx512f"}, "avx2")):  # AVX-512 without BW/VL: the AVX2 build
        monkeypatch.setattr(cpu_kernel, "_cpu_flags", lambda flags=flags: flags)
        assert cpu_kernel.isa().name == want
    monkeypatch.setattr(cpu_kernel, "_cpu_flags", lambda: {"sse4_2", "avx"})
    with pytest.raises(cpu_kernel.KernelUnavailable, match="this CPU lacks avx2, fma, f16c"):
        cpu_kernel.isa()


def test_server_reports_kernel_and_serves_half_precision_factors_batch_invariantly(model_dirs, tmp_path):
    llama = model_dirs["llama"]
    make_peft_adapter(llama, tmp_path / "lora", 1, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    _, layers = make_hydra_model(llama, 3, heads=3, r=4, alpha=8, targets=["q_proj", "down_proj"])
    save_hydralora(layers, tmp_path / "hydra", {"r": 4, "lora_alpha": 8, "lora_nums": 3})
    prompts = [[(3 * i + j) % 200 + 4 for j in range(2 + i)] for i in range(6)]
    ids = ["", "lora", "hydra"]
    outputs = {}
    for factors in ("float32", "bfloat16", "float16"):
        server = start_server(llama, tmp_path, adapter_dtype=factors)
        try:
            with Client(server.target, timeout=60) as client:
                info = client.server_info()
                assert (info.adapter_kernel, info.adapter_dtype) == ("native", factors)
            per_row = [ids[i % 3] for i in range(len(prompts))]
            alone, mixed = tokens_alone_and_together(server.target, prompts, per_row, 8)
            assert mixed == alone
            outputs[factors] = alone
        finally:
            server.stop()
    # base rows do not depend on the factor dtype at all
    for factors in ("bfloat16", "float16"):
        assert [outputs["float32"][i] for i in (0, 3)] == [outputs[factors][i] for i in (0, 3)]


def test_torch_kernel_is_used_when_asked_for(model_dirs, caplog):
    caplog.set_level(logging.INFO, logger="loraplex.app")
    server = start_server(model_dirs["llama"], None, adapter_kernel="torch", log_level="INFO")
    try:
        with Client(server.target, timeout=30) as client:
            assert client.server_info().adapter_kernel == "torch"
    finally:
        server.stop()
    assert any("adapter kernel: torch" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flags,needle", [
    (["--adapter-kernel", "native", "--dtype", "bfloat16"], "native runs on the CPU with --dtype float32"),
    (["--adapter-kernel", "native", "--dtype", "float16"], "native runs on the CPU with --dtype float32"),
])
def test_native_kernel_where_it_cannot_run_is_a_one_line_error(flags, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--port", "0", "--metrics-port", "0", *flags])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err
