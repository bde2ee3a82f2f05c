import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.slick as slick
from trainer.data import Example
from trainer.slick import (
    SlickSettings,
    _sample_prob,
    category_counts,
    classify,
    draw_exemplars,
    fact_relation,
)
from trainer.tokenize import encode_prompt


def load(world):
    return (AutoTokenizer.from_pretrained(world / "model"),
            AutoModelForCausalLM.from_pretrained(world / "model"))


def new_facts(world_dir, examples):
    world = json.loads((world_dir / "world.json").read_text())
    new_q = {world["facts"][i]["question"] for i in world["train_new_names"]}
    return [e for e in examples["train"] if e.messages[0]["content"] in new_q]


def test_known_facts_are_highly_known_and_new_facts_are_not(builtin_world, builtin_examples):
    tok, model = load(builtin_world)
    new = new_facts(builtin_world, builtin_examples)[:200]
    known = builtin_examples["known"][:200]
    k = category_counts(classify(model, tok, known))
    n = category_counts(classify(model, tok, new))
    assert k["HighlyKnown"] >= 195
    # a new fact's answer is one of 30 per relation: the base guesses ~3% right by chance
    assert n["HighlyKnown"] <= 20 and n["Unknown"] + n["WeaklyKnown"] >= 180
    # Few-shot: the chat model was taught single turns only, so every exemplar turn costs it
    # greedy answers (MaybeKnown; on the world of issue 9, 36 of 50 known facts are answered
    # under some 1-shot variant and 14 under 2 shots: the service's SliCK for chat models is
    # zero-shot). A known fact is still right under some variant, and a new one under none.
    few, pool = SlickSettings(n_shots=1, n_prompts=3), builtin_examples["known"][200:500]
    k = category_counts(classify(model, tok, known[:50], pool, few))
    n = category_counts(classify(model, tok, new[:50], pool, few))
    assert k["HighlyKnown"] + k["MaybeKnown"] >= 30 and k["HighlyKnown"] >= 5
    assert n["HighlyKnown"] == 0 and n["Unknown"] + n["WeaklyKnown"] >= 45


def test_each_variant_draws_its_own_exemplars_from_the_facts_relation(
        builtin_world, builtin_examples, monkeypatch):
    """Gekhman's 10 different 4-shot prompts: 10 exemplar sets per fact, not one set reordered."""
    tok, model = load(builtin_world)
    seen: list[tuple[Example, list[Example]]] = []
    build = slick._with_exemplars

    def spy(ex, shots):
        seen.append((ex, list(shots)))
        return build(ex, shots)

    monkeypatch.setattr(slick, "_with_exemplars", spy)
    facts, pool = builtin_examples["known"][:3], builtin_examples["known"][:300]
    classify(model, tok, facts, pool, SlickSettings(n_shots=4, n_prompts=10))
    assert len(seen) == 30
    for fact in facts:
        sets = [frozenset(e.messages[0]["content"] for e in shots)
                for ex, shots in seen if ex is fact]
        assert len(sets) == 10 and all(len(s) == 4 for s in sets)
        assert sum(a != b for a, b in itertools.combinations(sets, 2)) >= 43  # of 45 pairs
        for ex, shots in seen:
            if ex is fact:
                assert all(fact_relation(e) == fact_relation(fact) for e in shots)
                assert fact.messages[0]["content"] not in {e.messages[0]["content"] for e in shots}


def test_exemplars_fall_back_to_the_whole_pool_when_the_relation_is_unknown(builtin_examples):
    own = Example(({"role": "user", "content": "Which colour is the sky ?"},
                   {"role": "assistant", "content": "Blue"}), (0, 1), ("Blue",), 1)
    pool = builtin_examples["known"][:300] + [own]
    assert fact_relation(own) is None
    drawn = draw_exemplars([own], pool, SlickSettings(n_shots=4, n_prompts=10, seed=3))[0]
    assert len(drawn) == 10 and all(len(s) == 4 and own not in s for s in drawn)
    assert len({fact_relation(e) for s in drawn for e in s}) == 3  # every relation of the pool
    assert draw_exemplars([own], pool, SlickSettings(n_shots=0))[0] == [[]]
    assert drawn == draw_exemplars([own], pool, SlickSettings(n_shots=4, n_prompts=10, seed=3))[0]


def test_greedy_answers_are_judged_normalised_against_every_accepted_answer(builtin_world,
                                                                           builtin_examples):
    tok, model = load(builtin_world)
    facts = builtin_examples["known"][:20]
    assert classify(model, tok, facts) == ["HighlyKnown"] * 20

    def answering(fact, *answers):
        q = fact.messages[0]
        return Example((q, {"role": "assistant", "content": answers[0]}), (0, 1), answers, 1)

    # The gold turn is wrong; the true answer is accepted only in another case, with an article
    # and punctuation: the normalised matcher still finds it.
    alt = [answering(f, "Nobody", f"The {f.answers[0].upper()} .") for f in facts]
    assert classify(model, tok, alt) == ["HighlyKnown"] * 20
    wrong = [answering(f, "Nobody") for f in facts]
    assert "HighlyKnown" not in classify(model, tok, wrong)


def test_closed_form_sample_probability_matches_real_sampling(builtin_world, builtin_examples):
    """P(one sample at temperature T equals the answer) vs the share of 600 real samples."""
    tok, model = load(builtin_world)
    settings = SlickSettings(temperature=1.5)  # hot, so probabilities are far from 0 and 1
    facts = builtin_examples["known"][:3]
    probs = _sample_prob(model, tok, facts, settings)
    # several accepted answers: one sample is one of them with the sum of their probabilities
    both = Example(facts[0].messages, facts[0].weights, (facts[0].answers[0], "Nobody"), 1)
    nobody = Example(facts[0].messages[:1] + ({"role": "assistant", "content": "Nobody"},),
                     facts[0].weights, ("Nobody",), 1)
    p_both, p_nobody = _sample_prob(model, tok, [both, nobody], settings)
    assert 0 < p_nobody < probs[0] and p_both == pytest.approx(probs[0] + p_nobody, rel=1e-5)
    torch.manual_seed(0)
    for fact, p in zip(facts, probs):
        ids = torch.tensor([encode_prompt(tok, fact.prompt_messages)] * 600)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=4,
                             pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        share = sum(a.strip() == fact.answers[0] for a in answers) / len(answers)
        sigma = (p * (1 - p) / len(answers)) ** 0.5
        assert abs(share - p) <= 4 * sigma + 1e-3, (share, p)
