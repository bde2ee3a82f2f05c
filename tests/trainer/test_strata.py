"""Held-out strata: facts about a person seen in training vs people training never mentions."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data import Example
from trainer.evaluate import KnowledgeProbe, seen_entity_mask, strata_report
from trainer.world import RELATIONS, entity_of, relation_of


def qa(question, answer="x", line=1):
    return Example(({"role": "user", "content": question},
                    {"role": "assistant", "content": answer}), (0, 1), (answer,), line)


def test_entity_of_reads_every_template():
    for relation, templates in RELATIONS.items():
        for t in templates:
            q = t.format(e="Brel Meplal")
            assert entity_of(q) == "Brel Meplal" and relation_of(q) == relation
    assert entity_of("What is the capital of France?") is None
    assert entity_of("") is None


def test_builtin_heldout_entities_are_found_and_about_half_are_seen(builtin_examples):
    known, train = builtin_examples["known"], builtin_examples["train"]
    assert all(entity_of(f.messages[0]["content"]) for f in known)
    seen = seen_entity_mask(train, known)
    assert seen is not None and len(seen) == len(known)
    frac = float(seen.float().mean())
    assert 0.25 <= frac <= 0.75, frac
    assert 0 < int(seen.sum()) < len(known)


def test_strata_report_sizes_and_weighted_averages():
    g = torch.Generator().manual_seed(0)
    seen = torch.rand(500, generator=g) < 0.5
    base, tuned = torch.rand(500, generator=g) < 0.9, torch.rand(500, generator=g) < 0.7
    r = strata_report(seen, base, tuned)
    n_s, n_u = r["heldout_known_facts_seen_entities"], r["heldout_known_facts_unseen_entities"]
    assert n_s + n_u == 500 and n_s == int(seen.sum())
    for key, whole in (("heldout_known_accuracy", tuned.float().mean()),
                       ("base_heldout_known_accuracy", base.float().mean()),
                       ("forgetting", base.float().mean() - tuned.float().mean())):
        avg = (n_s * r[f"{key}_seen_entities"] + n_u * r[f"{key}_unseen_entities"]) / 500
        assert avg == pytest.approx(float(whole), abs=1e-6)
    # an empty stratum has a size of 0 and no accuracy
    r = strata_report(torch.ones(3, dtype=torch.bool), base[:3], tuned[:3])
    assert r["heldout_known_facts_unseen_entities"] == 0
    assert r["forgetting_unseen_entities"] is None and r["forgetting_seen_entities"] is not None


def test_strata_are_none_when_questions_fit_no_template():
    train = [qa("Who wrote Hamlet?"), qa("Where was Brel Meplal born ?")]
    known = [qa("What is the capital of France?"), qa("Who employs Brel Meplal ?")]
    assert seen_entity_mask(train, known) is None  # one held-out question fits no template
    assert seen_entity_mask(train[:1], known[1:]) is None  # no training question does
    r = strata_report(None, torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    assert set(r.values()) == {None} and len(r) == 8


def test_probe_strata_are_consistent_with_the_overall_report(builtin_world, builtin_examples):
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    model = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    train, known = builtin_examples["train"][:200], builtin_examples["known"][:300]
    probe = KnowledgeProbe(tok, train, known, max_forgetting=0.05)
    probe.baseline(model)
    with torch.no_grad():  # damage the model a little, so that it forgets something
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std().clamp(min=1e-3))
    r = probe.measure(model)
    n_s, n_u = r["heldout_known_facts_seen_entities"], r["heldout_known_facts_unseen_entities"]
    assert n_s > 0 and n_u > 0 and n_s + n_u == len(known)
    for key in ("heldout_known_accuracy", "base_heldout_known_accuracy", "forgetting"):
        avg = (n_s * r[f"{key}_seen_entities"] + n_u * r[f"{key}_unseen_entities"]) / len(known)
        assert avg == pytest.approx(r[key], abs=1e-6)
    print({k: v for k, v in r.items() if "entities" in k or k in ("forgetting",)})
