"""Vocabulary-wide quantities computed a few rows at a time.

With real vocabularies (32k-256k entries) a float32 [positions x vocab] tensor for a whole batch
is the largest thing in a step: 2,048 answer positions x 151,936 entries is 1.2 GB, and log-softmax,
its exponent and their product are three more. Here every such quantity runs over `rows` positions
at a time, and the autograd functions recompute in backward instead of saving float32 copies, so
the extra memory is a few [rows x vocab] float32 tensors whatever the batch
(tests/trainer/test_vocab_chunks.py measures it at vocab 151,936).

The logits themselves ([positions x vocab], in the compute dtype) come from the LM head at the
loss positions only (`trainer.losses.logits_at`); their gradient has the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_BYTES = 32 * 2**20  # float32 bytes of one [rows x vocab] block


def rows_per_chunk(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _spans(n: int, rows: int):
    return ((a, min(n, a + rows)) for a in range(0, n, rows))


class _KLSum(torch.autograd.Function):
    """sum over rows of w_row * KL(softmax(t / tau) || softmax(s / tau)); gradient to `s` only."""

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature: float, rows: int):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a, b in _spans(student.size(0), rows):
            log_p_s = F.log_softmax(student[a:b].float() / temperature, dim=-1)
            log_p_t = F.log_softmax(teacher[a:b].float() / temperature, dim=-1)
            per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
            total += (per_row * weights[a:b]).sum()
        ctx.save_for_backward(student, teacher, weights)
        ctx.temperature, ctx.rows = temperature, rows
        return total

    @staticmethod
    def backward(ctx, grad):
        student, teacher, weights = ctx.saved_tensors
        tau = ctx.temperature
        out = torch.empty_like(student)
        for a, b in _spans(student.size(0), ctx.rows):
            p_s = F.softmax(student[a:b].float() / tau, dim=-1)
            p_t = F.softmax(teacher[a:b].float() / tau, dim=-1)
            scale = (grad / tau) * weights[a:b, None]  # d KL / d s = (p_s - p_t) / tau
            out[a:b] = ((p_s - p_t) * scale).to(out.dtype)
        return out, None, None, None, None


class _CESum(torch.autograd.Function):
    """sum over rows of -log softmax(logits)[target]."""

    @staticmethod
    def forward(ctx, logits, targets, rows: int):
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for a, b in _spans(logits.size(0), rows):
            x = logits[a:b].float()
            total += (torch.logsumexp(x, -1) - x.gather(-1, targets[a:b, None])[:, 0]).sum()
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        for a, b in _spans(logits.size(0), ctx.rows):
            g = F.softmax(logits[a:b].float(), dim=-1)
            g[torch.arange(b - a, device=g.device), targets[a:b]] -= 1.0
            out[a:b] = (g * grad).to(out.dtype)
        return out, None, None


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
           rows: int | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over positions of KL(softmax(teacher/tau) || softmax(student/tau)) (no tau^2),
    each position's term times its weight when `weights` [N] is given."""
    if student.size(0) == 0:
        return student.sum() * 0.0
    if weights is None:
        weights = torch.ones(student.size(0), device=student.device)
    return _KLSum.apply(student, teacher.detach(), weights.detach().float(), float(temperature),
                        rows or rows_per_chunk(student.size(-1)))


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Sum over positions of the cross-entropy of `targets` under `logits`."""
    if logits.size(0) == 0:
        return logits.sum() * 0.0
    return _CESum.apply(logits, targets, rows or rows_per_chunk(logits.size(-1)))


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   rows: int | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row, float32, without a full log-softmax."""
    rows = rows or rows_per_chunk(logits.size(-1))
    out = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    for a, b in _spans(logits.size(0), rows):
        x = logits[a:b].float() / temperature
        out[a:b] = x.gather(-1, targets[a:b, None])[:, 0] - torch.logsumexp(x, -1)
    return out


@dataclass
class TopLogprobs:
    """Per position: the k largest log-probs, their token ids, and the log of the mass outside
    them. With k >= vocab nothing is dropped (`indices` is None: every token, in order)."""

    values: torch.Tensor  # [N, k] float32
    indices: torch.Tensor | None  # [N, k] int64, or None for the full vocabulary
    rest: torch.Tensor  # [N] log of the remaining mass (-inf when none)


TOP_K = 512  # covers every token of the built-in model's vocabulary: its drift stays exact


@torch.no_grad()
def top_logprobs(logits: torch.Tensor, k: int = TOP_K, at: torch.Tensor | None = None,
                 rows: int | None = None) -> TopLogprobs:
    """Log-probs of `logits` [N, V] kept at k entries per row: the k largest, or the given `at`
    indices [N, k] (to read a second model at the first one's tokens)."""
    vocab = logits.size(-1)
    rows = rows or rows_per_chunk(vocab)
    values, indices, rest = [], [], []
    for a, b in _spans(logits.size(0), rows):
        logp = F.log_softmax(logits[a:b].float(), dim=-1)
        if k >= vocab and at is None:
            values.append(logp.cpu())
            rest.append(torch.full((b - a,), float("-inf")))
            continue
        idx = at[a:b].to(logp.device) if at is not None else logp.topk(k, dim=-1).indices
        kept = logp.gather(-1, idx)
        values.append(kept.cpu())
        indices.append(idx.cpu())
        rest.append(torch.log1p(-kept.exp().sum(-1).clamp(max=1 - 1e-7)).cpu())
    empty = torch.empty((0, min(k, vocab)))
    return TopLogprobs(torch.cat(values) if values else empty,
                       torch.cat(indices) if indices else None,
                       torch.cat(rest) if rest else torch.empty(0))


def mean_kl_top(p: TopLogprobs, q: TopLogprobs) -> float:
    """Mean over positions of KL(p || q) on p's kept tokens plus one bucket for the rest.

    Exact when p keeps the whole vocabulary; otherwise KL of the coarse-grained distributions,
    which never exceeds the true KL (merging outcomes cannot increase a divergence).
    """
    if p.values.numel() == 0:
        return 0.0
    kl = (p.values.exp() * (p.values - q.values)).sum(-1)
    has_rest = torch.isfinite(p.rest)
    rest = torch.where(has_rest, p.rest.exp() * (p.rest - q.rest), torch.zeros_like(p.rest))
    return float((kl + rest).mean())
