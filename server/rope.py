"""LongRoPE per row: each row of a batch gets the rotary factors it would get alone.

transformers' longrope rotary embedding (Phi-3-mini-128k, Phi-3.5, Phi-4-mini, Phi-3.5-MoE) picks its short or long
factors (and, for Phi-3.5-MoE, its scale) from `max(position_ids) + 1 > original_max_position_embeddings` over the
whole forward call, so in a batch one row past the original length switched every row to the long factors. The
wrapper installed here runs the model's own rotary forward twice, once with one more position equal to the original
length (long factors for every row; that column is dropped) and once with the long rows' positions zeroed (short
factors for everyone), and gives each row the result of its own choice: its own largest position + 1 against the
original length, as HF decides for that request alone, or, while a prompt runs in chunks (LongRope.whole_prompts),
its whole prompt's length, as HF decides in one pass. Pad positions are 0 (server/batch.py), so they never raise a
row's choice. No host sync is added.

HF generate for the Phi-3 families also drops the KV cache when a sequence first passes the original length
(`prepare_inputs_for_generation`: the cached keys were rotated with the short factors) and recomputes the whole
sequence with the long ones. `LongRope.recompute_at` names that position for those families; the batch runner then
recomputes such a row's cache alone (Runner.decode_step). Other families keep their cached keys, as HF does.
`rope_type: dynamic` needs nothing: its frequencies change only past max_position_embeddings, the server's context.
"""
from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger("loraplex.rope")

# Families whose causal LM's prepare_inputs_for_generation drops the cache when the sequence reaches
# config.original_max_position_embeddings + 1 tokens (tests/test_longrope.py checks this list against transformers).
RECOMPUTING_FAMILIES = ("phi3", "phimoe", "phi4_multimodal")


@dataclass(frozen=True)
class LongRope:
    original_length: int          # original_max_position_embeddings: longer sequences take the long factors
    recompute_at: int | None      # the position whose decode step recomputes a row's cache; None: never
    modules: tuple[torch.nn.Module, ...] = ()  # the wrapped rotary embeddings

    @contextmanager
    def whole_prompts(self, lengths: torch.Tensor):
        """Within: row i takes its factors from `lengths[i]` (its whole prompt) instead of the positions of one
        forward, so a prompt run in chunks (server/batch.py) gets the factors HF gives it in one pass."""
        for module in self.modules:
            module._loraplex_whole = lengths
        try:
            yield
        finally:
            for module in self.modules:
                module._loraplex_whole = None

    @classmethod
    def install(cls, model: torch.nn.Module) -> LongRope | None:
        """Make every longrope rotary embedding of `model` choose its factors per row (idempotent); None where the
        model has none."""
        installed = {module: _install(module) for module in model.modules()}
        lengths = sorted({n for n in installed.values() if n is not None})
        if not lengths:
            return None
        config = model.config.get_text_config()
        boundary = getattr(config, "original_max_position_embeddings", None)
        recompute_at = int(boundary) if config.model_type in RECOMPUTING_FAMILIES and boundary else None
        log.info("longrope: each row takes the long factors past its own %s positions%s", lengths[0],
                 f"; a row reaching position {recompute_at} has its cache recomputed, as HF generate does"
                 if recompute_at is not None else "")
        return cls(lengths[0], recompute_at, tuple(m for m, n in installed.items() if n is not None))


def _original_lengths(module) -> dict[str | None, int]:
    """{layer type (None: the module's only one): original_max_position_embeddings} of its longrope types."""
    rope_type = getattr(module, "rope_type", None)
    parameters = getattr(getattr(module, "config", None), "rope_parameters", None)
    if not isinstance(parameters, dict):
        return {}
    kinds = {None: rope_type} if isinstance(rope_type, str) else rope_type if isinstance(rope_type, dict) else {}
    lengths = {}
    for layer_type, kind in kinds.items():
        own = parameters if layer_type is None else parameters.get(layer_type)
        if kind == "longrope" and isinstance(own, dict) and own.get("original_max_position_embeddings"):
            lengths[layer_type] = int(own["original_max_position_embeddings"])
    return lengths


def _install(module: torch.nn.Module) -> int | None:
    """Wrap one rotary embedding's forward if it is longrope; returns its (smallest) original length, or None."""
    lengths = _original_lengths(module)
    if not lengths:
        return None
    if getattr(module, "_loraplex_per_row", False):
        return min(lengths.values())
    own = module.forward  # the model's rotary forward, HF's longrope switch included

    def forward(self, x, position_ids, *args, **kwargs):
        layer_type = kwargs.get("layer_type", args[0] if args else None)
        original = lengths.get(layer_type)
        whole = self._loraplex_whole  # [B] each row's whole prompt while it runs in chunks; None: this forward
        if original is None or position_ids is None or position_ids.dim() != 2 or \
                (whole is None and position_ids.shape[0] == 1):
            return own(x, position_ids, *args, **kwargs)  # one row (or rows sharing positions): HF's choice is its own
        long = (whole if whole is not None else position_ids.amax(dim=-1) + 1) > original  # [B]: each row's choice
        # Long factors for every row: one more position past the original length decides HF's switch, then is dropped
        beyond = torch.cat([position_ids, position_ids.new_full((position_ids.shape[0], 1), original)], dim=1)
        cos, sin = (t[:, :-1] for t in own(x, beyond, *args, **kwargs))
        short_cos, short_sin = own(x, position_ids.masked_fill(long[:, None], 0), *args, **kwargs)
        pick = long.view(-1, *([1] * (cos.dim() - 1)))
        return torch.where(pick, cos, short_cos), torch.where(pick, sin, short_sin)

    module.forward = types.MethodType(forward, module)
    module._loraplex_per_row = True
    module._loraplex_whole = None
    return min(lengths.values())
