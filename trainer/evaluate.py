"""The known-fact report of SCIENCE.md: what a tuned model learned, and what it forgot.

`KnowledgeProbe.baseline` asks the base model once, before training: which training examples it
already knows (task vs new facts), its held-out known accuracy, and its answer distributions for
output drift. `measure` asks the tuned model the same questions at any checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data import Example
from trainer.drift import cosine_drift, subject_spans, subject_vectors
from trainer.scoring import (
    PreparedFacts,
    answer_logprobs,
    answer_margin,
    greedy_answers,
    is_correct,
    mean_kl,
    normalize,
    prepare_facts,
)
from trainer.vocab_chunks import TopLogprobs
from trainer.world import entity_of


@dataclass
class Baseline:
    train_known: torch.Tensor  # bool per training example: the base answered it right
    heldout_correct: torch.Tensor  # bool per held-out known fact
    heldout_logprobs: TopLogprobs  # base log-probs at held-out answer tokens (top-k + rest)
    subject_vectors: torch.Tensor | None  # base hidden state at held-out entities (drift)


def _correct(model, tokenizer, facts: PreparedFacts, match: str = "exact"
             ) -> tuple[torch.Tensor, list[str]]:
    answers = greedy_answers(model, tokenizer, facts)
    return torch.tensor([is_correct(a, f.answers, match)
                         for a, f in zip(answers, facts.examples)], dtype=torch.bool), answers


def _mean(mask: torch.Tensor) -> float | None:
    return float(mask.float().mean()) if mask.numel() else None


STRATA = ("seen_entities", "unseen_entities")


def seen_entity_mask(train_examples: list[Example], known_facts: list[Example]
                     ) -> torch.Tensor | None:
    """Per held-out fact: is its entity the entity of some training question?

    The entity is read off the world's question templates (`trainer.world.entity_of`). None when
    it cannot be told: a held-out question fits no template, or no training question does (a
    user's own files): the strata are then unknown, not empty.
    """
    seen = {entity_of(m["content"]) for e in train_examples for m in e.messages
            if m["role"] == "user"} - {None}
    known = [entity_of(f.messages[0]["content"]) for f in known_facts]
    if not seen or not known or any(k is None for k in known):
        return None
    return torch.tensor([k in seen for k in known], dtype=torch.bool)


def strata_report(seen: torch.Tensor | None, base_correct: torch.Tensor,
                  tuned_correct: torch.Tensor) -> dict:
    """Held-out size, base and tuned accuracy and forgetting within each entity stratum.

    Every value is None where the strata are unknown (`seen` None); accuracies and forgetting
    are None where a stratum is empty.
    """
    out: dict = {}
    for name, mask in zip(STRATA, (seen, None if seen is None else ~seen)):
        if mask is None:
            base = tuned = size = None
        else:
            size = int(mask.sum())
            base, tuned = _mean(base_correct[mask]), _mean(tuned_correct[mask])
        out[f"heldout_known_facts_{name}"] = size
        out[f"base_heldout_known_accuracy_{name}"] = base
        out[f"heldout_known_accuracy_{name}"] = tuned
        out[f"forgetting_{name}"] = None if base is None or tuned is None else base - tuned
    return out


class KnowledgeProbe:
    def __init__(self, tokenizer, train_examples: list[Example], known_facts: list[Example],
                 max_forgetting: float, match: str = "exact"):
        self.tokenizer = tokenizer
        self.train = train_examples
        # A held-out question that is also trained on measures learning, not forgetting.
        asked = {normalize(m["content"]) for e in train_examples for m in e.messages
                 if m["role"] == "user"}
        self.known = [f for f in known_facts if normalize(f.messages[0]["content"]) not in asked]
        self.dropped_in_training = len(known_facts) - len(self.known)
        self.match = match
        self.max_forgetting = max_forgetting
        self.base: Baseline | None = None
        self.seen = seen_entity_mask(train_examples, self.known)  # None: strata unknown
        self._spans = None  # held-out prompts and their entity tokens, for representation drift
        # Asked at every checkpoint: rendered and tokenized once.
        self.train_ready, self.known_ready = (
            prepare_facts(tokenizer, facts, margin=answer_margin(match))
            for facts in (self.train, self.known))

    def baseline(self, model) -> Baseline:
        train_known, _ = _correct(model, self.tokenizer, self.train_ready, self.match)
        heldout, _ = _correct(model, self.tokenizer, self.known_ready, self.match)
        logprobs = answer_logprobs(model, self.tokenizer, self.known)
        self.base = Baseline(train_known, heldout, logprobs, self._subject_vectors(model))
        return self.base

    def _subject_vectors(self, model) -> torch.Tensor | None:
        if self._spans is None:
            self._spans = subject_spans(self.tokenizer, self.known)
        return subject_vectors(model, self._spans, self.tokenizer.pad_token_id)

    def measure(self, model) -> dict:
        """Every metric of the report, as fractions in [0, 1] (None where a set is empty)."""
        assert self.base is not None, "baseline() first"
        train_ok, _ = _correct(model, self.tokenizer, self.train_ready, self.match)
        heldout_ok, answers = _correct(model, self.tokenizer, self.known_ready, self.match)
        base_acc = _mean(self.base.heldout_correct) or 0.0
        tuned_acc = _mean(heldout_ok) or 0.0
        was_right = self.base.heldout_correct
        # A hallucination is a confident wrong answer, not silence: empty answers do not count.
        now_wrong = ~heldout_ok & torch.tensor([bool(normalize(a)) for a in answers])
        hallucination = float((was_right & now_wrong).sum()) / max(1, int(was_right.sum()))
        drift = mean_kl(self.base.heldout_logprobs,
                        answer_logprobs(model, self.tokenizer, self.known,
                                        like=self.base.heldout_logprobs))
        # Forgetting counts only facts the base answered right (the held-out facts "used"):
        # a fact the base never knew cannot be forgotten, nor its lucky guess count as kept.
        # With none used there is no measure (None), and no checkpoint is called drift-safe on
        # no evidence (it was: forgetting 0.0, so every checkpoint passed the budget).
        used = int(was_right.sum())
        forgetting = float((was_right & ~heldout_ok).sum()) / used if used else None
        return {
            "base_heldout_known_accuracy": base_acc,
            "heldout_known_accuracy": tuned_acc,
            "forgetting": forgetting,
            "heldout_known_facts_used": used,
            "heldout_known_facts_dropped_in_training": self.dropped_in_training,
            "hallucination_rate": hallucination,
            "new_fact_accuracy": _mean(train_ok[~self.base.train_known]),
            "task_accuracy": _mean(train_ok[self.base.train_known]),
            "output_drift": drift,
            "representation_drift": cosine_drift(self.base.subject_vectors,
                                                 self._subject_vectors(model)),
            "max_forgetting": self.max_forgetting,
            "drift_safe": None if forgetting is None else forgetting <= self.max_forgetting,
            **strata_report(self.seen, self.base.heldout_correct, heldout_ok),
        }
