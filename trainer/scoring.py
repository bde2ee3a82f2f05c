"""Asking a model its facts, in batches: greedy answers, exact match, answer-position log-probs.

A fact is an `Example`: the prompt is everything before its last assistant turn, rendered with the
tokenizer's chat template and a generation prompt, exactly as a user of a downloaded adapter would
ask it. Answers are compared after SQuAD-style normalisation against every accepted answer.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence

import torch

from trainer.data import Example, parse_line
from trainer.tokenize import IGNORE, encode_example, encode_prompt

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


def greedy_answers(model, tokenizer, facts, *, batch_size: int = 256,
                   max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers for many prompts: left-padded batches, longest first, one `generate` each.

    Decoding settings are explicit (`trainer.generation`); `max_new_tokens` defaults to the
    longest accepted answer of the batch plus a margin.
    """
    from trainer.generation import answer_budget, generate_greedy

    examples = _as_examples(facts)
    prompts = [encode_prompt(tokenizer, ex.prompt_messages) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        budget = max_new_tokens or answer_budget(
            tokenizer, {a for i in idx for a in examples[i].answers})
        got = generate_greedy(model, tokenizer, [prompts[i] for i in idx], budget, device)
        for i, answer in zip(idx, got):
            answers[i] = answer
    model.train(was_training)
    return answers


def is_correct(answer: str, accepted: Sequence[str]) -> bool:
    got = normalize(answer)
    return any(got == normalize(a) for a in accepted)


def accuracy(model, tokenizer, facts, **kw) -> torch.Tensor:
    """Bool tensor: which facts the model answers right (greedy, normalised exact match)."""
    examples = _as_examples(facts)
    answers = greedy_answers(model, tokenizer, examples, **kw)
    return torch.tensor([is_correct(a, ex.answers) for a, ex in zip(answers, examples)])


@torch.inference_mode()
def answer_logprobs(model, tokenizer, facts, *, batch_size: int = 256,
                    max_len: int = 256) -> torch.Tensor:
    """Log-probs [N_positions, V] at every answer-token position, teacher-forced, in fact order."""
    from trainer.tokenize import collate

    examples = _as_examples(facts)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = []
    was_training = model.training
    model.eval()
    for b in range(0, len(examples), batch_size):
        enc = [encode_example(tokenizer, ex, max_len) for ex in examples[b: b + batch_size]]
        batch = {k: v.to(device) for k, v in collate(enc, pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        where = batch["labels"][:, 1:] != IGNORE
        chunks.append(torch.log_softmax(logits[:, :-1][where].float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(chunks)


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(p || q), both given as log-probs."""
    if p_log.numel() == 0:
        return 0.0
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
