"""Greedy answers proven by one teacher-forced pass, so that most are never generated.

Greedy decoding emits the argmax at every step and stops at the first stop token. So when, fed
the prompt and then a candidate (an accepted answer's tokens through its stop token), the model's
argmax at every candidate position is the candidate's next token, generation would emit exactly
that candidate and stop: its answer is the candidate, decoded as generation decodes it. A row
that fails is left to generation, which decides it as before (`trainer.generation`).

What keeps this the answer `generate` gives:
  - Float noise. The pass computes in a different order from generate's cached one-token steps,
    so an argmax counts only when it beats the runner-up by more than that noise can move them
    (`TIE_TOLERANCE`); a near or exact tie is left to generate, which breaks it its own way.
  - The budget. A candidate longer than the batch's `max_new_tokens` would be cut short by
    generate, so it is not checked.
  - Candidates are only guesses (`forced_answer_ids`): a wrong guess fails the check, never
    passes it, and what is returned is the decoded candidate, not the accepted string.

Cost: the stop token is predicted, never read, so rows end before it; rows of one length batch
together, so no padding mask is needed; the LM head runs only at candidate positions; and rows
that open alike (the chat template's header, a question's first words) compute the keys and
values of their common head once (`_shared_depth`). On the built-in model (CPU) checking a row
costs about 0.6 of generating it, and a failed check is generated as well: 1,000 held-out known
facts score 1.35x faster than by generation alone, but the training file before training (half
its facts unknown) 1.2x slower, and facts the model does not know at all 1.5x slower.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch

from trainer.losses import logits_at
from trainer.templates import answer_lead, end_of_turn_ids, turn_suffix

# How far the top logit must beat the runner-up, relative to its size, for the argmax to stand
# for generate's: two computation orders differ by ~1e-6 relative in float32 and by a few ulps
# of a 16-bit format (autocast).
TIE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2,
                 torch.float16: 1e-2}


def forced_answer_ids(tokenizer, answers: Sequence[str]) -> list[list[int] | None]:
    """Per answer, the tokens a model emits to give it and end its turn: the template's text
    around an assistant message (`answer_lead`, `turn_suffix`), through its first stop token.
    None where that text never stops the turn. A template that rewrites an answer (trims it,
    say) makes the guess fail the check, never pass it wrongly."""
    if not answers:
        return []
    lead, suffix = answer_lead(tokenizer), turn_suffix(tokenizer)
    stop = set(end_of_turn_ids(tokenizer))
    out: list[list[int] | None] = []
    for ids in tokenizer([lead + a + suffix for a in answers],
                         add_special_tokens=False)["input_ids"]:
        end = next((k for k, t in enumerate(ids) if t in stop), None)
        out.append(None if end is None else ids[: end + 1])
    return out


@torch.inference_mode()
def verified_answers(model, tokenizer, prompts: Sequence[list[int]],
                     candidates: Sequence[Sequence[list[int]]], limits: Sequence[int], device,
                     batch_size: int = 256) -> list[str | None]:
    """Per prompt, the greedy answer where one of its candidates is provably what greedy
    decoding emits within `limits[i]` new tokens, else None.

    Rows of one length batch together: with no padding there is no padding mask, and attention
    takes its plain causal path (a padded batch costs half as much again)."""
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for i, cs in enumerate(candidates):
        for c in cs:
            if len(c) <= limits[i]:
                by_length.setdefault(len(prompts[i]) + len(c), []).append((i, c))
    answers: list[str | None] = [None] * len(prompts)
    decoded: dict[tuple[int, ...], str] = {}
    for pairs in by_length.values():
        for b in range(0, len(pairs), batch_size):
            batch = pairs[b: b + batch_size]
            held = _greedy_is_candidate(model, [prompts[i] for i, _ in batch],
                                        [c for _, c in batch], device)
            for (i, c), ok in zip(batch, held):
                if ok:
                    if tuple(c) not in decoded:
                        decoded[tuple(c)] = tokenizer.decode(c, skip_special_tokens=True).strip()
                    answers[i] = decoded[tuple(c)]
    return answers


def _greedy_is_candidate(model, prompts: Sequence[list[int]], candidates: Sequence[list[int]],
                         device) -> list[bool]:
    """Per row: does greedy decoding after prompts[r] emit exactly candidates[r]? One pass over
    rows of one length."""
    rows = [p + c[:-1] for p, c in zip(prompts, candidates)]
    depth = _shared_depth(rows, min(len(p) for p in prompts) - 1)
    kwargs = _head_cache(model, rows, depth, device) if depth else {}
    ids = torch.tensor([r[depth:] for r in rows], device=device)
    # The prompt's last position predicts the candidate's first token, and so on.
    where = torch.tensor([[len(p) - 1 <= depth + k < len(p) - 1 + len(c)
                           for k in range(ids.size(1))] for p, c in zip(prompts, candidates)],
                         device=device)
    mask = torch.ones((len(rows), depth + ids.size(1)), dtype=torch.long, device=device)
    logits = logits_at(model, ids, mask, where, **kwargs)
    tolerance = TIE_TOLERANCE.get(logits.dtype, 5e-2)
    top = logits.float().topk(2, dim=-1)
    target = torch.tensor([t for c in candidates for t in c], device=device)
    holds = (top.indices[:, 0] == target) & (
        top.values[:, 0] - top.values[:, 1] > tolerance * top.values[:, 0].abs().clamp(min=1.0))
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                     torch.tensor([len(c) for c in candidates], device=device))
    misses = torch.zeros(len(rows), dtype=torch.long, device=device)
    misses.index_add_(0, row_of, (~holds).long())
    return (misses == 0).tolist()


def _shared_depth(rows: Sequence[list[int]], longest: int) -> int:
    """How many leading tokens the rows share keys and values of: the depth that computes the
    fewest tokens, a head's counted twice (the pass over the distinct heads is a small batch);
    0 where sharing saves nothing."""
    best, fewest = 0, sum(len(r) for r in rows)
    for depth in range(1, longest + 1):
        heads = len({tuple(r[:depth]) for r in rows})
        cost = 2 * heads * depth + sum(len(r) - depth for r in rows)
        if cost < fewest:
            best, fewest = depth, cost
    return best


@functools.cache
def _cache_argument(model_class: type) -> str:
    # transformers 5.x renames `past_key_values` to `cache`
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters \
        else "past_key_values"


def _head_cache(model, rows: Sequence[list[int]], depth: int, device) -> dict:
    """Forward kwargs that give every row the keys and values of its first `depth` tokens,
    computed once per distinct head: attention is causal, so they depend on nothing after."""
    from transformers import DynamicCache

    heads: dict[tuple[int, ...], int] = {}
    group = [heads.setdefault(tuple(r[:depth]), len(heads)) for r in rows]
    ids = torch.tensor(list(heads), device=device)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT
    cache = DynamicCache(config=model.config)
    kwargs = {_cache_argument(type(inner)): cache, "use_cache": True}
    logits_at(model, ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool), **kwargs)
    cache.reorder_cache(torch.tensor(group, device=device))  # one copy of its head per row
    return kwargs
