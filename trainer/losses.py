"""The two losses of SCIENCE.md: answer-token cross-entropy and the self-distillation KL.

Both work on next-token logits: position t predicts token t+1, so logits[:, :-1] pair with
labels[:, 1:]. `loss_positions` returns that shifted mask, so CE and KL agree on where they apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.tokenize import IGNORE


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T-1]: positions whose next token is an answer token."""
    return labels[:, 1:] != IGNORE


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over answer tokens of the batch (every answer token weighs the same)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    positions: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over `positions`.

    Forward KL, teacher first (Hinton 2015; Li & Hoiem 2017). Logits are already shifted-aligned
    with `positions` ([B, T-1, V] and [B, T-1]). Computed in float32 for stability under bf16.
    """
    s = student_logits[positions].float() / temperature
    t = teacher_logits[positions].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2
