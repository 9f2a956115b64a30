"""LoRA through peft: train low-rank adapters instead of every weight (`training.lora`).

For reference-based methods the reference is the same model with its adapters switched off
(`AdapterDisabled`): there is no second copy in memory, and the numbers are those of the starting checkpoint,
so the shared reference-log-prob cache (keyed by that checkpoint) still applies. An SFT trial's adapters are
merged into the weights before its checkpoint is saved: preference stages start from a plain model."""

from __future__ import annotations

import torch


def apply_lora(model, lora_spec) -> torch.nn.Module:
    """Wrap `model` with fresh LoRA adapters (only they train); weights of the base model are frozen."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora_spec.target_modules if m not in names]
    if missing:
        raise ValueError(f"training.lora.target_modules {missing} are not modules of this model (it has e.g. "
                         f"{', '.join(sorted(n for n in names if n.endswith('proj'))[:8])})")
    config = LoraConfig(r=lora_spec.r, lora_alpha=lora_spec.alpha, lora_dropout=lora_spec.dropout,
                        target_modules=list(lora_spec.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


class AdapterDisabled(torch.nn.Module):
    """The reference view of a LoRA model: every call runs the model in eval mode with its adapters off. The
    model is held outside the module tree, so .eval()/.train() on this view never change the policy's mode."""

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "_peft", peft_model)

    def _call(self, fn, *args, **kwargs):
        model = self._peft
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return fn(*args, **kwargs)
        finally:
            model.train(was_training)

    def forward(self, *args, **kwargs):
        return self._call(self._peft, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._call(self._peft.generate, *args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self._peft.parameters(recurse)


def merged(model) -> torch.nn.Module:
    """A plain model with the adapters folded into its weights (what later stages load), or `model` itself."""
    return model.merge_and_unload() if is_lora(model) else model
