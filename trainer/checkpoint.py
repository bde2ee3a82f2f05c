"""Checkpoints: the trained weights in their own format plus everything needed to resume exactly.

Layout of `step-000120/`:
  adapter/            PEFT's `save_pretrained` (adapter_config.json, adapter_model.safetensors),
                      or the whole model's `save_pretrained` under full fine-tuning
  trainer_state.pt    optimizer, scheduler and RNG states (tensors and plain containers only,
                      read back with `weights_only=True`, so loading never runs pickled code)
  trainer_state.json  step, epoch, metrics and the job facts a resume reuses
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    epoch: float
    path: Path
    metrics: dict


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_weights(model, path: Path, extra_files: dict[str, str] | None = None) -> None:
    """PEFT saves only the adapter (the active one); a plain model saves itself whole.
    `extra_files` (name -> text) go beside the weights, e.g. how to prompt the tuned model."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(path, selected_adapters=["default"])
    else:
        model.save_pretrained(path)
    for name, text in (extra_files or {}).items():
        (Path(path) / name).write_text(text)


def save_checkpoint(root: Path, *, step: int, epoch: float, model, optimizer, scheduler,
                    metrics: dict, extra_state: dict, extra_tensors: dict | None = None,
                    extra_files: dict[str, str] | None = None) -> CheckpointInfo:
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "adapter", extra_files)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), **(extra_tensors or {})}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(
        {"step": step, "epoch": epoch, "metrics": metrics, **extra_state}, indent=1, default=float))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)  # a checkpoint directory either exists whole or not at all
    return CheckpointInfo(step, epoch, final, metrics)


def load_state(path: Path) -> tuple[dict, dict]:
    """(tensor state, json state) of a checkpoint directory."""
    path = Path(path)
    tensors = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "trainer_state.json").read_text())
    return tensors, meta


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "trainer_state.json").exists())
    return done[-1] if done else None
