"""Teachers for self-distillation: frozen models whose next-token distributions the student is
pulled toward. Each gives logits for a batch under no_grad and costs one forward pass; or, for
the teacher cache, the last hidden states its LM head reads and that head's frozen weight."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from trainer.losses import _has_plain_lm_head, hidden_at, logits_at


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


class _Teacher:
    """What every teacher gives: its outputs at `where`, read within `_as_teacher()`."""

    model: torch.nn.Module

    def _as_teacher(self):
        return _dropout_off(self.model)  # a caller may have put the model in train mode

    @torch.no_grad()
    def logits_at(self, input_ids, attention_mask, where):
        with self._as_teacher():
            return logits_at(self.model, input_ids, attention_mask, where)

    @torch.no_grad()
    def hidden_at(self, input_ids, attention_mask, where):
        with self._as_teacher():
            return hidden_at(self.model, input_ids, attention_mask, where)

    def lm_head_weight(self) -> torch.Tensor | None:
        """W where the teacher's logits are exactly hidden @ W^T and no training step changes W:
        a plain bias-free linear head (not an adapter's, nor trained); else None."""
        head = self.model.get_output_embeddings() if _has_plain_lm_head(self.model) else None
        if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
            return None
        return head.weight


class AdapterOffTeacher(_Teacher):
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

    @contextmanager
    def _as_teacher(self):
        with self._adapters_off(), _dropout_off(self.model):
            yield


class NamedAdapterTeacher(_Teacher):
    """format_warmup under LoRA: a second, frozen adapter on the same base weights."""

    def __init__(self, peft_model, name: str):
        self.model, self.name = peft_model, name

    @contextmanager
    def _as_teacher(self):
        # set_adapter also flips requires_grad to the active adapter; switching back restores it.
        self.model.set_adapter(self.name)
        try:
            with _dropout_off(self.model):
                yield
        finally:
            self.model.set_adapter("default")


class FrozenCopyTeacher(_Teacher):
    """Under full fine-tuning the student's weights move, so the teacher is a frozen copy."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
