"""The levers beyond the paper: an L2 anchor, a lambda schedule, a per-example lambda, stopping at
a new-fact accuracy, and the L2 strength matched to self-distillation's pull."""

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.test_loop import job, spec
from trainer.loop import Callbacks, train


def _lora_b_norm(result) -> float:
    saved = load_file(result.final_dir / "adapter" / "adapter_model.safetensors")
    return float(torch.sqrt(sum(v.pow(2).sum() for k, v in saved.items() if ".lora_B." in k)))


def test_the_l2_anchor_holds_the_weights_near_where_they_started(builtin_world, builtin_examples,
                                                                 tmp_path):
    seen = []
    free = train(job(builtin_world, builtin_examples, tmp_path / "a", spec(lr=1e-2), slick=None))
    held = train(job(builtin_world, builtin_examples, tmp_path / "b",
                     spec(lr=1e-2, weight_anchor=1e3), slick=None, log_every_n_steps=1),
                 Callbacks(on_metrics=seen.append))
    # LoRA's B starts at zero: its norm is the distance the adapter moved.
    assert _lora_b_norm(held) < 0.5 * _lora_b_norm(free)
    assert seen[0]["anchor_loss"] == pytest.approx(0.0, abs=1e-9)  # theta = theta_0 at step 1
    assert seen[-1]["anchor_loss"] > 0


def test_lambda_moves_linearly_from_distill_weight_to_its_final_value(builtin_world,
                                                                      builtin_examples, tmp_path):
    seen = []
    result = train(job(builtin_world, builtin_examples, tmp_path, spec(
        "self_distillation", epochs=3, lr=1e-2, distill_weight=0.5, distill_weight_final=4.0),
        slick=None, log_every_n_steps=1), Callbacks(on_metrics=seen.append))
    total = result.total_steps
    checked = 0
    for m in seen:
        if m["distill_loss"] > 1e-4:  # lambda is readable off the loss where the KL is not 0
            lam = (m["train_loss"] - m["ce_loss"]) / m["distill_loss"]
            assert lam == pytest.approx(0.5 + 3.5 * (m["step"] - 1) / (total - 1), rel=1e-3)
            checked += 1
    assert checked >= total - 2


def test_lambda_for_new_facts_changes_only_the_new_fact_examples(builtin_world, builtin_examples,
                                                                 tmp_path):
    def run(name, **hp):
        return train(job(builtin_world, builtin_examples, tmp_path / name,
                         spec("self_distillation", lr=1e-2, **hp), slick=None)).losses

    plain = run("plain", distill_weight=2.0)
    assert run("same", distill_weight=2.0, distill_weight_new_facts=2.0) == pytest.approx(
        plain, rel=1e-5)
    assert run("light", distill_weight=2.0, distill_weight_new_facts=0.0) != pytest.approx(
        plain, rel=1e-3)


def test_training_stops_at_the_first_checkpoint_reaching_the_new_fact_accuracy(
        builtin_world, builtin_examples, tmp_path):
    every_epoch = {"eval_every_n_epochs": 1}

    def run(name, **hp):
        s = spec("supervised", "full", epochs=6, lr=3e-3, **hp)
        s = s.model_copy(update={"evaluation": s.evaluation.model_copy(update=every_epoch)})
        return train(job(builtin_world, builtin_examples, tmp_path / name, s, n=96, slick=None))

    full = run("full")
    points = [(c.step, c.metrics["new_fact_accuracy"]) for c in full.checkpoints]
    learning = [acc for _, acc in points if acc > 0]
    assert learning, f"no checkpoint learned any new fact: {points}"
    target = learning[0]
    stop_step = next(step for step, acc in points if acc >= target)
    stopped = run("stopped", stop_at_new_fact_accuracy=target)
    assert stopped.status == "succeeded" and stopped.step == stop_step < full.total_steps
    assert stopped.report["new_fact_accuracy"] == pytest.approx(target)
    assert stopped.checkpoints[-1].step == stop_step  # the final adapter is that checkpoint
    assert (stopped.final_dir / "adapter").is_dir()


def test_a_lever_that_needs_known_facts_says_so(builtin_world, builtin_examples, tmp_path):
    for hp in ({"stop_at_new_fact_accuracy": 0.9}, {"distill_weight_new_facts": 1.0}):
        method = "self_distillation"
        with pytest.raises(ValueError, match=next(iter(hp))):
            train(job(builtin_world, builtin_examples, tmp_path, spec(method, **hp), known=0,
                      slick=None))


def test_the_matched_l2_strength_is_the_distill_gradient_over_the_distance(
        builtin_world, builtin_examples, tmp_path):
    result = train(job(builtin_world, builtin_examples, tmp_path,
                       spec("self_distillation", epochs=2, lr=1e-2), slick=None,
                       measure_pull=True))
    r = result.report
    assert r["distill_grad_norm"] > 0 and r["weight_displacement"] > 0
    assert r["matched_weight_anchor"] == pytest.approx(
        r["distill_grad_norm"] / r["weight_displacement"])
