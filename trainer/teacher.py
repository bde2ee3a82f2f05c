"""Teachers for self-distillation: frozen models whose next-token distributions the student is
pulled toward. Each gives logits for a batch under no_grad and costs one forward pass."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from trainer.losses import logits_at


@contextmanager
def _dropout_off(model):
    """The teacher is a fixed distribution: no dropout, even when it shares the student's modules
    (which train with dropout, e.g. GPT-2's 0.1). Mode is restored module by module."""
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in training:
            m.training = mode


class AdapterOffTeacher:
    """teacher=base under LoRA: the same weights with the adapter switched off; no extra memory.

    PEFT's `disable_adapter()` also flips requires_grad on every adapter weight on the way in and
    out, which costs ~3 ms a step on the built-in model (6% of an SD step). The LoRA forward only
    reads each layer's `disable_adapters` flag, so we flip just that flag on the layers we found
    once. (If PEFT stopped reading it, the teacher would equal the student and the KL would stay
    zero; tests/trainer/test_loop.py checks that it does not.)
    """

    def __init__(self, peft_model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = peft_model
        self.layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]

    @contextmanager
    def _adapters_off(self):
        for layer in self.layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer._disable_adapters = False

    @torch.no_grad()
    def logits_at(self, input_ids, attention_mask, where):
        with self._adapters_off(), _dropout_off(self.model):
            return logits_at(self.model, input_ids, attention_mask, where)


class NamedAdapterTeacher:
    """format_warmup under LoRA: a second, frozen adapter on the same base weights."""

    def __init__(self, peft_model, name: str):
        self.model, self.name = peft_model, name

    @torch.no_grad()
    def logits_at(self, input_ids, attention_mask, where):
        # set_adapter also flips requires_grad to the active adapter; switching back restores it.
        self.model.set_adapter(self.name)
        try:
            with _dropout_off(self.model):
                return logits_at(self.model, input_ids, attention_mask, where)
        finally:
            self.model.set_adapter("default")


class FrozenCopyTeacher:
    """Under full fine-tuning the student's weights move, so the teacher is a frozen copy."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logits_at(self, input_ids, attention_mask, where):
        with _dropout_off(self.model):  # a caller may have put the copy back in train mode
            return logits_at(self.model, input_ids, attention_mask, where)
