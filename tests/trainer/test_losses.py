import torch

from trainer.losses import answer_cross_entropy, distillation_kl, loss_positions
from trainer.tokenize import IGNORE


def test_kl_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(7, 11)
    assert distillation_kl(z, z.clone(), 0.5).abs().item() < 1e-6


def test_kl_is_forward_teacher_first_with_tau_squared():
    torch.manual_seed(1)
    s, t = torch.randn(8, 7), torch.randn(8, 7)
    tau = 0.5
    p_t = torch.softmax(t / tau, -1)
    expected = (p_t * (torch.log(p_t) - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    assert torch.allclose(distillation_kl(s, t, tau), expected, atol=1e-6)
    assert not torch.allclose(distillation_kl(t, s, tau), expected, atol=1e-3)


def test_kl_gradient_matches_hand_written_reference():
    """d/dz_s [tau^2 KL(p_t || p_s)] = tau * (p_s - p_t) per position, divided by #positions."""
    torch.manual_seed(2)
    tau = 0.5
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, dtype=torch.float64)
    distillation_kl(s, t, tau).backward()
    reference = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1)) / 6
    assert torch.allclose(s.grad, reference, atol=1e-10)


def test_logits_at_equals_the_full_forward_at_those_positions(builtin_world):
    from transformers import AutoModelForCausalLM

    from trainer.losses import logits_at
    model = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    ids = torch.randint(6, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    where = torch.rand(3, 8) > 0.5
    full = model(input_ids=ids, attention_mask=mask).logits[:, :-1][where]
    assert torch.allclose(logits_at(model, ids, mask, where), full, atol=1e-5)


def test_cross_entropy_only_counts_answer_positions():
    torch.manual_seed(3)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 2, 4]])
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([2, 4]))
    assert torch.allclose(answer_cross_entropy(logits, labels), expected)
    assert loss_positions(labels).tolist() == [[False, True, True]]
