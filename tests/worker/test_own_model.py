"""A model this repository did not make, fine-tuned through the HTTP API (issue 8, "Done when").

The base model is built here the way someone else would build one, with plain `transformers` and
`tokenizers` calls and a training loop of this file's own (nothing of `trainer.zoo` or
`trainer.builtin`): a Qwen2 architecture with tied embeddings, a byte-level BPE tokenizer trained
on the facts' text, a ChatML template, and Qwen2.5-Instruct's sampling `generation_config` (which
a job's scoring must not inherit). It is taught a few hundred QA facts, saved with
`save_pretrained`, and registered through DRIFTSAFE_MODELS for a real uvicorn API and Celery
worker. The facts come from `trainer.world` as plain text: data, not driftsafe's model code.

Everything the test asserts is measured here independently: greedy answers through `generate`
with the ChatML prompt, compared after a normalisation of this file's own.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile

import httpx
import pytest

from tests.live import new_tenant_key, running_api
from tests.worker.test_e2e import Worker, wait_for

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_TAUGHT = 300  # facts the base model is taught; 60 of them go into the training file
N_TRAIN_KNOWN, N_NEW = 60, 120


def _facts():
    """(taught facts, new facts) as (question, answer) pairs of one seeded fact world."""
    from trainer.world import WorldConfig, generate_world

    world = generate_world(WorldConfig(seed=11))
    taught = [(f.question(0), f.answer) for f in world.train_known[:N_TAUGHT]]
    new = [(f.question(0), f.answer) for f in world.train_new_names[:N_NEW]]
    return taught, new


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    return tok


def _conversation(q, a=None):
    return [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a else [])


def _encode(tok, q, a):
    """Token ids of the whole turn and the labels: -100 on the prompt, the answer and its
    <|im_end|> learned."""
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt = ids(tok.apply_chat_template(_conversation(q), add_generation_prompt=True,
                                         tokenize=False))
    full = ids(tok.apply_chat_template(_conversation(q, a), tokenize=False))
    assert full[:len(prompt)] == prompt, "prompt and answer tokens overlap"
    return full, [-100] * len(prompt) + full[len(prompt):]


def build_base(folder, epochs: int = 60):
    """Teach a tiny Qwen2 the taught facts (AdamW, shuffled mini-batches) and save it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    taught, new = _facts()
    tok = _tokenizer([f"{q} {a}" for q, a in taught + new] + ["You are a helpful assistant."])
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=96, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    rows = [_encode(tok, q, a) for q, a in taught]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in rows])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(rows)).split(50):
            loss = model(input_ids=ids[batch], attention_mask=mask[batch],
                         labels=labels[batch]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    # What Qwen2.5-Instruct's hub folder asks of `generate`: scoring must override all of it.
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                   repetition_penalty=1.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return loss.item()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def greedy_correct(model, tok, facts) -> list[bool]:
    """One fact at a time (no padding): greedy, every sampling setting overridden, stopped at
    <|im_end|>; right when the whole answer equals the fact's answer after `_norm`."""
    import torch

    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    with torch.inference_mode():
        for q, a in facts:
            prompt = tok.apply_chat_template(_conversation(q), add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
            got = model.generate(**prompt, do_sample=False, num_beams=1, max_new_tokens=16,
                                 repetition_penalty=1.0, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=end, pad_token_id=tok.pad_token_id)
            text = tok.decode(got[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
            out.append(_norm(text) == _norm(a))
    return out


def _jsonl(path, facts):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in facts))
    return path


def _adapter(url, key, job_id, folder):
    r = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}/adapter",
                  headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(folder)
    return folder


@pytest.mark.slow
def test_a_qwen2_model_made_elsewhere_fine_tunes_through_the_api(tmp_path):
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from store.settings import Settings

    base = tmp_path / "own-qwen2"
    started = time.monotonic()
    final_loss = build_base(base)
    built_s = time.monotonic() - started
    taught, new = _facts()
    known = taught[N_TRAIN_KNOWN:]  # held out: never in the training file
    tok = AutoTokenizer.from_pretrained(base)
    assert AutoModelForCausalLM.from_pretrained(base).config.tie_word_embeddings
    base_ok = greedy_correct(AutoModelForCausalLM.from_pretrained(base), tok, known)
    # It was taught these facts: most answered right makes the forgetting measured real.
    assert sum(base_ok) / len(known) >= 0.8, (sum(base_ok), final_loss)

    settings = Settings(data_dir=tmp_path / "data", secret_key="e2e", heartbeat_seconds=1.0,
                        stale_after_seconds=60.0, models={"own-qwen2": str(base)})
    key = new_tenant_key(settings, "own-model")
    jobs = {}
    with running_api(settings, tmp_path / "api.log") as url:
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert "own-qwen2" in [m.id for m in client.models.list().data]
        with open(_jsonl(tmp_path / "train.jsonl", taught[:N_TRAIN_KNOWN] + new), "rb") as a, \
                open(_jsonl(tmp_path / "known.jsonl", known), "rb") as b:
            train_id = client.files.create(file=a, purpose="fine-tune").id
            known_id = client.files.create(file=b, purpose="fine-tune").id
        worker = Worker(settings, tmp_path / "worker.log")
        try:
            for name in ("supervised", "self_distillation"):
                # 12 epochs at 3e-3 under LoRA r=16: SFT learns the new facts and forgets
                # about half of the held-out ones (52-60 pts in trial runs, seeds 1 and 2).
                method = {"type": name, name: {"hyperparameters": {
                    "n_epochs": 12, "batch_size": 16, "learning_rate": 3e-3}}}
                jobs[name] = client.fine_tuning.jobs.create(
                    model="own-qwen2", training_file=train_id, method=method, seed=1,
                    extra_body={"adapter": {"type": "lora", "r": 16, "alpha": 32},
                                "evaluation": {"known_facts_file": known_id}}).id
            done = {name: wait_for(client, job_id, timeout=900) for name, job_id in jobs.items()}
        finally:
            worker.stop()
        folders = {name: _adapter(url, key, job_id, tmp_path / f"adapter-{name}")
                   for name, job_id in jobs.items()}
    trained_s = time.monotonic() - started - built_s

    seen = {}
    for name, job in done.items():
        assert job.status == "succeeded", (name, job.error)
        ev = job.evaluation
        assert ev["heldout_known_facts_dropped_in_training"] == 0
        # (a) The base held-out accuracy agrees with this file's own greedy scoring of the base
        # (the job's batched, left-padded generation may flip an answer or two in float32).
        assert ev["base_heldout_known_accuracy"] == pytest.approx(
            sum(base_ok) / len(known), abs=0.02), name
        assert abs(ev["heldout_known_facts_used"] - sum(base_ok)) <= 0.02 * len(known), name
        # (b) The downloaded adapter, loaded with PEFT on the base, reproduces the reported
        # held-out accuracy and forgetting (forgetting: of the facts the base answered right).
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                          folders[name])
        tuned_ok = greedy_correct(tuned, tok, known)
        assert ev["heldout_known_accuracy"] == pytest.approx(
            sum(tuned_ok) / len(known), abs=0.02), name
        lost = sum(b and not t for b, t in zip(base_ok, tuned_ok)) / sum(base_ok)
        assert ev["forgetting"] == pytest.approx(lost, abs=0.02), name
        seen[name] = {k: round(ev[k], 4) for k in ("base_heldout_known_accuracy",
                                                   "heldout_known_accuracy", "forgetting",
                                                   "new_fact_accuracy")}
        seen[name] |= {"ours_base": round(sum(base_ok) / len(known), 4),
                       "ours_tuned": round(sum(tuned_ok) / len(known), 4),
                       "ours_forgetting": round(lost, 4)}
    print(f"\nbase built in {built_s:.0f} s (loss {final_loss:.3f}), jobs and scoring in "
          f"{trained_s:.0f} s: {json.dumps(seen)}")
    sft, sd = done["supervised"].evaluation, done["self_distillation"].evaluation
    # (c) SFT clearly forgets, and self-distillation forgets less while learning new facts.
    assert sft["forgetting"] >= 0.25 and sft["new_fact_accuracy"] >= 0.9, seen
    assert sd["forgetting"] <= sft["forgetting"] - 0.15, seen
    assert sd["new_fact_accuracy"] >= 0.5, seen
