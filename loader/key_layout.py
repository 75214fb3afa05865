"""How an adapter's tensor keys name the base model's modules: transformers renamed some models' modules (Gemma-3's
`language_model.model.*` became `model.language_model.*` in 4.52), and PEFT loads LoRA adapters saved before with
the same renamings; a multimodal checkpoint's vision tower is a module a text forward never runs."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from torch import nn

from adapters.targets import never_run, under


@dataclass(frozen=True)
class KeyLayout:
    modules: frozenset[str] = frozenset()  # the model's module paths (its current layout)
    renamings: tuple = ()  # transformers' WeightRenaming entries for the model (its checkpoint conversion mapping)
    skipped: tuple[str, ...] = ()  # module paths a text forward never runs (adapters.targets.never_run)

    def renamer(self) -> Callable[[str], str]:
        """For one adapter's keys: a key's path (PEFT's prefix off) in the model's current layout. A key whose
        module is one of the model's is in it already: renamings are for older layouts, and some would change a
        current name again (Laguna's "mlp.shared_expert." pattern turns shared_experts into shared_experts..).
        Fresh copies of the renamings: some keep state from one key to the next."""
        if not self.renamings:
            return lambda path: path
        from transformers.core_model_loading import rename_source_key
        renamings = copy.deepcopy(list(self.renamings))

        def rename(path: str) -> str:
            if path.rsplit(".lora_", 1)[0] in self.modules:
                return path
            return rename_source_key(path, renamings, [])[0]
        return rename

    def never_runs(self, path: str) -> bool:
        return under(path, self.skipped)


def key_layout(model: nn.Module) -> KeyLayout:
    try:  # the renamings transformers applies when it loads an older checkpoint of this model
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        renamings = tuple(c for c in get_model_conversion_mapping(model) or () if isinstance(c, WeightRenaming))
    except Exception:  # not a transformers model, or a transformers without them: keys are taken as they are
        renamings = ()
    return KeyLayout(frozenset(name for name, _ in model.named_modules()), renamings, never_run(model))
