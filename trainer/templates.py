"""How a conversation becomes text: the model's own chat template, or driftsafe's plain QA one.

Most base models (GPT-2-style ones, and the base checkpoints of every family) ship without a chat
template, so `apply_chat_template` raises. Such a model is trained, scored and asked through
`PLAIN_QA_TEMPLATE`, documented in README ("Bring your own model"):

    Question: {user message}
    Answer: {assistant message}{eos_token}

with a system message, if any, as a first paragraph, and turns separated by a blank line. The
answer starts with a space after "Answer:": byte-level BPE pre-tokenizers keep a leading space with
the word that follows, so the prompt's tokens end where the answer's begin.

`end_of_turn_ids` reads off the template which token closes an assistant turn (<|im_end|>,
<|eot_id|>, <end_of_turn>, <|end|>, or eos for the plain template): training learns it, and
generation stops at it.
"""

from __future__ import annotations

PLAIN_QA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Question: ' + message['content'] + '\\nAnswer:' }}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
PLAIN_QA_NAME = "driftsafe-plain-qa"
_PROBE_ANSWER = "\u2063driftsafe-answer\u2063"  # text no real answer contains


def template_of(tokenizer) -> str:
    """The chat template this tokenizer's model is trained and asked with."""
    return tokenizer.chat_template or PLAIN_QA_TEMPLATE


def template_name(tokenizer) -> str:
    return "model" if tokenizer.chat_template else PLAIN_QA_NAME


def render(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         chat_template=template_of(tokenizer))


def render_many(tokenizer, conversations, *, add_generation_prompt: bool) -> list[str]:
    """`render` for many conversations in one call: per-call overhead is most of its cost."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template([list(m) for m in conversations], tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         chat_template=template_of(tokenizer))


def turn_suffix(tokenizer) -> str:
    """The text the template writes after an assistant message's content (end-of-turn marker)."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    text = render(tokenizer, msgs, add_generation_prompt=False)
    return text[text.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):]


def answer_lead(tokenizer) -> str:
    """The text the template writes between the generation prompt and an assistant message's
    content: '' for most, a space for the plain QA template ("Answer:" then " Paris")."""
    msgs = [{"role": "user", "content": "q"}]
    prompt = render(tokenizer, msgs, add_generation_prompt=True)
    text = render(tokenizer, [*msgs, {"role": "assistant", "content": _PROBE_ANSWER}],
                  add_generation_prompt=False)
    start = text.index(_PROBE_ANSWER)
    return text[len(prompt): start] if text.startswith(prompt) and start >= len(prompt) else ""


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn token, and eos.

    The end-of-turn token is the first token of `turn_suffix` when that is a special token (one
    the tokenizer never splits). A template that closes turns with plain text has only eos.
    """
    ids: list[int] = []
    suffix = tokenizer(turn_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    if suffix and suffix[0] in special:
        ids.append(suffix[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_format(tokenizer) -> dict:
    """How to ask a tuned model, for the adapter's driftsafe.json."""
    eot = end_of_turn_ids(tokenizer)
    return {"chat_template": template_name(tokenizer),
            "template": template_of(tokenizer),
            "stop_token_ids": eot,
            "stop_tokens": tokenizer.convert_ids_to_tokens(eot),
            "usage": "tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                     "chat_template=<template>), greedy decoding, stop at stop_token_ids"}
