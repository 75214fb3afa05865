"""Adapter files the readers cannot serve exactly are FAILED_PRECONDITION naming the key, never INTERNAL (an
unexpected exception in a reader) and never served as something else (a key the kind's reader would ignore)."""
import json
import shutil

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.client import Client
from loader.hydra_files import save_hydralora
from loader.reslora_files import save_reslora
from tests.helpers import make_hydra_model, make_peft_adapter, make_reslora_model, start_server, status_of

C = grpc.StatusCode
PROMPT = [5, 17, 99, 3, 42]
# Overlapping alternatives under a repetition: Python's re backtracked through ~1.8^31 ways of splitting a module path
# (with the GIL held: the whole server froze); the readers stop it at a deadline.
SLOW = r"([\w.]|[\w.]{2}|[\w.]{3})+[^\w.]"
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
V0, V1 = "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"


def _variant(root, source: str, name: str, edit=None, tensors=None) -> None:
    """A copy of adapter `source` with its config changed by `edit` (a dict to merge, or a function) and, where
    given, its tensors replaced."""
    shutil.copytree(root / source, root / name)
    path = root / name / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config) if callable(edit) else config.update(edit or {})
    path.write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(root / name / "adapter_model.safetensors"), metadata={"format": "pt"})


# id -> needle of the FAILED_PRECONDITION message
REFUSED = {
    # 1: unexpected exceptions in the readers (INTERNAL before)
    "pattern-bad-rank": "rank_pattern key 'q_proj(' is not a valid regular expression",
    "pattern-bad-alpha": "alpha_pattern key 'v_proj)' is not a valid regular expression",
    "fp8-nan": "contains NaN or Inf",
    "pattern-posix-targets": "a regular expression Python's re (PEFT) reads as this server does: re warns: "
                             "Possible nested set at position 3",
    # (QA) braces that are no repeat count: literal to re (PEFT matched nothing, alpha 2 everywhere), fuzzy to the
    # regex module (within one edit of q_proj: q/k/v/o_proj took alpha 64)
    "pattern-fuzzy-alpha": "alpha_pattern key '(?:q_proj){e<=1}' is read otherwise by Python's re (PEFT) than by "
                           "this server: {e<=1} is literal text to re, which no module path holds, and may be fuzzy",
    "pattern-fuzzy-targets": "target_modules must be a regular expression Python's re (PEFT) reads as this server "
                             "does: {e<=1} is literal text to re",
    "pattern-posix-rank": "is read otherwise by Python's re (PEFT) than by this server",
    "pattern-slow-targets": f"config target_modules {SLOW!r} took over 0.25 s of CPU to match the module path",
    "pattern-slow-exclude": f"config exclude_modules {SLOW!r} took over 0.25 s of CPU to match the module path",
    "pattern-slow-rank": f"config rank_pattern key {SLOW!r} took over 0.25 s of CPU to match the module path",
    "pattern-slow-alpha": f"config alpha_pattern key {SLOW!r} took over 0.25 s of CPU to match the module path",
    "res-structure-list": "structure must be one of",
    "res-stats-string": "statistics must be an object",
    "res-stats-list": "statistics must be an object",
    "res-stats-entry-string": f"statistics[{Q0!r}] must be an object",
    "res-chain-number": "list of non-empty lists of module paths (strings)",
    "res-chain-mixed": "mixes module types 'model.layers.*.self_attn.q_proj' and 'model.layers.*.self_attn.v_proj'",
    "config-nested": "adapter_config.json is not valid JSON (nested too deeply",  # RecursionError before
    "header-nested": "nested too deeply",
    "config-bigint": "adapter_config.json is not valid JSON (Exceeds the limit (4300 digits)",  # ValueError before
    "header-many": "cannot read adapter_model.safetensors: 5000 tensors, above the 4096 an adapter can hold",
    # 4: keys the kind's reader would ignore
    "res-rslora": "use_rslora is true",
    "res-alpha-pattern": "sets alpha_pattern = {'q_proj': 64}, which RESLORA adapters do not define",
    "hydra-alpha-pattern": "sets alpha_pattern = {'gate_proj': 64}, which HYDRALORA adapters do not define",
    "hydra-rank-pattern": "sets rank_pattern = {'v_proj': 1}, which HYDRALORA adapters do not define",
    "hydra-alora": "sets alora_invocation_tokens = [5, 6], which HYDRALORA adapters do not define",
    # 5: chains that would merge into something never trained
    "res-chain-reversed": "is not in depth order: layer 0 comes after layer 1",
    "res-chain-split": "is split across 'chains'",
    "res-chain-duplicate": f"module {Q1!r} appears more than once in 'chains'",
}


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    llama = model_dirs["llama"]
    make_peft_adapter(llama, root / "good", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _variant(root, "good", "pattern-bad-rank", {"rank_pattern": {"q_proj(": 4}})
    _variant(root, "good", "pattern-bad-alpha", {"alpha_pattern": {"v_proj)": 2}})
    _variant(root, "good", "pattern-posix-targets", {"target_modules": ".*[[:digit:]].*"})  # regex: any digit
    _variant(root, "good", "pattern-posix-rank", {"rank_pattern": {"layers.[[:digit:]].self_attn.q_proj": 2}})
    _variant(root, "good", "pattern-fuzzy-alpha", {"alpha_pattern": {"(?:q_proj){e<=1}": 64}})
    _variant(root, "good", "pattern-fuzzy-targets", {"target_modules": ".*(?:q_proj){e<=1}"})
    _variant(root, "good", "pattern-slow-targets", {"target_modules": SLOW})
    _variant(root, "good", "pattern-slow-exclude", {"exclude_modules": SLOW})
    _variant(root, "good", "pattern-slow-rank", {"rank_pattern": {SLOW: 4}})
    _variant(root, "good", "pattern-slow-alpha", {"alpha_pattern": {SLOW: 2}})
    _variant(root, "good", "config-nested")
    (root / "config-nested" / "adapter_config.json").write_text("[" * 200_000)
    _variant(root, "good", "config-bigint")
    bigint = root / "config-bigint" / "adapter_config.json"
    bigint.write_text(bigint.read_text().replace('"lora_alpha": 8', '"lora_alpha": 1' + "0" * 5000))
    _variant(root, "good", "header-many",  # empty tensors: a big header over no data, each entry built before
             tensors={f"base_model.model.x{i}.lora_A.weight": torch.zeros(0) for i in range(5000)})
    _variant(root, "good", "header-nested")
    header = b"[" * 200_000
    (root / "header-nested" / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    tensors = load_file(root / "good" / "adapter_model.safetensors")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}
    _variant(root, "good", "fp8", tensors=fp8)
    _variant(root, "good", "fp8-widened", tensors={k: v.float() for k, v in fp8.items()})  # the same values in fp32
    first = sorted(fp8)[0]
    _variant(root, "good", "fp8-nan", tensors={**fp8, first: torch.full_like(tensors[first], float("nan"))
                                                                   .to(torch.float8_e4m3fn)})

    _, layers = make_reslora_model(llama, 3, "bs", 1, ["q_proj", "v_proj"])
    save_reslora(layers, root / "res", {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    assert json.loads((root / "res" / "adapter_config.json").read_text())["chains"] == [[Q0, Q1], [V0, V1]]
    for name, edit in {
            "res-structure-list": {"structure": ["bs"]},
            "res-stats-string": {"statistics": "none"},
            "res-stats-list": {"statistics": [1]},
            "res-stats-entry-string": lambda c: c["statistics"].__setitem__(Q0, "x"),
            "res-chain-number": {"chains": [[Q0, Q1], [V0, 1]]},
            "res-chain-mixed": {"chains": [[Q0, V1], [V0, Q1]]},
            "res-rslora": {"use_rslora": True},
            "res-alpha-pattern": {"alpha_pattern": {"q_proj": 64}},
            "res-chain-reversed": {"chains": [[Q1, Q0], [V1, V0]]},
            "res-chain-split": {"chains": [[Q0], [Q1], [V0, V1]]},
            "res-chain-duplicate": {"chains": [[Q0, Q1], [V0, V1, Q1]]},
            # what the readers keep serving: PEFT's "off" values, and README keys
            "res-neutral": {"use_rslora": False, "alpha_pattern": {}, "use_dora": False, "bias": "none"}}.items():
        _variant(root, "res", name, edit)

    _, layers = make_hydra_model(llama, 4, 2, 4, 8, ["q_proj", "v_proj", "gate_proj", "up_proj"])
    save_hydralora(layers, root / "hydra", {"r": 4, "lora_alpha": 8, "lora_nums": 2})
    _variant(root, "hydra", "hydra-alpha-pattern", {"alpha_pattern": {"gate_proj": 64}})
    _variant(root, "hydra", "hydra-rank-pattern", {"rank_pattern": {"v_proj": 1}})
    _variant(root, "hydra", "hydra-alora", {"alora_invocation_tokens": [5, 6]})
    _variant(root, "hydra", "hydra-neutral", {"alpha_pattern": {}, "rank_pattern": None, "use_dora": False,
                                              "inference_mode": True, "peft_version": "0.21.2"})
    return root


@pytest.fixture(scope="module")
def client(model_dirs, adapter_root):
    from adapters import targets
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(targets, "MATCH_SECONDS", 0.25)  # the slow patterns' time limit, not the default 5 s each
        server = start_server(model_dirs["llama"], adapter_root, max_lora_rank=16)
        try:
            with Client(server.target, timeout=60) as c:
                yield c
        finally:
            server.stop()


@pytest.mark.parametrize("adapter_id", list(REFUSED))
def test_refused_on_load_and_on_generate_naming_the_key(client, adapter_id):
    code, details = status_of(client.load_adapter, adapter_id)
    assert code == C.FAILED_PRECONDITION and REFUSED[adapter_id] in details, details
    code, details = status_of(client.generate, PROMPT, adapter_id, max_new_tokens=2)  # auto-load
    assert code == C.FAILED_PRECONDITION and REFUSED[adapter_id] in details, details


def _tokens(client, adapter_id):
    return list(client.generate(PROMPT, adapter_id, max_new_tokens=8, ignore_eos=True).token_ids)


def test_fp8_e4m3_weights_are_served_as_their_exact_values(client):
    assert _tokens(client, "fp8") == _tokens(client, "fp8-widened")


@pytest.mark.parametrize("adapter_id,same_as", [("res-neutral", "res"), ("hydra-neutral", "hydra")])
def test_off_values_of_peft_keys_still_load(client, adapter_id, same_as):
    assert _tokens(client, adapter_id) == _tokens(client, same_as)


ODD = [None, True, 0, -1, 2 ** 70, 1.5, float("nan"), "x", "", [], [1], [[1]], ["x"], {}, {"a": 1}, {"q_proj": "x"},
       {Q0: "x"}, {Q0: {"input_norm": "x"}}]


@pytest.mark.parametrize("source", ["good", "res", "hydra"])
def test_odd_config_values_are_refused_by_name_never_an_unexpected_exception(model_dirs, adapter_root, source):
    """Every key of each kind's config (and the optional ones), set to values of every JSON type: the reader serves
    the adapter or refuses it, and no other exception (which the server answers INTERNAL) comes out."""
    from loader.base_model import load_base_model
    from loader.inject import base_weight, inject
    from loader.peft_files import read_adapter
    from server.errors import FailedPrecondition
    base = load_base_model(str(model_dirs["llama"]), "cpu", "float32")
    shapes = {s.name: s for s in inject(base.model)[1]}
    config = json.loads((adapter_root / source / "adapter_config.json").read_text())
    for key in dict.fromkeys([*config, "rank_pattern", "alpha_pattern", "statistics", "chains", "structure"]):
        for value in ODD:
            try:
                read_adapter(adapter_root / source, source, shapes, 16, 1, config={**config, key: value},
                             base_weight=lambda name: base_weight(base.model, name))
            except FailedPrecondition:
                pass
