"""The training loop shared by every adapter kind: AdamW, warmup + cosine decay, gradient accumulation,
periodic eval loss, and checkpoints that a resumed run continues from exactly (same data order, same
dropout draws). Kind-specific behaviour comes in through `Hooks` (AdaLoRA's regulariser and rank
allocation). No file I/O here: checkpoints are handed to a callback as a state dict."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from loader.train_data import IGNORE, Example, collate


class Diverged(Exception):
    """The loss or the gradients stopped being finite: what the run would go on to save is no adapter (AdaLoRA's
    rank allocation pruned every triplet of NaN scores, and the run reported success)."""


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    eval_every: int = 50          # optimizer steps between eval-loss measurements (and checkpoints)
    seed: int = 0


class Hooks:
    """Per-kind additions to the loop; the defaults do nothing."""

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer.step() and before zero_grad(), while gradients are still populated."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainResult:
    steps: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def total_steps(n_examples: int, s: TrainSettings) -> int:
    per_epoch = math.ceil(math.ceil(n_examples / s.batch_size) / s.grad_accum)
    return s.max_steps if s.max_steps is not None else per_epoch * s.epochs


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # (modulo the generator's 64-bit seed: a large --seed overflowed it)
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2 ** 64)).tolist()


def _labelled(example: Example) -> int:
    """Tokens the example's loss is over: HF's causal LM loss predicts positions 1.. (labels shifted by one)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int, device) -> float:
    """Token-level mean loss over the examples' labelled tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    def __init__(self, model: nn.Module, settings: TrainSettings, pad_id: int, hooks: Hooks | None = None) -> None:
        self.model = model
        self.settings = settings
        self.pad_id = pad_id
        self.hooks = hooks or Hooks()
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)

    def _lr_factor(self, step: int, total: int) -> float:
        warmup = max(1, int(total * self.settings.warmup_ratio))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def state_dict(self, step: int, epoch: int, position: int, log: dict | None = None) -> dict:
        """`log`: the run's losses, tokens and seconds so far, so that a resumed run's log is the whole run's."""
        trainable = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"step": step, "epoch": epoch, "position": position, "params": trainable, "log": log,
                "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                # dropout on a GPU draws from the CUDA generators
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                "hooks": self.hooks.state_dict()}

    def _restore(self, state: dict) -> tuple[int, int, int]:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.hooks.load_state_dict(state["hooks"])
        return state["step"], state["epoch"], state["position"]

    def run(self, train: list[Example], evaluation: list[Example] | None = None,
            checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
            progress: Callable[[Iterable], Iterable] | None = None) -> TrainResult:
        s = self.settings
        total = total_steps(len(train), s)
        step, epoch, position = (0, 0, 0) if resume is None else self._restore(resume)
        if resume is None:
            torch.manual_seed(s.seed)  # dropout draws; a resumed run restores the generator instead
        result = TrainResult(steps=total)
        before = (resume or {}).get("log") or {}  # what the interrupted run had logged
        result.train_loss = [tuple(x) for x in before.get("train_loss", [])]
        result.eval_loss = [tuple(x) for x in before.get("eval_loss", [])]
        bar = progress(range(total)) if progress else None
        if bar is not None and step:
            bar.update(step)
        self.model.train()
        start, tokens = time.perf_counter(), 0
        pending = 0  # micro-batches accumulated since the last optimizer step (0 at every checkpoint)
        while step < total:
            order = _epoch_order(len(train), s.seed, epoch)
            batches = [order[i:i + s.batch_size] for i in range(0, len(order), s.batch_size)]
            while position < len(batches) and step < total:
                if pending == 0:  # an optimizer step's micro-batches: --grad-accum of them, or the epoch's last
                    counts = [sum(_labelled(train[i]) for i in indices)
                              for indices in batches[position:position + s.grad_accum]]
                    labelled, window = sum(counts), 0.0
                n = counts[pending]
                batch = {k: v.to(self.device) for k, v in collate([train[i] for i in batches[position]],
                                                                   self.pad_id).items()}
                position += 1
                loss = self.model(**batch).loss
                extra = self.hooks.extra_loss()
                # The step's loss is the mean over all its labelled tokens, as one batch of all its examples gives
                # (HF Trainer's rule since transformers 4.46), however they split into micro-batches; a kind's
                # regulariser counts once per step (the mean of its micro-batches' values).
                terms = ([loss * (n / labelled)] if n else []) + ([extra / len(counts)] if extra is not None else [])
                if terms:
                    sum(terms).backward()
                tokens += int(batch["attention_mask"].sum())
                window += float(loss.detach()) * n if n else 0.0  # (HF's loss over no token is 0/0)
                pending += 1
                if pending < s.grad_accum and position < len(batches):  # an epoch's last batch flushes
                    continue
                pending = 0
                for group in self.optimizer.param_groups:
                    group["lr"] = s.lr * self._lr_factor(step, total)
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm))
                mean = window / max(labelled, 1)
                if not (math.isfinite(mean) and math.isfinite(norm)):
                    raise Diverged(f"the training diverged at step {step + 1} of {total}: loss {mean:.4g}, gradient "
                                   f"norm {norm:.4g}")
                self.optimizer.step()
                self.hooks.after_optimizer_step(step)
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                result.train_loss.append((step, mean))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
                if step % s.eval_every == 0 or step == total:
                    if evaluation:
                        result.eval_loss.append((step, evaluate(self.model, evaluation, self.pad_id,
                                                                s.batch_size, self.device)))
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean:.4f}", eval=f"{result.eval_loss[-1][1]:.4f}")
                    if checkpoint is not None:
                        log = {"train_loss": list(result.train_loss), "eval_loss": list(result.eval_loss),
                               "tokens": before.get("tokens", 0) + tokens,
                               "seconds": before.get("seconds", 0.0) + time.perf_counter() - start}
                        checkpoint(self.state_dict(step, epoch, position, log))
            if position >= len(batches):
                epoch, position = epoch + 1, 0
        result.seconds = before.get("seconds", 0.0) + time.perf_counter() - start
        result.tokens = before.get("tokens", 0) + tokens
        self.model.eval()
        return result
