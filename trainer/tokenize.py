"""Examples to token ids through the tokenizer's chat template, with loss on answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data import Example
from trainer.templates import render, render_many

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss applies


def token_ids(tokenizer, text: str | list[str]) -> list[int] | list[list[int]]:
    # The chat template already places any special tokens the model expects.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages) -> list[int]:
    return token_ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_prompts(tokenizer, conversations) -> list[list[int]]:
    """`encode_prompt` of many conversations, rendered and tokenized in one call each (per-call
    overhead is most of the cost of one)."""
    texts = render_many(tokenizer, conversations, add_generation_prompt=True)
    return token_ids(tokenizer, texts) if texts else []


def _common_prefix(a: str, b: str) -> int:
    """The length of their common prefix, by bisection: the comparisons run in C (a loop over
    characters in Python took seconds per turn on a long conversation)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def encode_example(tokenizer, example: Example, max_len: int) -> Encoded:
    """`_encode_example`, with a chat template's refusal (`raise_exception`, as Llama's and
    Mistral's raise for turns that do not alternate) told as what is wrong with which line, not
    as an internal error."""
    from jinja2 import TemplateError

    try:
        return _encode_example(tokenizer, example, max_len)
    except TemplateError as e:
        raise ValueError(f"line {example.line}: the model's chat template refuses this "
                         f"conversation: {e}") from None


def _encode_example(tokenizer, example: Example, max_len: int) -> Encoded:
    """Token ids of the whole conversation; labels on the assistant turns whose weight is 1.

    Each learned turn spans from the end of "conversation so far + generation prompt" to the end of
    "conversation including this turn", so whatever the template appends after an answer (an
    end-of-turn token) is learned too: that is what makes greedy decoding stop.

    Checked token by token: a learned turn's context is exactly the ids a user's prompt encodes to
    (`encode_prompt`), and the answer's ids follow them. Where a BPE merge crosses the boundary
    (the whole text tokenizes differently from prompt + answer), the answer is tokenized on its
    own, so the model learns the tokens it has to generate after that prompt.
    """
    msgs = list(example.messages)
    text = render(tokenizer, msgs, add_generation_prompt=False)
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of `text` already encoded
    for i, (_, w) in enumerate(zip(msgs, example.weights)):
        if not w:
            continue
        prompt = render(tokenizer, msgs[:i], add_generation_prompt=True)
        through = render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        # Some templates close only the last turn with more (Phi-3 appends eos): a turn ends
        # where the conversation so far and the whole conversation part.
        through = through[: _common_prefix(text, through)]
        if not (through.startswith(prompt) and len(through) > len(prompt) > done - 1):
            raise ValueError(f"line {example.line}: the chat template does not render turns "
                             "as a prefix of the whole conversation")
        context = (token_ids(tokenizer, prompt) if done == 0
                   else ids + token_ids(tokenizer, text[done: len(prompt)]))
        whole = token_ids(tokenizer, through) if done == 0 else None
        if whole is not None and whole[: len(context)] == context:
            answer = whole[len(context):]
        else:
            answer = token_ids(tokenizer, through[len(prompt):])
            if tokenizer.decode(context + answer) != tokenizer.decode(
                    token_ids(tokenizer, through)):
                raise ValueError(f"line {example.line}: the tokenizer does not encode the answer "
                                 "the same way after its prompt as alone; check the chat template")
        labels += [IGNORE] * (len(context) - len(ids)) + answer
        ids = context + answer
        done = len(through)
    if done < len(text):
        tail = token_ids(tokenizer, text[done:])
        ids, labels = ids + tail, labels + [IGNORE] * len(tail)
    if len(ids) > max_len:
        # Keep the end, where the answers are; a conversation that loses every answer is an error.
        ids, labels = ids[-max_len:], labels[-max_len:]
        if all(label == IGNORE for label in labels):
            raise ValueError(f"line {example.line}: longer than max_seq_len={max_len} tokens")
    return Encoded(ids, labels)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding carries no loss and no attention. (Each tensor is made in
    one call from padded lists: a tensor per row cost ~2 ms of a training step.)"""
    width = max(len(e.input_ids) for e in batch)
    gaps = [width - len(e.input_ids) for e in batch]
    ids = torch.tensor([e.input_ids + [pad_id] * g for e, g in zip(batch, gaps)],
                       dtype=torch.long)
    labels = torch.tensor([e.labels + [IGNORE] * g for e, g in zip(batch, gaps)],
                          dtype=torch.long)
    mask = torch.tensor([[1] * (width - g) + [0] * g for g in gaps], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
