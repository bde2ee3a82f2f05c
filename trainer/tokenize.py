"""Examples to token ids through the tokenizer's chat template, with loss on answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss applies


def render(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def token_ids(tokenizer, text: str) -> list[int]:
    # The chat template already places any special tokens the model expects.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages) -> list[int]:
    return token_ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_example(tokenizer, example: Example, max_len: int) -> Encoded:
    """Token ids of the whole conversation; labels on the assistant turns whose weight is 1.

    Each learned turn spans from the end of "conversation so far + generation prompt" to the end of
    "conversation including this turn", so whatever the template appends after an answer (an
    end-of-turn token) is learned too: that is what makes greedy decoding stop.
    """
    msgs = list(example.messages)
    ids = token_ids(tokenizer, render(tokenizer, msgs, add_generation_prompt=False))
    labels = [IGNORE] * len(ids)
    for i, (_, w) in enumerate(zip(msgs, example.weights)):
        if not w:
            continue
        start = len(encode_prompt(tokenizer, msgs[:i]))
        through = token_ids(tokenizer,
                            render(tokenizer, msgs[: i + 1], add_generation_prompt=False))
        if ids[: len(through)] != through:
            raise ValueError(f"line {example.line}: the chat template does not render turns "
                             "as a prefix of the whole conversation")
        labels[start: len(through)] = ids[start: len(through)]
    if len(ids) > max_len:
        # Keep the end, where the answers are; a conversation that loses every answer is an error.
        ids, labels = ids[-max_len:], labels[-max_len:]
        if all(label == IGNORE for label in labels):
            raise ValueError(f"line {example.line}: longer than max_seq_len={max_len} tokens")
    return Encoded(ids, labels)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding carries no loss and no attention."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
