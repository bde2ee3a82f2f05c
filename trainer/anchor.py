"""Matching the L2 anchor to self-distillation's pull (the paper's weight-space baseline).

The paper compared self-distillation with an L2 pull toward the teacher's weights "at matched
gradient strength". Here that is made concrete at the end of a self-distillation run: the norm of
the gradient of its distillation term (lambda * tau^2 * KL) over the trained parameters, averaged
over a few training batches, against the distance those parameters moved from where they
started. An L2 pull mu/2 * ||theta - theta_0||^2 has gradient norm mu * ||theta - theta_0||, so

    mu = ||grad of the distillation term|| / ||theta_SD - theta_0||

is the strength whose pull, at self-distillation's own solution, is as strong as the KL's.
"""

from __future__ import annotations

import torch

from trainer.losses import logits_at


def pull_diagnostics(run, anchor: list[torch.Tensor], batches: int = 8) -> dict:
    """{"distill_grad_norm", "weight_displacement", "matched_weight_anchor"} for a finished
    self-distillation `_Run` whose starting parameters are `anchor`."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    displacement = float(torch.sqrt(sum((p.detach() - p0).pow(2).sum()
                                        for p, p0 in zip(params, anchor))))
    norms = []
    was_training = run.model.training
    run.model.eval()  # the pull as the model stands, without dropout noise
    for b in range(min(batches, run.steps_per_epoch)):
        rows = run._batch_indices(b)
        batch = run._batch(rows)
        _, where = run._loss_positions(batch)
        with torch.no_grad():
            t_logits = run._teacher_logits(batch, where)
        logits = logits_at(run.model, batch["input_ids"], batch["attention_mask"], where)
        term, _ = run._distill_term(logits, t_logits, rows, run.total_steps - 1, where)
        grads = torch.autograd.grad(term, params, allow_unused=True)
        norms.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))))
    run.model.train(was_training)
    grad = sum(norms) / len(norms)
    return {"distill_grad_norm": grad, "weight_displacement": displacement,
            "matched_weight_anchor": grad / displacement if displacement > 0 else None}
