"""One training job end to end: read data, build the base model with the kind's trainable layers, train
(with checkpoints and --resume), and write the adapter in the format the server loads."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.training import Diverged, Hooks, Trainer, evaluate
from loader.base_model import DTYPES, model_context, pad_id
from loader.default_model import default_model_dir
from loader.inject import linear_module_names, unmatched_problem
from loader.train_data import collate, read_jsonl
from loader.train_job_spec import (CHECKPOINT, DEFAULT_TARGETS, LOG, METHODS, JobError, TrainJob, changes, check_job,
                                   check_out, job_identity, parse_targets)

def _load(job: TrainJob):
    path = default_model_dir() if job.model == "default" else Path(job.model)
    if not (path / "config.json").is_file():
        raise JobError(f"--model {job.model}: not a Hugging Face model directory (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[job.dtype])
    model.requires_grad_(False)
    return path, model.to(job.device), tokenizer


def padding_id(tokenizer, model) -> int:
    """What pads a batch's shorter examples (masked, and never a label): a valid id, as the server's is."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return pad_id(tokenizer, eos, model.config.get_text_config().vocab_size)


def _targets(job: TrainJob, model) -> list[str] | str:
    given = parse_targets(job.target_modules)
    targets = given or DEFAULT_TARGETS[job.method].get(model.config.model_type, DEFAULT_TARGETS[job.method][None])
    # each name must adapt something: one that matches nothing would silently train less
    problem = unmatched_problem(model, targets, "--target-modules" if given else
                                f"{job.method}'s default target modules")
    if problem and not given and model.config.model_type not in DEFAULT_TARGETS[job.method]:
        raise JobError(f"no default target modules for {job.method} on {model.config.model_type} models: give "
                       f"--target-modules (this model's linear modules are named {linear_module_names(model)})")
    if problem:
        raise JobError(problem)
    return targets


class _AdaLoraHooks(Hooks):
    def __init__(self, modules, allocator, orth_reg_weight: float) -> None:
        self.modules, self.allocator, self.weight = modules, allocator, orth_reg_weight

    def extra_loss(self):
        from adapters.adalora import orthogonal_regularizer
        return self.weight * orthogonal_regularizer(self.modules) if self.weight > 0 else None

    def after_optimizer_step(self, step: int) -> None:
        self.allocator.update_and_allocate(step)

    def state_dict(self) -> dict:
        return self.allocator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state)


def _best_merge(errors: dict[str, float], structure: str) -> str:
    """The merge the server will use: the one with the smallest error measured on the eval data (the structure's
    default when none was measured finite)."""
    from loader.reslora_files import DEFAULT_MERGE
    finite = {m: e for m, e in errors.items() if math.isfinite(e)}
    return min(finite, key=finite.get) if finite else DEFAULT_MERGE[structure]


class _ResLoraHooks(Hooks):
    """The merge statistics (windows of recent training forwards) go into checkpoints: a resumed job saves the
    statistics, and so the merged weights, of the uninterrupted run (a resume from the final checkpoint, with no
    forward left to run, would otherwise save none)."""

    def __init__(self, layers: dict) -> None:
        self.layers = layers

    def state_dict(self) -> dict:
        return {name: {"input_norms": list(map(float, layer.input_norms)),
                       "shrunk_norms": list(map(float, layer.shrunk_norms))} for name, layer in self.layers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, layer in self.layers.items():
            for key in ("input_norms", "shrunk_norms"):
                window = getattr(layer, key)
                window.clear()
                window.extend(state[name][key])


def _prepare(job: TrainJob, model, targets, total: int, train_prompts: list[str]):
    """The kind's trainable layers, loop hooks and writer (a function of the output directory)."""
    common = {"r": job.rank, "lora_alpha": job.alpha, "lora_dropout": job.dropout,
              "base_model_name_or_path": None if job.model == "default" else str(job.model)}
    if job.method == "lora":
        from adapters.lora import add_lora
        from loader.lora_files import save_lora
        layers = add_lora(model, targets, job.rank, job.alpha, job.dropout, job.rslora)
        return layers, Hooks(), lambda out: save_lora(layers, out, {**common, "use_rslora": job.rslora})
    if job.method == "hydralora":
        from adapters.hydralora import add_hydralora
        from loader.hydra_files import save_hydralora
        from loader.heads import choose_heads
        heads = choose_heads(train_prompts) if job.heads == "auto" else int(job.heads)
        if job.heads == "auto":
            print(f"--heads auto: {heads} heads (k-means over {len(train_prompts)} training prompts)", file=sys.stderr)
        layers = add_hydralora(model, targets, job.rank, job.alpha, heads, job.dropout, job.router_bias, job.rslora)
        return layers, Hooks(), lambda out: save_hydralora(
            layers, out, {**common, "lora_nums": heads, "use_rslora": job.rslora})
    if job.method == "reslora":
        from adapters.reslora import add_reslora, in_a_block
        from adapters.targets import linear_modules
        from loader.reslora_files import save_reslora
        depth = model.config.get_text_config().num_hidden_layers
        if job.pre_num > max(1, depth - 1):  # the default, 1, fits any model (on one layer ResLoRA is LoRA)
            raise JobError(f"--pre-num {job.pre_num}: this model has {depth} layers, so a block links back to at most "
                           f"{depth - 1} previous blocks")
        outside = sorted(name for name, _ in linear_modules(model, targets) if not in_a_block(name))
        if outside:  # a residual path links a block to the previous ones: a module must sit in a numbered block
            raise JobError(f"ResLoRA links each block's module to the same module of the previous blocks, but "
                           f"{', '.join(outside)} {'sits' if len(outside) == 1 else 'sit'} in no numbered block; "
                           f"name the block modules in "
                           f"--target-modules (this model's linear modules: {linear_module_names(model)})")
        layers = add_reslora(model, targets, job.rank, job.alpha, job.dropout, job.structure, job.pre_num)
        return layers, _ResLoraHooks(layers), lambda out, merge: save_reslora(layers, out, {**common, **merge})
    from adapters.adalora import RankAllocator, add_adalora
    from loader.adalora_files import save_adalora
    layers = add_adalora(model, targets, job.init_r, job.alpha, job.dropout)
    try:
        allocator = RankAllocator(layers, job.init_r, job.target_r, job.tinit, job.tfinal, job.delta_t,
                                  total_step=total)
    except ValueError as exc:  # the flags' values, told as a user error (--max-steps or --epochs set total_step)
        raise JobError(f"{exc} (--init-r, --target-r, --tinit, --tfinal, --delta-t; total_step is the run's "
                       f"optimizer steps, from --max-steps or --epochs)") from None
    config = {**common, "init_r": job.init_r, "target_r": job.target_r, "tinit": job.tinit, "tfinal": job.tfinal,
              "deltaT": job.delta_t, "orth_reg_weight": job.orth_reg_weight, "total_step": total}

    def write(out: Path) -> None:
        allocator.finalize()  # the saved ranks sum to target_r · n exactly, whatever tfinal was
        save_adalora(layers, allocator.rank_pattern, out, config)
    return layers, _AdaLoraHooks(layers, allocator, job.orth_reg_weight), write


def run_job(job: TrainJob, progress=None, inspect=None) -> dict:
    """Train one adapter; returns a summary (also written to <out>/training_log.json). `inspect(model, tokenizer)`
    sees the trained model in its training form (adapter layers in place, eval mode) before it is freed."""
    if job.method not in METHODS:
        raise JobError(f"--method must be one of {METHODS}, got {job.method!r}")
    check_job(job)
    out = Path(job.out)
    created = not out.exists()
    check_out(job)
    try:
        return _train(job, out, progress, inspect)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # failed before writing anything: leave nothing
            out.rmdir()
        raise


def _check_context(job: TrainJob, model) -> None:
    """Refused, not capped: past the context, learned positions (GPT-2) index out of their table, and rotary ones
    (Llama) train on positions the server never serves (it refuses prompt + max_new_tokens beyond the context)."""
    context, source = model_context(model.config)
    if job.max_length > context:
        raise JobError(f"--max-length {job.max_length} is longer than the context of --model {job.model}: "
                       f"{context} tokens ({source}); give --max-length {context} or less")


def _train(job: TrainJob, out: Path, progress, inspect) -> dict:
    path, model, tokenizer = _load(job)
    _check_context(job, model)
    vocab = model.config.get_text_config().vocab_size
    train = read_jsonl(Path(job.data), tokenizer, job.max_length, vocab)
    evaluation = read_jsonl(Path(job.eval), tokenizer, job.max_length, vocab) if job.eval else None
    targets = _targets(job, model)
    from adapters.training import total_steps
    total = total_steps(len(train), job.settings)
    prompts = [tokenizer.decode([t for t, label in zip(e.input_ids, e.labels) if label == -100] or e.input_ids)
               for e in train]
    torch.manual_seed(job.settings.seed)  # adapter initialisation is part of the seeded run
    layers, hooks, write = _prepare(job, model, targets, total, prompts)
    model.to(job.device)  # the new adapter layers were created on the CPU
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad = padding_id(tokenizer, model)
    trainer = Trainer(model, job.settings, pad, hooks)
    identity = job_identity(job)
    resume = None
    if job.resume and (out / CHECKPOINT).exists():
        resume = torch.load(out / CHECKPOINT, weights_only=True, map_location="cpu")  # written on any device
        changed = changes(resume.get("job") or {}, identity)
        if changed and not job.overwrite:
            raise JobError(f"--resume: {out / CHECKPOINT} was written by a different job configuration ("
                           + ", ".join(changed) + "); pass --overwrite to start this job over")
        if changed:
            print(f"--overwrite: {out / CHECKPOINT} is another configuration's ({', '.join(changed)}): this job "
                  f"starts over", file=sys.stderr)
            resume = None

    def checkpoint(state: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        state["job"] = identity
        torch.save(state, out / (CHECKPOINT + ".tmp"))
        os.replace(out / (CHECKPOINT + ".tmp"), out / CHECKPOINT)  # atomic: a crash never leaves half a file

    try:
        result = trainer.run(train, evaluation, checkpoint, resume, progress)
    except Diverged as exc:  # a resume of its checkpoint would replay it: kept aside, out of a rerun's way
        kept = ""
        if (out / CHECKPOINT).exists():
            os.replace(out / CHECKPOINT, out / (CHECKPOINT + ".diverged"))
            kept = f", its last checkpoint kept as {CHECKPOINT}.diverged"
        raise JobError(f"{exc}; no adapter was written to {out}{kept}: lower --lr (it was {job.settings.lr:g})"
                       + (", or train in float32 (--dtype)" if job.dtype != "float32" else "")) from None
    if job.method == "reslora":
        from adapters.reslora import MERGE_METHODS, merge_error
        batches = [{k: v.to(job.device) for k, v in collate((evaluation or train)[i:i + 8], pad).items()}
                   for i in range(0, min(len(evaluation or train), 64), 8)]
        errors = {m: merge_error(model, layers, m, batches) for m in MERGE_METHODS[job.structure]}
        merge = {"merge_error": errors, "merge_method": _best_merge(errors, job.structure)}
        write(out, merge)
    else:
        merge = {"merge_error": None, "merge_method": None}
        write(out)
    eval_loss = list(result.eval_loss)
    if evaluation and (not eval_loss or job.method == "adalora"):
        # the last figure is the saved adapter's: AdaLoRA's write applies the final rank budget after the run
        eval_loss = [e for e in eval_loss if e[0] != result.steps] + [
            (result.steps, evaluate(model, evaluation, pad, job.settings.batch_size, job.device))]
    summary = {"method": job.method, "out": str(out), "steps": result.steps, "trainable_params": trainable,
               "seconds": round(result.seconds, 2), "tokens": result.tokens, "train_loss": result.train_loss,
               "eval_loss": eval_loss, "targets": targets, **merge, "job": identity,
               "served": _served(out, layers)}  # what a server's AdapterInfo must say once it loads it
    (out / LOG).write_text(json.dumps(summary, indent=2))
    if inspect is not None:
        inspect(model, tokenizer)
    print(f"wrote {job.method} adapter to {out} ({result.steps} steps, {result.seconds:.1f}s)", file=sys.stderr)
    return summary


def _served(out: Path, layers: dict) -> dict:
    """The adapter as a server will read it; files it would refuse (factors that diverged to NaN, say) are this
    job's failure, named, not a traceback after the files were written."""
    from loader.deploy import served_form  # here: deploying (grpc, the client) is not training's import
    from server.errors import LoraplexError
    try:
        return served_form(out, layers)
    except LoraplexError as exc:
        raise JobError(f"the adapter written to {out} cannot be served: {exc}") from None
