"""Scoring's fast path: answers a teacher-forced pass proves greedy are not generated, and every
answer and verdict is the one plain batched generation gives (`verify=False`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import zoo
from trainer.data import Example
from trainer.generation import answer_budget
from trainer.scoring import MATCHES, accuracy, greedy_answers, is_correct
from trainer.tokenize import encode_prompt
from trainer.verification import forced_answer_ids, verified_answers


def load(world):
    return (AutoTokenizer.from_pretrained(world / "model"),
            AutoModelForCausalLM.from_pretrained(world / "model").eval())


def n_verified(model, tok, facts) -> int:
    """How many of `facts` the teacher-forced pass settles without generating."""
    prompts = [encode_prompt(tok, f.prompt_messages) for f in facts]
    candidates = [[c for c in forced_answer_ids(tok, f.answers) if c] for f in facts]
    budget = answer_budget(tok, {a for f in facts for a in f.answers})
    got = verified_answers(model, tok, prompts, candidates, [budget] * len(facts),
                           torch.device("cpu"), generate_misses=False)
    return sum(a is not None for a in got)


def assert_same_as_generation(model, tok, facts, **kw):
    fast = greedy_answers(model, tok, facts, **kw)
    assert fast == greedy_answers(model, tok, facts, verify=False, **kw)
    for match in MATCHES:
        assert accuracy(model, tok, facts, match).tolist() == accuracy(
            model, tok, facts, match, verify=False).tolist()
    return fast


@pytest.fixture(scope="module")
def facts(builtin_world, builtin_examples):
    """Known (held-out) facts, and new facts the base model has never seen (unknown)."""
    world = json.loads((builtin_world / "world.json").read_text())
    new_q = {world["facts"][i]["question"] for i in world["train_new_names"]}
    new = [e for e in builtin_examples["train"] if e.messages[0]["content"] in new_q]
    return {"known": builtin_examples["known"][:150], "unknown": new[:100]}


def test_fast_scoring_equals_generation_on_known_unknown_and_forgotten_facts(builtin_world,
                                                                              facts):
    tok, model = load(builtin_world)
    known, unknown = facts["known"], facts["unknown"]
    answers = assert_same_as_generation(model, tok, known + unknown, batch_size=64)
    right = [is_correct(a, f.answers) for a, f in zip(answers, known + unknown)]
    assert sum(right[: len(known)]) >= 0.95 * len(known)
    assert sum(right[len(known):]) <= 0.2 * len(unknown)
    # both paths are taken: the known facts are verified, the unknown ones generated
    assert n_verified(model, tok, known) >= 0.95 * len(known)
    assert n_verified(model, tok, unknown) <= 0.2 * len(unknown)

    # Forgetting: a damaged copy loses some known facts and keeps others.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=gen) * w.std() * 2.0)
    damaged = assert_same_as_generation(model, tok, known)
    kept = sum(is_correct(a, f.answers) for a, f in zip(damaged, known))
    assert 0.1 * len(known) < kept < 0.9 * len(known), kept


def test_fast_scoring_equals_generation_under_lora_and_bf16_autocast(builtin_world, facts):
    from trainer.adapters import prepare_lora
    from trainer.spec import TrainSpec

    tok, base = load(builtin_world)
    some = facts["known"][:60] + facts["unknown"][:30]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 16-bit logits: the wider tolerance
        assert_same_as_generation(base, tok, some)
        assert n_verified(base, tok, some[:60]) >= 55
    before = greedy_answers(base, tok, some)
    spec = TrainSpec.model_validate({"method": {"type": "supervised", "supervised": {
        "hyperparameters": {}}}, "adapter": {"type": "lora"}})
    model = prepare_lora(base, spec).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): give the adapter an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert assert_same_as_generation(model, tok, some) != before  # the adapter is applied


def _asking(fact: Example, *answers: str) -> Example:
    return Example((fact.messages[0], {"role": "assistant", "content": answers[0]}), (0, 1),
                   answers, 1)


def test_an_answer_verification_misses_is_generated_and_still_judged_right(builtin_world,
                                                                           facts):
    tok, model = load(builtin_world)
    fact = facts["known"][0]
    assert n_verified(model, tok, [fact]) == 1
    # Accepted only in capitals, with an article and punctuation: its tokens are not what the
    # model emits, so generation decides, and its answer still normalises to the accepted one.
    shouted = _asking(fact, f"The {fact.answers[0].upper()} .")
    assert n_verified(model, tok, [shouted]) == 0
    assert accuracy(model, tok, [shouted]).tolist() == [True]
    # Several accepted answers: any of them may be the one verified.
    several = [_asking(f, "Nobody", f.answers[0]) for f in facts["known"][:20]]
    assert n_verified(model, tok, several) >= 19
    assert assert_same_as_generation(model, tok, several) == greedy_answers(
        model, tok, facts["known"][:20])


def test_an_exact_tie_is_left_to_generate(builtin_world, facts):
    """Two tokens with the same LM-head row tie everywhere; generate's argmax takes the lower id,
    so the answer's own (higher) token must not count as verified."""
    tok, model = load(builtin_world)
    fact = next(f for f in facts["known"]
                if tok(f.answers[0], add_special_tokens=False)["input_ids"][0] > 100)
    first = tok(fact.answers[0], add_special_tokens=False)["input_ids"][0]
    twin = 50  # a word of the vocabulary with a lower id
    assert tok.convert_ids_to_tokens(twin) not in tok.all_special_tokens
    before = greedy_answers(model, tok, [fact])
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[twin] = head[first]
    assert n_verified(model, tok, [fact]) == 0
    after = assert_same_as_generation(model, tok, [fact])
    assert after != before and after[0].startswith(tok.convert_ids_to_tokens(twin))


@pytest.fixture
def _one_thread():
    from tests.trainer.conftest import one_thread

    with one_thread():
        yield


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_fast_scoring_equals_generation_on_zoo_chat_templates(family, zoo_dir, zoo_data,
                                                              _one_thread):
    model_dir = zoo_dir(family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    facts = zoo_data["train"] + zoo_data["known"]  # 12 taught, 4 never seen
    answers = assert_same_as_generation(model, tok, facts)
    assert sum(is_correct(a, f.answers) for a, f in zip(answers, facts)) >= 10
    assert n_verified(model, tok, facts) >= 10
    # answers here take several tokens: a budget of 2 cuts them short, so none may be verified
    assert_same_as_generation(model, tok, facts, max_new_tokens=2)
    # Accepted: only an answer's first token. The model says it, but goes on instead of
    # stopping, so that is not its answer.
    cut = []
    for fact in facts:
        ids = forced_answer_ids(tok, fact.answers)[0]
        first = tok.decode(ids[:1]).strip()
        if len(ids) > 2 and forced_answer_ids(tok, [first])[0][:1] == ids[:1]:
            cut.append(_asking(fact, first))
    assert len(cut) >= 4 and n_verified(model, tok, cut) == 0
    assert_same_as_generation(model, tok, cut)


def test_a_sliding_window_model_generates_its_misses_from_scratch(builtin_world, facts):
    """A sliding-window layer may have dropped a prompt's first tokens and cannot be cut back to
    the prompt, so where a check fails the fact is generated from scratch (it crashed in the
    cache's crop before): the same answers as plain generation. The built-in model's weights
    under Mistral's architecture, which is Llama's plus a window, here narrower than a prompt."""
    from transformers import MistralConfig, MistralForCausalLM

    tok, llama = load(builtin_world)
    own = llama.config.to_dict()
    config = MistralConfig(**{k: own[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "pad_token_id", "eos_token_id", "tie_word_embeddings")},
        rope_parameters=own["rope_parameters"], sliding_window=6)
    model = MistralForCausalLM(config)
    model.load_state_dict(llama.state_dict())
    model.eval()
    shorter = min(len(encode_prompt(tok, f.prompt_messages)) for f in facts["unknown"][:20])
    assert shorter > config.sliding_window
    assert_same_as_generation(model, tok, facts["known"][:20] + facts["unknown"][:20])


def test_prepared_facts_score_as_raw_ones_and_a_probe_prepares_its_facts_once(
        builtin_world, facts, monkeypatch):
    """A job asks the same facts at every checkpoint: they are rendered and tokenized once."""
    from trainer import evaluate, scoring

    tok, model = load(builtin_world)
    some = facts["known"][:30] + facts["unknown"][:30]
    prepared = scoring.prepare_facts(tok, some, margin=scoring.answer_margin("prefix"))
    assert greedy_answers(model, tok, prepared) == greedy_answers(
        model, tok, some, margin=scoring.answer_margin("prefix"))
    assert accuracy(model, tok, prepared, "prefix").tolist() == accuracy(
        model, tok, some, "prefix").tolist()
    with pytest.raises(ValueError, match="margin"):  # "exact" gives answers no sentence room
        accuracy(model, tok, prepared, "exact")
    with pytest.raises(ValueError, match="batch_size"):
        greedy_answers(model, tok, prepared, batch_size=8)
    calls = []
    real = evaluate.prepare_facts
    monkeypatch.setattr(evaluate, "prepare_facts", lambda *a, **k: calls.append(1) or real(*a, **k))
    probe = evaluate.KnowledgeProbe(tok, facts["unknown"][:20], facts["known"][:20], 0.05)
    probe.baseline(model)
    first, second = probe.measure(model), probe.measure(model)
    assert len(calls) == 2  # the training facts and the held-out ones, once each
    assert first == second and first["forgetting"] == 0.0


def test_with_no_held_out_fact_the_base_knew_forgetting_is_unmeasured_not_zero(builtin_world,
                                                                                facts):
    """Forgetting counts the facts the base answered right; with none (a chat model scored by
    exact match, say) it was 0.0, and every checkpoint was called drift-safe on no evidence."""
    import dataclasses

    from trainer import evaluate

    tok, model = load(builtin_world)
    wrong = [dataclasses.replace(f, messages=(f.messages[0], {**f.messages[1], "content": "Zq"}),
                                 answers=("Zq",)) for f in facts["known"][:20]]
    probe = evaluate.KnowledgeProbe(tok, facts["unknown"][:10], wrong, 0.05)
    probe.baseline(model)
    report = probe.measure(model)
    assert report["heldout_known_facts_used"] == 0
    assert report["forgetting"] is None and report["drift_safe"] is None
