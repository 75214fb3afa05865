"""AdaLoRA training (adapters/adalora.py) against HF PEFT: the same forward, the same masks and weights
step by step from the same start, and saved files PEFT and our reader load (reference/methods.md §2, §7.7–7.9)."""
import json
from dataclasses import dataclass, field

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from adapters.adalora import PARTS, AdaLoraLinear, RankAllocator, add_adalora, orthogonal_regularizer
from adapters.layer import linear_dims
from adapters.slot_bank import ModuleShape
from loader.adalora_files import save_adalora
from loader.peft_files import read_adapter

SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 4, "tfinal": 6, "deltaT": 2, "total_step": 24}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
ALPHA, DROPOUT, ORTH, LR = 8, 0.1, 0.5, 5e-2


def allocator(modules, **overrides) -> RankAllocator:
    s = {**SCHEDULE, **overrides}
    return RankAllocator(modules, s["init_r"], s["target_r"], s["tinit"], s["tfinal"], s["deltaT"],
                         total_step=s["total_step"])


def toy_modules(n: int = 2, init_r: int = 3, d: int = 4) -> dict[str, AdaLoraLinear]:
    torch.manual_seed(0)
    return {f"layers.{i}.proj": AdaLoraLinear(nn.Linear(d, d), init_r, alpha=ALPHA) for i in range(n)}


def random_grad_step(alloc: RankAllocator, modules: dict[str, AdaLoraLinear], step: int) -> None:
    """One allocator step with random gradients on every factor (the allocator reads them)."""
    for layer in modules.values():
        for part in PARTS:
            getattr(layer, part).grad = torch.randn_like(getattr(layer, part))
    alloc.update_and_allocate(step)


def copy_from_peft(peft, modules) -> None:
    params = dict(peft.base_model.model.named_parameters())
    with torch.no_grad():
        for name, layer in modules.items():
            for part in PARTS:
                getattr(layer, part).copy_(params[f"{name}.{part}.default"])


@dataclass
class Run:
    peft: nn.Module
    ours: nn.Module
    modules: dict[str, AdaLoraLinear]
    allocator: RankAllocator
    steps: list[dict] = field(default_factory=list)  # per step: both losses and both rank patterns


def train_both(model_dir, targets) -> Run:
    """PEFT (with its own update_and_allocate) and our modules from the same start, on the same batches
    and dropout draws, each with its own AdamW; the loss includes the orthogonal regulariser in both."""
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=targets, lora_alpha=ALPHA, lora_dropout=DROPOUT,
        orth_reg_weight=ORTH, fan_in_fan_out=targets == TARGETS["gpt2"], **SCHEDULE)).train()
    ours = AutoModelForCausalLM.from_pretrained(model_dir).requires_grad_(False).train()
    modules = add_adalora(ours, targets, SCHEDULE["init_r"], ALPHA, DROPOUT)
    copy_from_peft(peft, modules)
    run = Run(peft, ours, modules, allocator(modules))
    opt_peft = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=LR)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=LR)
    batches = torch.Generator().manual_seed(1)
    for step in range(SCHEDULE["total_step"]):
        ids = torch.randint(3, 250, (4, 12), generator=batches)
        torch.manual_seed(step)
        loss_peft = peft(input_ids=ids, labels=ids).loss
        loss_peft.backward()
        opt_peft.step()
        peft.base_model.update_and_allocate(step)
        opt_peft.zero_grad()
        torch.manual_seed(step)
        loss_ours = ours(input_ids=ids, labels=ids).loss + ORTH * orthogonal_regularizer(modules)
        loss_ours.backward()
        opt_ours.step()
        run.allocator.update_and_allocate(step)
        opt_ours.zero_grad()
        pattern = peft.peft_config["default"].rank_pattern  # PEFT keys carry the adapter name while training
        run.steps.append({"loss": (loss_peft.item(), loss_ours.item()), "ours": run.allocator.rank_pattern,
                          "peft": None if pattern is None else {k.removesuffix(".default"): v
                                                                for k, v in pattern.items()}})
    return run


@pytest.fixture(scope="module", params=sorted(TARGETS))
def run(request, model_dirs):
    return request.param, train_both(model_dirs[request.param], TARGETS[request.param])


# (a) schedule and when masks happen (§2.3, §7.8)
def test_budget_schedule_is_the_cubic_formula():
    alloc = allocator(toy_modules(n=6, init_r=6), tinit=3, tfinal=4, total_step=20, deltaT=3)
    b0, bt = 36, 12
    for t in range(4):                                   # t <= tinit: full budget, no mask
        assert alloc.budget_schedule(t) == (b0, False)
    assert alloc.budget_schedule(10) == (14, False)      # int(24 · (1 − 7/13)³ + 12) = int(14.36); 10 % 3 != 0
    assert alloc.budget_schedule(9) == (int(24 * (1 - 6 / 13) ** 3 + 12), True)
    assert alloc.budget_schedule(16) == (bt, False)      # t = T − tfinal: b_T (update_and_allocate forces the mask)
    for t in (17, 20, 25):                               # after: b_T, mask every step
        assert alloc.budget_schedule(t) == (bt, True)


def test_masks_only_every_delta_t_then_freeze_then_reapply(monkeypatch):
    modules = toy_modules()
    alloc = allocator(modules, init_r=3, target_r=1, tinit=2, tfinal=3, deltaT=3, total_step=14)
    masked, reapplied = [], []
    real_mask, real_apply = alloc.mask_to_budget, alloc.apply_rank_pattern
    monkeypatch.setattr(alloc, "mask_to_budget", lambda b: masked.append((step, b)) or real_mask(b))
    monkeypatch.setattr(alloc, "apply_rank_pattern", lambda: reapplied.append(step) or real_apply())
    for step in range(14):
        random_grad_step(alloc, modules, step)
        assert (alloc.rank_pattern is None) == (step < 3)
    decay = [(t, alloc.budget_schedule(t)[0]) for t in (3, 6, 9)]  # tinit < t < T − tfinal = 11, t % 3 == 0
    assert masked == decay + [(11, 2)] and reapplied == [12, 13] and alloc.frozen
    assert sum(map(sum, alloc.rank_pattern.values())) == 2
    for name, layer in modules.items():  # pruned λ are zero after the re-applied mask
        keep = torch.tensor(alloc.rank_pattern[f"{name}.lora_E"])
        assert torch.all(layer.lora_E[~keep] == 0)


# (b) the final budget is exact and ranks differ per layer (§7.7)
def test_final_budget_exact_and_ranks_differ(run):
    _, r = run
    kept = {k: sum(v) for k, v in r.allocator.rank_pattern.items()}
    assert r.allocator.frozen and sum(kept.values()) == SCHEDULE["target_r"] * len(r.modules)
    assert len(set(kept.values())) > 1
    for name, layer in r.modules.items():
        assert int((layer.lora_E != 0).sum()) == kept[f"{name}.lora_E"]


# (c) importance EMAs, triplet scores and masking with ties (§2.2, §2.4, §7.9)
def test_importance_ema_two_steps_by_hand():
    modules = toy_modules(n=1, init_r=2, d=3)
    (name, layer), = modules.items()
    alloc = allocator(modules, init_r=2, target_r=1)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([[0.5], [-1.0]]))
        layer.lora_A.normal_(0, 1.0)  # A and B of the same order as λ, so all three terms weigh in the score
        layer.lora_B.normal_(0, 1.0)
    grads = [{p: torch.randn_like(getattr(layer, p)) for p in PARTS} for _ in range(2)]
    grads[0]["lora_E"], grads[1]["lora_E"] = torch.tensor([[2.0], [0.25]]), torch.tensor([[-4.0], [1.0]])
    for g in grads:
        for part in PARTS:
            getattr(layer, part).grad = g[part]
        alloc.update_ipt()

    def by_hand(w: float, g1: float, g2: float) -> tuple[float, float]:
        i1, i2 = abs(w * g1), abs(w * g2)
        avg1 = 0.15 * i1
        unc1 = 0.15 * abs(i1 - avg1)
        avg2 = 0.85 * avg1 + 0.15 * i2
        return avg2, 0.85 * unc1 + 0.15 * abs(i2 - avg2)

    # λ_0 = 0.5 with gradients 2 then −4: I = 1, 2; Ī = 0.15, 0.4275; Ū = 0.1275, 0.34425
    assert alloc.exp_avg_ipt[f"{name}.lora_E"][0, 0].item() == pytest.approx(0.4275, rel=1e-6)
    assert alloc.exp_avg_unc[f"{name}.lora_E"][0, 0].item() == pytest.approx(0.34425, rel=1e-6)
    score = {}
    for part in PARTS:
        w = getattr(layer, part).detach()
        avg, unc = alloc.exp_avg_ipt[f"{name}.{part}"], alloc.exp_avg_unc[f"{name}.{part}"]
        want = [[by_hand(w[i, j].item(), grads[0][part][i, j].item(), grads[1][part][i, j].item())
                 for j in range(w.shape[1])] for i in range(w.shape[0])]
        torch.testing.assert_close(avg, torch.tensor([[a for a, _ in row] for row in want]), rtol=1e-6, atol=0)
        torch.testing.assert_close(unc, torch.tensor([[u for _, u in row] for row in want]), rtol=1e-6, atol=0)
        score[part] = [[a * u for a, u in row] for row in want]
    triplets = [score["lora_E"][i][0] + sum(score["lora_A"][i]) / 3 + sum(row[i] for row in score["lora_B"]) / 3
                for i in range(2)]
    torch.testing.assert_close(alloc.triplet_scores()[name], torch.tensor(triplets), rtol=1e-6, atol=0)


def test_mask_keeps_budget_prunes_ties_and_guards_k0():
    modules = toy_modules(n=2, init_r=2)
    alloc = allocator(modules, init_r=2, target_r=1)
    for name, s in zip(modules, ([1.0, 2.0], [2.0, 3.0])):  # triplet scores [1, 2 | 2, 3]
        for part in PARTS:
            alloc.exp_avg_ipt[f"{name}.{part}"].zero_()
            alloc.exp_avg_unc[f"{name}.{part}"].fill_(1.0)
        alloc.exp_avg_ipt[f"{name}.lora_E"].copy_(torch.tensor(s).view(-1, 1))
        with torch.no_grad():
            modules[name].lora_E.fill_(7.0)
    first, second = (f"{n}.lora_E" for n in modules)
    assert alloc.mask_to_budget(4) == {first: [True, True], second: [True, True]}  # k = 0: nothing to prune
    assert alloc.mask_to_budget(3) == {first: [False, True], second: [True, True]}  # exactly 3, no tie
    assert alloc.mask_to_budget(2) == {first: [False, False], second: [False, True]}  # τ = 2: both ties pruned
    assert modules["layers.0.proj"].lora_E.view(-1).tolist() == [0.0, 0.0]
    assert modules["layers.1.proj"].lora_E.view(-1).tolist() == [0.0, 7.0]


def test_init_r_equal_target_r_keeps_everything():
    modules = toy_modules(n=2, init_r=2)
    alloc = allocator(modules, init_r=2, target_r=2, tinit=0, tfinal=1, total_step=4, deltaT=1)
    for step in range(4):
        random_grad_step(alloc, modules, step)
    assert all(all(mask) for mask in alloc.rank_pattern.values())


def test_allocator_state_round_trips():
    modules = toy_modules()
    alloc = allocator(modules, init_r=3, target_r=1, tinit=0, tfinal=2, total_step=8, deltaT=1)
    for step in range(3):
        random_grad_step(alloc, modules, step)
    resumed = allocator(modules, init_r=3, target_r=1, tinit=0, tfinal=2, total_step=8, deltaT=1)
    resumed.load_state_dict(alloc.state_dict())
    assert resumed.rank_pattern == alloc.rank_pattern and resumed.frozen == alloc.frozen
    for name, score in alloc.triplet_scores().items():
        assert torch.equal(resumed.triplet_scores()[name], score)


@pytest.mark.parametrize("overrides,needle", [
    ({"target_r": 7}, "target_r must be in"), ({"target_r": 0}, "target_r must be in"),
    ({"total_step": 0}, "total_step > 0"), ({"tinit": 18, "tfinal": 6}, "no budgeting phase"),
    ({"deltaT": 0}, "deltaT must be >= 1"), ({"init_r": 5}, "not built with init_r = 5"),
])
def test_allocator_rejects_bad_schedules(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        allocator(toy_modules(init_r=6), **overrides)


def test_allocator_needs_gradients_and_the_final_step():
    modules = toy_modules()
    alloc = allocator(modules, init_r=3, target_r=1, tinit=0, tfinal=2, total_step=6, deltaT=1)
    with pytest.raises(ValueError, match="before zero_grad"):
        alloc.update_and_allocate(0)
    with pytest.raises(ValueError, match="final mask was never taken"):
        alloc.update_and_allocate(5)


# (d) strong parity with PEFT's own AdaLoraModel.update_and_allocate
def test_forward_and_training_match_peft_bit_for_bit(run):
    arch, r = run
    alloc_peft = r.peft.base_model.rankallocator
    for t in range(SCHEDULE["total_step"] + 3):
        assert r.allocator.budget_schedule(t) == alloc_peft.budget_schedule(t)
    for step, s in enumerate(r.steps):
        assert s["loss"][0] == s["loss"][1], f"{arch} step {step}: losses differ"
        assert s["ours"] == s["peft"], f"{arch} step {step}: rank patterns differ"
    assert r.steps[SCHEDULE["tinit"]]["ours"] is None and r.steps[-1]["ours"] is not None
    params = dict(r.peft.base_model.model.named_parameters())
    for name, layer in r.modules.items():
        for part in PARTS:
            assert torch.equal(getattr(layer, part), params[f"{name}.{part}.default"]), f"{name}.{part}"


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.bfloat16)])
def test_forward_matches_peft_svdlinear(model_dirs, arch, dtype):
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=dtype).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    modules = add_adalora(base, TARGETS[arch], 4, 16)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, base_logits)  # E = 0: the base model exactly (§7.1)
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=dtype), AdaLoraConfig(
        target_modules=TARGETS[arch], init_r=4, target_r=2, total_step=10, lora_alpha=16,
        fan_in_fan_out=arch == "gpt2")).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_E" in name:
                p.normal_(0, 1.0)
    copy_from_peft(peft, modules)
    assert all(getattr(m, part).dtype == torch.float32 for m in modules.values() for part in PARTS)
    with torch.no_grad():
        ours, theirs = base(ids).logits, peft(input_ids=ids).logits
    assert ours.dtype == dtype and torch.equal(ours, theirs)


# (e) saved files: PEFT's layout, loadable by PEFT and by our reader, same logits
def hand_canonical_logits(model_dir, canonical, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for name, f in canonical.modules.items():
        model.get_submodule(name).register_forward_hook(lambda m, args, out, f=f: out + args[0] @ f.a.T @ f.b.T)
    with torch.no_grad():
        return model(ids).logits


def check_saved(model_dir, model, modules, out, ids):
    with torch.no_grad():
        want = model.eval()(ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    shapes = {n: ModuleShape(n, *linear_dims(m.base)) for n, m in modules.items()}
    canonical = read_adapter(out, "trained", shapes, max_rank=16, load_serial=1)
    torch.testing.assert_close(hand_canonical_logits(model_dir, canonical, ids), want, atol=1e-5, rtol=0)
    return canonical


def test_saved_adapter_is_peft_layout_and_loads_everywhere(run, model_dirs, tmp_path):
    arch, r = run
    ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(2))
    config = {k: SCHEDULE[k] for k in ("target_r", "tinit", "tfinal", "deltaT", "total_step")}
    save_adalora(r.modules, r.allocator.rank_pattern, tmp_path / "ours", {**config, "orth_reg_weight": ORTH})
    r.peft.save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any("ranknum" in k or k.endswith(".weight") for k in ours)
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in r.allocator.rank_pattern.items()}
    for name, rank in kept.items():
        d_in, d_out = linear_dims(r.modules[name].base)
        assert ours[f"base_model.model.{name}.lora_A"].shape == (rank, d_in)
        assert ours[f"base_model.model.{name}.lora_B"].shape == (d_out, rank)
        assert ours[f"base_model.model.{name}.lora_E"].shape == (rank, 1)
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg_ours["peft_type"] == "ADALORA" and cfg_ours["rank_pattern"] == r.allocator.rank_pattern
    assert {k for k in cfg_ours if cfg_ours[k] != cfg_peft.get(k)} == {"target_modules", "base_model_name_or_path"}
    canonical = check_saved(model_dirs[arch], r.ours, r.modules, tmp_path / "ours", ids)
    assert {m: f.rank for m, f in canonical.modules.items()} == {m: k for m, k in kept.items() if k}


def test_saved_before_any_mask_and_with_empty_layers(model_dirs, tmp_path):
    ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(3))
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    modules = add_adalora(model, ["q_proj", "v_proj"], 4, ALPHA)
    with torch.no_grad():
        for layer in modules.values():
            layer.lora_E.normal_(0, 1.0)
    config = {"target_r": 2, "total_step": 10}
    save_adalora(modules, None, tmp_path / "full", config)  # rank_pattern null: all init_r triplets
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["rank_pattern"] is None
    check_saved(model_dirs["llama"], model, modules, tmp_path / "full", ids)
    names = sorted(modules)
    pattern = {f"{n}.lora_E": [i % 2 == 0, True, False, i % 2 == 0] for i, n in enumerate(names)}
    pattern[f"{names[0]}.lora_E"] = [False] * 4  # fully pruned: empty tensors
    with torch.no_grad():
        for n in names:
            modules[n].lora_E.masked_fill_(~torch.tensor(pattern[f"{n}.lora_E"]).view(-1, 1), 0.0)
    save_adalora(modules, pattern, tmp_path / "pruned", config)
    tensors = load_file(tmp_path / "pruned" / "adapter_model.safetensors")
    assert tensors[f"base_model.model.{names[0]}.lora_A"].shape == (0, 64)
    assert tensors[f"base_model.model.{names[0]}.lora_B"].shape[1] == 0
    canonical = check_saved(model_dirs["llama"], model, modules, tmp_path / "pruned", ids)
    assert names[0] not in canonical.modules


@pytest.mark.parametrize("config,needle", [({"target_r": 2}, "total_step > 0"),
                                           ({"total_step": 10, "init_r": 5}, "init_r=5 differs"),
                                           ({"total_step": 4, "tinit": 4}, "tinit < total_step")])
def test_save_rejects_configs_peft_cannot_load(tmp_path, config, needle):
    with pytest.raises(ValueError, match=needle):
        save_adalora(toy_modules(), None, tmp_path, config)


# (f) the orthogonal regulariser (§2.5)
def test_orthogonal_regularizer_is_the_mean_unsquared_frobenius_norm():
    modules = toy_modules(n=3, init_r=3, d=5)
    norms = []
    for layer in modules.values():
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        norms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(3, dtype=torch.float64)))
        norms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(3, dtype=torch.float64)))
    reg = orthogonal_regularizer(modules)
    assert reg.item() == pytest.approx(sum(norms).item() / 6, rel=1e-6)
    reg.backward()
    layer = next(iter(modules.values()))
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and layer.lora_E.grad is None
