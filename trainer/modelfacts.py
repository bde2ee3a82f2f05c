"""Facts about a base model that the trainer must not assume: tied embeddings, group mapping.

Torch-free at import, so the API can check a job against a registered model's `config.json` when
the job is created; the same check runs again on the loaded model when the job starts.

Tied input/output embeddings (Qwen2 small sizes, Gemma, GPT-2) are one tensor. Under full
fine-tuning, `named_parameters()` lists it once, under the input embedding's name, so naming only
"embeddings" would also train the LM head, and naming only "lm_head" would train nothing. Both are
refused with a message naming the tie. (Under LoRA each side gets its own low-rank update, so a
one-sided selection means what it says and is allowed.)
"""

from __future__ import annotations

import json
from pathlib import Path

TIE_SIDES = ("embeddings", "lm_head")


class TiedEmbeddingsError(ValueError):
    code = "tied_embeddings"


def tied_in_config(model_dir: str | Path) -> bool | None:
    """Does the model's config.json tie its embeddings? None when the file does not say."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    tie = config.get("tie_word_embeddings")
    if tie is None and isinstance(config.get("text_config"), dict):
        tie = config["text_config"].get("tie_word_embeddings")
    return tie if isinstance(tie, bool) else None


def check_tied_selection(tied: bool | None, groups: set[str], adapter_type: str) -> None:
    """Refuse a full fine-tuning selection that names one side of a tied embedding pair."""
    if not tied or adapter_type != "full":
        return
    named = [g for g in TIE_SIDES if g in groups]
    if len(named) == 1:
        effect = ("would also train the LM head" if named[0] == "embeddings"
                  else "would train nothing (the tensor is listed as the input embedding)")
        raise TiedEmbeddingsError(
            f"this model ties its input and output embeddings (tie_word_embeddings: one tensor "
            f"for embed_tokens and lm_head), so trainable {named[0]!r} alone {effect} under full "
            "fine-tuning; name both 'embeddings' and 'lm_head', or neither, or use a LoRA adapter")


def embeddings_are_tied(model) -> bool:
    """True when the loaded model's input and output embeddings share one weight tensor."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or not hasattr(out, "weight"):
        return False
    return out.weight.data_ptr() == inp.weight.data_ptr()


def modules_by_group(model) -> dict[str, list[str]]:
    """Every leaf module with parameters, by the named group it belongs to ("other": none)."""
    from trainer.adapters import group_of

    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and not list(module.children()) and any(True for _ in module.parameters()):
            out.setdefault(group_of(name) or "other", []).append(name)
    return out


def is_builtin_model(model_dir: str | Path) -> bool:
    """A model built by `trainer.builtin` (it sits in a world folder beside world.json)."""
    return (Path(model_dir).parent / "world.json").is_file()


def estimated_parameters(model_dir: str | Path) -> int | None:
    """Parameters of a decoder-only model, estimated from config.json without loading it (enough
    to pick a size class for "auto" hyperparameters); None when the file does not say."""
    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    c = c.get("text_config", c) if isinstance(c.get("text_config"), dict) else c
    hidden = c.get("hidden_size") or c.get("n_embd")
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    vocab = c.get("vocab_size")
    if not (hidden and layers and vocab):
        return None
    inter = c.get("intermediate_size") or c.get("n_inner") or 4 * hidden
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", True) else 2)
    return int(embeddings + layers * (4 * hidden * hidden + 3 * hidden * inter))


def auto_size(model_dir: str | Path) -> int | None:
    """What `resolve_auto` takes as `model_params`: None for a built-in model (its own tuned
    defaults), else the estimated size (0 when unknown: the smallest size class)."""
    if is_builtin_model(model_dir):
        return None
    return estimated_parameters(model_dir) or 0
