"""`"preset": "drift_safe"` fills the method; explicit fields win; conflicts are 400."""

import pytest

from tests.api.conftest import h, upload
from trainer.presets import _DRIFT_SAFE


def create(client, tenant, **body):
    file_id = upload(client, tenant).json()["id"]
    return client.post("/v1/fine_tuning/jobs", headers=h(tenant),
                       json={"model": "driftsafe-factlm-tiny", "training_file": file_id, **body})


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_preset_fills_the_method_and_the_job_shows_it(client, alice, adapter):
    r = create(client, alice, preset="drift_safe", adapter={"type": adapter})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["preset"] == "drift_safe"
    assert job["method"]["type"] == "self_distillation"
    hp = job["method"]["self_distillation"]["hyperparameters"]
    for key, value in _DRIFT_SAFE[adapter].items():
        assert hp[key] == value, key
    assert job["hyperparameters"]["distill_weight"] == _DRIFT_SAFE[adapter]["distill_weight"]
    assert job["evaluation"]["eval_every_n_epochs"] == 2
    again = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=h(alice)).json()
    assert again["method"] == job["method"] and again["preset"] == "drift_safe"


def test_explicit_fields_win_over_the_preset(client, alice):
    r = create(client, alice, preset="drift_safe", evaluation={"eval_every_n_epochs": 5},
               method={"type": "self_distillation", "self_distillation": {
                   "hyperparameters": {"distill_weight": 1.5, "n_epochs": 7}}})
    assert r.status_code == 200, r.text
    job = r.json()
    hp = job["method"]["self_distillation"]["hyperparameters"]
    assert hp["distill_weight"] == 1.5 and hp["n_epochs"] == 7
    assert hp["distill_temperature"] == _DRIFT_SAFE["lora"]["distill_temperature"]
    assert hp["stop_at_new_fact_accuracy"] == _DRIFT_SAFE["lora"]["stop_at_new_fact_accuracy"]
    assert job["evaluation"]["eval_every_n_epochs"] == 5


@pytest.mark.parametrize("body, param", [
    ({"method": {"type": "supervised"}}, "preset"),
    ({"hyperparameters": {"n_epochs": 3}}, "hyperparameters"),
    ({"preset": "fastest"}, "preset"),
])
def test_a_preset_that_conflicts_is_400_naming_the_field(client, alice, body, param):
    r = create(client, alice, **({"preset": "drift_safe"} | body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert client.get("/v1/fine_tuning/jobs", headers=h(alice)).json()["data"] == []
