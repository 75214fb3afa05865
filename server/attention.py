"""Which attention each layer of the base model runs, as the masks the batch hands the HF forward.

The batch builds its own boolean masks (left-padded rows on one shared time axis), and a mask handed to an HF
model replaces the one it would build itself, sliding windows included. So the windows are applied here, the
way transformers' masking_utils does: a query at position p sees keys at positions > p - window. Models whose
config lists `layer_types` take one mask per type (a dict: Gemma-3, Qwen2 with use_sliding_window, ...); models
without them apply `sliding_window`, when set, on every layer (Mistral, Phi-3, Starcoder2). Anything else (chunked
or linear attention, ALiBi) is refused when the server starts, never served with the wrong mask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

SERVED_TYPES = ("full_attention", "sliding_attention")
ALIBI_FAMILIES = ("bloom", "mpt")  # always ALiBi; Falcon only with its `alibi` setting
log = logging.getLogger("loraplex.attention")


class UnsupportedAttention(ValueError):
    """The model's attention is not one this server builds masks for; the message says which."""


@dataclass(frozen=True)
class AttentionLayout:
    window: int | None         # keys a query sees, itself included, on sliding layers; None: no sliding layer
    layer_types: tuple[str, ...] | None  # the mask types to hand over as a dict; None: one mask for every layer

    @classmethod
    def of(cls, config) -> AttentionLayout:
        config = config.get_text_config()
        if config.model_type in ALIBI_FAMILIES or _setting(config, "alibi"):
            raise UnsupportedAttention("the model uses ALiBi attention biases, which this server does not build")
        window, types = _setting(config, "sliding_window"), _setting(config, "layer_types")
        if types is not None:
            types = tuple(dict.fromkeys(types))
            unknown = [t for t in types if t not in SERVED_TYPES]
            if unknown:
                raise UnsupportedAttention(f"the model has {', '.join(unknown)} layers; this server serves "
                                           f"{' and '.join(SERVED_TYPES)} only")
            if "sliding_attention" not in types:
                return cls(None, None)
        if window is None:
            return cls(None, None)
        if not isinstance(window, int) or window < 1:
            raise UnsupportedAttention(f"the model's sliding_window is {window!r}, not a positive number of tokens")
        return cls(window, types)

    def masks(self, full: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor):
        """The mask(s) for the forward, from `full` [B, 1, Q, K] (causal and padding) and the positions of the
        queries [B, Q] and keys [B, K]: one tensor, or {layer type: tensor}."""
        if self.window is None:
            return full
        sliding = full & (key_pos[:, None, None, :] > query_pos[:, None, :, None] - self.window)
        if self.layer_types is None:
            return sliding
        return {t: sliding if t == "sliding_attention" else full for t in self.layer_types}


def _setting(config, name: str):
    """The config's value for `name` where its class declares it. A config.json may carry keys its model family
    never reads (a Llama converted from a Mistral keeps sliding_window): transformers ignores them, so must we."""
    declared = any(name in getattr(k, "__annotations__", {}) for k in type(config).__mro__) or \
        isinstance(getattr(type(config), name, None), property) or name in getattr(config, "attribute_map", {})
    # (a property or an alias in attribute_map is a setting too: RecurrentGemma's and Jamba's layer_types)
    value = getattr(config, name, None)
    if not declared and value not in (None, False):
        log.info("config %s = %r is not a setting of %s models; ignored, as transformers does", name, value,
                 config.model_type)
        return None
    return value
