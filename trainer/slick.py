"""SliCK knowledge categories (Gekhman et al. 2024) for QA pairs under a given model.

Each fact is asked through `n_prompts` prompt variants, each with `n_shots` exemplars of other
facts as earlier chat turns. The default is zero-shot through the chat template — how a tuned
adapter is asked, and what chat models (the built-in one included) expect; with no exemplars every
variant is the same prompt, so one is asked and MaybeKnown cannot occur. Gekhman's setting for
base (non-chat) models is n_shots=4, n_prompts=10.

Exemplars (`draw_exemplars`): every variant draws its own `n_shots` exemplars, independently and
from a seeded generator, among the pool's facts of the same relation as the fact, never the fact
itself (Gekhman et al.). The relation is read off the question with `trainer.world.relation_of`,
which knows the built-in world's question templates. A question that fits no template (a user's own
file: a QA line carries no relation) draws from the whole pool instead, as does a fact whose
relation has no other fact in the pool.

Per variant we need "is the greedy answer right?" and "is any of `n_samples` samples at
`temperature` right?".
  - Greedy: the variant is answered by batched greedy generation (`trainer.scoring.greedy_answers`)
    and judged by `trainer.scoring.is_correct` — the job's matcher (`evaluation.match`:
    normalised exact by default, or prefix / contains) against every accepted answer
    (`Example.answers`), the same judge as the service's accuracy figures. A
    teacher-forced argmax check settles the variants whose greedy answer is exactly an accepted
    answer's tokens; the rest are generated, so a string that only normalises to an accepted
    answer still counts.
  - Samples, teacher-forced with no generation: for each accepted answer a, one sample equals a's
    tokens (end-of-turn included) with probability p_a = prod softmax(z / T)[token]. Distinct
    complete token sequences are disjoint outcomes, so one sample is one of the accepted answers
    with probability p = min(1, sum_a p_a), and "any of n samples is right" is a
    Bernoulli(1 - (1 - p)^n) draw from a seeded generator. That is the distribution of sampling n
    answers and comparing them token-exactly with the accepted answers; a sample that only
    normalises to an accepted answer (other case, punctuation or articles) is not counted, so p is
    a lower bound of the normalised-match probability.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from trainer.data import Example
from trainer.losses import logits_at
from trainer.scoring import answer_margin, greedy_answers, is_correct, model_device
from trainer.tokenize import IGNORE, collate, encode_example
from trainer.vocab_chunks import token_logprobs
from trainer.world import relation_of

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


@dataclass(frozen=True)
class SlickSettings:
    n_prompts: int = 4  # used only with exemplars
    n_shots: int = 0
    n_samples: int = 16
    temperature: float = 0.5
    batch_size: int = 256
    seed: int = 0
    match: str = "exact"  # the job's evaluation.match: greedy answers are judged as scoring does


def _question(ex: Example) -> str:
    users = [m["content"] for m in ex.prompt_messages if m["role"] == "user"]
    return users[-1] if users else ""


def fact_relation(ex: Example) -> str | None:
    """The relation of a fact's (last) question, or None when no known template fits."""
    return relation_of(_question(ex))


def draw_exemplars(examples: list[Example], pool: list[Example],
                   settings: SlickSettings) -> list[list[list[Example]]]:
    """Per fact, per variant: that variant's exemplars, each variant drawn independently.

    `n_shots` exemplars per variant, without repetition inside a variant, from the pool's facts of
    the fact's relation other than the fact itself (fewer when there are fewer); from the whole
    pool when the relation is unknown or has no other fact there. Deterministic in `settings.seed`.
    """
    n_prompts = settings.n_prompts if settings.n_shots else 1
    if not settings.n_shots:
        return [[[] for _ in range(n_prompts)] for _ in examples]
    rng = random.Random(settings.seed)
    by_relation: dict[str | None, list[Example]] = defaultdict(list)
    for e in pool:
        by_relation[fact_relation(e)].append(e)
    out = []
    for ex in examples:
        relation, question = fact_relation(ex), _question(ex)
        group = by_relation.get(relation) if relation is not None else None
        if not group or all(_question(e) == question for e in group):
            group = pool
        variants = []
        for _ in range(n_prompts):
            # n_shots + 1 drawn so that dropping the fact itself still leaves n_shots: given the
            # fact is (or is not) among the draw, the others are a uniform draw of the rest.
            drawn = rng.sample(group, min(len(group), settings.n_shots + 1))
            variants.append([e for e in drawn if _question(e) != question][: settings.n_shots])
        out.append(variants)
    return out


def _with_exemplars(ex: Example, shots: list[Example]) -> Example:
    msgs: list[dict] = []
    for s in shots:
        msgs += [dict(m) for m in s.messages if m["role"] != "system"][-2:]
    msgs += [dict(m) for m in ex.messages]
    weights = (0,) * (len(msgs) - 1) + (1,)
    return Example(tuple(msgs), weights, ex.answers, ex.line)


def _answering(ex: Example, answer: str) -> Example:
    """The same conversation with `answer` as its last assistant turn."""
    msgs = [dict(m) for m in ex.messages]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    msgs[last]["content"] = answer
    return Example(tuple(msgs), ex.weights, ex.answers, ex.line)


@torch.inference_mode()
def _sample_prob(model, tokenizer, examples: list[Example], settings: SlickSettings) -> list[float]:
    """Per example: P(one sample at `temperature` is one of its accepted answers, token-exact)."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[Example] = []
    owner: list[int] = []
    for i, ex in enumerate(examples):
        for a in dict.fromkeys(ex.answers or (ex.messages[-1]["content"],)):
            rows.append(_answering(ex, a))
            owner.append(i)
    prob = torch.zeros(len(examples), dtype=torch.float64)
    for b in range(0, len(rows), settings.batch_size):
        enc = [encode_example(tokenizer, e, 1024) for e in rows[b: b + settings.batch_size]]
        batch = {k: v.to(device) for k, v in collate(enc, pad).items()}
        target = batch["labels"][:, 1:]
        where = target != IGNORE
        # LM head at the answer positions only, log-softmax a few rows at a time: no
        # [batch x time x vocab] tensor, nor a float32 one of the answer positions.
        logits = logits_at(model, batch["input_ids"], batch["attention_mask"], where)
        logp = token_logprobs(logits, target[where], settings.temperature)
        row = torch.arange(len(enc), device=device)[:, None].expand_as(target)[where]
        seq = torch.zeros(len(enc), device=device).index_add_(0, row, logp).exp()
        prob.index_add_(0, torch.tensor(owner[b: b + len(enc)]), seq.double().cpu())
    return prob.clamp(max=1.0).tolist()


def classify(model, tokenizer, examples: list[Example], exemplars: list[Example] | None = None,
             settings: SlickSettings = SlickSettings()) -> list[str]:
    """A SliCK category per example. Exemplars default to the other examples of the list."""
    pool = exemplars if exemplars is not None else examples
    gen = torch.Generator().manual_seed(settings.seed)
    shots = draw_exemplars(examples, pool, settings)
    k = len(shots[0]) if shots else 1
    variants = [_with_exemplars(ex, s) for ex, per in zip(examples, shots) for s in per]
    answers = greedy_answers(model, tokenizer, variants, batch_size=settings.batch_size,
                             margin=answer_margin(settings.match))
    greedy = [is_correct(a, v.answers, settings.match) for a, v in zip(answers, variants)]
    prob = _sample_prob(model, tokenizer, variants, settings)
    p_any = 1 - (1 - torch.tensor(prob, dtype=torch.float64)) ** settings.n_samples
    sampled = (torch.rand(len(prob), generator=gen, dtype=torch.float64) < p_any).tolist()
    out = []
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
