"""Numeric precision of a training run, and micro-batches under a token budget.

Weights and AdamW state stay float32 (master weights) on every device: a bf16 weight cannot
take an update smaller than 1/256 of itself, so with pure bf16 weights most small AdamW steps
silently round to nothing. On CUDA the forward and backward run under autocast: bf16 where the
device has it, else fp16 with a GradScaler (fp16's range is too narrow for unscaled gradients).
The CPU runs plain float32.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    device: torch.device
    compute_dtype: torch.dtype  # autocast dtype; float32 means no autocast
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> Precision:
        if device.type != "cuda":
            return cls(device, torch.float32)
        if torch.cuda.is_bf16_supported():
            return cls(device, torch.bfloat16)
        return cls(device, torch.float16, torch.amp.GradScaler("cuda"))

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer, params, max_grad_norm: float) -> None:
        """Clip the true (unscaled) gradient norm, then step; a scaler skips inf/nan steps."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def micro_batches(lengths: list[int], token_budget: int | None) -> list[list[int]]:
    """Split a batch (positions 0..n-1 with these token lengths) into consecutive micro-batches
    whose padded size (rows x longest row) stays within `token_budget`; a row longer than the
    budget goes alone. None: one micro-batch."""
    if token_budget is None:
        return [list(range(len(lengths)))]
    out: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > token_budget:
            out.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        out.append(current)
    return out
