"""A training job as asked for: its settings (flags or a --jobs line), their checks before anything is loaded,
where it writes (--out, --overwrite, --resume), and what makes two runs the same job."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapters import targets
from adapters.reslora import MERGE_METHODS
from adapters.training import TrainSettings
from loader.heads import MIN_AUTO_HEADS
from loader.base_model import DTYPES, device_problem
from loader.peft_files import CONFIG_FILE

METHODS = ("lora", "adalora", "hydralora", "reslora")
# PEFT's LoRA defaults for the decoder-only architectures where they are not q_proj and v_proj (fused attention
# projections mostly; PEFT is not a runtime dependency, so its table is not imported)
_FUSED_QKV = {"gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "codegen": ["qkv_proj"], "gpt_neox": ["query_key_value"],
              "falcon": ["query_key_value"], "bloom": ["query_key_value"], "mpt": ["Wqkv"],
              "phi": ["q_proj", "v_proj", "fc1", "fc2"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
              None: ["q_proj", "v_proj"]}
DEFAULT_TARGETS = {  # PEFT's per-architecture defaults (where PEFT has one); HydraLoRA's reference adapts the FFN
    "lora": _FUSED_QKV,
    "adalora": {**_FUSED_QKV, "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    "reslora": _FUSED_QKV,
    "hydralora": {"gpt2": ["c_fc", "mlp.c_proj"], "opt": ["fc1", "fc2"], "phi": ["fc1", "fc2"],
                  "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"], "falcon": ["dense_h_to_4h", "dense_4h_to_h"],
                  "phi3": ["gate_up_proj", "down_proj"], None: ["gate_proj", "up_proj", "down_proj"]},
}
CHECKPOINT = "checkpoint.pt"
LOG = "training_log.json"  # written last: its presence marks a finished job
class JobError(ValueError):
    """A problem with the job's inputs, reported to the user as is."""


@dataclass(frozen=True)
class TrainJob:
    method: str
    data: str
    out: str
    model: str = "default"
    eval: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    rslora: bool = False
    max_length: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    overwrite: bool = False
    resume: bool = False
    heads: int | str = 4                 # HydraLoRA: K, or "auto" (k-means over the prompts)
    router_bias: bool = False
    init_r: int = 12                     # AdaLoRA
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    orth_reg_weight: float = 0.5
    structure: str = "bs"                # ResLoRA
    pre_num: int = 1
    settings: TrainSettings = field(default_factory=TrainSettings)


METHOD_FLAGS = {"hydralora": ("heads", "router_bias"), "reslora": ("structure", "pre_num"),
                "adalora": ("init_r", "target_r", "tinit", "tfinal", "delta_t", "orth_reg_weight")}


def inapplicable(method: str, names) -> str | None:
    """Why one of the settings `names` (set by the user) does nothing for `method`, or None: a flag that is
    silently ignored trains something other than what was asked for."""
    for owner, flags in METHOD_FLAGS.items():
        for name in flags:
            if name in names and method != owner:
                return f"--{name.replace('_', '-')} applies to --method {owner} only, not {method}"
    if "rslora" in names and method in ("adalora", "reslora"):
        return f"--rslora applies to lora and hydralora; {method} scales by alpha/r"
    if "rank" in names and method == "adalora":
        return "--rank does nothing for adalora: its ranks are --init-r (start) and --target-r (average kept)"
    return None


def slot_needs(job: TrainJob) -> tuple[int, int] | None:
    """(slot width, heads) the server will need for this job's adapter, where the flags alone decide it: LoRA's
    rank, HydraLoRA's heads x rank, merged ResLoRA's rank (bs stacks a block's factors with its --pre-num
    predecessors': (pre_num + 1) x rank on any model of two layers or more; is and ms keep the rank); with --heads
    auto, the least it may choose (a slot it surely needs; more heads are checked when the server loads them). None
    where training decides (AdaLoRA's kept ranks)."""
    if job.method == "lora" or (job.method == "reslora" and job.structure != "bs"):
        return job.rank, 1
    if job.method == "reslora":
        return (job.pre_num + 1) * job.rank, 1
    if job.method == "hydralora":
        heads = MIN_AUTO_HEADS if job.heads == "auto" else int(job.heads)
        return heads * job.rank, heads
    return None


def parse_targets(value, name: str = "--target-modules") -> list[str] | str | None:
    """--target-modules and a --jobs line's "target_modules", read alike (adapters.targets.parse_targets, which
    `loraplex serve` reads its flag with too): None (the method's default), all-linear, or module names."""
    try:
        return targets.parse_targets(value, name)
    except ValueError as exc:
        raise JobError(str(exc)) from None


def check_job(job: TrainJob) -> None:
    """Every number in range before anything is loaded (from flags or a --jobs line alike): a zero batch size or
    eval interval would otherwise fail as a ZeroDivisionError, after the model loaded or a first step ran."""
    s = job.settings
    positive_int = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    count = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer")
    # a --jobs line's JSON true/false is a Python bool, an int: never a number here ("lr": true trained at 1.0)
    real = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    positive = (lambda v: real(v) and math.isfinite(v) and v > 0, "a positive number")
    fraction = (lambda v: real(v) and 0 <= v < 1, "in [0, 1)")
    non_negative = (lambda v: real(v) and math.isfinite(v) and v >= 0, "a non-negative number")
    seed = (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 64,  # torch's generators
            "an integer from 0 to 2^64-1")
    checks = [("seed", s.seed, seed), ("rank", job.rank, positive_int), ("alpha", job.alpha, positive),
              ("dropout", job.dropout, fraction),
              ("max_length", job.max_length, positive_int), ("init_r", job.init_r, positive_int),
              ("target_r", job.target_r, positive_int), ("tinit", job.tinit, count), ("tfinal", job.tfinal, count),
              ("delta_t", job.delta_t, positive_int), ("orth_reg_weight", job.orth_reg_weight, non_negative),
              ("pre_num", job.pre_num, count), ("lr", s.lr, positive), ("epochs", s.epochs, positive_int),
              ("batch_size", s.batch_size, positive_int), ("grad_accum", s.grad_accum, positive_int),
              ("eval_every", s.eval_every, positive_int), ("weight_decay", s.weight_decay, non_negative),
              ("warmup_ratio", s.warmup_ratio, fraction), ("max_grad_norm", s.max_grad_norm, positive)]
    text = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
    flag = (lambda v: isinstance(v, bool), "true or false")
    checks += [("data", job.data, text), ("out", job.out, text), ("model", job.model, text),
               ("device", job.device, text), ("rslora", job.rslora, flag), ("router_bias", job.router_bias, flag),
               ("dtype", job.dtype, (lambda v: v in DTYPES, f"one of {list(DTYPES)}")),
               ("structure", job.structure, (lambda v: v in MERGE_METHODS, f"one of {sorted(MERGE_METHODS)}"))]
    if job.eval is not None:
        checks.append(("eval", job.eval, text))
    if s.max_steps is not None:
        checks.append(("max_steps", s.max_steps, positive_int))
    if job.heads != "auto":
        checks.append(("heads", job.heads, positive_int))
    for name, value, (ok, what) in checks:
        if not ok(value):
            raise JobError(f"--{name.replace('_', '-')} must be {what}, got {value!r}"
                           + (" (or auto)" if name == "heads" else ""))
    parse_targets(job.target_modules)
    problem = device_problem(job.device)
    if problem:
        raise JobError(problem)


def check_out(job: TrainJob) -> None:
    """--out can be written, and holds nothing this job would silently replace: an adapter (--overwrite) or an
    interrupted run's checkpoint (--resume continues it; --overwrite starts over)."""
    out = Path(job.out)
    # the adapter is written before training_log.json: with a checkpoint and no log, the run was interrupted between
    # them (its last checkpoint is the final step, so --resume only writes the adapter and the log again)
    unfinished = (out / CHECKPOINT).exists() and not (out / LOG).exists()
    if (out / CONFIG_FILE).exists() and unfinished and not (job.resume or job.overwrite):
        raise JobError(f"{out} holds the adapter of a run interrupted before it wrote {LOG}; pass --resume to "
                       f"finish it, or --overwrite to start over")
    if (out / CONFIG_FILE).exists() and not unfinished and not job.overwrite:
        raise JobError(f"{out} already holds an adapter; pass --overwrite to replace it")
    if job.resume and not (out / CONFIG_FILE).exists() and not (out / CHECKPOINT).exists():
        raise JobError(f"--resume: {out / CHECKPOINT} does not exist")
    if (out / CHECKPOINT).exists() and not (out / CONFIG_FILE).exists() and not (job.resume or job.overwrite):
        raise JobError(f"{out} holds the checkpoint of an interrupted run; pass --resume to continue it, or "
                       f"--overwrite to start over")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise JobError(f"--out {out}: not writable by this user")


def _flat(identity: dict) -> dict:
    """A job's identity with its training settings as keys of their own (a refused resume names the one changed)."""
    return {**{k: v for k, v in identity.items() if k != "settings"}, **(identity.get("settings") or {})}


def job_identity(job: TrainJob) -> dict:
    """What makes two runs the same job, as JSON: everything but where it writes and how it starts; the data's
    contents, not only their paths (a file grown since would be read in another order, over another number of
    steps); the device's kind, not its index (torchrun gives each rank's jobs that rank's GPU)."""
    identity = {k: v for k, v in asdict(job).items() if k not in ("overwrite", "resume", "out")}
    identity["device"] = job.device.split(":")[0]
    identity.update(data_sha256=_sha256(job.data), eval_sha256=_sha256(job.eval))
    return json.loads(json.dumps(identity, default=str))


FINGERPRINTS = ("data_sha256", "eval_sha256")  # absent from what earlier versions recorded: not compared there


def _sha256(path: str | None) -> str | None:
    """The file's SHA-256, or None where there is none to read (the run says why when it reads it)."""
    if not isinstance(path, str):
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def changes(then: dict, now: dict) -> list[str]:
    """'key: old then, new now' for each setting two identities differ in."""
    then, now = _flat(then), _flat(now)
    if isinstance(then.get("device"), str):  # recorded with its index before the kind alone was
        then["device"] = then["device"].split(":")[0]
    keys = {*now, *then} - {k for k in FINGERPRINTS if k not in then}
    return [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(keys) if now.get(k) != then.get(k)]
