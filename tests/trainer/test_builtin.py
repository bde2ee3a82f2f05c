import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.builtin import BaseModelConfig, BuildConfig, ensure_world
from trainer.data import Example
from trainer.scoring import accuracy
from trainer.tokenize import encode_example
from trainer.world import WorldConfig


def test_builtin_model_loads_like_a_hub_model_and_knows_its_facts(builtin_world, builtin_examples):
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    model = AutoModelForCausalLM.from_pretrained(builtin_world / "model")
    held = builtin_examples["known"]
    assert accuracy(model, tok, held).float().mean() >= 0.97
    world = json.loads((builtin_world / "world.json").read_text())
    assert len(world["heldout_known"]) == len(held)
    assert not set(world["heldout_known"]) & set(world["train_known"])


def test_chat_template_masks_answers_and_is_concatenative(builtin_world, builtin_examples):
    tok = AutoTokenizer.from_pretrained(builtin_world / "model")
    one = builtin_examples["known"][0]
    answer = one.answers[0]
    two = Example(one.messages * 2, (0, 1, 0, 1), one.answers, 1)
    e1, e2 = encode_example(tok, one, 64), encode_example(tok, two, 64)
    assert e2.input_ids == e1.input_ids * 2 and e2.labels == e1.labels * 2
    learned = [t for t in e1.labels if t != -100]
    assert tok.decode(learned) == f"{answer} <|end|>"
    assert tok.unk_token_id not in e1.input_ids


def test_world_build_is_byte_identical_for_the_same_seed(tmp_path):
    tiny = BuildConfig(world=WorldConfig(seed=7, n_first_names=8, n_last_names=8,
                                         n_known_people=20, n_new_people=5, n_train_known=10,
                                         n_train_new=15, n_heldout_known=20),
                       model=BaseModelConfig(hidden_size=32, intermediate_size=64, layers=1,
                                             heads=2, max_epochs=2, check_every=1))
    a = ensure_world(tiny, root=tmp_path / "a", log=lambda m: None)
    b = ensure_world(tiny, root=tmp_path / "b", log=lambda m: None)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {"model/model.safetensors", "model/tokenizer.json", "train.jsonl", "train_uuid.jsonl",
            "heldout_known.jsonl", "world.json"} <= {str(f) for f in files}
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert ensure_world(tiny, root=tmp_path / "a") == a  # cached: no second build
