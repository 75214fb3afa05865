"""Mixed-adapter decode throughput (issue 2): our engine with 32 distinct LoRA adapters in one batch,
against the same engine on the base model and against HF PEFT's mixed-batch `generate`.

One random Llama-shaped model (fixed seed, fp32) and 32 random PEFT LoRA adapters (rank 16, all seven
projections, B non-zero) are built in a temporary directory. Measured, interleaved, `--repeats` times:
  (a) 32 base-model requests through the real gRPC server (`python -m server`, asyncio client)
  (b) 32 requests over 32 distinct adapters through the same server
  (c) HF PEFT `PeftModel.generate(..., adapter_names=[...32 names...])`, one left-padded batch of 32
  (d) HF base model `generate`, same batch, for reference
Every request generates exactly --max-new-tokens tokens (ignore_eos / min_new_tokens). Throughput is
generated tokens / wall time (first send to last response; for HF, the whole `generate` call).
Adapters are preloaded with LoadAdapter and one untimed warm-up round of each configuration runs first.

The server runs in its own process by default, as deployed. In-process (`--server inprocess`) the
HF/PEFT rounds and the engine thread are two OpenMP root threads of one libgomp, which then has more
managed threads than cores and throttles its spin-waits: both sides slow down (see bench/RESULTS.md).

    .venv/bin/python bench/mixed_adapters.py                 # CPU, 2 threads (the defaults)
    .venv/bin/python bench/mixed_adapters.py --device cuda   # on a GPU
    .venv/bin/python bench/mixed_adapters.py --breakdown     # plus direct Runner.decode_step timings + profile
    .venv/bin/python bench/mixed_adapters.py --skip-peft --server-module my_variant \
        --server-env PYTHONPATH=/path/to/variant:.      # A/B an engine variant (a module like `server`)
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
from dataclasses import replace
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from clients.client import AsyncClient  # noqa: E402
from loader.default_model import build_tokenizer, tiny_config  # noqa: E402
from server.background import BackgroundServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from bench.server_process import ServerProcess, free_port  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_ID = 0


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Model, workload and server flags shared by the benchmarks that drive the real server."""
    a = p.add_argument
    a("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    a("--threads", type=int, default=2, help="torch CPU threads, for the engine and for HF/PEFT alike")
    a("--requests", type=int, default=32, help="requests per round (= batch size)")
    a("--max-new-tokens", type=int, default=64)
    a("--prompt-min", type=int, default=16)
    a("--prompt-max", type=int, default=32)
    a("--repeats", type=int, default=5, help="interleaved timed rounds per configuration (median reported)")
    a("--hidden", type=int, default=512)
    a("--intermediate", type=int, default=1408)
    a("--layers", type=int, default=8)
    a("--heads", type=int, default=8)
    a("--kv-heads", type=int, default=8)
    a("--vocab", type=int, default=32000)
    a("--seed", type=int, default=0)
    a("--server", choices=["process", "inprocess"], default="process",
      help="process: `python -m server` in a child process (default); inprocess: server.background.BackgroundServer here")
    a("--server-env", action="append", default=[], metavar="KEY=VALUE",
      help="extra environment for the server process (repeatable), e.g. OMP_WAIT_POLICY=active")
    a("--server-module", default="server",
      help="module run as `python -m MODULE` for --server process (to A/B an engine variant; default: server)")
    a("--workdir", default=None, help="where to build model and adapters (default: a temporary directory)")
    a("--adapter-kernel", default="auto", choices=["auto", "native", "torch", "triton"],
      help="the server's --adapter-kernel")
    a("--adapter-dtype", default="auto", help="the server's --adapter-dtype")
    a("--temperature", type=float, default=0.0, help="engine requests sample at this temperature (0: greedy), "
      "request i seeded with i")
    a("--top-p", type=float, default=1.0, help="engine requests' top_p (with --temperature)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    a = p.add_argument
    a("--adapters", type=int, default=32, help="distinct adapters; request i uses adapter i %% adapters")
    a("--rank", type=int, default=16)
    a("--skip-peft", action="store_true", help="only (a) and (b)")
    a("--breakdown", action="store_true",
      help="after the rounds: Runner.decode_step timed directly (base vs mixed) and a torch.profiler op table")
    return p.parse_args(argv)


# -- fixtures ----------------------------------------------------------------------------------------
def build_model_dir(out: Path, args, context: int = 1024) -> None:
    """Like loader.default_model.build_model_dir, but with a real-sized vocabulary (the byte tokenizer
    only covers ids < 259; prompts are token ids, and ids it cannot decode are skipped in text)."""
    config = tiny_config("llama", args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=context)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)


def build_adapters(model_dir: Path, root: Path, names: list[str], args) -> None:
    """One PEFT model holding every adapter; save_pretrained writes root/<name>/ for each (PEFT layout)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(args.seed + 1)
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.save_pretrained(root)
    missing = [n for n in names if not (root / n / "adapter_model.safetensors").is_file()]
    if missing:
        raise RuntimeError(f"PEFT did not write adapters {missing[:3]} under {root}")


def make_prompts(args) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed + 2)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.requests,), generator=g).tolist()
    # Ids 3.. avoid the pad/bos/eos specials.
    return [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- our engine, through the real server -----------------------------------------------------------------
def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


ENGINE_STATS = {  # name in the table -> Prometheus sample
    "prefills": 'loraplex_step_duration_seconds_count{phase="prefill"}',  # chunks: one per prompt of <= 2048 tokens
    "prefill_s": 'loraplex_step_duration_seconds_sum{phase="prefill"}',
    "decode_steps": 'loraplex_step_duration_seconds_count{phase="decode"}',
    "decode_s": 'loraplex_step_duration_seconds_sum{phase="decode"}',
    "copied": "loraplex_prompt_tokens_copied_total",  # prompt tokens copied (prefix cache, running rows), not run
    "ttft_s": "loraplex_time_to_first_token_seconds_sum",
    "requests": "loraplex_time_to_first_token_seconds_count",
}


class EngineBench:
    """The real server, driven over gRPC by the asyncio client. `--server process` runs `python -m server`
    (what `loraplex serve` runs) in a child process; `inprocess` runs server.background.BackgroundServer in this
    process, where this process's own torch threads (HF/PEFT rounds) share libgomp with the engine."""

    def __init__(self, model_dir: Path, adapter_root: Path, names: list[str], args, kernel: str | None = None,
                 factors: str | None = None, env: dict | None = None, cwd: Path | None = None, **settings) -> None:
        """`settings`: more server settings (ServerConfig fields: prefix_cache_tokens=4096). `cwd`: the checkout
        whose server runs (`--server process` only; default: this one)."""
        self.temperature, self.top_p = getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0)
        self.config = ServerConfig(model=str(model_dir), adapter_root=str(adapter_root), port=free_port(),
                                   metrics_port=free_port(), device=args.device, max_batch_size=args.requests,
                                   max_active_adapters=args.adapters, max_lora_rank=args.rank,
                                   threads=args.threads, log_level="WARNING",
                                   adapter_kernel=kernel or args.adapter_kernel,
                                   adapter_dtype=factors or args.adapter_dtype,
                                   # its own state file: servers sharing the adapter root must not restore each
                                   # other's loads
                                   state_file=str(Path(tempfile.mkdtemp(prefix="loraplex-bench-")) / "state.json"),
                                   **settings)
        self.proc: ServerProcess | None = None
        self.server: BackgroundServer | None = None
        if args.server == "process":
            c = self.config
            flags = ["--model", c.model, "--adapter-root", c.adapter_root, "--device", c.device,
                     "--max-batch-size", c.max_batch_size, "--max-active-adapters", c.max_active_adapters,
                     "--max-lora-rank", c.max_lora_rank, "--threads", c.threads, "--log-level", c.log_level,
                     "--adapter-kernel", c.adapter_kernel, "--adapter-dtype", c.adapter_dtype,
                     "--state-file", c.state_file]
            for name, value in settings.items():  # a boolean setting is a switch: --no-preemption for False
                flag = "--" + name.replace("_", "-")
                flags += [] if value is True else ["--no-" + flag[2:]] if value is False else [flag, value]
            env = {**dict(kv.split("=", 1) for kv in args.server_env), **(env or {})}
            self.proc = ServerProcess(flags, args.server_module, env, cwd=cwd)
            self.config = replace(c, port=self.proc.port, metrics_port=self.proc.metrics_port)
        else:
            self.server = BackgroundServer(self.config).start()
        self.target = f"127.0.0.1:{self.config.port}"
        self.loop = asyncio.new_event_loop()
        self.client: AsyncClient = self.loop.run_until_complete(self._connect())
        for name in names:  # disk reads happen here, never inside a timed round
            self.loop.run_until_complete(self.client.load_adapter(name))

    async def _connect(self) -> AsyncClient:
        return AsyncClient(self.target, timeout=600)

    def round(self, prompts: list[list[int]], adapter_ids: list[str], max_new: int, **request):
        """`request`: more GenerateRequest settings for every request (the client's keyword arguments)."""
        async def go():
            start = time.perf_counter()
            sampling = {} if not self.temperature else dict(temperature=self.temperature, top_p=self.top_p)
            responses = await asyncio.gather(*(self.client.generate(p, a, max_new_tokens=max_new, ignore_eos=True,
                                                                    **sampling, **({"seed": i} if sampling else {}),
                                                                    **request)
                                               for i, (p, a) in enumerate(zip(prompts, adapter_ids))))
            return time.perf_counter() - start, responses
        before = scrape(self.config.metrics_port)
        wall, responses = self.loop.run_until_complete(go())
        after = scrape(self.config.metrics_port)
        stats = {k: after.get(m, 0.0) - before.get(m, 0.0) for k, m in ENGINE_STATS.items()}
        return wall, [list(r.token_ids) for r in responses], stats

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()
        if self.server is not None:
            self.server.stop()
        if self.proc is not None:
            self.proc.stop()


# -- HF / PEFT -----------------------------------------------------------------------------------------
def left_pad(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    return ids.to(device), mask.to(device)


def load_hf(model_dir: Path, device: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa").to(device).eval()


def load_peft(model_dir: Path, adapter_root: Path, names: list[str], device: str):
    model = PeftModel.from_pretrained(load_hf(model_dir, device), adapter_root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_root / name, adapter_name=name)
    return model.to(device).eval()


def hf_round(model, ids, mask, max_new: int, device: str, adapter_names: list[str] | None):
    kwargs = dict(adapter_names=adapter_names) if adapter_names is not None else {}
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=PAD_ID, **kwargs)
    sync(device)
    wall = time.perf_counter() - start
    return wall, out[:, ids.shape[1]:].tolist(), {}


# -- direct decode-step timing (diagnosis) ---------------------------------------------------------------
def breakdown(model_dir: Path, adapter_root: Path, names: list[str], prompts, args) -> None:
    """Runner.decode_step on a full batch of 32, base rows vs 32 distinct adapters, with no gRPC, sampling
    or detokenization around it; then a torch.profiler op table for a few mixed decode steps. The adapter
    kernel and factor dtype are the ones the benchmarked server resolves from --adapter-kernel/--adapter-dtype."""
    from adapters.slot_bank import SlotBank
    from loader.base_model import load_base_model
    from loader.inject import inject
    from loader.peft_files import read_adapter
    from server.app import adapter_kernel
    from server.batch import Row, Runner

    base = load_base_model(str(model_dir), args.device, "float32")
    context, shapes = inject(base.model)
    config = ServerConfig(device=args.device, adapter_kernel=args.adapter_kernel, adapter_dtype=args.adapter_dtype)
    factors = torch.float32 if args.adapter_dtype == "auto" else getattr(torch, args.adapter_dtype)
    bank = SlotBank(shapes, args.adapters, args.rank, torch.device(args.device), factors,
                    kernel=adapter_kernel(config), compute_dtype=torch.float32)
    runner = Runner(base.model, context, bank, base.pad_token_id, base.max_context)
    by_name = {s.name: s for s in shapes}
    slots = [bank.acquire(read_adapter(adapter_root / n, n, by_name, args.rank, i + 1)) for i, n in enumerate(names)]
    steps = args.max_new_tokens

    def run(slot_list):
        rows = [Row(p, s) for p, s in zip(prompts, slot_list)]
        batch, logits = runner.prefill(rows)
        times = []
        for step in range(steps):
            for row, t in zip(batch.rows, logits.argmax(-1).tolist()):
                row.last_token = t
            sync(args.device)
            t0 = time.perf_counter()
            logits = runner.decode_step(batch)
            logits.argmax(-1).tolist()
            times.append(time.perf_counter() - t0)
        return times

    mixed = [slots[i % len(slots)] for i in range(len(prompts))]
    base_rows = [0] * len(prompts)
    results = {"base": [], "mixed": [], "base, 2nd OpenMP root": [], "mixed, 2nd OpenMP root": []}
    for _ in range(3):
        results["base"] += run(base_rows)[4:]
        results["mixed"] += run(mixed)[4:]
    if not args.device.startswith("cuda"):
        # The server loads the model on an executor thread and decodes on the engine thread: two threads that
        # have run OpenMP regions. Reproduce that here with an idle thread that once ran a parallel matmul.
        release = threading.Event()

        def other_root():
            big = torch.randn(512, 512)
            for _ in range(3):
                big @ big
            release.wait()
        thread = threading.Thread(target=other_root, daemon=True)
        thread.start()
        time.sleep(0.2)
        for _ in range(3):
            results["base, 2nd OpenMP root"] += run(base_rows)[4:]
            results["mixed, 2nd OpenMP root"] += run(mixed)[4:]
        release.set()
        thread.join()
    med = {k: statistics.median(v) * 1e3 for k, v in results.items() if v}
    print(f"\nRunner.decode_step, batch {len(prompts)}, context ~{args.prompt_max}-{args.prompt_max + steps} "
          f"(median of {len(results['base'])} steps, argmax included, no gRPC/sampling/detokenization):")
    for key, ms in med.items():
        print(f"  {key:26s} {ms:7.2f} ms/step  ({len(prompts) / ms * 1e3:7.1f} tok/s)")
    print(f"  step-time ratio base/mixed: {med['base'] / med['mixed']:.3f}", end="")
    if "base, 2nd OpenMP root" in med:
        print(f"; with a 2nd OpenMP root: {med['base, 2nd OpenMP root'] / med['mixed, 2nd OpenMP root']:.3f}")
    else:
        print()

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for label, slot_list in (("base", base_rows), ("mixed", mixed)):
        with profile(activities=activities) as prof:
            run(slot_list)
        sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(f"\ntorch.profiler, prefill + {steps} decode steps, {label}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))


# -- report -------------------------------------------------------------------------------------------------
def machine(args) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (f"{cpu}, {cores} cores usable, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")
    if args.device.startswith("cuda"):
        text += f"; device {torch.cuda.get_device_name(torch.device(args.device))}"
    return text


def code_version() -> str:
    """The commit measured, with '+dirty' when engine code differs from it (the numbers are for the tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "adapters", "loader", "server"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes in adapters/loader/server" if dirty else "")


def agreement(x: list[list[int]], y: list[list[int]]) -> str:
    same_rows = sum(a == b for a, b in zip(x, y))
    prefix = [next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), len(a)) for a, b in zip(x, y)]
    return f"{same_rows}/{len(x)} rows identical, median common prefix {statistics.median(prefix):.0f} tokens"


def report(args, command: str, configs: dict, results: dict, outputs: dict) -> str:
    median = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    server = (f"`python -m {args.server_module}` child process" if args.server == "process"
              else "in-process BackgroundServer")
    if args.server_env:
        server += " with " + " ".join(args.server_env)
    lines = [
        f"mixed_adapters: {args.requests} requests x {args.max_new_tokens} new tokens, prompts {args.prompt_min}-"
        f"{args.prompt_max} tokens; Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
        f"layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, fp32, {args.device}; LoRA r={args.rank} "
        f"alpha={2 * args.rank} on {','.join(TARGETS)}; engine: {server}; median of {args.repeats} interleaved runs"
        + (f"; engine requests sampled: temperature {args.temperature}, top_p {args.top_p}, seed i"
           if args.temperature else ""),
        f"date: {datetime.date.today().isoformat()}",
        f"command: {command}",
        f"machine: {machine(args)}",
        f"code: {args.code}",
        "",
        "| config | tokens/s (median) | runs (tok/s) |",
        "|---|---:|---|",
    ]
    for key, (label, _) in configs.items():
        runs = ", ".join(f"{r[0]:.1f}" for r in results[key])
        lines.append(f"| ({key}) {label} | {median[key]:.1f} | {runs} |")
    lines.append("")
    ba = median["b"] / median["a"]
    lines.append(f"b/a = {ba:.3f} (target >= 0.80: {'met' if ba >= 0.80 else 'NOT met'})")
    if "c" in median:
        bc = median["b"] / median["c"]
        lines.append(f"b/c = {bc:.2f} (target >= 3.0: {'met' if bc >= 3.0 else 'NOT met'})")
        lines.append(f"a/d = {median['a'] / median['d']:.3f} (engine vs HF generate, base model)")
    for key in ("a", "b"):
        s = {k: statistics.median(r[1][k] for r in results[key]) for k in ENGINE_STATS}
        lines.append(f"engine ({key}), server metrics: {s['prefills']:.0f} prefill passes ({s['prefill_s']:.2f}s), "
                     f"{s['decode_steps']:.0f} decode steps ({s['decode_s']:.2f}s, "
                     f"{s['decode_s'] / max(s['decode_steps'], 1) * 1e3:.1f} ms/step incl. sampling)")
    if "c" in outputs:
        lines.append(f"greedy tokens (b) vs (c): {agreement(outputs['b'], outputs['c'])}")
        lines.append(f"greedy tokens (a) vs (d): {agreement(outputs['a'], outputs['d'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.code = code_version()  # read at the start: the tree may change while the benchmark runs
    torch.set_num_threads(args.threads)
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else sys.executable
    command = "cd " + shlex.quote(os.getcwd()) + " && " + " ".join(shlex.quote(a) for a in [python, *sys.argv])
    names = [f"lora{i:02d}" for i in range(args.adapters)]
    adapter_ids = [names[i % len(names)] for i in range(args.requests)]
    prompts = make_prompts(args)
    new = args.max_new_tokens

    with tempfile.TemporaryDirectory(prefix="loraplex-bench-", dir=args.workdir) as tmp:
        model_dir, adapter_root = Path(tmp) / "model", Path(tmp) / "adapters"
        t0 = time.perf_counter()
        build_model_dir(model_dir, args)
        build_adapters(model_dir, adapter_root, names, args)
        print(f"built model + {len(names)} adapters in {time.perf_counter() - t0:.1f}s under {tmp}", flush=True)

        engine = EngineBench(model_dir, adapter_root, names, args)
        configs = {
            "a": ("engine, base model", lambda: engine.round(prompts, [""] * len(prompts), new)),
            "b": (f"engine, {len(set(adapter_ids))} distinct adapters",
                  lambda: engine.round(prompts, adapter_ids, new)),
        }
        if not args.skip_peft:
            peft_model = load_peft(model_dir, adapter_root, names, args.device)
            plain = load_hf(model_dir, args.device)
            ids, mask = left_pad(prompts, args.device)
            configs["c"] = (f"HF PEFT generate, {len(set(adapter_ids))} adapters (adapter_names)",
                            lambda: hf_round(peft_model, ids, mask, new, args.device, adapter_ids))
            configs["d"] = ("HF generate, base model (reference)",
                            lambda: hf_round(plain, ids, mask, new, args.device, None))
        torch.set_num_threads(args.threads)  # the server set it too; make sure HF runs under the same count

        results: dict[str, list[tuple[float, dict]]] = {k: [] for k in configs}
        outputs: dict[str, list[list[int]]] = {}
        try:
            for rnd in range(args.repeats + 1):  # round 0 is the untimed warm-up
                for key, (label, fn) in configs.items():
                    wall, tokens, stats = fn()
                    generated = sum(len(t) for t in tokens)
                    if generated != len(prompts) * new:
                        raise RuntimeError(f"({key}) generated {generated} tokens, expected {len(prompts) * new}")
                    tag = "warm-up" if rnd == 0 else f"round {rnd}"
                    print(f"  {tag:8s} ({key}) {label:48s} {wall:7.2f}s  {generated / wall:8.1f} tok/s", flush=True)
                    if rnd > 0:
                        results[key].append((generated / wall, stats))
                    outputs[key] = tokens
        finally:
            engine.close()
        if not args.skip_peft:
            del peft_model, plain  # free memory before the breakdown; the table only needs labels

        print("\n" + report(args, command, configs, results, outputs), flush=True)

        if args.breakdown:
            breakdown(model_dir, adapter_root, names, prompts, args)

    return 0


if __name__ == "__main__":
    sys.exit(main())
