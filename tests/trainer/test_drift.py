"""Representation drift: the entity's tokens are found, and the measure moves with the weights."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.drift import cosine_drift, subject_spans, subject_vectors
from trainer.world import entity_of


def test_subject_spans_cover_exactly_the_entity(builtin_world, builtin_examples):
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    facts = builtin_examples["known"][:20]
    spans = subject_spans(tok, facts)
    assert all(s is not None for s in spans)
    for fact, (ids, positions) in zip(facts, spans):
        entity = entity_of(fact.prompt_messages[-1]["content"])
        assert tok.decode([ids[i] for i in positions]).split() == entity.split()
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous run


def test_a_question_without_an_entity_has_no_span(builtin_world, builtin_examples):
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    fact = builtin_examples["known"][0]
    odd = type(fact)(({"role": "user", "content": "Tell me something ?"},
                      fact.messages[1]), fact.weights, fact.answers, fact.line)
    assert subject_spans(tok, [odd]) == [None]


def test_drift_is_zero_for_the_same_model_and_grows_with_a_perturbation(builtin_world,
                                                                        builtin_examples):
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    model = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    spans = subject_spans(tok, builtin_examples["known"][:64])
    base = subject_vectors(model, spans, tok.pad_token_id, batch_size=16)
    assert base.shape == (64, model.config.hidden_size)
    assert cosine_drift(base, subject_vectors(model, spans, tok.pad_token_id)) < 1e-5
    drifts = []
    for scale in (0.02, 0.2):
        moved = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in moved.model.layers.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
        drifts.append(cosine_drift(base, subject_vectors(moved, spans, tok.pad_token_id)))
    assert 0 < drifts[0] < drifts[1] <= 2


def test_padding_does_not_change_a_fact_s_vector(builtin_world, builtin_examples):
    """Right padding keeps positions; the mask keeps pads out of attention."""
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    model = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    spans = subject_spans(tok, builtin_examples["known"][:40])
    together = subject_vectors(model, spans, tok.pad_token_id, batch_size=40)
    alone = torch.cat([subject_vectors(model, [s], tok.pad_token_id) for s in spans])
    assert torch.allclose(together, alone, atol=1e-4)
