"""The official `openai` client, pointed at a real uvicorn process, drives every job route."""

import json

import pytest
from openai import OpenAI

from tests.api.conftest import QA_LINES
from tests.live import new_tenant_key, running_api

METHODS = [
    {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    {"type": "self_distillation", "self_distillation": {"hyperparameters": {
        "n_epochs": 2, "distill_weight": 1.0, "distill_temperature": 0.5}}},
    {"type": "frozen_groups", "frozen_groups": {"hyperparameters": {"trainable": ["mlp"]}}},
]


def test_openai_client_end_to_end(settings, tmp_path):
    key = new_tenant_key(settings, "openai-user")
    with running_api(settings, tmp_path / "api.log") as url:
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in QA_LINES) + "\n")
        with open(path, "rb") as fh:
            f = client.files.create(file=fh, purpose="fine-tune")
        assert f.id.startswith("file-") and f.bytes == path.stat().st_size
        assert client.files.retrieve(f.id).filename == "train.jsonl"

        jobs = []
        for method in METHODS:
            job = client.fine_tuning.jobs.create(
                model="driftsafe-factlm-tiny", training_file=f.id, method=method, seed=7,
                suffix="e2e", metadata={"method": method["type"]},
                extra_body={"adapter": {"type": "lora", "r": 8},
                            "evaluation": {"max_forgetting": 0.1}})
            jobs.append(job)
            assert job.status == "queued" and job.method.type == method["type"]
            assert job.seed == 7 and job.metadata == {"method": method["type"]}
            # driftsafe's extensions ride along as extra fields the client keeps
            assert job.adapter["r"] == 8 and job.evaluation["max_forgetting"] == 0.1
            assert job.hyperparameters is not None and job.error is None
        sd = client.fine_tuning.jobs.retrieve(jobs[1].id)
        assert sd.method.to_dict()["self_distillation"]["hyperparameters"]["distill_weight"] == 1.0
        assert set(sd.to_dict()) >= {
            "id", "object", "model", "created_at", "finished_at", "status", "fine_tuned_model",
            "training_file", "validation_file", "hyperparameters", "method", "result_files",
            "trained_tokens", "error", "seed", "estimated_finish", "metadata", "integrations",
            "organization_id", "adapter", "evaluation", "progress"}

        page = client.fine_tuning.jobs.list(limit=2)
        assert [j.id for j in page.data] == [jobs[2].id, jobs[1].id] and page.has_more
        nxt = client.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
        assert [j.id for j in nxt.data] == [jobs[0].id]
        every = [j.id for j in client.fine_tuning.jobs.list(limit=1)]  # auto-pagination
        assert every == [j.id for j in reversed(jobs)]
        filtered = client.fine_tuning.jobs.list(metadata={"method": "frozen_groups"})
        assert [j.id for j in filtered.data] == [jobs[2].id]

        events = client.fine_tuning.jobs.list_events(jobs[0].id)
        assert events.data and events.data[0].object == "fine_tuning.job.event"
        ckpts = client.fine_tuning.jobs.checkpoints.list(jobs[0].id)
        assert ckpts.data == []

        cancelled = client.fine_tuning.jobs.cancel(jobs[0].id)
        assert cancelled.status == "cancelled"
        with pytest.raises(Exception) as e:
            client.fine_tuning.jobs.cancel(jobs[0].id)
        assert getattr(e.value, "status_code", None) == 409

        models = [m.id for m in client.models.list()]
        assert "driftsafe-factlm-tiny" in models
