"""Greedy answers under an explicit generation configuration.

A model's own `generation_config` (from its hub folder) may ask for sampling, a repetition
penalty, bad-word lists or a minimum length; `generate` fills every setting we leave unset from
it. Scoring must not depend on those, so generation here runs with the model's config swapped for
an empty one and every decoding setting given: greedy, one beam, no penalties, KV cache on,
`max_new_tokens` from the longest accepted answer plus a margin, stopping at the template's
end-of-turn token (and eos).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch

from trainer.templates import end_of_turn_ids, turn_suffix

ANSWER_MARGIN_TOKENS = 4  # a tuned model may phrase an answer a little longer than the key


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id


def answer_lengths(tokenizer, answers: Iterable[str]) -> dict[str, int]:
    """Tokens each answer takes, its end-of-turn marker included (one tokenizer call)."""
    unique = list(dict.fromkeys(answers))
    if not unique:
        return {}
    suffix = turn_suffix(tokenizer)
    ids = tokenizer([" " + a + suffix for a in unique], add_special_tokens=False)["input_ids"]
    return {a: len(x) for a, x in zip(unique, ids)}


def answer_budget(tokenizer, answers: Iterable[str], margin: int = ANSWER_MARGIN_TOKENS,
                  lengths: dict[str, int] | None = None) -> int:
    """Tokens the longest accepted answer takes, its end-of-turn marker included, plus `margin`
    (`lengths`: `answer_lengths` already counted, for many batches at once)."""
    answers = list(answers)
    lengths = lengths if lengths is not None else answer_lengths(tokenizer, answers)
    return max((lengths[a] for a in answers), default=0) + margin


def greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False, num_beams=1, use_cache=True, max_new_tokens=max_new_tokens,
        min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        length_penalty=1.0, renormalize_logits=False, remove_invalid_values=False,
        eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=pad_id_of(tokenizer),
        bos_token_id=None, forced_bos_token_id=None, forced_eos_token_id=None,
        temperature=1.0, top_k=50, top_p=1.0,  # unused when greedy; set so none is inherited
    )


def _hf_model(model):
    """The transformers model under a PEFT wrapper (whose `generate` delegates to it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def _no_inherited_settings(model):
    from transformers import GenerationConfig

    inner = _hf_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                    device, **cache) -> list[str]:
    """Answers to already-encoded prompts of one batch (left-padded here), decoded and stripped.
    `cache`: a KV cache of all but the last token of prompts of one length, to continue from."""
    pad = pad_id_of(tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    config = greedy_config(tokenizer, max_new_tokens)
    with _no_inherited_settings(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config, **cache)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
