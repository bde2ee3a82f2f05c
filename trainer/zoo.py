"""A model zoo made here: tiny models of real architectures, with real tokenizers, no download.

Each family is built the way its hub checkpoints are shaped, at a size that trains in
milliseconds a step on a CPU:
  - llama:  LlamaForCausalLM, untied, Llama-3 header template (<|eot_id|> ends a turn, eos is
            <|end_of_text|>, no pad token);
  - qwen2:  Qwen2ForCausalLM with tied embeddings, ChatML with Qwen's default system prompt, and
            Qwen2.5-Instruct's sampling generation_config (which scoring must not inherit);
  - gpt2:   GPT2LMHeadModel (Conv1D layers, dropout 0.1, tied), no chat template at all;
  - phi3:   Phi3ForCausalLM (fused qkv_proj and gate_up_proj), Phi-3's template, which appends
            eos after the last turn;
  - gemma:  GemmaForCausalLM (tied, (1 + w) RMSNorms, scaled embeddings), Gemma's turn template.
Every tokenizer is a byte-level BPE trained here on the fact world's text (`trainer.world`), with
a vocabulary small enough that names and answers take several tokens.

`teach` trains a zoo model briefly on a few facts, so it has known facts to score, forget and
distil (a format-warmup teacher needs training examples the base already answers right).
`bench gpu` builds its Qwen2 model from `build_tokenizer` and the qwen2 config with real sizes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.data import Example

FAMILIES = ("llama", "qwen2", "gpt2", "phi3", "gemma")
TINY = dict(hidden=32, intermediate=64, layers=2, heads=4)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    specials: list[str]
    bos: str | None
    eos: str
    pad: str | None
    template: str | None
    tied: bool
    # What the hub's generation_config.json of such a model asks for (scoring must ignore it).
    generation: dict = field(default_factory=dict)


SPECS = {
    "llama": Family("llama", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"],
                    "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3_TEMPLATE, False,
                    {"do_sample": True, "temperature": 0.6, "top_p": 0.9}),
    "qwen2": Family("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
                    "<|endoftext|>", CHATML_TEMPLATE, True,
                    {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                     "repetition_penalty": 1.05}),
    "gpt2": Family("gpt2", ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, None, True),
    "phi3": Family("phi3", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                            "<|end|>"], None, "<|endoftext|>", "<|endoftext|>", PHI3_TEMPLATE,
                   False),
    "gemma": Family("gemma", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                    "<bos>", "<eos>", "<pad>", GEMMA_TEMPLATE, True),
}


@functools.lru_cache(maxsize=4)
def _world(seed: int):
    from trainer.world import WorldConfig, generate_world

    return generate_world(WorldConfig(seed=seed))


@functools.lru_cache(maxsize=4)
def world_text(seed: int = 0) -> tuple[str, ...]:
    """Every question and answer of a fact world, plus the words templates put around them."""
    world = _world(seed)
    facts = world.known + world.train_new_names + world.train_new_uuids
    lines = [f"{f.question(t)} {f.answer}" for f in facts for t in range(3)]
    return (*lines, "Question: Answer: system user assistant model You are a helpful assistant.")


def build_tokenizer(family: str, vocab_size: int = 400, seed: int = 0):
    """A byte-level BPE tokenizer trained on the world's text, with the family's special tokens
    and chat template (none for gpt2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(world_text(seed), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec.specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, **{k: v for k, v in named.items() if v is not None},
        additional_special_tokens=[t for t in spec.specials if t not in named.values()],
        clean_up_tokenization_spaces=False, model_max_length=256)
    tokenizer.chat_template = spec.template
    return tokenizer


def model_config(family: str, tokenizer, *, hidden: int, intermediate: int, layers: int,
                 heads: int, vocab_size: int | None = None, kv_heads: int | None = None):
    """The family's transformers config at the given size (vocab: the tokenizer's by default)."""
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    spec = SPECS[family]
    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else None,
               eos_token_id=tokenizer.convert_tokens_to_ids(spec.eos),
               pad_token_id=tokenizer.convert_tokens_to_ids(spec.pad) if spec.pad else None)
    vocab = vocab_size or len(tokenizer)
    kv = kv_heads or max(1, heads // 2)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=256, tie_word_embeddings=spec.tied, **ids)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=kv, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=kv, **common)
    if family == "phi3":
        return Phi3Config(num_key_value_heads=heads, original_max_position_embeddings=256,
                          **common)
    if family == "gemma":
        return GemmaConfig(num_key_value_heads=1, head_dim=hidden // heads, **common)
    if family == "gpt2":  # GPT-2's own names; dropout stays at its 0.1 defaults
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=intermediate, n_layer=layers,
                          n_head=heads, n_positions=256, tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown family {family!r}; the zoo has {list(FAMILIES)}")


def build_model(family: str, tokenizer, seed: int = 0, **size):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, tokenizer, **(TINY | size)))
    for key, value in SPECS[family].generation.items():
        setattr(model.generation_config, key, value)
    return model


def facts(n: int, seed: int = 0, offset: int = 0) -> list[Example]:
    """`n` QA facts of the world (known facts, from `offset`), as examples."""
    chosen = _world(seed).known[offset: offset + n]
    return [Example(({"role": "user", "content": f.question(0)},
                     {"role": "assistant", "content": f.answer}), (0, 1), (f.answer,), i + 1)
            for i, f in enumerate(chosen)]


def teach(model, tokenizer, examples: list[Example], *, max_steps: int = 400, lr: float = 1e-2,
          check_every: int = 25) -> float:
    """Full training on `examples` until the model answers all of them (or `max_steps`).
    Returns the final greedy accuracy."""
    from trainer.generation import pad_id_of
    from trainer.losses import answer_cross_entropy
    from trainer.scoring import accuracy
    from trainer.tokenize import collate, encode_example

    batch = collate([encode_example(tokenizer, e, 256) for e in examples], pad_id_of(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    acc = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = answer_cross_entropy(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every == 0:
            acc = float(accuracy(model, tokenizer, examples).float().mean())
            if acc == 1.0:
                break
    model.eval()
    return acc


def build(family: str, out: Path, *, known: list[Example] | None = None, seed: int = 0) -> Path:
    """Build a family's tiny model and tokenizer into `out` (taught `known` first, if given)."""
    out = Path(out)
    tokenizer = build_tokenizer(family, seed=seed)
    model = build_model(family, tokenizer, seed=seed)
    if known:
        teach(model, tokenizer, known)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
