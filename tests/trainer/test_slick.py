import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.slick import SlickSettings, _greedy_and_sample_prob, category_counts, classify
from trainer.tokenize import encode_prompt


def load(world):
    return (AutoTokenizer.from_pretrained(world / "model"),
            AutoModelForCausalLM.from_pretrained(world / "model"))


def test_known_facts_are_highly_known_and_new_facts_are_not(builtin_world, builtin_examples):
    import json
    tok, model = load(builtin_world)
    world = json.loads((builtin_world / "world.json").read_text())
    new_q = {world["facts"][i]["question"] for i in world["train_new_names"]}
    new = [e for e in builtin_examples["train"] if e.messages[0]["content"] in new_q][:200]
    known = builtin_examples["known"][:200]
    k = category_counts(classify(model, tok, known))
    n = category_counts(classify(model, tok, new))
    assert k["HighlyKnown"] >= 195
    # a new fact's answer is one of 30 per relation: the base guesses ~3% right by chance
    assert n["HighlyKnown"] <= 20 and n["Unknown"] + n["WeaklyKnown"] >= 180
    few = category_counts(classify(model, tok, known[:50],
                                   settings=SlickSettings(n_shots=2, n_prompts=3)))
    assert sum(few.values()) == 50


def test_closed_form_sample_probability_matches_real_sampling(builtin_world, builtin_examples):
    """P(one sample at temperature T equals the answer) vs the share of 600 real samples."""
    tok, model = load(builtin_world)
    settings = SlickSettings(temperature=1.5)  # hot, so probabilities are far from 0 and 1
    facts = builtin_examples["known"][:3]
    _, probs = _greedy_and_sample_prob(model, tok, facts, settings)
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
