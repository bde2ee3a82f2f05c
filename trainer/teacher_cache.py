"""The teacher's distributions at the KL positions, computed once per run instead of every step.

The self-distillation teacher is frozen and runs without dropout, and the training examples do
not change, so its output at a given (example, position) is the same in every epoch: a live
teacher repeats one forward pass per step, `n_epochs` times over. Here those outputs are computed
before the first step (batched by length, without gradients) and each step reads its rows'.

Two forms, chosen by `teacher_cache` (SelfDistillationHyperparameters):
  - exact: the teacher's whole distribution at each of the P KL positions, so the KL equals the
    live teacher's up to float rounding of batch shapes. Kept as the smaller of: the
    temperature-scaled log-probs, float32 [P, V]; or, where the teacher's LM head is a plain
    linear layer that training never changes (`Teacher.lm_head_weight`: the base's head under
    LoRA, the frozen copy's under full fine-tuning), the hidden states that head reads, [P, H],
    with the head shared, not copied. Each step then reruns the head on its rows (one [N, H] x
    [H, V] matmul, as the live teacher's last layer does) and takes the live teacher's KL. On
    the built-in model (H 128, V 306) that is 1.2 MiB instead of 2.9.
  - topk: per position the k largest log-probs, their token ids and the log of the mass outside
    them (the form offline-distillation tools store). The KL is taken between the coarse-grained
    distributions (k tokens + one tail bucket): it never exceeds the true KL, and falls short of
    it by r_t * KL(teacher tail || student tail), r_t the teacher's tail mass
    (tests/trainer/test_teacher_cache.py measures it).
  - auto: exact when that fits in EXACT_MAX_BYTES (the built-in model's vocabulary of a few
    hundred always does), else topk; either over MAX_BYTES falls back to the live teacher.

Resume: the cache is not saved with checkpoints. It is recomputed at the start of every run,
resumed or not, after the teacher is restored, with a batching that depends only on the
examples, so a resumed run reads bit-identical values and its losses equal an uninterrupted run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.losses import distillation_kl
from trainer.tokenize import IGNORE, Encoded, collate
from trainer.vocab_chunks import rows_per_chunk

EXACT_MAX_BYTES = 256 * 2**20  # auto: exact below this, top-k above
MAX_BYTES = 2 * 2**30  # any cache over this: the live teacher instead
BUILD_TOKENS = 16_384  # padded tokens per batched teacher forward while building


def kl_mask(encoded: Encoded, positions: str) -> list[bool]:
    """Which of the example's next-token positions carry the KL, as the loop selects them:
    answer tokens (labels[1:] set) or every real position."""
    if positions == "all":
        return [True] * (len(encoded.input_ids) - 1)
    return [t != IGNORE for t in encoded.labels[1:]]


@dataclass
class TeacherCache:
    temperature: float
    offsets: torch.Tensor  # [n_examples + 1] int64 (CPU): example i owns rows offsets[i]:[i+1]
    values: torch.Tensor  # [P, V] (exact) or [P, k] (topk) float32 log-probs at temperature;
    #                       or, with `head`, [P, H] teacher hidden states (exact)
    indices: torch.Tensor | None  # [P, k] int32 token ids (topk), None (exact)
    rest: torch.Tensor | None  # [P] float32 log of the teacher's mass outside `indices`
    head: torch.Tensor | None = None  # [V, H] the teacher's frozen LM head (shared, not a copy)

    @property
    def mode(self) -> str:
        return "exact" if self.indices is None else "topk"

    @property
    def tensors(self) -> list[torch.Tensor]:
        """What the cache holds; `head` is the model's own weight, so it is not counted."""
        return [t for t in (self.values, self.indices, self.rest, self.offsets) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def positions(self, examples: list[int]) -> torch.Tensor:
        """Row ids of these examples' KL positions, in the loop's row-major order: example e's
        rows offsets[e]:offsets[e+1], one after another (a few tensor ops, not one per example)."""
        idx = torch.as_tensor(examples, dtype=torch.long)
        starts = self.offsets[idx]
        counts = self.offsets[idx + 1] - starts
        total = int(counts.sum())
        # Row k of the result is k shifted by (its example's start - rows before that example).
        shift = (starts - (counts.cumsum(0) - counts)).repeat_interleave(counts, output_size=total)
        return (torch.arange(total) + shift).to(self.values.device)

    def kl(self, student_logits: torch.Tensor, examples: list[int],
           weights: torch.Tensor | None = None) -> torch.Tensor:
        """tau^2 * mean KL(teacher || student) at the examples' KL positions, as
        `trainer.losses.distillation_kl` (weights [N] multiply each position's term)."""
        n = student_logits.size(0)
        if n == 0:
            return student_logits.sum() * 0.0
        rows = self.positions(examples)
        if rows.numel() != n:  # only a bug can do this: the loop chose other positions
            raise RuntimeError(f"teacher cache has {rows.numel()} KL positions for these "
                               f"examples, the student {n}")
        if self.head is not None:  # the live teacher's last layer and KL, on cached inputs
            teacher_logits = F.linear(self.values.index_select(0, rows), self.head)
            return distillation_kl(student_logits, teacher_logits, self.temperature, weights)
        w = (torch.ones(n, device=student_logits.device) if weights is None
             else weights.detach().float())
        values = self.values.index_select(0, rows)
        indices = None if self.indices is None else self.indices.index_select(0, rows).long()
        rest = None if self.rest is None else self.rest.index_select(0, rows)
        total = _CachedKLSum.apply(student_logits, values, indices, rest, w, self.temperature,
                                   rows_per_chunk(student_logits.size(-1)))
        return total / n * self.temperature**2


class _CachedKLSum(torch.autograd.Function):
    """sum over rows of w * KL(p_t || p_s) on the teacher's kept tokens plus a tail bucket.

    With every token kept (exact) this is the plain KL. With top-k the student's tail is
    log R = logsumexp of its log-probs outside the kept tokens, and the gradient is
    (p_s - p~) / tau, where p~ is the teacher on its kept tokens and, outside them, its tail
    mass spread in the student's proportions (r_t * p_s / R). Recomputed a few rows at a time in
    backward, like `trainer.vocab_chunks`, so no float32 [N, V] copy is kept.
    """

    @staticmethod
    def forward(ctx, student, values, indices, rest, weights, temperature: float, rows: int):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, student.size(0), rows):
            b = min(student.size(0), a + rows)
            log_s = F.log_softmax(student[a:b].float() / temperature, dim=-1)
            log_t = values[a:b]
            if indices is None:
                per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
            else:
                idx = indices[a:b]
                kept = (log_t.exp() * (log_t - log_s.gather(-1, idx))).sum(-1)
                log_tail_s = log_s.scatter(-1, idx, float("-inf")).logsumexp(-1)
                r = rest[a:b]
                tail = torch.where(torch.isfinite(r), r.exp() * (r - log_tail_s),
                                   torch.zeros_like(r))
                per_row = kept + tail
            total += (per_row * weights[a:b]).sum()
        ctx.save_for_backward(student, values, indices, rest, weights)
        ctx.temperature, ctx.rows = temperature, rows
        return total

    @staticmethod
    def backward(ctx, grad):
        student, values, indices, rest, weights = ctx.saved_tensors
        tau = ctx.temperature
        out = torch.empty_like(student)
        for a in range(0, student.size(0), ctx.rows):
            b = min(student.size(0), a + ctx.rows)
            p_s = F.softmax(student[a:b].float() / tau, dim=-1)
            if indices is None:
                target = values[a:b].exp()
            else:
                idx = indices[a:b]
                tail_s = p_s.scatter(-1, idx, 0.0)
                share = rest[a:b].exp() / tail_s.sum(-1).clamp_min(1e-30)
                target = (tail_s * share[:, None]).scatter(-1, idx, values[a:b].exp())
            scale = (grad / tau) * weights[a:b, None]
            out[a:b] = ((p_s - target) * scale).to(out.dtype)
        return out, None, None, None, None, None, None


def planned_bytes(positions: int, vocab: int, mode: str, top_k: int) -> int:
    if mode == "exact":
        return positions * vocab * 4
    return positions * (min(top_k, vocab) * 8 + 4)  # float32 value + int32 id, and the tail


def choose_mode(requested: str, positions: int, vocab: int, top_k: int) -> tuple[str, str]:
    """(mode, why): the form to build, or "off" for the live teacher, and a reason to report."""
    if requested == "off":
        return "off", "teacher_cache=off"
    mode = requested
    if mode == "auto":
        exact = planned_bytes(positions, vocab, "exact", top_k)
        mode = "exact" if exact <= EXACT_MAX_BYTES else "topk"
    size = planned_bytes(positions, vocab, mode, top_k)
    if size > MAX_BYTES:
        return "off", (f"a {mode} cache would take {size / 2**20:.0f} MiB, over the "
                       f"{MAX_BYTES / 2**20:.0f} MiB cap: set teacher_cache_top_k lower")
    return mode, ""


@torch.no_grad()
def build(teacher, encoded: list[Encoded], positions: str, temperature: float, mode: str,
          top_k: int, pad_id: int, device, autocast) -> TeacherCache:
    """Run the teacher once over every example (batched by length) and keep its log-probs at
    the KL positions, or (exact, where smaller) the hidden states its frozen LM head reads.
    `autocast` is the run's precision context, so values match a live step."""
    head = teacher.lm_head_weight() if mode == "exact" else None
    if head is not None and head.size(1) >= head.size(0):
        head = None  # hidden states as wide as the vocabulary: keep the log-probs
    masks = [kl_mask(e, positions) for e in encoded]
    counts = torch.tensor([sum(m) for m in masks], dtype=torch.long)
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    total = int(offsets[-1])
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    values = indices = rest = None
    start = 0
    while start < len(order):
        width = len(encoded[order[start]].input_ids)
        end = start + 1
        # Sorted by length: the last row of a group is its longest, so rows * that <= budget.
        while end < len(order) and (end - start + 1) * len(encoded[order[end]].input_ids) \
                <= BUILD_TOKENS:
            end += 1
            width = len(encoded[order[end - 1]].input_ids)
        group, start = order[start:end], end
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in group], pad_id).items()}
        where = torch.zeros(len(group), width - 1, dtype=torch.bool)
        for row, i in enumerate(group):
            where[row, : len(masks[i])] = torch.tensor(masks[i], dtype=torch.bool)
        dest = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in group])
        dest = dest.to(device)
        if head is not None:
            with autocast():
                hidden = teacher.hidden_at(batch["input_ids"], batch["attention_mask"],
                                           where.to(device))
            if values is None:
                values = torch.empty(total, hidden.size(-1), dtype=hidden.dtype, device=device)
            values[dest] = hidden
            continue
        with autocast():
            logits = teacher.logits_at(batch["input_ids"], batch["attention_mask"],
                                       where.to(device))
        vocab = logits.size(-1)
        if values is None:
            k = vocab if mode == "exact" else min(top_k, vocab)
            values = torch.empty(total, k, dtype=torch.float32, device=device)
            if mode == "topk":
                indices = torch.empty(total, k, dtype=torch.int32, device=device)
                rest = torch.empty(total, dtype=torch.float32, device=device)
        step = rows_per_chunk(vocab)
        for a in range(0, logits.size(0), step):
            logp = F.log_softmax(logits[a:a + step].float() / temperature, dim=-1)
            rows = dest[a:a + step]
            if indices is None:
                values[rows] = logp
                continue
            top = logp.topk(values.size(1), dim=-1)
            values[rows] = top.values
            indices[rows] = top.indices.int()
            # The tail's log-mass from its own terms, not log(1 - kept): exact when it is tiny.
            rest[rows] = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    if values is None:  # no KL positions at all
        values = torch.empty(0, 0, device=device)
    return TeacherCache(temperature, offsets, values, indices, rest, head)


def for_run(teacher, encoded: list[Encoded], hp, vocab: int, pad_id: int, device, autocast
            ) -> tuple[TeacherCache | None, str, str]:
    """(the cache or None for a live teacher, event level, event message) for a run with these
    SelfDistillationHyperparameters: the mode chosen, its size, and what it cost to build."""
    positions = sum(sum(kl_mask(e, hp.distill_positions)) for e in encoded)
    mode, why = choose_mode(hp.teacher_cache, positions, vocab, hp.teacher_cache_top_k)
    if mode == "off":
        return None, "info" if hp.teacher_cache == "off" else "warning", \
            f"teacher runs live every step: {why}"
    started = time.monotonic()
    cache = build(teacher, encoded, hp.distill_positions, hp.distill_temperature, mode,
                  hp.teacher_cache_top_k, pad_id, device, autocast)
    what = (f"top-{cache.values.size(1)} log-probs + tail mass" if mode == "topk"
            else "exact log-probs" if cache.head is None
            else "exact log-probs, kept as the teacher's last hidden states (its frozen LM head "
                 "rerun each step)")
    return cache, "info", (f"teacher cache: {what} at {positions} KL positions, "
                           f"{cache.nbytes / 2**20:.1f} MiB in memory (none on disk: recomputed "
                           f"at every start), built in {time.monotonic() - started:.1f} s")
