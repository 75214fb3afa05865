"""AdaLoRA (arXiv 2303.10512), trainable, with PEFT's rank allocator (reference/methods.md §2).

    y = W0 x + b + c · B ((A ⊙ E) drop(x)),   c = scaling / (ranknum + 1e-5),  scaling = alpha (or init_r if alpha <= 0)

A (init_r, d_in), E (init_r, 1) and B (d_out, init_r) are named as PEFT's SVDLinear parameters and initialised
as PEFT does (A, B ~ N(0, 0.02²), E = 0, so the model starts as the base). Pruning only zeroes entries of E:
modules keep their full size during training, and `ranknum` stays at init_r, so c never changes. The allocator
scores every triplet (A row, λ, B column) by smoothed sensitivity × uncertainty and keeps the best ones under a
cubic budget schedule; `save_adalora` (loader/adalora_files.py) writes the kept triplets in PEFT's layout.
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.layer import linear_dims
from adapters.lora import wrap_modules

PARTS = ("lora_A", "lora_E", "lora_B")


class AdaLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, init_r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if init_r < 1:
            raise ValueError(f"AdaLoRA init_r must be a positive integer, got {init_r}")
        d_in, d_out = linear_dims(base)
        device = base.weight.device  # fp32 factors on any base dtype, as PEFT's autocast_adapter_dtype leaves them
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(init_r, d_in, device=device).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(d_out, init_r, device=device).normal_(0.0, 0.02))
        # A buffer, not a parameter: it never trains, and an optimizer built from model.parameters() must not see it.
        self.register_buffer("ranknum", torch.full((1,), float(init_r), device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init_r, self.alpha, self.dropout_p = init_r, alpha, dropout
        self.scaling = alpha if alpha > 0 else float(init_r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT's SVDLinear.forward op for op, so that gradients (and hence masks) agree bit for bit: the input is
        # cast to the adapter dtype and the delta is added in place, keeping the base output's dtype.
        result = self.base(x)
        x = x.to(self.lora_A.dtype)
        result += (self.dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (
            self.ranknum + 1e-5)
        return result

    def kept(self, mask: list[bool] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A rows, E rows, B columns) of the triplets `mask` keeps, in their original order (all when None)."""
        if mask is not None and len(mask) != self.init_r:
            raise ValueError(f"rank mask has {len(mask)} entries, expected init_r = {self.init_r}")
        keep = torch.ones(self.init_r, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
        keep = keep.to(self.lora_A.device)
        return (self.lora_A.detach()[keep], self.lora_E.detach()[keep], self.lora_B.detach()[:, keep])


def add_adalora(model: nn.Module, targets, init_r: int, alpha: float,
                dropout: float = 0.0) -> dict[str, AdaLoraLinear]:
    """Wrap every targeted linear module of `model` in place; returns them by module path."""
    return wrap_modules(model, targets, lambda m: AdaLoraLinear(m, init_r, alpha, dropout))


def orthogonal_regularizer(modules: dict[str, AdaLoraLinear]) -> torch.Tensor:
    """PEFT's form (§2.5): mean over every A and every B (counted separately) of ‖G − I‖_F, unsquared,
    with G = A Aᵀ for A and Bᵀ B for B. The caller adds it with weight orth_reg_weight."""
    total, count = 0, 0
    for layer in modules.values():
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(*gram.shape, out=torch.empty_like(gram))
            total = total + torch.norm(gram - eye, p="fro")
            count += 1
    return total / count


class RankAllocator:
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate for one adapter's modules (§2.2–2.6).

    Steps are optimizer steps in `total_step` units. `rank_pattern` is None until the first mask, then
    {"<module path>.lora_E": [kept, ...]} exactly as PEFT writes it; it is frozen at step total_step − tfinal.
    """

    def __init__(self, modules: dict[str, AdaLoraLinear], init_r: int, target_r: int, tinit: int, tfinal: int,
                 delta_t: int, beta1: float = 0.85, beta2: float = 0.85, *, total_step: int) -> None:
        if not modules:
            raise ValueError("RankAllocator needs at least one AdaLoRA module")
        wrong = sorted(name for name, layer in modules.items() if layer.init_r != init_r)
        if wrong:
            raise ValueError(f"modules {wrong} were not built with init_r = {init_r}")
        if not 1 <= target_r <= init_r:
            raise ValueError(f"AdaLoRA target_r must be in [1, init_r = {init_r}], got {target_r}")
        if total_step is None or total_step <= 0:
            raise ValueError(f"AdaLoRA needs total_step > 0 (optimizer steps), got {total_step}")
        if tinit < 0 or tfinal < 0 or tinit >= total_step - tfinal:
            raise ValueError(f"AdaLoRA schedule leaves no budgeting phase: need 0 <= tinit < total_step - tfinal, "
                             f"got tinit={tinit}, tfinal={tfinal}, total_step={total_step}")
        if delta_t < 1:
            raise ValueError(f"AdaLoRA deltaT must be >= 1, got {delta_t}")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"AdaLoRA beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        self.modules = modules
        self.tinit, self.tfinal, self.delta_t, self.total_step = tinit, tfinal, delta_t, total_step
        self.beta1, self.beta2 = beta1, beta2
        self.init_bgt, self.target_bgt = init_r * len(modules), target_r * len(modules)
        self.params = {f"{name}.{part}": getattr(layer, part) for name, layer in modules.items() for part in PARTS}
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.frozen = False  # the final mask has been taken (step total_step − tfinal)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Zero EMA state: the same as PEFT's lazily created zeros."""
        self.exp_avg_ipt = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_unc = {k: torch.zeros_like(p) for k, p in self.params.items()}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask now?): b_0 until tinit, cubic decay to b_T at total_step − tfinal, then b_T.
        The numerator is (t − tinit), as in both codebases (the paper's printed (t − tinit − tfinal) is a typo)."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (coeff ** 3) + self.target_bgt)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """I = |w · ∂L/∂w|; Ī ← β1 Ī + (1−β1) I; Ū ← β2 Ū + (1−β2) |I − Ī| (with the updated Ī, as PEFT)."""
        for key, p in self.params.items():
            if p.grad is None:
                raise ValueError(f"{key} has no gradient: call update_and_allocate after loss.backward() and "
                                 f"optimizer.step(), before zero_grad()")
            ipt = (p * p.grad).abs()
            self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt
            self.exp_avg_unc[key] = self.beta2 * self.exp_avg_unc[key] + (1 - self.beta2) * (
                ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i = s(λ_i) + mean_j s(A_ij) + mean_j s(B_ji), s = Ī·Ū; (init_r,) per module, summed in PEFT's order."""
        scores = {}
        for name in self.modules:
            s = {part: self.exp_avg_ipt[f"{name}.{part}"] * self.exp_avg_unc[f"{name}.{part}"] for part in PARTS}
            vectors = torch.cat([s["lora_A"].mean(dim=1, keepdim=True), s["lora_B"].mean(dim=0).view(-1, 1)], dim=1)
            scores[name] = s["lora_E"].view(-1) + vectors.sum(dim=1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ of every triplet scoring <= τ, the (b_0 − budget)-th smallest score (ties at τ are all pruned,
        as PEFT). With nothing to prune (b_0 == budget, e.g. init_r == target_r) everything is kept; PEFT's
        kthvalue(k=0) raises there."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        tau = torch.kthvalue(torch.cat(list(scores.values())), k).values if k > 0 else None
        pattern = {}
        for name, score in scores.items():
            keep = score > tau if tau is not None else torch.ones_like(score, dtype=torch.bool)
            self.modules[name].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        for name, layer in self.modules.items():
            keep = torch.tensor(self.rank_pattern[f"{name}.lora_E"], dtype=torch.bool, device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> None:
        """Once per optimizer step, after optimizer.step() and before zero_grad() (PEFT's three phases):
        before total_step − tfinal update importance and mask on schedule; at it, take the final mask at b_T,
        freeze rank_pattern and drop the EMA state; after it, re-apply the frozen mask (Adam keeps moving λ)."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(budget)
        elif step == final:
            self.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0])
            self.frozen = True
            self.reset_ipt()
        elif not self.frozen:
            raise ValueError(f"update_and_allocate({step}) is past total_step − tfinal = {final}, but the final "
                             f"mask was never taken: call it on every optimizer step, in total_step units")
        else:
            self.apply_rank_pattern()

    def finalize(self) -> None:
        """Take the final mask at b_T if the schedule never did. With 0-based steps and tfinal = 0, step
        total_step − tfinal never arrives (in PEFT too), so without this the saved ranks could miss the budget."""
        if not self.frozen:
            self.rank_pattern = self.mask_to_budget(self.target_bgt)
            self.frozen = True

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (the EMA state, the current and frozen masks)."""
        return {"exp_avg_ipt": {k: v.clone() for k, v in self.exp_avg_ipt.items()},
                "exp_avg_unc": {k: v.clone() for k, v in self.exp_avg_unc.items()},
                "rank_pattern": self.rank_pattern, "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        if set(state["exp_avg_ipt"]) != set(self.params):
            raise ValueError("allocator state does not match these AdaLoRA modules")
        self.exp_avg_ipt = {k: v.to(self.params[k].device).clone() for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: v.to(self.params[k].device).clone() for k, v in state["exp_avg_unc"].items()}
        self.rank_pattern, self.frozen = state["rank_pattern"], state["frozen"]
