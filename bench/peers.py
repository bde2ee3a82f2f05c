"""The trainers people would otherwise use, configured to do our loop's work and nothing more.

Both get the same LoRA model (`trainer.adapters.prepare_lora`, r=16 on every linear layer), the
same tokenized rows (our chat template; loss on the answer tokens only), batch, number of steps
and optimizer (fused AdamW, lr 1e-3, no weight decay, constant schedule without warmup, gradient
norm clipped at 1.0), float32 without gradient checkpointing, no packing, no logging, saving or
evaluation, one process, no data workers. Each returns examples/s from the end of its first step
to the end of its last.

TRL is an optional extra (`pip install -e ".[bench]"`): `trl_available()` says whether it is here.
"""

from __future__ import annotations

import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

LR = 1e-3


def _rows(world: Path, examples, tokenizer) -> list[dict]:
    from trainer.tokenize import IGNORE, encode_example

    rows = []
    for ex in examples:
        enc = encode_example(tokenizer, ex, 512)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels,
                     "completion_mask": [int(t != IGNORE) for t in enc.labels]})
    return rows


def _model(world: Path, spec):
    from transformers import AutoModelForCausalLM

    from trainer.adapters import prepare_lora

    torch.manual_seed(0)
    return prepare_lora(AutoModelForCausalLM.from_pretrained(world / "model"), spec)


def _common_args(batch: int, steps: int, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0,
                save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
                disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, seed=0,
                # Our loop's CPU precision and memory mode: float32, activations kept. (TRL's
                # SFTConfig would otherwise turn on bf16 autocast and gradient checkpointing,
                # which on this CPU made it 10x slower: not the comparison we mean.)
                bf16=False, fp16=False, gradient_checkpointing=False)


def _stamper():
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(time.perf_counter())

    return stamps, Stamp()


def rate(stamps: list[float], batch: int) -> dict:
    """A run's figures from the end of each step: its mean examples/s, and every step's time
    (for a median that a passing burst of machine load does not move)."""
    seconds = stamps[-1] - stamps[0]
    return {"steps": len(stamps) - 1, "seconds": seconds,
            "examples_per_second": (len(stamps) - 1) * batch / seconds,
            "step_times": [b - a for a, b in zip(stamps, stamps[1:])]}


def hf_trainer(world: Path, examples, spec, batch: int, steps: int) -> dict:
    """transformers' Trainer with a padding collator (labels already mask the prompt)."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"],
             "attention_mask": [1] * len(r["input_ids"])}
            for r in _rows(world, examples, tokenizer)]
    model = _model(world, spec)
    stamps, stamp = _stamper()
    with TemporaryDirectory() as out:
        args = TrainingArguments(**_common_args(batch, steps, out))
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[stamp],
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)).train()
    return rate(stamps, batch)


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def trl_sft_trainer(world: Path, examples, spec, batch: int, steps: int) -> dict:
    """TRL's SFTTrainer on already-tokenized rows with a completion mask: completion-only loss
    (the assistant's answer), no packing, no padding-free; TRL pads with its own collator. TRL
    also computes entropy and token accuracy every step for its metrics; that is its default and
    part of what using it costs."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    rows = [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]}
            for r in _rows(world, examples, tokenizer)]
    model = _model(world, spec)
    stamps, stamp = _stamper()
    with TemporaryDirectory() as out:
        args = SFTConfig(**_common_args(batch, steps, out), packing=False, padding_free=False,
                         completion_only_loss=True, max_length=512, dataset_num_proc=None,
                         shuffle_dataset=False)
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer, callbacks=[stamp]).train()
    return rate(stamps, batch)
