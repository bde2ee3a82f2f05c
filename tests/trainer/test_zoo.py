"""The model zoo: every method and adapter on tiny Llama, Qwen2, GPT-2, Phi-3 and Gemma models.

Each family has its own byte-level BPE tokenizer, chat template (none for GPT-2), tying and layer
layout (`trainer.zoo`). The full method x adapter matrix is marked slow (it still runs in CI);
one run per family and every model-fact check stay in the quick loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer import zoo
from trainer.loop import TrainJob, _Run, train
from trainer.modelfacts import TiedEmbeddingsError, modules_by_group
from trainer.scoring import greedy_answers
from trainer.spec import TrainSpec
from trainer.templates import end_of_turn_ids, turn_suffix
from trainer.tokenize import IGNORE, encode_example, encode_prompt

FAMILIES = zoo.FAMILIES


@pytest.fixture(autouse=True)
def _tiny_models_run_on_one_thread():
    from tests.trainer.conftest import one_thread

    with one_thread():
        yield

TIED = {"qwen2", "gpt2", "gemma"}

# What each named group selects, by the last part of the module names (every layer's alike).
GROUP_MODULES = {
    "llama": {"attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
              "mlp": {"gate_proj", "up_proj", "down_proj"},
              "norms": {"input_layernorm", "post_attention_layernorm", "norm"},
              "embeddings": {"embed_tokens"}, "lm_head": {"lm_head"}},
    "qwen2": {"attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
              "mlp": {"gate_proj", "up_proj", "down_proj"},
              "norms": {"input_layernorm", "post_attention_layernorm", "norm"},
              "embeddings": {"embed_tokens"}, "lm_head": {"lm_head"}},
    "gpt2": {"attention": {"c_attn", "c_proj"}, "mlp": {"c_fc", "c_proj"},
             "norms": {"ln_1", "ln_2", "ln_f"}, "embeddings": {"wte", "wpe"},
             "lm_head": {"lm_head"}},
    "phi3": {"attention": {"qkv_proj", "o_proj"}, "mlp": {"gate_up_proj", "down_proj"},
             "norms": {"input_layernorm", "post_attention_layernorm", "norm"},
             "embeddings": {"embed_tokens"}, "lm_head": {"lm_head"}},
    "gemma": {"attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
              "mlp": {"gate_proj", "up_proj", "down_proj"},
              "norms": {"input_layernorm", "post_attention_layernorm", "norm"},
              "embeddings": {"embed_tokens"}, "lm_head": {"lm_head"}},
}

METHODS = [("supervised", {})]
METHODS += [("self_distillation", {"teacher": t, "distill_positions": p})
            for t in ("base", "format_warmup") for p in ("answer", "all")]
METHODS += [("frozen_groups", {"trainable": g}) for g in (
    ["attention"], ["mlp"], ["norms"], ["embeddings"], ["lm_head"], ["embeddings", "lm_head"],
    ["layers:1"])]


def spec(method="supervised", adapter="lora", lr=1e-2, **hp) -> TrainSpec:
    return TrainSpec.model_validate({
        "method": {"type": method, method: {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate": lr, "warmup_ratio": 0, **hp}}},
        "adapter": {"type": adapter}, "seed": 3})


def job(model_dir, data, out, s, **kw) -> TrainJob:
    kw.setdefault("save_checkpoints", False)
    return TrainJob(spec=s, model_dir=model_dir, train_examples=data["train"],
                    known_facts=data["known"], output_dir=out, slick=None, **kw)


def _one_sided_tie(family, adapter, hp) -> bool:
    groups = set(hp.get("trainable", ()))
    return (family in TIED and adapter == "full"
            and len(groups & {"embeddings", "lm_head"}) == 1)


def _run_and_check(family, method, adapter, hp, zoo_dir, zoo_data, tmp_path):
    s = spec(method, adapter, **hp)
    if hp.get("trainable") == ["norms"] and adapter == "lora":
        with pytest.raises(ValueError, match="only norms, which have no LoRA form"):
            train(job(zoo_dir(family), zoo_data, tmp_path, s))
        return
    if _one_sided_tie(family, adapter, hp):
        with pytest.raises(TiedEmbeddingsError, match="ties its input and output embeddings"):
            train(job(zoo_dir(family), zoo_data, tmp_path, s))
        return
    result = train(job(zoo_dir(family), zoo_data, tmp_path, s))
    assert result.status == "succeeded" and result.step == result.total_steps == 2
    assert all(math.isfinite(x) for x in result.losses)
    assert result.report["base_heldout_known_accuracy"] == 1.0  # the zoo model was taught them


@pytest.mark.parametrize("family", FAMILIES)
def test_one_method_per_family_quick(family, zoo_dir, zoo_data, tmp_path):
    _run_and_check(family, "self_distillation", "lora", {"distill_positions": "all"}, zoo_dir,
                   zoo_data, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("method, hp", METHODS, ids=lambda x: x if isinstance(x, str) else
                         "-".join(str(v) if isinstance(v, str) else "+".join(v)
                                  for v in x.values()) or "default")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_and_adapter_on_every_family(family, method, hp, adapter, zoo_dir,
                                                  zoo_data, tmp_path):
    _run_and_check(family, method, adapter, hp, zoo_dir, zoo_data, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_is_byte_level_bpe_with_multi_token_answers(family):
    tok = zoo.build_tokenizer(family)
    answer = zoo.facts(1)[0].answers[0]
    pieces = tok(answer, add_special_tokens=False)["input_ids"]
    assert len(pieces) >= 2 and tok.decode(pieces) == answer
    assert (tok.chat_template is None) == (family == "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_span_is_the_answer_then_the_end_of_turn(family):
    tok = zoo.build_tokenizer(family)
    ex = zoo.facts(1)[0]
    enc = encode_example(tok, ex, 256)
    prompt = encode_prompt(tok, ex.prompt_messages)
    assert enc.input_ids[: len(prompt)] == prompt  # what a user's prompt encodes to, exactly
    learned = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert enc.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert tok.decode(learned).strip() == ex.answers[0] + turn_suffix(tok).strip()
    assert end_of_turn_ids(tok)[0] in learned  # learned, so greedy decoding stops there


def test_a_bpe_merge_across_the_prompt_answer_boundary_keeps_the_prompt_tokens():
    tok = zoo.build_tokenizer("gpt2")
    # The prompt ends with a space: alone it is a lone "Ġ"; in the whole text the space merges
    # into the answer's first token ("ĠV..."), so the whole text's ids do not extend the prompt's.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ 'Q: ' + m['content'] + '\\nA: ' }}{% else %}"
                         "{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    ex = zoo.facts(1)[0]
    whole = tok(tok.apply_chat_template(list(ex.messages), tokenize=False),
                add_special_tokens=False)["input_ids"]
    prompt = encode_prompt(tok, ex.prompt_messages)
    assert whole[: len(prompt)] != prompt
    enc = encode_example(tok, ex, 256)
    assert enc.input_ids[: len(prompt)] == prompt
    learned = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert tok.decode(learned) == ex.answers[0] + tok.eos_token
    assert tok.decode(enc.input_ids) == tok.decode(whole)


def test_a_template_that_closes_only_the_last_turn_encodes_multi_turn_chats():
    from trainer.data import Example

    tok = zoo.build_tokenizer("phi3")  # Phi-3's template appends eos after the last turn only
    a, b = zoo.facts(2)
    ex = Example(a.messages + b.messages, (0, 1, 0, 1), b.answers, 1)
    enc = encode_example(tok, ex, 256)
    learned = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])
    assert learned.count("<|end|>") == 2 and a.answers[0] in learned and b.answers[0] in learned


@pytest.mark.parametrize("family", FAMILIES)
def test_named_groups_select_each_familys_modules(family):
    tok = zoo.build_tokenizer(family)
    groups = modules_by_group(zoo.build_model(family, tok))
    assert "other" not in groups, f"modules in no group: {groups.get('other')}"
    selected = {g: {n.split(".")[-1] for n in names} for g, names in groups.items()}
    assert selected == GROUP_MODULES[family]
    layer1 = [n for n in groups["attention"] + groups["mlp"] if ".1." in n]
    assert layer1 and all(".0." not in n for n in layer1)


@pytest.mark.parametrize("family", sorted(TIED))
def test_tied_embeddings_one_sided_full_selection_is_refused(family, zoo_dir, zoo_data, tmp_path):
    for groups in (["lm_head"], ["embeddings"]):
        s = spec("frozen_groups", "full", trainable=groups)
        with pytest.raises(TiedEmbeddingsError, match="tie_word_embeddings") as err:
            train(job(zoo_dir(family), zoo_data, tmp_path, s))
        assert "name both 'embeddings' and 'lm_head'" in str(err.value)


def test_untied_model_trains_its_lm_head_alone(zoo_dir, zoo_data, tmp_path):
    s = spec("frozen_groups", "full", trainable=["lm_head"])
    run = _Run(job(zoo_dir("llama"), zoo_data, tmp_path, s), _quiet())
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained == {"lm_head.weight"}


def _quiet():
    from trainer.loop import Callbacks

    return Callbacks()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_reloads_with_peft_and_answers_the_same(family, zoo_dir, zoo_data,
                                                            tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = zoo_dir(family)
    run = _Run(job(model_dir, zoo_data, tmp_path, spec(lr=3e-2), save_checkpoints=True),
               _quiet())
    result = run.run()
    facts = zoo_data["train"] + zoo_data["known"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    trained = greedy_answers(run.model, tok, facts)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = greedy_answers(base, tok, facts)
    reloaded = PeftModel.from_pretrained(base, result.final_dir / "adapter")
    assert greedy_answers(reloaded, tok, facts) == trained
    assert trained != before  # the adapter is really applied
    fmt = (result.final_dir / "adapter" / "prompt_format.json").read_text()
    assert ("driftsafe-plain-qa" in fmt) == (family == "gpt2")


def test_generation_ignores_the_models_sampling_settings(zoo_dir, zoo_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = zoo_dir("qwen2")  # ships Qwen2.5-Instruct's sampling and repetition penalty
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.generation_config.do_sample and model.generation_config.repetition_penalty > 1
    facts = zoo_data["known"]
    got = greedy_answers(model, tok, facts)
    stop = set(end_of_turn_ids(tok))
    for fact, answer in zip(facts, got):  # a plain argmax loop, one token at a time
        ids = encode_prompt(tok, fact.prompt_messages)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(12):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt in stop:
                    break
                out.append(nxt)
        assert answer == tok.decode(out, skip_special_tokens=True).strip()


def test_teacher_forward_has_no_dropout_while_the_student_trains(zoo_dir):
    from transformers import AutoModelForCausalLM

    from trainer.adapters import prepare_lora
    from trainer.teacher import AdapterOffTeacher

    base = AutoModelForCausalLM.from_pretrained(zoo_dir("gpt2"))  # dropout 0.1 everywhere
    model = prepare_lora(base, spec())
    model.train()
    teacher = AdapterOffTeacher(model)
    ids = torch.tensor([[5, 9, 40, 77, 3, 12]])
    mask = torch.ones_like(ids)
    where = torch.ones((1, 5), dtype=torch.bool)
    a = teacher.logits_at(ids, mask, where)
    b = teacher.logits_at(ids, mask, where)
    assert torch.equal(a, b)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("method, extra", [("supervised", []),
                                           ("frozen_groups", ["--trainable", "attention,mlp"])])
def test_gpt2_trains_with_driftsafe_train_and_its_adapter_reloads(method, extra, zoo_dir,
                                                                 zoo_data, tmp_path, capsys):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cli.main import main
    from trainer.world import write_jsonl

    model_dir = zoo_dir("gpt2")  # Conv1D layers, dropout 0.1, no chat template
    rows = {"train": [{"question": e.messages[0]["content"], "answer": e.answers[0]}
                      for e in zoo_data["train"]],
            "known": [{"question": e.messages[0]["content"], "answer": e.answers[0]}
                      for e in zoo_data["known"]]}
    for name, lines in rows.items():
        write_jsonl(tmp_path / f"{name}.jsonl", lines)
    code = main(["train", "--model", str(model_dir), "--training-file",
                 str(tmp_path / "train.jsonl"), "--known-facts", str(tmp_path / "known.jsonl"),
                 "--out", str(tmp_path / "run"), "--method", method, "--adapter", "lora",
                 "--epochs", "1", "--batch-size", "4", "--learning-rate", "0.01", *extra])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "succeeded"
    assert printed["evaluation"]["base_heldout_known_accuracy"] == 1.0
    adapter = printed["adapter"]
    fmt = json.loads((tmp_path / "run" / "final" / "adapter" / "prompt_format.json").read_text())
    assert fmt["chat_template"] == "driftsafe-plain-qa"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    assert any("lora_" in n for n, _ in reloaded.named_parameters())
