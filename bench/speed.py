"""`driftsafe bench speed`: ratios measured side by side in one run on the built-in model.

  trainer_vs_hf / trainer_vs_trl
      our loop's training examples/s over the Hugging Face Trainer's / TRL's SFTTrainer's: the
      same LoRA model (r=16), tokenized rows, answer-only loss, batch, steps, fused AdamW, constant
      learning rate, clipping, no packing, logging, saving or eval (`bench.peers`). Each side
      runs PEER_REPEATS times, interleaved (ours, HF, TRL, ours, ...) so drifting machine load
      hits all alike, and its speed is its median step time over every step of its repeats: a
      burst of load on a shared 2-core machine moves a run's mean rate by 10-20% but few of its
      steps. (`trainer_vs_*_mean_rate`: the median of the repeats' mean examples/s instead.)
      TRL is the `bench` extra; without it the figure is null and the table says so.
      The optimizer is the same implementation on every side (torch's fused AdamW: ours with
      fused=True, theirs optim="adamw_torch_fused"). What differs is how each computes the same
      loss: ours feeds no token after the last loss position and no padding mask for right-padded
      rows (`trainer.losses.logits_at`, the same outputs), runs LoRA layers through one addmm on
      tokens flattened to rows (`trainer.adapters.lean_lora_forward`, bit-identical outputs
      here, gradients to float32 rounding) and lists parameters,
      collates and reads losses without per-step overhead; the peers run stock PEFT and their own
      loops. The process keeps freed memory for reuse (`trainer.host`) from the start, for all.
  sd_over_sft_time / sd_over_sft_time_full
      a 40-epoch job's time, self-distillation over SFT, LoRA / full fine-tuning, on the whole
      training file (1,200 examples, 38 steps an epoch, 1,520 steps). Measured, not run to the
      end: the teacher cache's one-time build over all 1,200 examples is timed, and each method's
      step time is the median of SD_STEPS_FACTOR x `steps` steps, SFT's and SD's in alternating
      blocks of BLOCK (`sft_and_sd`); the job's time is build + 1,520 x step time.
      `sd_over_sft_time_live` is the same with teacher_cache=off.
  sd_over_sft_memory
      peak live tensor bytes during training steps, SD over SFT, LoRA, whole training file: model,
      optimizer state and the teacher cache counted as resident, plus every tensor an op makes in
      forward and backward until it is freed (`bench.memory.PeakTensorMemory`). The cache is
      extra memory the live teacher does not take, so it shows here (on the built-in model the
      exact cache is kept as the teacher's hidden states, 1.2 MiB, `trainer.teacher_cache`);
      `sd_over_sft_memory_live` is teacher_cache=off. Under LoRA the teacher is the student with
      its adapter off: no second copy of the weights exists to count.
  scoring_speedup
      held-out scoring throughput over a per-example generate() loop, the two alternated
      REPEATS times, each the median of its repeats. Scoring runs as a job's checkpoint does,
      on facts rendered and tokenized once per job (`KnowledgeProbe`); the per-example loop
      renders its one prompt inside its timing, a negligible part of a generate() call.
      `scoring_speedup_unprepared` renders and tokenizes inside the timing too.
Timings depend on the machine's load; ratios within one run are what count.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from trainer.data import load_examples
from trainer.spec import TrainSpec

BATCH = 32
EPOCHS = 40  # the job the SD ratios describe: the README's 40-epoch LoRA job
REPEATS = 3
PEER_REPEATS = 5  # a peer run is ~60 steps, a few seconds: repeats vary by ~10% on 2 cores
BLOCK = 6  # steps per block when SFT and SD alternate (5 step times each)
SD_STEPS_FACTOR = 2  # SD vs SFT: targets 5-10% from 1 need more steps than the peers' 30%
TARGETS = {"trainer_vs_hf": (">=", 1.3), "trainer_vs_trl": (">=", 1.3),
           "sd_over_sft_time": ("<=", 1.05), "sd_over_sft_time_full": ("<=", 1.10),
           "sd_over_sft_memory": ("<=", 1.05), "scoring_speedup": (">=", 30.0)}


def _spec(method: str, epochs: int, adapter: str = "lora", **hp) -> TrainSpec:
    return TrainSpec.model_validate({"method": {"type": method, method: {"hyperparameters": {
        "n_epochs": epochs, "batch_size": BATCH, "learning_rate": 1e-3, "warmup_ratio": 0.0,
        "lr_scheduler": "constant", **hp}}}, "seed": 0, "adapter": {"type": adapter}})


def _examples(world: Path, n: int | None = None):
    examples = load_examples(world / "train.jsonl")
    return examples if n is None else examples[:n]


def _job(world: Path, spec: TrainSpec, examples):
    from trainer.loop import TrainJob

    return TrainJob(spec=spec, model_dir=world / "model", train_examples=examples,
                    output_dir=Path("."), known_facts=[], slick=None, save_checkpoints=False,
                    log_every_n_steps=1)


class _Timed:
    """Our loop on the whole training file (a 40-epoch job's spec), run a block of steps at a
    time: the teacher cache's one-time build timed apart, then the end of every step stamped."""

    def __init__(self, world: Path, method: str, adapter: str = "lora", **hp):
        from trainer.loop import Callbacks, _Run

        self.stamps: list[float] = []
        self.gaps: list[float] = []
        self.run = _Run(_job(world, _spec(method, EPOCHS, adapter, **hp), _examples(world)),
                        Callbacks(on_metrics=lambda m: self.stamps.append(time.perf_counter())))
        self.job_steps = self.run.total_steps
        self.build = 0.0
        if self.run.teacher is not None:
            started = time.perf_counter()
            self.run._cache_teacher()  # what run() would do first; timed apart from the steps
            self.build = time.perf_counter() - started

    def steps(self, n: int) -> None:
        """n more steps (the loop's first n again: its data order and learning rate, the model
        and optimizer as they stand); the gaps between their ends are step times (the first
        step of a block also carries the block's start, so it is left out)."""
        self.stamps.clear()
        self.run.total_steps = n
        self.run.run()
        self.gaps += [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    def figures(self) -> dict:
        step = statistics.median(self.gaps)
        return {"steps": len(self.gaps), "seconds": sum(self.gaps),
                "examples_per_second": len(self.gaps) * BATCH / sum(self.gaps),
                "step_seconds": step, "cache_build_seconds": self.build,
                "job_steps": self.job_steps, "job_seconds_extrapolated": self.build
                + self.job_steps * step}


def sft_and_sd(world: Path, steps: int, adapter: str = "lora", **hp) -> dict[str, dict]:
    """SFT's and self-distillation's figures (`_Timed`), their step blocks alternating (BLOCK
    steps each, after one warm-up step each) so that load drifting during the measurement hits
    both alike."""
    runs = {"supervised": _Timed(world, "supervised", adapter),
            "self_distillation": _Timed(world, "self_distillation", adapter, **hp)}
    for timed in runs.values():
        timed.steps(1)
        timed.gaps.clear()
    for _ in range(max(1, round(steps / (BLOCK - 1)))):
        for timed in runs.values():
            timed.steps(BLOCK)
    return {method: timed.figures() for method, timed in runs.items()}


def peak_memory_of_step(world: Path, method: str, **hp) -> dict:
    """Peak live tensor bytes over two training steps on the whole training file (after two
    warm-up steps, so AdamW state exists): resident model, optimizer and teacher cache included."""
    from bench.memory import PeakTensorMemory
    from trainer.loop import Callbacks, _Run

    run = _Run(_job(world, _spec(method, EPOCHS, **hp), _examples(world)), Callbacks())
    run.total_steps = 2
    run.run()
    run.total_steps = 4
    resident = list(run.model.state_dict().values())
    resident += [v for s in run.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
    cache = run.teacher_cache
    if cache is not None:  # (an exact cache's `head` is the model's own weight: counted above)
        resident += cache.tensors
    with PeakTensorMemory(resident) as mem:
        run.run()
    return {"peak_bytes": mem.peak, "teacher_cache_bytes": cache.nbytes if cache else 0}


def scoring(world: Path, n: int = 1000, loop_n: int = 100, repeats: int = REPEATS) -> dict:
    """Batched scoring of `n` held-out facts vs `generate()` one prompt at a time (on loop_n),
    the two alternated `repeats` times; each side's rate is the median of its repeats. Batched
    scoring is timed as a job's checkpoint runs it, on facts it prepared once per job
    (`trainer.scoring.prepare_facts`: prompts rendered and tokenized), and also from raw facts,
    preparation included (`unprepared_facts_per_second`)."""
    from trainer.loop import load_base
    from trainer.scoring import accuracy, answer_margin, prepare_facts
    from trainer.tokenize import encode_prompt

    tokenizer, model = load_base(world / "model", torch.device("cpu"), torch.float32)
    model.eval()
    facts = load_examples(world / "heldout_known.jsonl")[:n]
    accuracy(model, tokenizer, facts[:32])  # warm-up
    prepared = prepare_facts(tokenizer, facts, margin=answer_margin("exact"))
    batched, unprepared, looped = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        accuracy(model, tokenizer, prepared)
        batched.append(len(facts) / (time.perf_counter() - t))
        t = time.perf_counter()
        accuracy(model, tokenizer, facts)
        unprepared.append(len(facts) / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.inference_mode():
            for ex in facts[:loop_n]:
                ids = torch.tensor([encode_prompt(tokenizer, ex.prompt_messages)])
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=16, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        looped.append(loop_n / (time.perf_counter() - t))
    return {"batched_facts_per_second": statistics.median(batched),
            "unprepared_facts_per_second": statistics.median(unprepared),
            "loop_facts_per_second": statistics.median(looped),
            "batched_runs": batched, "unprepared_runs": unprepared, "loop_runs": looped}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _median_step(runs: list[dict]) -> float:
    """The median step time over every step of every repeat (one step in 60 is an epoch's
    last, half-full batch, on every side alike: a median barely notices it)."""
    return statistics.median(t for r in runs for t in r["step_times"])


def _peer_runs(world: Path, steps: int, log) -> dict[str, list[dict]]:
    """ours / hf / trl on the same first `steps` x BATCH examples, interleaved PEER_REPEATS
    times."""
    from bench import peers
    from trainer.loop import Callbacks, train

    examples = _examples(world, steps * BATCH)
    epochs = max(1, -(-steps * BATCH // len(examples)))
    spec = _spec("supervised", epochs)

    def our_rate() -> dict:
        stamps: list[float] = []
        train(_job(world, spec, examples),
              Callbacks(on_metrics=lambda m: stamps.append(time.perf_counter())))
        return peers.rate(stamps[: steps + 1], BATCH)  # the same number of steps as theirs

    runs: dict[str, list[dict]] = {"ours": [], "hf_trainer": [], "trl_sft_trainer": []}
    have_trl = peers.trl_available()
    if not have_trl:
        log("TRL is not installed: trainer_vs_trl is skipped (pip install -e '.[bench]')")
    for i in range(PEER_REPEATS):
        log(f"peers: repeat {i + 1}/{PEER_REPEATS}")
        runs["ours"].append(our_rate())
        runs["hf_trainer"].append(peers.hf_trainer(world, examples, spec, BATCH, steps))
        if have_trl:
            runs["trl_sft_trainer"].append(peers.trl_sft_trainer(world, examples, spec, BATCH,
                                                                 steps))
    return runs


def _sd_runs(world: Path, steps: int, adapter: str, repeats: int, log, **hp) -> dict:
    runs: dict[str, list[dict]] = {"supervised": [], "self_distillation": []}
    for i in range(repeats):
        log(f"sd vs sft ({adapter}{', ' + str(hp) if hp else ''}): repeat {i + 1}/{repeats}")
        for method, figures in sft_and_sd(world, steps, adapter, **hp).items():
            runs[method].append(figures)
    sft, sd = (_median(runs[m], "job_seconds_extrapolated") for m in runs)
    return {"ratio": sd / sft, "runs": runs}


def run_speed(steps: int, log=print) -> dict:
    from trainer.builtin import default_world_dir
    from trainer.host import keep_freed_memory

    world = default_world_dir(log=log)
    # Our loop sets this for its process; set before anything runs, every trainer measured here
    # allocates the same way.
    kept = keep_freed_memory()
    torch.manual_seed(0)
    peers_runs = _peer_runs(world, steps, log)
    sd_steps = SD_STEPS_FACTOR * steps
    lora = _sd_runs(world, sd_steps, "lora", REPEATS, log)
    full = _sd_runs(world, sd_steps, "full", 2, log)
    live = _sd_runs(world, sd_steps, "lora", 2, log, teacher_cache="off")
    mem_sft = peak_memory_of_step(world, "supervised")
    mem_sd = peak_memory_of_step(world, "self_distillation")
    mem_live = peak_memory_of_step(world, "self_distillation", teacher_cache="off")
    score = scoring(world)
    trl = peers_runs["trl_sft_trainer"]
    ours_step, hf_step = (_median_step(peers_runs[k]) for k in ("ours", "hf_trainer"))
    ours_eps = _median(peers_runs["ours"], "examples_per_second")
    return {
        "trainer_vs_hf": hf_step / ours_step,
        "trainer_vs_trl": _median_step(trl) / ours_step if trl else None,
        "trainer_vs_hf_mean_rate": ours_eps / _median(peers_runs["hf_trainer"],
                                                      "examples_per_second"),
        "trainer_vs_trl_mean_rate": (ours_eps / _median(trl, "examples_per_second")
                                     if trl else None),
        "sd_over_sft_time": lora["ratio"],
        "sd_over_sft_time_full": full["ratio"],
        "sd_over_sft_time_live": live["ratio"],
        "sd_over_sft_memory": mem_sd["peak_bytes"] / mem_sft["peak_bytes"],
        "sd_over_sft_memory_live": mem_live["peak_bytes"] / mem_sft["peak_bytes"],
        "scoring_speedup": score["batched_facts_per_second"] / score["loop_facts_per_second"],
        "scoring_speedup_unprepared": (score["unprepared_facts_per_second"]
                                       / score["loop_facts_per_second"]),
        "raw": {"peers": peers_runs, "sd_lora": lora["runs"], "sd_full": full["runs"],
                "sd_lora_live_teacher": live["runs"],
                "memory": {"supervised": mem_sft, "self_distillation": mem_sd,
                           "self_distillation_live_teacher": mem_live},
                "scoring": score, "batch_size": BATCH, "steps": steps, "sd_steps": sd_steps,
                "job_epochs": EPOCHS,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
                "allocator": ("glibc keeps freed memory (trainer.host), for every trainer"
                              if kept else "default")},
    }


def main(args) -> int:
    figures = run_speed(args.steps, log=lambda m: print(m, file=sys.stderr))
    print("| figure | value | target |\n|---|---|---|")
    for key, (op, target) in TARGETS.items():
        value = figures[key]
        shown = "n/a (TRL not installed)" if value is None else f"{value:.3f}"
        print(f"| {key} | {shown} | {op} {target} |")
    for key in ("sd_over_sft_time_live", "sd_over_sft_memory_live"):
        print(f"| {key} | {figures[key]:.3f} | (teacher_cache=off, for comparison) |")
    for key in ("trainer_vs_hf_mean_rate", "trainer_vs_trl_mean_rate"):
        value = figures[key]
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"| {key} | {shown} | (median of the repeats' mean rates, for comparison) |")
    print(f"| scoring_speedup_unprepared | {figures['scoring_speedup_unprepared']:.3f} | "
          "(facts rendered and tokenized inside the timing, for comparison) |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    return 0
