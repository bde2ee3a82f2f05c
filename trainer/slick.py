"""SliCK knowledge categories (Gekhman et al. 2024) for QA pairs under a given model.

Each fact is asked through `n_prompts` prompt variants, each with `n_shots` exemplars of other
facts as earlier chat turns. The default is zero-shot through the chat template — how a tuned
adapter is asked, and what chat models (the built-in one included) expect; with no exemplars every
variant is the same prompt, so one is asked and MaybeKnown cannot occur. Gekhman's setting for
base (non-chat) models is n_shots=4, n_prompts=10.

Per variant we need "is the greedy answer right?" and "is any of `n_samples` samples at
`temperature` right?". Both follow from one teacher-forced pass over
prompt + gold answer, with no generation:
  - greedy decoding produces the gold tokens iff each gold token is the argmax where it is
    predicted;
  - one sample equals the gold tokens with probability p = prod softmax(z / T)[gold], so "any of n
    samples is right" is a Bernoulli(1 - (1 - p)^n) draw, taken from a seeded generator.
That is the same distribution as sampling n answers and comparing tokens, at 1/(n+1) of the cost.
The match is token-exact, which is what greedy decoding of a single accepted answer means.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from trainer.data import Example
from trainer.scoring import model_device
from trainer.tokenize import IGNORE, collate, encode_example

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


@dataclass(frozen=True)
class SlickSettings:
    n_prompts: int = 4  # used only with exemplars
    n_shots: int = 0
    n_samples: int = 16
    temperature: float = 0.5
    batch_size: int = 256
    seed: int = 0


def _with_exemplars(ex: Example, shots: list[Example]) -> Example:
    msgs: list[dict] = []
    for s in shots:
        msgs += [dict(m) for m in s.messages if m["role"] != "system"][-2:]
    msgs += [dict(m) for m in ex.messages]
    weights = (0,) * (len(msgs) - 1) + (1,)
    return Example(tuple(msgs), weights, ex.answers, ex.line)


@torch.inference_mode()
def _greedy_and_sample_prob(model, tokenizer, examples: list[Example], settings: SlickSettings):
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy, prob = [], []
    for b in range(0, len(examples), settings.batch_size):
        enc = [encode_example(tokenizer, e, 1024) for e in examples[b: b + settings.batch_size]]
        batch = {k: v.to(device) for k, v in collate(enc, pad).items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        where = target != IGNORE
        safe = target.clamp(min=0)
        hit = (logits.argmax(-1) == safe) | ~where
        logp = (torch.log_softmax(logits / settings.temperature, -1)
                .gather(-1, safe[..., None])[..., 0])
        greedy += hit.all(-1).tolist()
        prob += (logp * where).sum(-1).exp().tolist()
    return greedy, prob


def classify(model, tokenizer, examples: list[Example], exemplars: list[Example] | None = None,
             settings: SlickSettings = SlickSettings()) -> list[str]:
    """A SliCK category per example. Exemplars default to the other examples of the list."""
    pool = exemplars if exemplars is not None else examples
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    n_prompts = settings.n_prompts if settings.n_shots else 1
    variants: list[Example] = []
    for ex in examples:
        others = [e for e in rng.sample(pool, min(len(pool), settings.n_shots + 1)) if e is not ex]
        for _ in range(n_prompts):
            shots = rng.sample(others, min(len(others), settings.n_shots)) if others else []
            variants.append(_with_exemplars(ex, shots))
    greedy, prob = _greedy_and_sample_prob(model, tokenizer, variants, settings)
    p_any = 1 - (1 - torch.tensor(prob, dtype=torch.float64)) ** settings.n_samples
    sampled = (torch.rand(len(prob), generator=gen, dtype=torch.float64) < p_any).tolist()
    out = []
    k = n_prompts
    for i in range(len(examples)):
        g, s = greedy[i * k: (i + 1) * k], sampled[i * k: (i + 1) * k]
        if all(g):
            out.append("HighlyKnown")
        elif any(g):
            out.append("MaybeKnown")
        elif any(s):
            out.append("WeaklyKnown")
        else:
            out.append("Unknown")
    return out


def category_counts(categories: list[str]) -> dict[str, int]:
    c = Counter(categories)
    return {name: c.get(name, 0) for name in CATEGORIES}
