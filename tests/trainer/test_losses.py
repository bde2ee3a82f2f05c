import torch

from trainer.losses import answer_cross_entropy, distillation_kl, loss_positions
from trainer.tokenize import IGNORE


def test_kl_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 11)
    where = torch.rand(3, 5) > 0.3
    assert distillation_kl(z, z.clone(), where, 0.5).abs().item() < 1e-6


def test_kl_is_forward_teacher_first_with_tau_squared():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    where = torch.ones(2, 4, dtype=torch.bool)
    tau = 0.5
    p_t = torch.softmax(t / tau, -1)
    expected = (p_t * (torch.log(p_t) - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    assert torch.allclose(distillation_kl(s, t, where, tau), expected, atol=1e-6)
    assert not torch.allclose(distillation_kl(t, s, where, tau), expected, atol=1e-3)


def test_kl_gradient_matches_hand_written_reference():
    """d/dz_s [tau^2 KL(p_t || p_s)] = tau * (p_s - p_t) per position, divided by #positions."""
    torch.manual_seed(2)
    tau = 0.5
    s = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 9, dtype=torch.float64)
    where = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    distillation_kl(s, t, where, tau).backward()
    reference = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1))
    reference = reference * where[..., None] / where.sum()
    assert torch.allclose(s.grad, reference, atol=1e-10)


def test_cross_entropy_only_counts_answer_positions():
    torch.manual_seed(3)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 2, 4]])
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([2, 4]))
    assert torch.allclose(answer_cross_entropy(logits, labels), expected)
    assert loss_positions(labels).tolist() == [[False, True, True]]
