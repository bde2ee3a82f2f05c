"""Adapter downloads: a zip of PEFT's own files plus a driftsafe.json report."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from sqlalchemy.orm import Session

from api.errors import APIError
from api.responses import Download
from api.schemas import checkpoint_object, job_object
from api.tenancy import Scoped
from store.artifacts import ArtifactStore
from store.models import Checkpoint, Job


def pick_checkpoint(session: Session, scoped: Scoped, job: Job, select: str) -> Checkpoint:
    query = scoped.select(Checkpoint).where(Checkpoint.job_id == job.id)
    if select == "drift_safe":
        query = query.where(Checkpoint.drift_safe.is_(True))
    ckpt = session.scalar(query.order_by(Checkpoint.step_number.desc()).limit(1))
    if ckpt is None:
        if select == "drift_safe":
            budget = job.spec.get("evaluation", {}).get("max_forgetting")
            raise APIError(404, f"No checkpoint of job '{job.id}' is within its forgetting budget "
                                f"(max_forgetting={budget}); every scored checkpoint forgot more.",
                           code="no_drift_safe_checkpoint")
        raise APIError(404, f"Job '{job.id}' has no adapter yet (status {job.status}).",
                       code="adapter_not_ready")
    return ckpt


ZIP_NAME = "adapter.zip"


def _build_zip(folder: Path, report: dict, target: Path) -> None:
    """Entries are stored, not deflated: safetensors do not compress, and a stored zip costs one
    copy to make."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
        zf.writestr("driftsafe.json", json.dumps(report, indent=1, default=str))


def adapter_response(artifacts: ArtifactStore, job: Job, ckpt: Checkpoint) -> Download:
    """The checkpoint's adapter zip, made on its first download and kept with the checkpoint (it
    goes when the checkpoint's directory does); later downloads stream the same file."""
    checkpoint_dir = artifacts.path(ckpt.storage_path)
    folder = checkpoint_dir / "adapter"
    if not folder.is_dir():
        raise APIError(404, f"The adapter files of checkpoint '{ckpt.id}' are gone.",
                       code="adapter_missing")
    target = checkpoint_dir / ZIP_NAME
    if not target.is_file():
        # The report describes the job as it was when the zip was made (the checkpoint's own
        # scores do not change).
        report = {"job": job_object(job), "checkpoint": checkpoint_object(ckpt, job),
                  "base_model": job.model,
                  "usage": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                           "this_folder); ask with tokenizer.apply_chat_template(messages, "
                           "add_generation_prompt=True, chat_template=prompt_format.template) "
                           "and greedy decoding stopped at prompt_format.stop_token_ids"}
        fmt = folder / "prompt_format.json"  # written by the trainer beside the weights
        if fmt.is_file():
            report["prompt_format"] = json.loads(fmt.read_text())
        with artifacts.replacing(f"{ckpt.storage_path}/{ZIP_NAME}") as tmp:
            _build_zip(folder, report, tmp)  # renamed into place whole: no half zip is served
    return Download(target, media_type="application/zip",
                    filename=f"{job.id}-step{ckpt.step_number}.zip")
