"""Micro-batches under a token budget, gradient checkpointing, precision, matchers, "auto"."""

from __future__ import annotations

import pytest
import torch

from trainer.loop import Callbacks, TrainJob, _Run
from trainer.precision import Precision, micro_batches
from trainer.scoring import is_correct
from trainer.spec import TrainSpec, resolve_auto


@pytest.fixture(autouse=True)
def _one_thread():
    from tests.trainer.conftest import one_thread

    with one_thread():
        yield


def spec(method="self_distillation", adapter="full", **hp) -> TrainSpec:
    return TrainSpec.model_validate({
        "method": {"type": method, method: {"hyperparameters": {
            "n_epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0, **hp}}},
        "adapter": {"type": adapter}, "seed": 4})


def trained(model_dir, data, tmp_path, s) -> tuple[dict, list[float]]:
    run = _Run(TrainJob(spec=s, model_dir=model_dir, train_examples=data["train"],
                        output_dir=tmp_path, slick=None, save_checkpoints=False), Callbacks())
    result = run.run()
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}, result.losses


def test_micro_batches_keep_padded_tokens_within_the_budget():
    assert micro_batches([5, 7, 3], None) == [[0, 1, 2]]
    assert micro_batches([10, 10, 10, 10], 20) == [[0, 1], [2, 3]]
    assert micro_batches([4, 30, 4, 4], 16) == [[0], [1], [2, 3]]  # a long row goes alone
    for budget in (8, 25, 60):
        for group in micro_batches([9, 12, 3, 20, 7, 7], budget):
            assert len(group) == 1 or len(group) * max([9, 12, 3, 20, 7, 7][i] for i in group) \
                <= budget


@pytest.mark.parametrize("method, adapter", [("self_distillation", "full"),
                                             ("supervised", "lora")])
def test_accumulated_micro_batches_equal_the_whole_batch(method, adapter, zoo_dir, zoo_data,
                                                         tmp_path):
    model_dir = zoo_dir("qwen2")
    whole, whole_losses = trained(model_dir, zoo_data, tmp_path / "a", spec(method, adapter))
    split, split_losses = trained(model_dir, zoo_data, tmp_path / "b",
                                  spec(method, adapter, micro_batch_tokens=64))
    assert whole_losses == pytest.approx(split_losses, rel=1e-5)
    # Adam moves each weight by about +-lr whatever its gradient's size, so a gradient within
    # float noise of zero (summed in another order when split) may flip its weight's step: allow
    # two such weights in a tensor, never a shifted tensor.
    for name, value in whole.items():
        off = ~torch.isclose(value, split[name], atol=1e-6, rtol=1e-4)
        assert int(off.sum()) <= 2, (name, int(off.sum()), off.numel())


def test_the_budget_really_splits_the_batch(zoo_dir, zoo_data, tmp_path):
    run = _Run(TrainJob(spec=spec(micro_batch_tokens=64), model_dir=zoo_dir("qwen2"),
                        train_examples=zoo_data["train"], output_dir=tmp_path, slick=None,
                        save_checkpoints=False), Callbacks())
    lengths = [len(e.input_ids) for e in run.encoded]
    assert len(micro_batches(lengths, 64)) >= 4


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_training(adapter, zoo_dir, zoo_data, tmp_path):
    model_dir = zoo_dir("llama")
    plain, plain_losses = trained(model_dir, zoo_data, tmp_path / "a", spec("supervised", adapter))
    ckpt, ckpt_losses = trained(model_dir, zoo_data, tmp_path / "b",
                                spec("supervised", adapter, gradient_checkpointing=True))
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-5)
    run = _Run(TrainJob(spec=spec("supervised", adapter, gradient_checkpointing=True),
                        model_dir=model_dir, train_examples=zoo_data["train"], output_dir=tmp_path,
                        slick=None, save_checkpoints=False), Callbacks())
    assert any(getattr(m, "gradient_checkpointing", False) for m in run.model.modules())
    assert all(torch.allclose(v, ckpt[n], atol=1e-6) for n, v in plain.items())


def test_cpu_runs_float32_and_cuda_autocasts_with_float32_master_weights():
    cpu = Precision.for_device(torch.device("cpu"))
    assert cpu.compute_dtype == torch.float32 and cpu.scaler is None
    if torch.cuda.is_available():  # the GPU path: bf16 autocast, or fp16 with a GradScaler
        gpu = Precision.for_device(torch.device("cuda"))
        assert gpu.compute_dtype in (torch.bfloat16, torch.float16)
        assert (gpu.scaler is not None) == (gpu.compute_dtype == torch.float16)


@pytest.mark.parametrize("match, answer, ok", [
    ("exact", "The Paris.", True), ("exact", "Paris, France", False),
    ("prefix", "Paris, the capital.\nMore text", True), ("prefix", "Parisian food", False),
    ("contains", "It is in Paris, France.", True), ("contains", "Line one\nParis", False),
    ("contains", "Comparison", False),
])
def test_matchers(match, answer, ok):
    assert is_correct(answer, ["Rome", "paris"], match) is ok


def test_auto_hyperparameters_for_a_model_that_is_not_built_in():
    s = TrainSpec.model_validate({"method": {"type": "supervised"}})
    builtin = resolve_auto(s, 1200).method.hyperparameters
    small = resolve_auto(s, 1200, model_params=500_000_000).method.hyperparameters
    assert (builtin.learning_rate, builtin.n_epochs) == (1e-3, 40)
    assert (small.learning_rate, small.n_epochs, small.batch_size) == (2e-4, 3, 16)
    full = s.model_copy(update={"adapter": s.adapter.model_copy(update={"type": "full"})})
    assert resolve_auto(full, 1200, 500_000_000).method.hyperparameters.learning_rate == 2e-5
    assert resolve_auto(full, 1200, 7_000_000_000).method.hyperparameters.learning_rate == 1e-5


def test_auto_size_reads_the_model_folder(zoo_dir):
    from trainer.modelfacts import auto_size, estimated_parameters

    model_dir = zoo_dir("qwen2")
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert estimated_parameters(model_dir) == pytest.approx(real, rel=0.2)
    assert auto_size(model_dir) == estimated_parameters(model_dir)
