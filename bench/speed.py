"""`driftsafe bench speed`: four ratios, measured side by side in one run on the built-in model.

  trainer_vs_hf       our loop's training examples/s over the Hugging Face Trainer's, same model
                      (LoRA r=16), data, batch size and number of steps (target >= 1.0)
  sd_over_sft_time    self-distillation step time over SFT step time, LoRA (target <= 1.35);
                      `sd_over_sft_time_full` gives the same under full fine-tuning
  sd_over_sft_memory  self-distillation peak tensor memory over SFT's, LoRA (target <= 1.05)
  scoring_speedup     held-out scoring throughput over a per-example generate() loop (target >= 10)
Step times exclude set-up: they run from the end of the first logged step to the last.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from trainer.data import load_examples
from trainer.spec import TrainSpec

BATCH = 32
TARGETS = {"trainer_vs_hf": (">=", 1.0), "sd_over_sft_time": ("<=", 1.35),
           "sd_over_sft_memory": ("<=", 1.05), "scoring_speedup": (">=", 10.0)}


def _spec(method: str, steps: int, n: int, adapter: str = "lora") -> TrainSpec:
    epochs = max(1, -(-steps * BATCH // n))
    return TrainSpec.model_validate({"method": {"type": method, method: {"hyperparameters": {
        "n_epochs": epochs, "batch_size": BATCH, "learning_rate": 1e-3}}}, "seed": 0,
        "adapter": {"type": adapter}})


def _examples(world: Path, steps: int):
    examples = load_examples(world / "train.jsonl")
    return examples[: min(len(examples), steps * BATCH)]


def ours(world: Path, method: str, steps: int, adapter: str = "lora") -> dict:
    """Examples/s of our loop over `steps` steps (the first one excluded as warm-up)."""
    from trainer.loop import Callbacks, TrainJob, train

    examples = _examples(world, steps)
    stamps: list[float] = []
    job = TrainJob(spec=_spec(method, steps, len(examples), adapter), model_dir=world / "model",
                   train_examples=examples, output_dir=Path("."), known_facts=[], slick=None,
                   save_checkpoints=False, log_every_n_steps=1)
    train(job, Callbacks(on_metrics=lambda m: stamps.append(time.perf_counter())))
    stamps = stamps[: steps + 1]  # the same number of steps for every run
    seconds = stamps[-1] - stamps[0]
    return {"steps": len(stamps) - 1, "seconds": seconds,
            "examples_per_second": (len(stamps) - 1) * BATCH / seconds,
            "step_seconds": seconds / (len(stamps) - 1)}


def peak_memory_of_step(world: Path, method: str) -> int:
    """Peak live tensor bytes of training steps, model and optimizer state included."""
    from bench.memory import PeakTensorMemory
    from trainer.loop import Callbacks, TrainJob, _Run

    examples = _examples(world, 4)
    run = _Run(TrainJob(spec=_spec(method, 4, len(examples)), model_dir=world / "model",
                        train_examples=examples, output_dir=Path("."), known_facts=[], slick=None,
                        save_checkpoints=False), Callbacks())
    run.total_steps = 2
    run.run()  # warm: AdamW state exists from here on
    run.total_steps = 4
    resident = list(run.model.state_dict().values())
    resident += [v for s in run.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
    with PeakTensorMemory(resident) as mem:
        run.run()
    return mem.peak


def hf_trainer(world: Path, steps: int) -> dict:
    """The Hugging Face Trainer on the same LoRA model, data, batch size and steps."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from trainer.adapters import prepare_lora
    from trainer.tokenize import encode_example

    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    spec = _spec("supervised", steps, BATCH)
    model = prepare_lora(AutoModelForCausalLM.from_pretrained(world / "model"), spec)
    rows = []
    for ex in _examples(world, steps):
        enc = encode_example(tokenizer, ex, 512)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels,
                     "attention_mask": [1] * len(enc.input_ids)})
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(time.perf_counter())

    with TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH,
                                 max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant",
                                 save_strategy="no", report_to=[], logging_strategy="no",
                                 disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                                 dataloader_num_workers=0, seed=0, max_grad_norm=1.0)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Stamp()],
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)).train()
    seconds = stamps[-1] - stamps[0]
    return {"steps": len(stamps) - 1, "seconds": seconds,
            "examples_per_second": (len(stamps) - 1) * BATCH / seconds}


def scoring(world: Path, n: int = 1000, loop_n: int = 100) -> dict:
    """Batched scoring of `n` held-out facts vs `generate()` one prompt at a time (on loop_n)."""
    from trainer.loop import load_base
    from trainer.scoring import accuracy, encode_prompt

    tokenizer, model = load_base(world / "model", torch.device("cpu"), torch.float32)
    model.eval()
    facts = load_examples(world / "heldout_known.jsonl")[:n]
    accuracy(model, tokenizer, facts[:32])  # warm-up
    t = time.perf_counter()
    accuracy(model, tokenizer, facts)
    batched = len(facts) / (time.perf_counter() - t)
    t = time.perf_counter()
    with torch.inference_mode():
        for ex in facts[:loop_n]:
            ids = torch.tensor([encode_prompt(tokenizer, ex.prompt_messages)])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
    looped = loop_n / (time.perf_counter() - t)
    return {"batched_facts_per_second": batched, "loop_facts_per_second": looped}


def run_speed(steps: int, log=print) -> dict:
    from trainer.builtin import default_world_dir

    world = default_world_dir(log=log)
    torch.manual_seed(0)
    # Interleave ours and theirs so drifting machine load hits both alike.
    hf = hf_trainer(world, steps)
    sft = ours(world, "supervised", steps)
    sd = ours(world, "self_distillation", steps)
    hf2 = hf_trainer(world, steps)
    sft2 = ours(world, "supervised", steps)
    sd2 = ours(world, "self_distillation", steps)
    full_sft = ours(world, "supervised", steps, "full")
    full_sd = ours(world, "self_distillation", steps, "full")
    hf_eps = max(hf["examples_per_second"], hf2["examples_per_second"])
    our_eps = max(sft["examples_per_second"], sft2["examples_per_second"])
    sft_step = min(sft["step_seconds"], sft2["step_seconds"])
    sd_step = min(sd["step_seconds"], sd2["step_seconds"])
    mem_sft = peak_memory_of_step(world, "supervised")
    mem_sd = peak_memory_of_step(world, "self_distillation")
    score = scoring(world)
    figures = {
        "trainer_vs_hf": our_eps / hf_eps,
        "sd_over_sft_time": sd_step / sft_step,
        "sd_over_sft_memory": mem_sd / mem_sft,
        "sd_over_sft_time_full": full_sd["step_seconds"] / full_sft["step_seconds"],
        "scoring_speedup": score["batched_facts_per_second"] / score["loop_facts_per_second"],
        "raw": {"ours_sft": [sft, sft2], "ours_self_distillation": [sd, sd2],
                "hf_trainer": [hf, hf2], "full_sft": full_sft, "full_self_distillation": full_sd,
                "peak_tensor_bytes": {"supervised": mem_sft, "self_distillation": mem_sd},
                "scoring": score, "batch_size": BATCH, "steps": steps,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads()},
    }
    return figures


def main(args) -> int:
    figures = run_speed(args.steps, log=lambda m: print(m, file=sys.stderr))
    print("| figure | value | target |\n|---|---|---|")
    for key, (op, target) in TARGETS.items():
        print(f"| {key} | {figures[key]:.3f} | {op} {target} |")
    print(f"| sd_over_sft_time_full | {figures['sd_over_sft_time_full']:.3f} "
          "| (full fine-tuning) |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    return 0
