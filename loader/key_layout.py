"""How an adapter's tensor keys name the base model's modules: transformers renamed some models' modules (Gemma-3's
`language_model.model.*` became `model.language_model.*` in 4.52), and PEFT loads adapters saved before with the
same renamings; a multimodal checkpoint's vision tower is a module a text forward never runs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adapters.targets import never_run, under


@dataclass(frozen=True)
class KeyLayout:
    renamings: tuple = ()  # transformers' WeightRenaming entries for the model (its checkpoint conversion mapping)
    skipped: tuple[str, ...] = ()  # module paths a text forward never runs (adapters.targets.never_run)

    def rename(self, path: str) -> str:
        """A key's path (without PEFT's prefix) in the model's current layout: unchanged where none applies."""
        if not self.renamings:
            return path
        from transformers.core_model_loading import rename_source_key
        return rename_source_key(path, list(self.renamings), [])[0]

    def never_runs(self, path: str) -> bool:
        return under(path, self.skipped)


def key_layout(model: nn.Module) -> KeyLayout:
    try:  # the renamings transformers applies when it loads an older checkpoint of this model (None for most)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        renamings = tuple(c for c in get_model_conversion_mapping(model) or () if isinstance(c, WeightRenaming))
    except Exception:  # not a transformers model, or a transformers without them: keys are taken as they are
        renamings = ()
    return KeyLayout(renamings, never_run(model))
