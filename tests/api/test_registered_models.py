"""Job creation for a model registered through DRIFTSAFE_MODELS: what its config.json decides.

A config.json in a folder is all the API reads (it never loads a model or imports torch): whether
the model ties its embeddings, and its size, which sets the "auto" hyperparameters the worker will
use and so the steps checked against max_job_steps.
"""

import json

import pytest

from store.db import session_scope
from store.models import Job, by_public_id
from tests.api.conftest import h, upload
from tests.api.test_files_and_jobs import count

TRAINABLE = "method.frozen_groups.hyperparameters.trainable"
# A Qwen2-0.5B-shaped config (tied embeddings), as its hub folder has it.
QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
         "intermediate_size": 4864, "num_hidden_layers": 24, "vocab_size": 151936,
         "tie_word_embeddings": True}


@pytest.fixture
def register(client, tmp_path):
    """Register a model folder holding only `config`, on the live settings the routes read."""
    def add(model_id: str, config: dict) -> str:
        folder = tmp_path / model_id
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        client.app.state.settings.models = {**client.app.state.settings.models,
                                            model_id: str(folder)}
        return model_id
    return add


def _create(client, tenant, fid, model, trainable, adapter="lora"):
    return client.post("/v1/fine_tuning/jobs", headers=h(tenant), json={
        "model": model, "training_file": fid, "adapter": {"type": adapter},
        "method": {"type": "frozen_groups",
                   "frozen_groups": {"hyperparameters": {"trainable": trainable}}}})


def test_one_side_of_tied_embeddings_is_refused_at_creation_naming_the_tie(
        client, alice, settings, register):
    tied = register("own-qwen2", QWEN2)
    untied = register("own-llama", QWEN2 | {"model_type": "llama", "tie_word_embeddings": False})
    fid = upload(client, alice).json()["id"]
    for side in ("lm_head", "embeddings"):
        r = _create(client, alice, fid, tied, [side, "attention"], adapter="full")
        err = r.json()["error"]
        assert r.status_code == 400, r.text
        assert err["param"] == TRAINABLE and err["code"] == "tied_embeddings"
        assert "own-qwen2" in err["message"] and "tie_word_embeddings" in err["message"]
        assert repr(side) in err["message"]
    assert count(settings, Job) == 0  # nothing stored, nothing queued
    # What the tie allows: both sides, neither, or LoRA (each side its own update); and an
    # untied model may name one side.
    for model, trainable, adapter in [(tied, ["embeddings", "lm_head"], "full"),
                                      (tied, ["attention"], "full"),
                                      (tied, ["lm_head"], "lora"),
                                      (untied, ["lm_head"], "full")]:
        r = _create(client, alice, fid, model, trainable, adapter)
        assert r.status_code == 200, (model, trainable, adapter, r.text)
    assert count(settings, Job) == 4


def test_auto_steps_are_planned_with_the_registered_models_own_defaults(
        client, alice, settings, register):
    """6 examples, every hyperparameter "auto". A model that is not built in gets batch 6 (at
    most 16) and 10 epochs (3,000 examples seen, at most 10): 10 steps. The built-in model's own
    autos (batch 1, 40 epochs: 240 steps) would exceed a cap of 50 that the registered model's
    plan fits; the API must plan each job as the worker will run it."""
    client.app.state.settings.max_job_steps = 50
    model = register("own-qwen2", QWEN2)
    fid = upload(client, alice).json()["id"]
    body = {"training_file": fid, "method": {"type": "supervised"}}
    builtin = client.post("/v1/fine_tuning/jobs", headers=h(alice),
                          json=body | {"model": "driftsafe-factlm-tiny"})
    assert builtin.status_code == 400 and builtin.json()["error"]["code"] == "job_too_large"
    assert "240 steps" in builtin.json()["error"]["message"]
    r = client.post("/v1/fine_tuning/jobs", headers=h(alice), json=body | {"model": model})
    assert r.status_code == 200, r.text
    with session_scope(settings) as s:
        assert by_public_id(s, Job, r.json()["id"]).total_steps == 10
