"""Read adapter directories in the PEFT layout into the canonical form, refusing what we cannot serve exactly."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO, Callable
from pathlib import Path

import torch
from safetensors.torch import save

from adapters.canonical import CanonicalAdapter, pattern_regex
from adapters.slot_bank import ModuleShape
from adapters.targets import SlowPattern, matches, read_otherwise
from loader import json_input
from loader.key_layout import KeyLayout
from loader.tensor_bytes import TensorFileError, read_tensors_from
from server.errors import FailedPrecondition

log = logging.getLogger("loraplex.adapters")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 4 << 20  # ResLoRA's per-module statistics for an 80-layer model take ~100 KB
KEY_PREFIX = "base_model.model."
MIN_TENSOR_BOUND = 4096  # tensors a weights file's header may list whatever the model (~600 KB of header)
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose on-disk layout we write and test against


def write_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """The PEFT directory layout: fp32 contiguous safetensors (metadata format=pt) + sorted, indented JSON. Each
    file is written beside its final name and renamed over it: a server reading the directory meanwhile never
    sees a truncated file (swapping both files at once is what `--deploy-root`'s versioned directories are for)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / (WEIGHTS_FILE + ".tmp")
    # Written with open(), so the file's mode follows the umask like the config's: safetensors' save_file
    # creates 0600, which a server running as another user (a container's) could not read.
    weights.write_bytes(save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                             metadata={"format": "pt"}))
    os.replace(weights, out / WEIGHTS_FILE)
    write_config(out, config)


def write_config(out: Path, config: dict) -> None:
    """adapter_config.json as sorted, indented JSON, renamed over the old one."""
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, out / CONFIG_FILE)


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def read_file(path: Path, name: str, adapter_id: str, limit: int | None, limit_why: str,
              read: Callable[[BinaryIO, int], object] = lambda f, size: f.read(size)):
    """What `read(file, size)` makes of the adapter file `path/name` (default: its bytes), or None where there is
    none. One open that follows no symlink at `name`; type and size are checked on the descriptor the bytes come
    from, and `read` takes no more than `size` bytes, so a file swapped or grown between check and read cannot slip
    past the limit. Only the directory may
    be a link (deploys flip it; the registry confines it to the root). A linked file is refused even where it points
    inside the root: checking its target would be a resolve-then-open that whoever owns the link can race.
    Read, not memory-mapped: a mapped file truncated meanwhile would take the process down with SIGBUS."""
    def refuse(why: str) -> FailedPrecondition:
        return FailedPrecondition(f"adapter {adapter_id!r}: {why}")
    try:  # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; it is refused below, never read
        fd = os.open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse(f"{name} is a symbolic link; adapter files must be regular files in the adapter's "
                         f"directory (copy the files in, or link the whole directory, as --deploy-root does)") from None
        raise refuse(f"cannot read {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"{name} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise refuse(f"{name} is {st.st_size} bytes, above {limit_why}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return read(f, st.st_size)
    except OSError as exc:
        raise refuse(f"cannot read {name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_config(path: Path, adapter_id: str) -> dict:
    text = read_file(path, CONFIG_FILE, adapter_id, MAX_CONFIG_BYTES,
                     f"{MAX_CONFIG_BYTES}: it holds settings, not weights")
    if text is None:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG_FILE} is missing")
    try:
        config = json_input.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG_FILE} must be an object with a 'peft_type'")
    return config


def read_tensors(path: Path, adapter_id: str, max_bytes: int | None = None,
                 max_tensors: int | None = None) -> dict[str, torch.Tensor]:
    try:  # each tensor read into a buffer of its own: the file is held once (safetensors.torch.load held it twice)
        tensors = read_file(path, WEIGHTS_FILE, adapter_id, max_bytes, f"the server's --max-adapter-bytes {max_bytes}",
                            lambda f, size: read_tensors_from(f, size, max_tensors))
    except TensorFileError as exc:
        raise FailedPrecondition(f"adapter {adapter_id!r}: cannot read {WEIGHTS_FILE}: {exc}") from None
    if tensors is None:
        if (path / PICKLE_FILE).exists():
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: pickle weights ({PICKLE_FILE}) are refused because loading them can run "
                f"code; convert to safetensors, e.g. PeftModel.from_pretrained(...).save_pretrained(dir) or "
                f"safetensors.torch.save_file(torch.load(f, weights_only=True), '{WEIGHTS_FILE}', {{'format': 'pt'}})")
        raise FailedPrecondition(f"adapter {adapter_id!r}: {WEIGHTS_FILE} is missing")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: tensor {key} has dtype {t.dtype}, expected floating point")
        # fp8 factors are served exactly (every reader widens to fp32), but torch has no isfinite for
        # float8_e4m3fn: widen those one-byte tensors to check them (exact too)
        if not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
            raise FailedPrecondition(f"adapter {adapter_id!r}: tensor {key} contains NaN or Inf")
    return tensors


def read_adapter_tensors(path: Path, adapter_id: str, shapes: dict[str, ModuleShape],
                         ctx: "LoadContext") -> dict[str, torch.Tensor]:
    """An adapter's weights file, holding at most the tensors of every module the server adapts (a HydraLoRA
    module's are the most: A, its heads' Bs, the router and its bias), or 4096: a bound on the header's memory,
    well above what the readers refuse by name (a tensor of a module the server does not adapt). Keys are taken in
    the model's current layout (ctx.layout: as PEFT renames an older one), and tensors of modules a text forward
    never runs (a multimodal checkpoint's vision tower, which PEFT's all-linear adapts) are left out: serving
    without them is exact."""
    tensors = read_tensors(path, adapter_id, ctx.max_bytes, max(MIN_TENSOR_BOUND, len(shapes) * (3 + ctx.max_heads)))
    layout, renamed = ctx.layout, {}
    rename = layout.renamer()
    for key, t in tensors.items():
        new = KEY_PREFIX + rename(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else key
        if new in renamed:
            raise FailedPrecondition(f"adapter {adapter_id!r}: tensors {renamed[new][0]} and {key} are both {new} in "
                                     f"this model's layout")
        renamed[new] = (key, t)
    unused = {key for key in renamed if key.startswith(KEY_PREFIX) and layout.never_runs(key[len(KEY_PREFIX):])}
    if unused and len(unused) == len(renamed):  # served, it would be the base model under the adapter's name
        raise FailedPrecondition(f"adapter {adapter_id!r}: every tensor adapts a module a text forward never runs "
                                 f"({', '.join(layout.skipped)}; e.g. {min(unused)}): it would change no output")
    if unused:
        log.info("adapter %r: %d of its tensors (%s, ...) adapt modules a text forward never runs (%s): left out",
                 adapter_id, len(unused), min(unused), ", ".join(layout.skipped))
    return {key: t for key, (_, t) in renamed.items() if key not in unused}


def _targets(config: dict, module: str) -> bool:
    return matches(config.get("target_modules"), module) and \
        not matches(config.get("exclude_modules"), module, "exclude_modules")


# PEFT's LoraConfig/AdaLoraConfig keys that the readers serve exactly, or that only shape training or the
# initialisation (their values do not change what a saved adapter computes). PEFT keeps adding LoRA variants as
# config keys (aLoRA's alora_invocation_tokens, BD-LoRA, Arrow, ...), each with its own forward: serving one as
# plain LoRA would be silently wrong, so any other key set to a value is refused by name.
PEFT_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "runtime_config", "use_dora", "trainable_token_indices", "target_parameters", "lora_bias", "layer_replication",
    "ensure_weight_tying", "qalora_group_size",
    "corda_config", "lora_ga_config",  # kept by PEFT's weight conversion; unconverted: BASE_REWRITING_INITS
    "use_qalora",  # only changes GPTQ-quantized layers, which a base model here never has
    # AdaLoRA's rank allocation schedule (training only)
    "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
})
# Our own kinds: the keys their README formats define, plus PEFT's keys that never change what the saved factors
# compute (or that refuse_unservable checks by name). Everything else a PEFT-like config may carry (alpha_pattern,
# rank_pattern, aLoRA's invocation tokens, fan_in_fan_out, ...) these readers would ignore: refused when set.
NEUTRAL_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "target_modules", "exclude_modules", "r", "lora_alpha",
    "use_dora", "modules_to_save", "trainable_token_indices", "target_parameters", "bias", "lora_bias",
    "layers_to_transform", "layers_pattern", "layer_replication"})
KIND_KEYS = {"LORA": PEFT_KEYS, "ADALORA": PEFT_KEYS,
             "HYDRALORA": NEUTRAL_KEYS | {"lora_nums", "use_rslora", "router_bias"},
             # no use_rslora: the merge scales by lora_alpha / r, as the trainer trains (it refuses --rslora)
             "RESLORA": NEUTRAL_KEYS | {"structure", "pre_num", "chains", "merge_method", "statistics",
                                        "stats_window", "merge_error"}}
# Initialisations that rewrite the base model's weights in ways a load cannot redo (CorDA and LoRA-GA from training
# data, LoftQ by quantizing): the adapter is a correction to that base, exact on the base model saved with it, or on
# the original weights once PEFT converted it at save time (which resets the value to true). Which base --model is
# cannot be told from the files, so such an adapter is served, and the log says what it needs. (PiSSA and OLoRA
# residuals are rebuilt from the weights, as PEFT's load does: lora_files.residual_term.)
BASE_REWRITING_INITS = ("corda", "lora_ga", "loftq")


def refuse_unservable(config: dict, adapter_id: str) -> None:
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        log.warning("adapter %r: init_lora_weights is %r, which rewrote the base model's weights while training: it "
                    "is exact only on the base model saved with it, or once converted by PEFT's save_pretrained(..., "
                    "path_initial_model_for_weight_conversion=...)", adapter_id, init)
    checks = [
        (config.get("use_dora"), "use_dora is true (DoRA is not served)"),
        (config.get("modules_to_save"), "modules_to_save is set (full module copies cannot share a batch)"),
        (config.get("trainable_token_indices"), "trainable_token_indices is set"),
        (config.get("target_parameters"), "target_parameters is set (LoRA on parameters, such as a mixture-of-experts "
                                          "model's fused experts, which PEFT adds for target_modules='all-linear' on "
                                          "such models; train with target_modules naming nn.Linear modules, e.g. "
                                          "the attention projections)"),
        (config.get("bias", "none") != "none", f"bias is {config.get('bias')!r}; only 'none' is served"),
        (config.get("lora_bias"), "lora_bias is true"),
        # PEFT reads an empty list as every layer
        (config.get("layers_to_transform") not in (None, []), "layers_to_transform is set; list modules in "
                                                               "target_modules"),
        (config.get("layer_replication"), "layer_replication is set"),
    ]
    kind = config.get("peft_type")
    if kind in ("LORA", "ADALORA"):  # PEFT's save always writes the modules it adapted
        checks.append((config.get("target_modules") is None,
                       "adapter_config.json has no target_modules: PEFT would adapt its default modules for the model "
                       "type, which the server does not guess; set target_modules to the modules the adapter was "
                       "trained on"))
    if kind == "RESLORA":
        checks.append((config.get("use_rslora"), "use_rslora is true, but a RESLORA adapter is trained and merged "
                                                 "with the scaling lora_alpha / r; set it to false or remove it"))
    what = "a PEFT feature the server does not serve" if kind in ("LORA", "ADALORA") else \
        f"which {kind} adapters do not define (the README lists their keys): it would be ignored"
    # null, false, 0 and empty have been the "off" value of every PEFT option so far
    checks += [(value not in (None, False, "", [], {}), f"adapter_config.json sets {key} = {value!r}, {what}")
               for key, value in config.items() if key not in KIND_KEYS[kind]]  # (read_adapter checked peft_type)
    for bad, why in checks:
        if bad:
            raise FailedPrecondition(f"adapter {adapter_id!r}: {why}")


def group_tensors(tensors: dict[str, torch.Tensor], key: re.Pattern, adapter_id: str, kind: str,
                  shapes: dict[str, ModuleShape]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {part: tensor}} from keys matching `key` (groups `module` and `part`); any other key is refused."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = key.match(name)
        if m is None:
            raise FailedPrecondition(f"adapter {adapter_id!r}: unsupported tensor {name} in a {kind} adapter")
        module = m["module"]
        if module not in shapes:
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: tensor {name} targets module {module!r}, which this server does not adapt: "
                f"it is not a linear layer of this base model that --target-modules allows (the output head and the "
                f"embeddings are never adapted)")
        parts.setdefault(module, {})[m["part"]] = t
    return parts


def require_parts(parts: dict[str, dict[str, torch.Tensor]], config: dict, shapes: dict[str, ModuleShape],
                  adapter_id: str, key_names: dict[str, str]) -> None:
    """Every targeted module has every part: a missing tensor is an error, never a silent zero.
    key_names maps part -> key suffix (e.g. {'A': 'lora_A.weight'})."""
    for module in shapes:
        if _targets(config, module) and module not in parts:
            first = next(iter(key_names.values()))
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: target module {module!r} has no weights (missing key "
                f"{KEY_PREFIX}{module}.{first})")
    for module, have in parts.items():
        if config.get("target_modules") is not None and not _targets(config, module):  # PEFT would leave it out
            key = f"{KEY_PREFIX}{module}.{key_names.get(next(iter(have)), '')}"
            raise FailedPrecondition(
                f"adapter {adapter_id!r}: tensor {key} is for module {module!r}, which the config's target_modules "
                f"{config['target_modules']!r} (minus exclude_modules) does not select")
        for part, suffix in key_names.items():
            if part not in have:
                raise FailedPrecondition(f"adapter {adapter_id!r}: missing key {KEY_PREFIX}{module}.{suffix}")
    if not parts:
        raise FailedPrecondition(f"adapter {adapter_id!r}: {WEIGHTS_FILE} holds no adapter tensors")


def check_shape(adapter_id: str, key: str, got: torch.Size, want: tuple[int, ...], why: str) -> None:
    if tuple(got) != want:
        raise FailedPrecondition(
            f"adapter {adapter_id!r}: {KEY_PREFIX}{key} has shape {tuple(got)}, expected {want} ({why})")


def check_rank(adapter_id: str, module: str, rank: int, ctx: "LoadContext", what: str = "rank") -> None:
    if rank > ctx.max_rank:
        raise FailedPrecondition(f"adapter {adapter_id!r}: module {module!r} has {what} {rank}, above the server's "
                                 f"--max-lora-rank {ctx.max_rank}")


COUNTS = ("r", "init_r", "target_r", "lora_nums", "pre_num")  # integers where present (pre_num may be 0)
LIMIT = 2 ** 31  # counts travel in uint32 fields of AdapterInfo


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value < LIMIT


def check_config_values(config: dict, adapter_id: str) -> None:
    """Numbers where the readers read numbers. JSON parsing accepts NaN and Infinity, and a string or a list
    where a number belongs would otherwise surface as an INTERNAL error or as NaN weights at serving time."""
    def refuse(key: str, value, what: str):
        raise FailedPrecondition(f"adapter {adapter_id!r}: config {key} must be {what}, got {value!r}")
    for key in COUNTS:
        value = config.get(key)
        if key in config and not _count(value, 0 if key == "pre_num" else 1):
            refuse(key, value, "a non-negative integer" if key == "pre_num" else "a positive integer")
    if "lora_alpha" in config and not _number(config["lora_alpha"]):
        refuse("lora_alpha", config["lora_alpha"], "a finite number")
    for key in ("use_rslora", "router_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            refuse(key, config[key], "true or false")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, str):
            try:
                otherwise = read_otherwise(value)
            except re.error as exc:
                refuse(key, value, f"a valid regular expression ({exc})")
            if otherwise:
                refuse(key, value, f"a regular expression Python's re (PEFT) reads as this server does: {otherwise}")
        elif value is not None and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            refuse(key, value, "a list of module names or a regular expression")
    for key in ("rank_pattern", "alpha_pattern", "merge_error"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            refuse(key, config[key], "an object")
    for module, value in (config.get("alpha_pattern") or {}).items():
        if not _number(value):
            refuse(f"alpha_pattern[{module!r}]", value, "a finite number")
    adalora = config.get("peft_type") == "ADALORA"  # its rank_pattern holds masks; the others', ranks
    for key in () if adalora else ("rank_pattern", "alpha_pattern"):  # keys matched as regexes (AdaLoRA: neither)
        for module in config.get(key) or {}:
            try:
                otherwise = read_otherwise(pattern_regex(module).pattern)
            except re.error as exc:  # exc.msg: its position would count in PEFT's wrapper, not in the key
                raise FailedPrecondition(f"adapter {adapter_id!r}: config {key} key {module!r} is not a valid "
                                         f"regular expression ({exc.msg}); PEFT matches each key as a regex against "
                                         f"module paths (escape special characters)") from None
            if otherwise:
                raise FailedPrecondition(f"adapter {adapter_id!r}: config {key} key {module!r} is read otherwise by "
                                         f"Python's re (PEFT) than by this server: {otherwise}")
    for module, value in (config.get("rank_pattern") or {}).items():
        ok = (isinstance(value, list) and all(isinstance(m, bool) for m in value)) if adalora else _count(value, 1)
        if not ok:
            refuse(f"rank_pattern[{module!r}]", value, "a list of booleans" if adalora else "a positive integer")
    for method, value in (config.get("merge_error") or {}).items():
        if value is not None and not _number(value):
            refuse(f"merge_error[{method!r}]", value, "a finite number or null")


def check_finite_factors(adapter: CanonicalAdapter, dtype: torch.dtype = torch.float32) -> None:
    """After the config's scaling is folded in, and in `dtype`, the narrowest the factors are stored or computed
    in: a huge lora_alpha can overflow fp32 (or fp16's 65504, in an fp16 bank or on an fp16 model) even when every
    stored tensor is finite, and a non-finite factor would turn its rows' logits into NaN on every request. Routers
    are kept in fp32."""
    limit = torch.finfo(dtype).max
    for module, f in adapter.modules.items():
        for name, t, bound in (("lora_A", f.a, limit), ("lora_B x scaling", f.b, limit),
                               ("router", f.router, None), ("router bias", f.router_bias, None)):
            if t is None or t.numel() == 0:
                continue
            peak = float(t.abs().max())  # NaN when any element is: one pass answers both questions
            if not math.isfinite(peak):
                raise FailedPrecondition(f"adapter {adapter.adapter_id!r}: module {module!r}: {name} is not finite "
                                         f"once the config's scaling (lora_alpha / r) is applied; check lora_alpha")
            if bound is not None and peak > bound:
                raise FailedPrecondition(
                    f"adapter {adapter.adapter_id!r}: module {module!r}: {name} reaches {peak:.4g}, "
                    f"beyond {str(dtype).removeprefix('torch.')} (max {bound:.4g}) that this server stores or computes "
                    f"factors in; check lora_alpha, or serve with --adapter-dtype float32 (computed in float32)")


@dataclass(frozen=True)
class LoadContext:
    """What a kind's reader may know about the server: slot limits, and the frozen base weights
    ((d_out, d_in) fp32 copies by module path) for merges that need them."""

    max_rank: int       # widest expand (K·r for HydraLoRA) a slot holds
    max_heads: int = 8  # HydraLoRA heads a slot's router holds
    base_weight: Callable[[str], torch.Tensor] | None = None
    max_bytes: int | None = None  # the weights file's limit (--max-adapter-bytes), checked on the open file
    residuals: object | None = None  # a lora_files.ResidualCache the server keeps across reads
    layout: KeyLayout = KeyLayout()  # how tensor keys name the model's modules (loader.key_layout)


def read_adapter(path: Path, adapter_id: str, shapes: dict[str, ModuleShape], max_rank: int,
                 load_serial: int, max_heads: int = 8,
                 base_weight: Callable[[str], torch.Tensor] | None = None,
                 config: dict | None = None, max_bytes: int | None = None,
                 factor_dtype: torch.dtype = torch.float32, residuals=None,
                 layout: KeyLayout = KeyLayout()) -> CanonicalAdapter:
    """Dispatch on peft_type to the kind's reader; each returns the canonical form. `config` replaces the
    directory's adapter_config.json (e.g. `loraplex merge` choosing another merge method); `max_bytes` bounds
    the weights file, checked before it is read; `factor_dtype` is what the slots store factors in (fp16 overflows
    beyond 65504); `layout` says how tensor keys name the model's modules (loader.key_layout)."""
    from loader import adalora_files, hydra_files, lora_files, reslora_files  # readers build on the helpers above
    readers = {"LORA": lora_files.read_lora, "ADALORA": adalora_files.read_adalora,
               "HYDRALORA": hydra_files.read_hydralora, "RESLORA": reslora_files.read_reslora}
    config = read_config(path, adapter_id) if config is None else config
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in readers:
        raise FailedPrecondition(f"adapter {adapter_id!r}: peft_type {peft_type!r} is not served "
                                 f"(supported: {', '.join(readers)})")
    refuse_unservable(config, adapter_id)
    check_config_values(config, adapter_id)
    context = LoadContext(max_rank, max_heads, base_weight, max_bytes, residuals, layout)
    try:
        adapter = readers[peft_type](path, adapter_id, config, shapes, context, load_serial)
    except SlowPattern as exc:
        raise FailedPrecondition(
            f"adapter {adapter_id!r}: config {exc.what} {exc.pattern!r} took over {exc.seconds} s of CPU to match "
            f"the module path {exc.name!r} (nested repetition backtracks without bound); PEFT matches it as a regex "
            f"against every module path: write it without nested repetition, or list the module names") from None
    check_finite_factors(adapter, factor_dtype)
    return adapter
