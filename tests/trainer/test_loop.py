"""Every method on the built-in model at tiny sizes, checkpoints, resume, cancel, adapters."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.loop import Callbacks, TrainJob, train
from trainer.scoring import accuracy
from trainer.spec import TrainSpec


def spec(method="supervised", adapter="lora", epochs=1, batch=16, lr=1e-3, **hp):
    return TrainSpec.model_validate({
        "method": {"type": method, method: {"hyperparameters": {
            "n_epochs": epochs, "batch_size": batch, "learning_rate": lr, **hp}}},
        "adapter": {"type": adapter}, "seed": 5})


def job(world, examples, out, s, n=48, known=32, **kw):
    return TrainJob(spec=s, model_dir=world / "model", train_examples=examples["train"][:n],
                    known_facts=examples["known"][:known], output_dir=out, **kw)


METHODS = [
    ("supervised", "lora", {}),
    ("supervised", "full", {}),
    ("self_distillation", "lora", {}),
    ("self_distillation", "full", {}),
    ("self_distillation", "lora", {"teacher": "format_warmup", "distill_positions": "all"}),
    ("self_distillation", "full", {"teacher": "format_warmup"}),
    ("frozen_groups", "lora", {"trainable": ["attention", "norms"]}),
    ("frozen_groups", "full", {"trainable": ["mlp", "layers:1-2"]}),
]


@pytest.mark.parametrize("method, adapter, hp", METHODS)
def test_every_method_trains_and_reports(builtin_world, builtin_examples, tmp_path, method,
                                         adapter, hp):
    result = train(job(builtin_world, builtin_examples, tmp_path, spec(method, adapter, **hp)))
    assert result.status == "succeeded" and result.step == result.total_steps == 3
    assert all(math.isfinite(x) for x in result.losses)
    report = result.report
    for key in ("base_heldout_known_accuracy", "heldout_known_accuracy", "forgetting",
                "hallucination_rate", "new_fact_accuracy", "task_accuracy", "output_drift",
                "drift_safe", "max_forgetting", "knowledge_categories"):
        assert key in report
    assert report["base_heldout_known_accuracy"] >= 0.9
    assert sum(report["knowledge_categories"].values()) == 48
    assert (result.final_dir / "adapter").is_dir()


def test_self_distillation_teacher_is_the_base_with_the_adapter_off(builtin_world,
                                                                     builtin_examples, tmp_path):
    seen = []
    cb = Callbacks(on_metrics=seen.append)
    train(job(builtin_world, builtin_examples, tmp_path, spec("self_distillation"),
              log_every_n_steps=1, slick=None), cb)
    # LoRA's B starts at zero, so at step 1 the student *is* the base: the KL must be zero.
    assert seen[0]["distill_loss"] == pytest.approx(0.0, abs=1e-6)
    assert seen[-1]["distill_loss"] > 0


def test_adapter_off_teacher_gives_the_base_models_logits(builtin_world, builtin_examples,
                                                         tmp_path):
    from trainer.losses import logits_at, loss_positions
    from trainer.tokenize import collate, encode_example

    result = train(job(builtin_world, builtin_examples, tmp_path, spec(lr=1e-2), slick=None))
    assert result.status == "succeeded"
    from peft import PeftModel

    from trainer.teacher import AdapterOffTeacher
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    base = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_world / "model"),
                                      result.final_dir / "adapter")
    batch = collate([encode_example(tok, e, 64) for e in builtin_examples["train"][:8]],
                    tok.pad_token_id)
    where = loss_positions(batch["labels"])
    args = (batch["input_ids"], batch["attention_mask"], where)
    with torch.no_grad():
        expected, student = logits_at(base, *args), logits_at(tuned, *args)
    teacher = AdapterOffTeacher(tuned).logits_at(*args)
    assert torch.allclose(teacher, expected, atol=1e-5)
    assert not torch.allclose(student, expected, atol=1e-3)  # the adapter is on again after
    with torch.no_grad():
        assert torch.equal(logits_at(tuned, *args), student)


def test_zero_distill_weight_follows_plain_sft_exactly(builtin_world, builtin_examples, tmp_path):
    sft = train(job(builtin_world, builtin_examples, tmp_path / "a", spec(), slick=None))
    sd0 = train(job(builtin_world, builtin_examples, tmp_path / "b",
                    spec("self_distillation", distill_weight=0.0), slick=None))
    assert sd0.losses == sft.losses


def test_frozen_parameters_are_bit_identical_after_training(builtin_world, builtin_examples,
                                                            tmp_path):
    base = AutoModelForCausalLM.from_pretrained(builtin_world / "model").state_dict()
    result = train(job(builtin_world, builtin_examples, tmp_path,
                       spec("frozen_groups", "full", lr=1e-2, trainable=["attention"]), slick=None))
    tuned = AutoModelForCausalLM.from_pretrained(result.final_dir / "adapter").state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert {k for k in base if ".self_attn." in k and k.endswith("weight")} == changed


def test_lora_leaves_base_weights_untouched_and_adapter_reloads_exactly(
        builtin_world, builtin_examples, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.losses import logits_at, loss_positions
    from trainer.tokenize import collate, encode_example

    result = train(job(builtin_world, builtin_examples, tmp_path, spec(epochs=3, lr=3e-3),
                       known=200, slick=None))
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    reference = AutoModelForCausalLM.from_pretrained(builtin_world / "model")  # another model
    fresh = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    loaded = PeftModel.from_pretrained(fresh, result.final_dir / "adapter")
    saved = load_file(result.final_dir / "adapter" / "adapter_model.safetensors")
    # The artifact is LoRA factors only, every one of them trained away from its init or zero.
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(saved[k].abs().max() > 0 for k in saved if ".lora_B." in k)
    # Reloads exactly: the model's LoRA weights are the saved tensors, bit for bit.
    live = get_peft_model_state_dict(loaded)
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)
    # Every base weight, LoRA-wrapped layers included, equals the untouched reference model's.
    ref = reference.state_dict()
    base = {k.replace(".base_layer.", "."): v
            for k, v in loaded.get_base_model().state_dict().items() if "lora_" not in k}
    assert base.keys() == ref.keys() and all(torch.equal(base[k], ref[k]) for k in ref)
    batch = collate([encode_example(tok, e, 64) for e in builtin_examples["known"][:16]],
                    tok.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
    with torch.no_grad():
        expected = logits_at(reference, *args)
        assert not torch.allclose(logits_at(loaded, *args), expected, atol=1e-3)
        with loaded.disable_adapter():
            assert torch.allclose(logits_at(loaded, *args), expected, atol=1e-5)
    # ...and answers the held-out facts exactly as the job reported, with the service's matcher.
    right = accuracy(loaded, tok, builtin_examples["known"][:200]).float().mean().item()
    assert right == pytest.approx(result.report["heldout_known_accuracy"])


def whole_cut_and_resumed(world, examples, tmp_path, s):
    """The run of `s` uninterrupted; the same run cancelled after 3 steps; and its resumption."""
    whole = train(job(world, examples, tmp_path / "whole", s, slick=None))
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    cut = train(job(world, examples, tmp_path / "cut", s, slick=None),
                Callbacks(should_stop=stop_after_three))
    assert cut.status == "cancelled" and cut.step == 3
    resumed = train(job(world, examples, tmp_path / "cut", s, slick=None))
    return whole, cut, resumed


def test_resume_from_checkpoint_equals_an_uninterrupted_run(builtin_world, builtin_examples,
                                                           tmp_path):
    s = spec("self_distillation", epochs=2, batch=16).model_copy(
        update={"checkpoint_every_n_steps": 2})
    whole, cut, resumed = whole_cut_and_resumed(builtin_world, builtin_examples, tmp_path, s)
    assert cut.checkpoints[-1].step == 3  # cancelling keeps the last completed step
    assert resumed.status == "succeeded"
    assert cut.losses + resumed.losses == whole.losses
    from safetensors.torch import load_file
    a = load_file(whole.final_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_cancelled_before_its_first_step_leaves_its_checkpoint_alone(
        builtin_world, builtin_examples, tmp_path):
    """A job resumed on a new worker and cancelled while that worker was still loading: the run
    learned nothing, and re-saving the step it resumed from replaced that checkpoint's scores
    (and its drift-safe flag) with none."""
    s = spec(epochs=2, batch=16).model_copy(update={"checkpoint_every_n_steps": 2})
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    first = train(job(builtin_world, builtin_examples, tmp_path, s, slick=None),
                  Callbacks(should_stop=stop_after_two))
    (kept,) = first.checkpoints
    assert kept.step == 2 and kept.metrics
    state = kept.path / "trainer_state.json"
    before = state.read_bytes()
    recorded = []
    again = train(job(builtin_world, builtin_examples, tmp_path, s, slick=None),
                  Callbacks(should_stop=lambda: True, on_checkpoint=recorded.append))
    assert again.status == "cancelled" and again.step == 2
    assert again.checkpoints == [] and recorded == []
    assert state.read_bytes() == before


def test_a_run_stopped_by_its_rule_and_resumed_stops_again_where_it_was(
        builtin_world, builtin_examples, tmp_path, monkeypatch):
    """The run stopped at a checkpoint by stop_at_new_fact_accuracy; its worker died before the
    job's end was recorded, and the job was resumed: it trained on to the next checkpoint,
    past the point its rule had chosen, and forgot more."""
    from trainer import loop

    monkeypatch.setattr(loop._Run, "_measure", lambda self: {
        "new_fact_accuracy": 0.97, "forgetting": 0.01, "drift_safe": True})
    s = spec(epochs=3, batch=16, stop_at_new_fact_accuracy=0.95).model_copy(
        update={"checkpoint_every_n_steps": 2})
    first = train(job(builtin_world, builtin_examples, tmp_path, s, slick=None))
    assert first.status == "succeeded" and first.step == 2 < first.total_steps
    steps = []
    again = train(job(builtin_world, builtin_examples, tmp_path, s, slick=None),
                  Callbacks(on_metrics=lambda m: steps.append(m["step"])))
    assert again.status == "succeeded" and again.step == 2 and steps == []
    assert again.report["new_fact_accuracy"] == 0.97
