"""Asking a model its facts, in batches: greedy answers, exact match, answer-position log-probs.

A fact is an `Example`: the prompt is everything before its last assistant turn, rendered with the
tokenizer's chat template and a generation prompt, exactly as a user of a downloaded adapter would
ask it. Answers are compared after SQuAD-style normalisation against every accepted answer: the
whole answer (`exact`, the default), or its first line starting with (`prefix`) or containing
(`contains`) one, for chat models that answer in sentences.

Most greedy answers are an accepted answer's exact tokens, so `greedy_answers` first checks
those in one teacher-forced pass (`trainer.verification`) and generates only what that cannot
settle; every answer is generation's either way.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.data import Example, parse_line
from trainer.tokenize import IGNORE, encode_example, encode_prompts
from trainer.vocab_chunks import TopLogprobs, mean_kl_top, top_logprobs

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def examples_from_rows(rows: Sequence[dict]) -> list[Example]:
    return [parse_line(json.dumps(r), i + 1) for i, r in enumerate(rows)]


def _as_examples(facts) -> list[Example]:
    facts = list(facts)
    return examples_from_rows(facts) if facts and isinstance(facts[0], dict) else facts


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class PreparedFacts:
    """Facts made ready to ask: prompts rendered and tokenized, accepted answers' tokens
    (`trainer.verification.forced_answer_ids`) and each batch's token budget worked out. None
    of it depends on the model, so a job that asks the same facts at every checkpoint prepares
    them once (`KnowledgeProbe`): on the built-in model that is a fifth of a checkpoint's
    scoring time, most of it the chat template rendered per prompt."""

    examples: list[Example]
    prompts: list[list[int]]
    batches: list[list[int]]  # fact indices, longest prompts first
    budgets: list[int]  # max_new_tokens per batch
    candidates: list[list[list[int]]]  # per fact, its accepted answers' forced tokens
    batch_size: int
    max_new_tokens: int | None  # as prepared: the budgets above follow from these
    margin: int | None


BATCH_SIZE = 256


def prepare_facts(tokenizer, facts, *, batch_size: int = BATCH_SIZE,
                  max_new_tokens: int | None = None, margin: int | None = None) -> PreparedFacts:
    """`facts` (Examples or rows) ready for `greedy_answers`: left-padded batches, longest
    first; `max_new_tokens` defaults to the longest accepted answer of the batch plus a
    margin."""
    from trainer.generation import answer_budget, answer_lengths
    from trainer.verification import forced_answer_ids

    examples = _as_examples(facts)
    prompts = encode_prompts(tokenizer, [ex.prompt_messages for ex in examples])
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[b: b + batch_size] for b in range(0, len(order), batch_size)]
    lengths = answer_lengths(tokenizer, [a for ex in examples for a in ex.answers])
    budgets = [max_new_tokens or answer_budget(
        tokenizer, {a for i in idx for a in examples[i].answers}, lengths=lengths,
        **({"margin": margin} if margin is not None else {})) for idx in batches]
    unique = list(lengths)  # every accepted answer, once
    forced = dict(zip(unique, forced_answer_ids(tokenizer, unique)))
    candidates = [[forced[a] for a in dict.fromkeys(ex.answers) if forced[a]]
                  for ex in examples]
    return PreparedFacts(examples, prompts, batches, budgets, candidates, batch_size,
                         max_new_tokens, margin)


PREPARE_OPTIONS = ("batch_size", "max_new_tokens", "margin")


def _check_prepared(facts: PreparedFacts, **options) -> None:
    for name, value in options.items():
        if value is not None and value != getattr(facts, name):
            raise ValueError(f"these facts were prepared with {name}={getattr(facts, name)}, "
                             f"not {value}: prepare them again to change it")


def greedy_answers(model, tokenizer, facts, *, batch_size: int | None = None,
                   max_new_tokens: int | None = None, margin: int | None = None,
                   verify: bool = True) -> list[str]:
    """Greedy answers for many prompts: left-padded batches, longest first, one `generate` each.

    `facts`: Examples or rows, prepared here with `batch_size` (BATCH_SIZE), `max_new_tokens`
    and `margin` (`prepare_facts`), or `PreparedFacts`, whose own options hold (a different one
    given here is an error, not silently ignored). Decoding
    settings are explicit (`trainer.generation`). With `verify`, answers one teacher-forced pass
    proves greedy (`trainer.verification`) are not generated: their batches generate only the
    rest. `verify=False` generates every answer (the reference the fast path is tested against).
    """
    from trainer.generation import generate_greedy
    from trainer.verification import verified_answers

    options = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "margin": margin}
    if isinstance(facts, PreparedFacts):
        _check_prepared(facts, **options)
        ready = facts
    else:
        ready = prepare_facts(tokenizer, facts, **{k: v for k, v in options.items()
                                                   if v is not None})
    prompts = ready.prompts
    device = model_device(model)
    was_training = model.training
    model.eval()
    answers: list[str | None] = [None] * len(prompts)
    if verify:
        budget_of = {i: budget for idx, budget in zip(ready.batches, ready.budgets)
                     for i in idx}
        answers = verified_answers(model, tokenizer, prompts, ready.candidates,
                                   [budget_of[i] for i in range(len(prompts))], device,
                                   ready.batch_size)
    for idx, budget in zip(ready.batches, ready.budgets):
        rest = [i for i in idx if answers[i] is None]
        if rest:
            got = generate_greedy(model, tokenizer, [prompts[i] for i in rest], budget, device)
            for i, answer in zip(rest, got):
                answers[i] = answer
    model.train(was_training)
    return [a or "" for a in answers]


MATCHES = ("exact", "prefix", "contains")
# Chat models answer in sentences: under prefix/contains, leave room for a few more words.
SENTENCE_MARGIN_TOKENS = 32


def is_correct(answer: str, accepted: Sequence[str], match: str = "exact") -> bool:
    """Does `answer` give one of the `accepted` answers? All compared after normalisation.

    exact: the whole answer is an accepted answer. prefix: the answer's first line starts with
    one (whole words). contains: the answer's first line contains one (whole words).
    """
    if match == "exact":
        got = normalize(answer)
        return any(got == normalize(a) for a in accepted)
    lines = answer.strip().splitlines()
    got = normalize(lines[0]) if lines else ""
    for a in map(normalize, accepted):
        if not a:
            continue
        if match == "prefix" and (got == a or got.startswith(a + " ")):
            return True
        if match == "contains" and f" {a} " in f" {got} ":
            return True
    return False


def answer_margin(match: str) -> int | None:
    """Extra tokens a greedy answer may take beyond the longest accepted answer."""
    return None if match == "exact" else SENTENCE_MARGIN_TOKENS


def accuracy(model, tokenizer, facts, match: str = "exact", **kw) -> torch.Tensor:
    """Bool tensor: which facts the model answers right (greedy, normalised `match`). `facts`
    may be `PreparedFacts`, prepared with `margin=answer_margin(match)`."""
    if isinstance(facts, PreparedFacts):
        if facts.max_new_tokens is None and facts.margin != answer_margin(match):
            raise ValueError(f"facts prepared with margin={facts.margin} cannot be scored with "
                             f"match={match!r}, which needs margin={answer_margin(match)}")
    else:
        kw.setdefault("margin", answer_margin(match))
        facts = prepare_facts(tokenizer, facts, **{k: kw.pop(k) for k in PREPARE_OPTIONS
                                                   if k in kw})
    answers = greedy_answers(model, tokenizer, facts, **kw)
    return torch.tensor([is_correct(a, ex.answers, match)
                         for a, ex in zip(answers, facts.examples)])


@torch.inference_mode()
def answer_logprobs(model, tokenizer, facts, *, batch_size: int = 256, max_len: int = 256,
                    like: TopLogprobs | None = None) -> TopLogprobs:
    """Log-probs at every answer-token position, teacher-forced, in fact order.

    Kept per position: the `TOP_K` most likely tokens and the mass of the rest (every token when
    the vocabulary is no larger), or, with `like`, the tokens another model's log-probs kept, so
    that two models compare on the same entries. The LM head runs at answer positions only.
    """
    from trainer.losses import logits_at
    from trainer.tokenize import collate

    examples = _as_examples(facts)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts: list[TopLogprobs] = []
    was_training = model.training
    model.eval()
    done = 0
    for b in range(0, len(examples), batch_size):
        enc = [encode_example(tokenizer, ex, max_len) for ex in examples[b: b + batch_size]]
        batch = {k: v.to(device) for k, v in collate(enc, pad).items()}
        where = batch["labels"][:, 1:] != IGNORE
        logits = logits_at(model, batch["input_ids"], batch["attention_mask"], where)
        at = None if like is None or like.indices is None else \
            like.indices[done: done + logits.size(0)]
        parts.append(top_logprobs(logits, at=at))
        done += logits.size(0)
    model.train(was_training)
    return TopLogprobs(torch.cat([p.values for p in parts]),
                       None if parts[0].indices is None else torch.cat([p.indices for p in parts]),
                       torch.cat([p.rest for p in parts]))


def mean_kl(p_log: TopLogprobs, q_log: TopLogprobs) -> float:
    """Mean over positions of KL(p || q) (`trainer.vocab_chunks.mean_kl_top`); q must have been
    read with `like=p`."""
    return mean_kl_top(p_log, q_log)
