"""Shared test helpers: tiny random models, PEFT-made adapters, the real server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import subprocess
import tempfile
import time
import urllib.request
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapters import cpu_kernel, triton_kernel
from adapters.canonical import ModuleFactors
from adapters.layer import MultiAdapterLinear, reference_delta
from adapters.slot_bank import AdapterContext, ModuleShape, SlotBank
from adapters.training import TrainSettings
from clients.client import AsyncClient, Client
from loader.train_job_spec import TrainJob
from server.background import BackgroundServer
from server.config import ServerConfig

# Every way of computing the adapter delta; native and triton only where they can run (the reason is shown as a
# skip). Triton runs in its interpreter here (tests/conftest.py).
_NATIVE_PROBLEM = cpu_kernel.available()
_TRITON_PROBLEM = triton_kernel.problem(torch.device("cpu"))
KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    _NATIVE_PROBLEM is not None, reason=f"native kernel: {_NATIVE_PROBLEM}")),
    pytest.param("triton", marks=pytest.mark.skipif(_TRITON_PROBLEM is not None,
                                                    reason=f"triton kernel: {_TRITON_PROBLEM}"))]


def run_cli(*argv) -> subprocess.CompletedProcess:
    """`loraplex ARGV` in this process: the command's own entry point (clients.cli.main), its output and exit code,
    without the 5 s a new interpreter spends importing torch and transformers. Its stderr holds what it logs and
    warns too (pytest would take those), as a process's would. What the command changes in the process is put back:
    the environment (it sets OMP_WAIT_POLICY), torch's threads (--threads) and its RNG. Tests of what only a
    process shows (signals, torchrun, a start-up's whole stderr) start the real command."""
    from clients import cli
    out, err = io.StringIO(), io.StringIO()
    env, threads, rng = dict(os.environ), torch.get_num_threads(), torch.get_rng_state()
    logged = logging.StreamHandler(err)
    logging.getLogger().addHandler(logged)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            cli.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        logging.getLogger().removeHandler(logged)
        for key in set(os.environ) - set(env):  # key by key: servers' threads of this process read it meanwhile
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model_dir: Path, out: Path, seed: int, **lora) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B, as `PeftModel.save_pretrained` writes it. With an
    `init_lora_weights` that starts from the base weights (PiSSA, OLoRA), its factors are moved off that start, as
    training would, and saved unconverted."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**{"init_lora_weights": False, **lora}))
    if lora.get("init_lora_weights", False) is not False:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    return out


def make_versions(model_dir: Path, root: Path, count: int) -> Path:
    """v0 .. v<count-1> under `root`: versions of one small LoRA, told apart by their greedy outputs."""
    for i in range(count):
        make_peft_adapter(model_dir, root / f"v{i}", 100 + i, r=4, lora_alpha=64,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def start_server(model_dir: Path, adapter_root: Path | None, **overrides) -> BackgroundServer:
    """Each server records its loaded adapters in its own fresh state file unless `state_file` is given
    (servers sharing an adapter root would otherwise restore each other's loads)."""
    settings = dict(model=str(model_dir), adapter_root=str(adapter_root) if adapter_root else None, port=0,
                    metrics_port=0, max_batch_size=16, max_active_adapters=8, max_lora_rank=16, threads=2,
                    log_level="WARNING", state_file=str(Path(tempfile.mkdtemp(prefix="loraplex-state-")) / "s.json"))
    settings.update(overrides)
    return BackgroundServer(ServerConfig(**settings)).start()


def lora_root(model_dirs, tmp_path_factory) -> Path:
    """A fresh adapter root holding one PEFT LoRA for the tiny Llama, "a" (r=8 on every projection)."""
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "a", 3, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    return root


def tokens_alone_and_together(target: str, prompts: list, adapter_ids: list[str], max_new_tokens: int):
    """Greedy token ids of each prompt with its adapter: one request at a time, then all at once (one batch)."""
    with Client(target, timeout=60) as client:
        alone = [list(client.generate(p, a, max_new_tokens=max_new_tokens, ignore_eos=True).token_ids)
                 for p, a in zip(prompts, adapter_ids)]

    async def together():
        async with AsyncClient(target, timeout=60) as client:
            return await asyncio.gather(*[client.generate(p, a, max_new_tokens=max_new_tokens, ignore_eos=True)
                                          for p, a in zip(prompts, adapter_ids)])
    return alone, [list(r.token_ids) for r in asyncio.run(together())]


def status_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the RpcError that `fn(*args, **kwargs)` must raise."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


def left_for_the_collector(work) -> tuple[object, int]:
    """`work()`'s result, and how many tensors it left that only Python's cyclic collector would free (unreachable, in
    reference cycles): memory that stays allocated, uncounted, until the collector next reaches their generation."""
    gc.collect()
    gc.disable()
    try:
        result = work()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept in gc.garbage, to be looked at
        gc.collect()
        return result, sum(isinstance(o, torch.Tensor) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def scrape(server: BackgroundServer) -> dict[str, float]:
    """Prometheus text exposition over HTTP -> {'name{labels}': value}."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10).read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def make_peft_adalora(model_dir: Path, out: Path, seed: int, steps: int = 10, **adalora) -> Path:
    """Train a few steps with PEFT's own update_and_allocate so per-layer ranks really differ, then save."""
    from peft import AdaLoraConfig
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    settings = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=steps, lora_alpha=8,
                    task_type="CAUSAL_LM")  # without task_type PEFT silently skips the orthogonal regulariser
    settings.update(adalora)
    model = get_peft_model(base, AdaLoraConfig(**settings))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(steps):
        ids = torch.randint(3, 250, (4, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def make_hydra_model(model_dir: Path, seed: int, heads: int, r: int, alpha: float, targets, router_bias=False,
                     use_rslora=False):
    """A base model with trainable HydraLoRA layers whose heads are random (not zero), in eval mode."""
    from adapters.hydralora import add_hydralora
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    layers = add_hydralora(model, targets, r=r, alpha=alpha, heads=heads, router_bias=router_bias,
                           use_rslora=use_rslora)
    with torch.no_grad():
        for layer in layers.values():
            for head in layer.lora_B:
                head.weight.normal_(0, 0.3)
            layer.lora_route.weight.mul_(8)  # sharper routing, so heads really differ per token
    return model.eval(), layers


def make_reslora_model(model_dir: Path, seed: int, structure: str, pre_num: int, targets, r: int = 4,
                       alpha: float = 8):
    """A base model with ResLoRA layers (random B), after a few training-mode forwards that record the
    merge statistics; returned in eval mode (the unmerged training formula without dropout)."""
    from adapters.reslora import add_reslora
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    layers = add_reslora(model, targets, r=r, alpha=alpha, dropout=0.0, structure=structure, pre_num=pre_num)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.normal_(0, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randint(3, 250, (2, 10)))
    return model.eval(), layers


def random_lora_runner(model_dir: Path):
    """(the server's Runner on the fp32 model in `model_dir`, the slot of a random rank-4 LoRA on every adaptable
    module): for tests of the batch runner itself, below the engine."""
    from adapters.canonical import AdapterKind, CanonicalAdapter
    from loader.base_model import load_base_model
    from loader.inject import inject
    from server.batch import Runner
    base = load_base_model(str(model_dir), "cpu", "float32")
    context, shapes = inject(base.model)
    bank = SlotBank(shapes, num_slots=2, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    adapter = CanonicalAdapter("a", AdapterKind.LORA, {s.name: ModuleFactors(a=torch.randn(4, s.d_in) * 0.3,
                                                                             b=torch.randn(s.d_out, 4) * 0.3)
                                                       for s in shapes}, load_serial=1)
    return Runner(base.model, context, bank, base.pad_token_id, base.max_context), bank.acquire(adapter)


def assert_logprobs_close(got, expected, tolerance: float) -> None:
    """TokenLogprobs `got` against (logprob, top ids, top values) `expected`: values within `tolerance`, and the same
    ids in the same order where no two alternatives are within the tolerance of each other."""
    assert len(got) == len(expected)
    for entry, (logprob, ids, values) in zip(got, expected):
        assert entry.logprob == pytest.approx(logprob, abs=tolerance)
        assert list(entry.top_logprobs) == pytest.approx(values, abs=tolerance)
        apart = [i for i in range(len(values))
                 if all(abs(values[i] - v) > tolerance for v in values[max(0, i - 1):i] + values[i + 1:i + 2])]
        assert [entry.top_token_ids[i] for i in apart] == [ids[i] for i in apart]


def decode_forced(runner, rows, forced=None, steps: int = 5):
    """Prefill `rows`, then greedy-decode `steps` tokens; `forced` ([B, steps]) feeds given tokens instead, so a
    near-tie cannot fork two runs being compared. Returns logits [B, steps+1, V] and the fed tokens [B, steps]."""
    return decode_from(runner, *runner.prefill(rows), forced, steps)


def decode_from(runner, batch, logits, forced=None, steps: int = 5):
    """decode_forced, from a `batch` already prefilled and its rows' next-token `logits`."""
    out, fed = [logits], []
    for step in range(steps):
        tokens = out[-1].argmax(-1) if forced is None else forced[:, step]
        for row, token in zip(batch.rows, tokens.tolist()):
            row.last_token = token
        fed.append(tokens)
        out.append(runner.decode_step(batch))
    return torch.stack(out, dim=1), torch.stack(fed, dim=1)


def assert_load_refused(model_dir: Path, adapter_root: Path, cases: dict[str, str], **server_overrides) -> None:
    """LoadAdapter of each id in `cases` is FAILED_PRECONDITION with a message containing its needle."""
    import grpc
    import pytest
    from clients.client import Client
    server = start_server(model_dir, adapter_root, **server_overrides)
    try:
        with Client(server.target, timeout=30) as client:
            for adapter_id, needle in cases.items():
                with pytest.raises(grpc.RpcError) as info:
                    client.load_adapter(adapter_id)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, adapter_id
                assert needle in info.value.details(), info.value.details()
    finally:
        server.stop()


def write_task(path: Path, n: int, seed: int, task: str = "reverse", text: bool = False) -> Path:
    """A tiny synthetic string task as JSONL: `<task>: <input> =>` -> ` <output>`."""
    import json
    import random
    rng = random.Random(seed)
    ops = {"reverse": lambda s: s[::-1], "upper": str.upper, "first": lambda s: s[0], "double": lambda s: s + s}
    with path.open("w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
            prompt, completion = f"{task}: {word} =>", f" {ops[task](word)}"
            record = {"text": prompt + completion} if text else {"prompt": prompt, "completion": completion}
            f.write(json.dumps(record) + "\n")
    return path


class Fake:
    """An adapter with one module 'm': rank r, K heads (router) or plain LoRA."""

    def __init__(self, serial: int, d_in: int, d_out: int, r: int, heads: int | None = None, bias: bool = False):
        self.key = ("fake", serial)
        router = None if heads is None else torch.randn(heads, d_in)
        self.modules = {"m": ModuleFactors(torch.randn(r, d_in) / d_in ** 0.5, torch.randn(d_out, r * (heads or 1)),
                                           router, torch.randn(heads) if bias else None)}


def rounded(adapter, dtype):
    """The factors as a bank of `dtype` holds them (routers stay fp32)."""
    if adapter is None:
        return None
    f = adapter.modules["m"]
    return ModuleFactors(f.a.to(dtype).float(), f.b.to(dtype).float(), f.router, f.router_bias)


def layer_delta(bank, slots, x):
    """The adapter delta of a bank's only module for rows using `slots`, through the adapted layer."""
    context = AdapterContext()
    layer = MultiAdapterLinear(torch.nn.Linear(x.shape[-1], bank.shapes[0].d_out), 0, context)
    context.rows = bank.gather(slots)
    with torch.inference_mode():
        return layer(x) - layer.base(x)


def assert_delta_equals_per_row_reference(kernel: str, dtype: torch.dtype, d_in: int, d_out: int, tokens: int):
    """LoRA of several ranks, HydraLoRA with 2-4 heads (with and without router bias), full-width rows and base
    rows in one batch through `kernel`, against the per-row reference (factors rounded as the bank stores them)."""
    torch.manual_seed(d_in + d_out + tokens)
    bank = SlotBank([ModuleShape("m", d_in, d_out)], num_slots=6, max_rank=12, device=torch.device("cpu"),
                    dtype=dtype, max_heads=4, kernel=kernel, compute_dtype=torch.float32)
    kinds = [Fake(1, d_in, d_out, 3, 2), Fake(2, d_in, d_out, 2, 4), Fake(3, d_in, d_out, 5),
             Fake(4, d_in, d_out, 4, 3, bias=True), Fake(5, d_in, d_out, 12), Fake(6, d_in, d_out, 1)]
    per_row = [kinds[0], None, kinds[2], kinds[1], kinds[3], kinds[0], None, kinds[4], kinds[5]]
    slots = [0 if a is None else bank.acquire(a) for a in per_row]
    x = torch.randn(len(per_row), tokens, d_in)
    got = layer_delta(bank, slots, x)
    want = reference_delta(x, [rounded(a, dtype) for a in per_row], d_out)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert got[1].abs().max() == 0 and got[6].abs().max() == 0  # base rows get exactly nothing


def slow_decode(server: BackgroundServer, monkeypatch, seconds: float = 0.005) -> None:
    """Every decode step of `server` takes at least `seconds` more: a long generation is still running while a test
    looks at it (N steps take >= N x seconds)."""
    runner = server.serving.engine.runner
    decode_step = runner.decode_step
    monkeypatch.setattr(runner, "decode_step", lambda batch: (time.sleep(seconds), decode_step(batch))[1])


FAST = TrainSettings(lr=1e-2, max_steps=60, batch_size=16, eval_every=30, seed=3)  # the training tests' settings


def training_job(model_dirs, data, out, method, **kw) -> TrainJob:
    """A job on the tiny Llama over the `data` fixture's (train, eval) files, FAST unless `kw` says."""
    base = dict(method=method, data=str(data[0]), eval=str(data[1]), out=str(out), model=str(model_dirs["llama"]),
                target_modules=["q_proj", "v_proj", "down_proj"], settings=FAST)
    base.update(kw)
    return TrainJob(**base)
