"""Teachers for self-distillation: frozen models whose next-token distributions the student is
pulled toward. Each gives logits for a batch under no_grad and costs one forward pass."""

from __future__ import annotations

import copy

import torch


class AdapterOffTeacher:
    """teacher=base under LoRA: the same weights with the adapter switched off; no extra memory."""

    def __init__(self, peft_model):
        self.model = peft_model

    @torch.no_grad()
    def logits(self, input_ids, attention_mask):
        with self.model.disable_adapter():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class NamedAdapterTeacher:
    """format_warmup under LoRA: a second, frozen adapter on the same base weights."""

    def __init__(self, peft_model, name: str):
        self.model, self.name = peft_model, name

    @torch.no_grad()
    def logits(self, input_ids, attention_mask):
        # set_adapter also flips requires_grad to the active adapter; switching back restores it.
        self.model.set_adapter(self.name)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.model.set_adapter("default")


class FrozenCopyTeacher:
    """Under full fine-tuning the student's weights move, so the teacher is a frozen copy."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logits(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
