"""Vocabulary-wide losses in chunks: Qwen's vocabulary (151,936), equal results, bounded memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.memory import PeakTensorMemory
from trainer.losses import distillation_kl
from trainer.vocab_chunks import ce_sum, kl_sum, mean_kl_top, token_logprobs, top_logprobs

VOCAB = 151_936
N = 48  # loss positions of a batch
ROWS = 4  # positions per chunk
BLOCK = ROWS * VOCAB * 4  # bytes of one float32 [rows x vocab] block
FULL = N * VOCAB * 4  # bytes of one float32 [positions x vocab] tensor


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, VOCAB, generator=g) * scale


def _reference_kl(s, t, tau):  # the unchunked formula the trainer used before
    log_p_s = F.log_softmax(s.float() / tau, -1)
    log_p_t = F.log_softmax(t.float() / tau, -1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * tau**2


def _peak_extra(fn, *inputs) -> tuple[int, torch.Tensor]:
    with PeakTensorMemory(inputs) as mem:
        out = fn()
    start = sum(t.untyped_storage().nbytes() for t in inputs)
    return mem.peak - start, out


def test_chunked_kl_equals_the_unchunked_one_with_memory_bounded_by_the_chunk():
    teacher = _logits(1)
    student = _logits(2).requires_grad_()
    ref_student = student.detach().clone().requires_grad_()

    def chunked():
        loss = kl_sum(student, teacher, 0.5, rows=ROWS) / N * 0.25
        loss.backward()
        return loss.detach()

    def unchunked():
        loss = _reference_kl(ref_student, teacher, 0.5)
        loss.backward()
        return loss.detach()

    extra, got = _peak_extra(chunked, student, teacher)
    ref_extra, want = _peak_extra(unchunked, ref_student, teacher)
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(student.grad, ref_student.grad, rtol=1e-4, atol=1e-9)
    # The gradient is [positions x vocab] by nature; beyond it, a few chunk-sized blocks.
    assert extra <= FULL + 8 * BLOCK, (extra, FULL, BLOCK)
    assert ref_extra >= 4 * FULL  # what the chunks avoid: fp32 log-softmaxes of the whole batch


def test_distillation_kl_uses_the_chunks_and_weights_positions():
    teacher, student = _logits(3)[:8, :1000], _logits(4)[:8, :1000].requires_grad_()
    assert torch.allclose(distillation_kl(student, teacher, 0.5),
                          _reference_kl(student, teacher, 0.5), rtol=1e-5)
    w = torch.tensor([0.0, 1, 2, 1, 1, 0, 3, 1])
    per_position = [distillation_kl(student[i:i + 1], teacher[i:i + 1], 0.5) for i in range(8)]
    want = sum(wi * k for wi, k in zip(w, per_position)) / 8
    assert torch.allclose(distillation_kl(student, teacher, 0.5, weights=w), want, rtol=1e-5)


def test_chunked_cross_entropy_equals_torchs():
    logits = _logits(5).requires_grad_()
    ref = logits.detach().clone().requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(6))
    extra, got = _peak_extra(lambda: _backward(ce_sum(logits, targets, rows=ROWS)), logits)
    want = _backward(F.cross_entropy(ref, targets, reduction="sum"))
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(logits.grad, ref.grad, rtol=1e-4, atol=1e-9)
    assert extra <= FULL + 8 * BLOCK


def _backward(loss):
    loss.backward()
    return loss.detach()


def test_token_logprobs_at_a_temperature_without_a_full_log_softmax():
    logits = _logits(7)
    targets = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(8))
    want = F.log_softmax(logits / 0.5, -1).gather(-1, targets[:, None])[:, 0]
    extra, got = _peak_extra(lambda: token_logprobs(logits, targets, 0.5, rows=ROWS), logits)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert extra <= 6 * BLOCK


@pytest.mark.parametrize("k", [VOCAB, 512])
def test_drift_from_kept_logprobs(k):
    base, tuned = _logits(9, scale=6.0), _logits(9, scale=6.0) + 0.3 * _logits(10)
    exact = float(_reference_kl(tuned, base, 1.0))  # KL(base || tuned)
    p = top_logprobs(base, k=k, rows=ROWS)
    q = top_logprobs(tuned, k=k, at=p.indices, rows=ROWS)
    got = mean_kl_top(p, q)
    if k == VOCAB:
        assert got == pytest.approx(exact, rel=1e-4)
    else:  # merged outcomes: a lower bound, and close for peaked distributions
        assert got <= exact + 1e-6 and got >= 0.5 * exact
        assert p.values.shape == (N, k)
