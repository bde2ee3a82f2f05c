"""`driftsafe bench gpu`: our loop on a real-sized model on one CUDA device, side by side.

The model is a random-init Qwen2 architecture at Qwen2.5-0.5B's shape (hidden 896, 24 layers,
14 heads / 2 KV heads, intermediate 4,864, tied embeddings, vocabulary 151,936), with a byte-level
BPE tokenizer trained on the fact world's text (`trainer.zoo`): nothing is downloaded. The data
are the world's QA facts (a few thousand). Figures, each a ratio of two runs in one process:

  tokens_vs_hf_lora / tokens_vs_hf_full   training tokens/s of our loop over the Hugging Face
                                          Trainer's (both bf16 autocast over float32 weights, same
                                          micro-batch, AdamW, learning rate and steps); >= 1.2
  sd_over_sft_time     self-distillation step time over SFT's, LoRA; <= 1.35
  sd_over_sft_memory   peak torch.cuda.max_memory_allocated, SD over SFT, LoRA; <= 1.05
  scoring_speedup      held-out facts/s, batched scoring over a per-example generate() loop; >= 20

On a machine without CUDA it refuses with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

BATCH = 16
LR = 2e-4
QWEN05 = dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2,
              vocab_size=151_936)
TARGETS = {"tokens_vs_hf_lora": (">=", 1.2), "tokens_vs_hf_full": (">=", 1.2),
           "sd_over_sft_time": ("<=", 1.35), "sd_over_sft_memory": ("<=", 1.05),
           "scoring_speedup": (">=", 20.0)}


def no_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return ("bench gpu needs a CUDA GPU and torch sees none (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}); run it on a GPU worker")
    return None


def build_model_dir(out: Path) -> Path:
    """The Qwen2 0.5B-shape model and its tokenizer, saved where the trainer loads from."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer import zoo

    tokenizer = zoo.build_tokenizer("qwen2", vocab_size=2000)
    torch.manual_seed(0)
    config = zoo.model_config("qwen2", tokenizer, **QWEN05)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def examples(n: int):
    from trainer import zoo

    return zoo.facts(n)


def _spec(method: str, adapter: str, steps: int, n: int):
    from trainer.spec import TrainSpec

    epochs = max(1, -(-steps * BATCH // n))
    return TrainSpec.model_validate({"method": {"type": method, method: {"hyperparameters": {
        "n_epochs": epochs, "batch_size": BATCH, "learning_rate": LR,
        "lr_scheduler": "constant", "warmup_ratio": 0}}}, "adapter": {"type": adapter},
        "seed": 0})


def ours(model_dir: Path, method: str, adapter: str, steps: int, data) -> dict:
    """Tokens/s and step time of our loop (first step excluded), and its peak CUDA memory."""
    import torch

    from trainer.loop import Callbacks, TrainJob, _Run

    stamps: list[float] = []

    def stamp(_metrics):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    run = _Run(TrainJob(spec=_spec(method, adapter, steps, len(data)), model_dir=model_dir,
                        train_examples=data, output_dir=Path("."), slick=None,
                        save_checkpoints=False, log_every_n_steps=1), Callbacks(on_metrics=stamp))
    run.total_steps = steps
    torch.cuda.reset_peak_memory_stats()
    run.run()
    peak = torch.cuda.max_memory_allocated()
    tokens = sum(sum(len(run.encoded[i].input_ids) for i in run._batch_indices(s))
                 for s in range(1, steps))
    seconds = stamps[-1] - stamps[0]
    del run
    torch.cuda.empty_cache()
    return {"steps": steps - 1, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "step_seconds": seconds / (steps - 1), "peak_bytes": peak}


def hf_trainer(model_dir: Path, adapter: str, steps: int, data) -> dict:
    """The Hugging Face Trainer: same model, adapter, examples in the same order, micro-batch,
    fused AdamW, learning rate and steps; bf16 autocast over float32 weights, as ours."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from trainer.adapters import prepare_full, prepare_lora
    from trainer.loop import epoch_order
    from trainer.tokenize import encode_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = _spec("supervised", adapter, steps, len(data))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = prepare_lora(base, spec) if adapter == "lora" else prepare_full(base, spec)
    order = epoch_order(0, 0, len(data))
    rows = []
    for i in order[: steps * BATCH]:
        enc = encode_example(tokenizer, data[i], 512)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels,
                     "attention_mask": [1] * len(enc.input_ids)})
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    with TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH,
                                 max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                                 optim="adamw_torch_fused", bf16=True, save_strategy="no",
                                 report_to=[], logging_strategy="no", disable_tqdm=True,
                                 dataloader_num_workers=0, seed=0, max_grad_norm=1.0)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Stamp()],
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)).train()
    tokens = sum(len(r["input_ids"]) for r in rows[BATCH: steps * BATCH])
    seconds = stamps[-1] - stamps[0]
    del model, base
    torch.cuda.empty_cache()
    return {"steps": steps - 1, "seconds": seconds, "tokens_per_second": tokens / seconds}


def scoring(model_dir: Path, facts, loop_n: int = 100) -> dict:
    """Batched greedy scoring (bf16 autocast, as a job scores) vs generate() per prompt."""
    import torch

    from trainer.generation import answer_budget, greedy_config
    from trainer.loop import load_base
    from trainer.scoring import accuracy
    from trainer.tokenize import encode_prompt

    tokenizer, model = load_base(model_dir, torch.device("cuda"), torch.float32)
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        accuracy(model, tokenizer, facts[:64])  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        accuracy(model, tokenizer, facts)
        torch.cuda.synchronize()
        batched = len(facts) / (time.perf_counter() - t)
        config = greedy_config(tokenizer, answer_budget(tokenizer, [a for f in facts
                                                                    for a in f.answers]))
        t = time.perf_counter()
        with torch.inference_mode():
            for ex in facts[:loop_n]:
                ids = torch.tensor([encode_prompt(tokenizer, ex.prompt_messages)], device="cuda")
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               generation_config=config)
        torch.cuda.synchronize()
        looped = loop_n / (time.perf_counter() - t)
    return {"facts": len(facts), "batched_facts_per_second": batched,
            "loop_facts_per_second": looped}


def run_gpu(steps: int, n_examples: int, log=print) -> dict:
    import torch

    data = examples(n_examples)
    with TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "qwen2-0.5b-shape")
        log(f"model built: {sum(1 for _ in model_dir.iterdir())} files; {len(data)} examples")
        hf_lora = hf_trainer(model_dir, "lora", steps, data)
        sft = ours(model_dir, "supervised", "lora", steps, data)
        sd = ours(model_dir, "self_distillation", "lora", steps, data)
        hf_full = hf_trainer(model_dir, "full", steps, data)
        full = ours(model_dir, "supervised", "full", steps, data)
        score = scoring(model_dir, data[:1000])
    return {
        "tokens_vs_hf_lora": sft["tokens_per_second"] / hf_lora["tokens_per_second"],
        "tokens_vs_hf_full": full["tokens_per_second"] / hf_full["tokens_per_second"],
        "sd_over_sft_time": sd["step_seconds"] / sft["step_seconds"],
        "sd_over_sft_memory": sd["peak_bytes"] / sft["peak_bytes"],
        "scoring_speedup": score["batched_facts_per_second"] / score["loop_facts_per_second"],
        "raw": {"ours_lora_sft": sft, "ours_lora_self_distillation": sd, "ours_full_sft": full,
                "hf_trainer_lora": hf_lora, "hf_trainer_full": hf_full, "scoring": score,
                "batch_size": BATCH, "steps": steps, "model": QWEN05,
                "device": torch.cuda.get_device_name(0), "torch": torch.__version__},
    }


def main(args) -> int:
    reason = no_gpu_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    figures = run_gpu(args.steps, args.examples, log=lambda m: print(m, file=sys.stderr))
    print("| figure | value | target |\n|---|---|---|")
    for key, (op, target) in TARGETS.items():
        print(f"| {key} | {figures[key]:.3f} | {op} {target} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    return 0
