"""Which linear modules an adapter targets: PEFT's matching rule, shared by serving and training."""
from __future__ import annotations

import logging
import re
import warnings
import weakref

import regex
import torch
from torch import nn

log = logging.getLogger("loraplex.adapters")
ALL_LINEAR = "all-linear"
_NAME = re.compile(r"[\w.-]+")  # what a module path is made of (a regex's *, [, ( or \\ never is)
# An adapter config's patterns are matched against every module path of the model. Python's re backtracks without
# bound and holds the GIL meanwhile: one config's target_modules "(.*)*x" froze the whole server, health checks
# included. The regex module reads the same syntax (but POSIX classes, [[:digit:]], which re reads as a set), releases
# the GIL (concurrent) and stops after a time limit: the process's CPU time, which its busy threads spend too, so it
# is set far above what a real pattern takes on a module path (microseconds).
MATCH_SECONDS = 5.0


class SlowPattern(Exception):
    """A config's pattern (`what` names where it stands) ran past the time limit on one module path."""

    def __init__(self, what: str, pattern: str, name: str, seconds: float) -> None:
        super().__init__(f"{what} {pattern!r} took over {seconds} s to match module path {name!r}")
        self.what, self.pattern, self.name, self.seconds = what, pattern, name, seconds


def pattern_matches(what: str, pattern: str, name: str, full: bool = True) -> bool:
    """`pattern` against module path `name` (re's syntax and semantics: fullmatch, or match at the start), within
    MATCH_SECONDS of process CPU time; SlowPattern past that."""
    seconds = MATCH_SECONDS
    try:
        found = (regex.fullmatch if full else regex.match)(pattern, name, timeout=seconds, concurrent=True)
    except TimeoutError:
        raise SlowPattern(what, pattern, name, seconds) from None
    return found is not None


# braces that are no repeat count ({2}, {2,}, {,3}, {2,3}), not escaped: literal text to re, fuzzy matching to the
# regex module where they hold e, i, s or d ((?:q_proj){e<=1}: within one edit of q_proj, so k_proj too)
_BRACES = re.compile(r"(?<!\\)\{(?!\d*,?\d*\})[^}]*\}")


def read_otherwise(pattern: str) -> str | None:
    """Why the regex module may read `pattern` otherwise than re (which PEFT matches with), or None: braces that are
    no repeat count (fuzzy matching to regex), and the constructs re warns of (nested sets and set operations: regex
    reads [[:digit:]] as a POSIX class, re as a set of '[', ':', 'd', ... followed by ']'). re.error where re cannot
    compile it."""
    re.purge()  # a cached pattern is not parsed again, so it would not warn again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        re.compile(pattern)
    braces = _BRACES.search(pattern)
    if braces:
        return (f"{braces.group()} is literal text to re, which no module path holds, and may be fuzzy matching to "
                f"the regex module (within so many edits); write the names it should match")
    warned = next((str(w.message) for w in caught if issubclass(w.category, FutureWarning)), None)
    return None if warned is None else f"re warns: {warned} (a POSIX class such as [[:digit:]] is a set to re: " \
                                       f"write [0-9])"


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or GPT-2 Conv1D whose output is its affine map of the input, to which a delta can be added. A
    subclass with a forward of its own is run once to see: MoE routers (PhiMoE's, Llama-4's) subclass nn.Linear but
    return (scores, experts) tuples, while FalconLinear computes the plain map its own way."""
    if type(module).__name__ == "Conv1D":
        return True
    if not isinstance(module, nn.Linear):
        return False
    if type(module).forward is nn.Linear.forward:
        return True
    if module not in _AFFINE:
        _AFFINE[module] = _computes_its_affine_map(module)
    return _AFFINE[module]


_AFFINE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()  # probes' answers, per module


def _computes_its_affine_map(module: nn.Linear) -> bool:
    weight = module.weight
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            got, want = module(x), nn.functional.linear(x, weight, module.bias)
    except Exception:  # whatever cannot run on a plain input is no linear layer to adapt
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and \
        torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def matches(spec: str | list[str] | None, name: str, what: str = "target_modules") -> bool:
    """A string is a full-match regex (or 'all-linear', in any case, as PEFT reads it); a list matches a name or its
    dotted suffix. `what` names the spec in a SlowPattern."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec.lower() == ALL_LINEAR or pattern_matches(what, spec, name)
    return any(name == t or name.endswith("." + t) for t in spec)


def never_run(model: nn.Module) -> tuple[str, ...]:
    """The submodules a text forward of a multimodal checkpoint (Gemma-3 4b+) never runs: its vision or audio towers
    and their projectors. Found once per model: the siblings of each module on the path to its text model
    (get_decoder()), but the output head, less those a forward of text ids runs (Gemma-3n embeds the multimodal
    token ids of a text through embed_vision and embed_audio). A text model (its config is its own text config)
    has none."""
    if model not in _NEVER_RUN:
        _NEVER_RUN[model] = _never_run(model)
    return _NEVER_RUN[model]


_NEVER_RUN: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _never_run(model: nn.Module) -> tuple[str, ...]:
    config = getattr(model, "config", None)
    if config is None or config.get_text_config() is config:
        return ()
    text, head = model.get_decoder(), model.get_output_embeddings()
    path = next((name for name, m in model.named_modules() if m is text), "")
    siblings, holder = [], ""
    for part in path.split(".") if path else ():
        siblings += [f"{holder}.{name}".lstrip(".") for name, child in model.get_submodule(holder).named_children()
                     if name != part and child is not head]
        holder = f"{holder}.{part}".lstrip(".")
    if not siblings:
        return ()
    siblings, ran = tuple(siblings), set()
    hooks = [module.register_forward_hook(lambda *_, name=name: ran.add(name))
             for name, module in model.named_modules() if under(name, siblings)]
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a training run's seeded draws stay as they were
            model.eval()(input_ids=torch.tensor([[0, 1, 2]], device=next(model.parameters()).device),
                         use_cache=False)
    except Exception as exc:  # a forward that cannot run so proves nothing: every module stays adaptable
        log.warning("a forward of text ids alone failed (%s: %s), so %s stay adaptable, though a text request may "
                    "never run them", type(exc).__name__, exc, ", ".join(siblings))
        return ()
    finally:
        for module, training in modes.items():  # each as it was (train() would set all as the root)
            module.training = training
        for hook in hooks:
            hook.remove()
    return tuple(root for root in siblings if not any(under(name, (root,)) for name in ran))


def under(name: str, roots: tuple[str, ...]) -> bool:
    """Whether module path `name` is one of `roots` or inside one."""
    return any(name == root or name.startswith(root + ".") for root in roots)


def linear_modules(model: nn.Module, spec: str | list[str] = ALL_LINEAR,
                   exclude: str | list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D modules matching `spec` that a text forward runs: never the output head, nor a multimodal
    checkpoint's other towers (adapting them would fill slots, and train factors, that no request ever uses)."""
    output, skipped = model.get_output_embeddings(), never_run(model)
    return [(name, m) for name, m in model.named_modules()
            if is_linear(m) and m is not output and not under(name, skipped) and matches(spec, name)
            and not matches(exclude, name)]


def parse_targets(value, name: str = "--target-modules",
                  default: str = "the method's default") -> list[str] | str | None:
    """A --target-modules value (`loraplex serve` and `train`) or a --jobs line's "target_modules", read alike: None
    (`default`), all-linear, or module names (a string is split at commas, each name stripped of spaces; a JSON
    list is taken as the names). An empty value or name, or a pattern, is a ValueError naming `name`: falling back
    to the default would adapt other modules than asked for."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip() == ALL_LINEAR:
        return ALL_LINEAR
    how = f"{name} takes module names, comma-separated ('q_proj,v_proj') or as a JSON list, or {ALL_LINEAR}; " \
          f"leave it out for {default}"
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(part, str) for part in value):
        names = [part.strip() for part in value]
    else:
        raise ValueError(f"{name} {value!r}: {how}")
    if not names or not all(names):
        raise ValueError(f"{name} {value!r}: {'is empty' if not any(names) else 'holds an empty name'}; {how}")
    odd = [part for part in names if not _NAME.fullmatch(part)]
    if odd:
        raise ValueError(f"{name}: {odd[0]!r} is not a module name (a name matches a module or its dotted suffix, "
                         f"e.g. q_proj or mlp.c_proj; patterns are not taken); {how}")
    return names
