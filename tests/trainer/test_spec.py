import pytest
from pydantic import ValidationError

from trainer.spec import TrainSpec, resolve_auto


def make(method: dict, **rest) -> TrainSpec:
    return TrainSpec.model_validate({"method": method, **rest})


def test_defaults_and_paper_defaults_for_self_distillation():
    s = make({"type": "self_distillation"})
    hp = s.method.hyperparameters
    assert (hp.distill_weight, hp.distill_temperature, hp.teacher) == (1.0, 0.5, "base")
    assert s.adapter.type == "lora" and s.evaluation.max_forgetting == 0.05


@pytest.mark.parametrize("method, where", [
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}, "n_epochs"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"bogus": 1}}}, "bogus"),
    ({"type": "self_distillation",
      "self_distillation": {"hyperparameters": {"distill_temperature": 0}}}, "distill_temperature"),
    ({"type": "frozen_groups", "frozen_groups": {"hyperparameters": {"trainable": ["brain"]}}},
     "trainable"),
    ({"type": "frozen_groups"}, "frozen_groups"),
    ({"type": "supervised", "self_distillation": {}}, "self_distillation"),
    ({"type": "dpo"}, "type"),
])
def test_bad_methods_name_the_field(method, where):
    with pytest.raises(ValidationError) as e:
        make(method)
    assert where in str(e.value)


def test_layer_ranges_and_auto_resolution():
    s = make({"type": "frozen_groups", "frozen_groups": {"hyperparameters": {
        "trainable": ["attention", "layers:1-2"]}}})
    hp = s.method.hyperparameters
    assert hp.groups() == {"attention"} and hp.layer_range() == (1, 2)
    r = resolve_auto(s, 1200).method.hyperparameters
    assert (r.n_epochs, r.batch_size, r.learning_rate) == (40, 32, 1e-3)
    full = resolve_auto(make({"type": "supervised"}, adapter={"type": "full"}), 100_000)
    assert full.method.hyperparameters.learning_rate == 3e-4
    assert full.method.hyperparameters.n_epochs == 2
