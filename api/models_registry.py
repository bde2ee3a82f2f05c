"""The base models a worker can load: the built-in one (always) plus DRIFTSAFE_MODELS."""

from __future__ import annotations

from store.settings import Settings

BUILTIN_MODEL_ID = "driftsafe-factlm-tiny"  # trainer.builtin.MODEL_ID, without importing torch
BUILTIN_CREATED = 1780000000


def known_model_ids(settings: Settings) -> list[str]:
    return [BUILTIN_MODEL_ID, *sorted(settings.models)]


def model_objects(settings: Settings) -> list[dict]:
    out = [{"id": BUILTIN_MODEL_ID, "object": "model", "created": BUILTIN_CREATED,
            "owned_by": "driftsafe"}]
    out += [{"id": m, "object": "model", "created": BUILTIN_CREATED, "owned_by": "local"}
            for m in sorted(settings.models)]
    return out
