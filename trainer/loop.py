"""The fine-tuning loop, top to bottom: spec and data in, tuned adapter and report out.

Supports, per TrainSpec:
  - methods: supervised (answer-token CE), self_distillation (CE + lambda * tau^2 * KL to a frozen
    teacher: the base with the adapter off, or a one-epoch format-warmup model), frozen_groups;
  - adapters: LoRA through peft, or full fine-tuning;
  - checkpoints holding weights, optimizer, scheduler and RNG state, and exact resume from them
    (the data order of epoch e is a pure function of (seed, e), so it needs no saved state);
  - known-fact scoring at every checkpoint (`trainer.evaluate`), SliCK categories before training;
  - callbacks for events, metrics and checkpoints, and a stop flag read before every step;
  - CUDA with bf16 where present, CPU otherwise; never requires a GPU.
It knows nothing of HTTP, databases or queues.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from trainer import teacher as teachers
from trainer import teacher_cache
from trainer.checkpoint import CheckpointInfo, latest_checkpoint, load_state, save_checkpoint
from trainer.data import Example
from trainer.evaluate import KnowledgeProbe
from trainer.host import keep_freed_memory
from trainer.losses import answer_cross_entropy, distillation_kl, logits_at, loss_positions
from trainer.modelfacts import auto_size
from trainer.precision import Precision, micro_batches
from trainer.slick import SlickSettings, category_counts, classify
from trainer.spec import SelfDistillationHyperparameters, TrainSpec, resolve_auto
from trainer.tokenize import IGNORE, Encoded, collate, encode_example
from trainer.vocab_chunks import ce_sum


def _quiet(*_args, **_kw) -> None:
    return None


@dataclass
class Callbacks:
    on_event: Callable[[str, str], None] = _quiet  # (level, message)
    on_metrics: Callable[[dict], None] = _quiet
    on_checkpoint: Callable[[CheckpointInfo], None] = _quiet
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class TrainJob:
    spec: TrainSpec
    model_dir: Path
    train_examples: list[Example]
    output_dir: Path
    known_facts: list[Example] = field(default_factory=list)  # empty: no knowledge report
    slick: SlickSettings | None = SlickSettings()
    save_checkpoints: bool = True
    log_every_n_steps: int = 10
    device: str | None = None  # None: CUDA when present, else CPU
    max_tokens: int | None = None  # epochs x tokens of the training set; over it: JobTooLarge
    measure_pull: bool = False  # self-distillation: report the L2 strength matching its pull


class JobTooLarge(ValueError):
    """The job exceeds a size cap the caller set; the message names the cap."""

    code = "job_too_large"


@dataclass
class TrainResult:
    status: str  # "succeeded" or "cancelled"
    spec: TrainSpec  # with every "auto" resolved
    step: int
    total_steps: int
    trained_tokens: int
    report: dict | None
    knowledge_categories: dict | None
    checkpoints: list[CheckpointInfo]
    final_dir: Path | None
    losses: list[float]  # train loss of every step run in this call


def pick_device(requested: str | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, weight dtype): weights are float32 everywhere; CUDA computes under autocast
    (`trainer.precision`)."""
    if requested:
        device = torch.device(requested)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.float32


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def load_base(model_dir: Path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    return tokenizer, model


class _Run:
    """Per-run state: what one call of `train` builds and steps through."""

    def __init__(self, job: TrainJob, callbacks: Callbacks):
        self.job, self.cb = job, callbacks
        self.device, self.dtype = pick_device(job.device)
        self.precision = Precision.for_device(self.device)
        self.sum_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults re-touching each step's activations
        torch.manual_seed(job.spec.seed)
        self.tokenizer, base = load_base(job.model_dir, self.device, self.dtype)
        self.spec = resolve_auto(job.spec, len(job.train_examples), auto_size(job.model_dir))
        self.hp = self.spec.method.hyperparameters
        self.encoded = [encode_example(self.tokenizer, ex, self.hp.max_seq_len)
                        for ex in job.train_examples]
        # Per example, counted once rather than every step: its tokens, and its answer tokens
        # (the CE's positions, whose share weighs a micro-batch).
        self.lengths = [len(e.input_ids) for e in self.encoded]
        self.answer_counts = [sum(1 for t in e.labels[1:] if t != IGNORE) for e in self.encoded]
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its data order)
        self.steps_per_epoch = math.ceil(len(self.encoded) / self.hp.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        planned = self.hp.n_epochs * sum(len(e.input_ids) for e in self.encoded)
        if job.max_tokens is not None and planned > job.max_tokens:
            raise JobTooLarge(f"the job would train on {planned} tokens ({self.hp.n_epochs} "
                              f"epochs); the cap is max_job_tokens={job.max_tokens}")
        self.pad_id = self.tokenizer.pad_token_id
        self.resume_from = latest_checkpoint(self.checkpoint_root) if job.save_checkpoints else None
        self.probe: KnowledgeProbe | None = None
        self.categories: dict | None = None
        self._assess_base(base)
        needs_probe = [name for name in ("stop_at_new_fact_accuracy", "distill_weight_new_facts")
                       if getattr(self.hp, name, None) is not None]
        if needs_probe and self.probe is None:
            raise ValueError(f"{needs_probe[0]} needs known-fact scoring (a known-facts file) to "
                             "tell new facts from known ones")
        self.model, self.teacher = self._prepare(base)
        self.teacher_cache: teacher_cache.TeacherCache | None = None  # built by `run`
        self.restored_metrics: dict = {}  # the metrics of the checkpoint a resume starts from
        # The trained parameters, listed once: walking a PEFT model's modules for them every
        # step cost ~3 ms of a ~80 ms step on the built-in model.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused AdamW (one kernel over all tensors, on the CPU too), as the bench's peers use.
        self.optimizer = torch.optim.AdamW(self.params, lr=self.hp.learning_rate,
                                           weight_decay=self.hp.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # theta_0 of the L2 anchor (and of `measure_pull`): the trained parameters as training
        # starts, before a resume restores later ones (the seed makes a LoRA init the same).
        self.start = ([p.detach().clone() for p in self.params]
                      if self.hp.weight_anchor > 0 or job.measure_pull else None)

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.job.output_dir) / "checkpoints"

    def _lr_factor(self, step: int) -> float:
        warmup = int(self.hp.warmup_ratio * self.total_steps)
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, self.total_steps - warmup)
        if self.hp.lr_scheduler == "linear":
            return max(0.0, 1.0 - done)
        if self.hp.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0

    # ---- before training -------------------------------------------------------------------
    def _assess_base(self, base) -> None:
        job = self.job
        if job.known_facts:
            self.probe = KnowledgeProbe(self.tokenizer, job.train_examples, job.known_facts,
                                        self.spec.evaluation.max_forgetting,
                                        match=self.spec.evaluation.match)
            with self.precision.autocast():
                self.probe.baseline(base)
            self.cb.on_event("info", f"base model answers {self.probe.base.train_known.sum()} of "
                                     f"{len(job.train_examples)} training questions and "
                                     f"{self.probe.base.heldout_correct.float().mean():.1%} "
                                     "of held-out known facts")
        if job.slick is not None:
            settings = replace(job.slick, match=self.spec.evaluation.match)
            with self.precision.autocast():
                self.categories = category_counts(classify(base, self.tokenizer,
                                                           job.train_examples, settings=settings))
            self.cb.on_event("info", f"SliCK categories of the training set: {self.categories}")

    def _known_train_indices(self) -> list[int]:
        if self.probe is None:
            raise ValueError("teacher=format_warmup needs known facts to tell known examples")
        idx = self.probe.base.train_known.nonzero().flatten().tolist()
        if not idx:
            raise ValueError("teacher=format_warmup needs training examples the base model "
                             "already answers right; this training set has none")
        return idx

    def _prepare(self, base):
        from trainer.adapters import lean_lora_forward, lora_config, prepare_full, prepare_lora

        lora = self.spec.adapter.type == "lora"
        sd = self.hp if isinstance(self.hp, SelfDistillationHyperparameters) else None
        teacher = None
        if sd is not None and sd.teacher == "format_warmup":
            if lora:
                model = prepare_lora(base, self.spec, adapter_name="teacher")
                lean_lora_forward(model)  # adding an adapter below keeps these layers
                self._format_warmup(model)
                model.add_adapter("default", lora_config(base, self.spec.adapter, self.spec))
                model.set_adapter("default")
                return model, teachers.NamedAdapterTeacher(model, "teacher")
            warm = teachers.FrozenCopyTeacher(base)
            warm.model.requires_grad_(True)
            self._format_warmup(warm.model)
            warm.model.requires_grad_(False)
            warm.model.eval()
            teacher = warm
        model = prepare_lora(base, self.spec) if lora else prepare_full(base, self.spec)
        if lora:
            lean_lora_forward(model)
        if self.hp.gradient_checkpointing:
            # Non-reentrant: gradients reach LoRA weights without the inputs requiring grad.
            if hasattr(base, "activation_checkpointing_enable"):  # its name from transformers 5
                base.activation_checkpointing_enable({"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable({"use_reentrant": False})
        if sd is not None and teacher is None:
            teacher = (teachers.AdapterOffTeacher(model) if lora
                       else teachers.FrozenCopyTeacher(base))
        return model, teacher

    def _format_warmup(self, model) -> None:
        """One epoch of plain SFT on the examples the base already knows (Kaplan et al. 2026)."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hp.learning_rate, weight_decay=0.0)
        known = self._known_train_indices()
        order = [known[i] for i in epoch_order(self.spec.seed, -1, len(known))]
        model.train()
        for b in range(0, len(order), self.hp.batch_size):
            batch = self._batch(order[b: b + self.hp.batch_size])
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            loss = answer_cross_entropy(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.cb.on_event("info", f"format warm-up teacher trained on {len(known)} known examples")

    # ---- the loop --------------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows: list[Encoded] = [self.encoded[i] for i in indices]
        return {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}

    def _distill_weight(self, step: int, rows: list[int], where: torch.Tensor
                        ) -> float | torch.Tensor:
        """lambda: the schedule's value at `step`; or, with `distill_weight_new_facts`, a tensor
        with lambda at each KL position, that value at those of new-fact examples."""
        hp: SelfDistillationHyperparameters = self.hp  # type: ignore[assignment]
        lam = hp.distill_weight
        if hp.distill_weight_final is not None:
            lam += (hp.distill_weight_final - lam) * step / max(1, self.total_steps - 1)
        if hp.distill_weight_new_facts is None:
            return lam
        per_row = torch.full((len(rows),), lam, device=where.device)
        new = ~self.probe.base.train_known[rows]
        per_row[new.to(where.device)] = hp.distill_weight_new_facts
        return per_row[where.nonzero()[:, 0]]

    def _anchor_penalty(self) -> torch.Tensor:
        """mu/2 * ||theta - theta_0||^2 over the trained parameters."""
        return 0.5 * self.hp.weight_anchor * sum(
            (p - p0).pow(2).sum() for p, p0 in zip(self.params, self.start))

    def _loss_positions(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer, where): the CE's positions, and those the forward runs the LM head at — the
        KL's, a superset of the answer's."""
        answer = loss_positions(batch["labels"])
        kl_all = self.teacher is not None and self.hp.distill_positions == "all"
        return answer, batch["attention_mask"][:, 1:].bool() if kl_all else answer

    def _teacher_logits(self, batch, where: torch.Tensor) -> torch.Tensor | None:
        """The live teacher's logits at `where`; None when the teacher cache answers instead."""
        if self.teacher is None or self.teacher_cache is not None:
            return None
        return self.teacher.logits_at(batch["input_ids"], batch["attention_mask"], where)

    def _distill_term(self, logits, t_logits, rows: list[int], step: int, where
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the lambda-weighted KL the loss adds, the KL as reported: weighted per position
        where lambda differs by example)."""
        hp: SelfDistillationHyperparameters = self.hp  # type: ignore[assignment]
        lam = self._distill_weight(step, rows, where)
        per_position = isinstance(lam, torch.Tensor)  # then the KL comes out weighted
        weights = lam if per_position else None
        kl = (self.teacher_cache.kl(logits, rows, weights) if t_logits is None else
              distillation_kl(logits, t_logits, hp.distill_temperature, weights=weights))
        return (kl if per_position else lam * kl), kl

    def _loss(self, batch, rows: list[int], step: int) -> tuple[torch.Tensor, dict]:
        """(the loss, its parts): the parts are detached tensors, read as numbers only when they
        are logged, so a step waits on the device for none of them."""
        answer, where = self._loss_positions(batch)  # CE positions are a subset of `where`
        t_logits = self._teacher_logits(batch, where)  # first: its activations go before ours
        logits = logits_at(self.model, batch["input_ids"], batch["attention_mask"], where)
        # With the KL at answer positions (the default) the head ran exactly where the CE is.
        ce_logits = logits if where is answer else logits[answer[where]]
        n_answer = max(1, sum(self.answer_counts[i] for i in rows))
        ce = ce_sum(ce_logits, batch["labels"][:, 1:][answer]) / n_answer
        loss, parts = ce, {}
        if self.hp.weight_anchor > 0:
            penalty = self._anchor_penalty()
            loss = loss + penalty
            parts["anchor_loss"] = penalty.detach()
        if self.teacher is not None:
            term, kl = self._distill_term(logits, t_logits, rows, step, where)
            loss = loss + term
            parts |= {"ce_loss": ce.detach(), "distill_loss": kl.detach()}
        return loss, {"train_loss": loss.detach(), **parts}

    def _gradients(self, rows: list[int], step: int) -> tuple[dict, int]:
        """Forward and backward of one optimizer step's examples, in micro-batches of at most
        `micro_batch_tokens` padded tokens. Each micro-batch's loss weighs by its share of the
        batch's answer tokens, so the summed gradient is the whole batch's: exactly for the CE
        and for a KL at answer positions (with distill_positions=all, each micro-batch's KL mean
        weighs by its answer tokens rather than its KL positions). Returns the step's loss parts
        (float64 tensors, summed as Python floats would be; float32 on MPS, which has no float64)
        and its tokens."""
        groups = micro_batches([self.lengths[i] for i in rows], self.hp.micro_batch_tokens)
        total = max(1, sum(self.answer_counts[i] for i in rows))
        parts: dict = {}
        for group in groups:
            micro = [rows[j] for j in group]
            share = 1.0 if len(groups) == 1 else sum(self.answer_counts[i] for i in micro) / total
            batch = self._batch(micro)
            with self.precision.autocast():
                loss, micro_parts = self._loss(batch, micro, step)
            self.precision.backward(loss * share if share != 1.0 else loss)
            for key, value in micro_parts.items():
                parts[key] = parts.get(key, 0.0) + share * value.to(self.sum_dtype)
        return parts, sum(self.lengths[i] for i in rows)

    def _batch_indices(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:  # an epoch's order is drawn once, not every step
            self._order = (epoch, epoch_order(self.spec.seed, epoch, len(self.encoded)))
        return self._order[1][offset * self.hp.batch_size: (offset + 1) * self.hp.batch_size]

    def _is_checkpoint_step(self, step: int) -> bool:
        """After `step` steps: every eval_every_n_epochs epochs (default a quarter of the run)."""
        if self.spec.checkpoint_every_n_steps and step % self.spec.checkpoint_every_n_steps == 0:
            return True
        every = self.spec.evaluation.eval_every_n_epochs or max(1, self.hp.n_epochs // 4)
        return step % (every * self.steps_per_epoch) == 0

    def _measure(self) -> dict:
        if self.probe is None:
            return {}
        with self.precision.autocast():
            return self.probe.measure(self.model)

    def _checkpoint(self, step: int, metrics: dict, trained_tokens: int) -> CheckpointInfo:
        # A format-warmup teacher was trained in this run: keep it, so a resume needs no re-run.
        extra = {}
        if isinstance(self.teacher, teachers.NamedAdapterTeacher):
            from peft import get_peft_model_state_dict
            extra = {"teacher_adapter": get_peft_model_state_dict(self.model,
                                                                  adapter_name="teacher")}
        elif self.teacher is not None and self._warm_teacher:
            extra = {"teacher_model": self.teacher.model.state_dict()}
        info = save_checkpoint(self.checkpoint_root, step=step, epoch=step / self.steps_per_epoch,
                               model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, metrics=metrics,
                               extra_state={"trained_tokens": trained_tokens,
                                            "knowledge_categories": self.categories},
                               extra_tensors=extra, extra_files=self._adapter_files())
        self.cb.on_checkpoint(info)
        return info

    def _adapter_files(self) -> dict[str, str]:
        """prompt_format.json: the template the model was trained with and how to ask it (the
        adapter download's driftsafe.json repeats it)."""
        import json

        from trainer.templates import prompt_format
        return {"prompt_format.json": json.dumps(prompt_format(self.tokenizer), indent=1)}

    @property
    def _warm_teacher(self) -> bool:
        return getattr(self.hp, "teacher", "base") == "format_warmup"

    def _restore(self) -> tuple[int, int]:
        tensors, meta = load_state(self.resume_from)
        weights = self.resume_from / "adapter"
        if hasattr(self.model, "peft_config"):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            state = load_file(weights / "adapter_model.safetensors", device=str(self.device))
            set_peft_model_state_dict(self.model, state, adapter_name="default")
            if "teacher_adapter" in tensors:
                set_peft_model_state_dict(self.model, tensors["teacher_adapter"],
                                          adapter_name="teacher")
                self.model.set_adapter("default")
        else:
            from transformers import AutoModelForCausalLM
            saved = AutoModelForCausalLM.from_pretrained(weights, dtype=self.dtype)
            self.model.load_state_dict(saved.state_dict())
            if "teacher_model" in tensors:
                self.teacher.model.load_state_dict(tensors["teacher_model"])
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        if "cuda_rng" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        if meta.get("knowledge_categories") is not None:
            self.categories = meta["knowledge_categories"]
        self.restored_metrics = meta.get("metrics") or {}
        self.cb.on_event("info", f"resumed from checkpoint at step {meta['step']}")
        return meta["step"], meta.get("trained_tokens", 0)

    def _stopped_here_by_its_rule(self, step: int) -> bool:
        rule = self.hp.stop_at_new_fact_accuracy
        reached = self.restored_metrics.get("new_fact_accuracy")
        return bool(rule and step < self.total_steps and reached is not None and reached >= rule)

    def _cache_teacher(self) -> None:
        """Compute the teacher's outputs once (`trainer.teacher_cache`): after the teacher is
        final (a format warm-up trained, a checkpoint's teacher restored), before step one."""
        self.teacher_cache, level, message = teacher_cache.for_run(
            self.teacher, self.encoded, self.hp, self.model.get_output_embeddings().weight.size(0),
            self.pad_id, self.device, self.precision.autocast)
        self.cb.on_event(level, message)

    def run(self) -> TrainResult:
        step, tokens = self._restore() if self.resume_from else (0, 0)
        self.first_step = step
        if self._stopped_here_by_its_rule(step):
            # Its worker died after the stop, before the job's end was recorded: stop again,
            # rather than train on to the next checkpoint and forget more.
            self.cb.on_event("info", f"resumed at step {step}, where the run had stopped: "
                                     "new-fact accuracy had reached its target")
            return self._finish("succeeded", step, tokens, [], [], report=self.restored_metrics)
        if self.teacher is not None and self.teacher_cache is None and step < self.total_steps:
            self._cache_teacher()
        checkpoints: list[CheckpointInfo] = []
        losses: list[torch.Tensor] = []  # each step's loss, read as numbers once, at the end
        started = time.monotonic()
        self.cb.on_event("info", f"training {self.spec.method.type} ({self.spec.adapter.type}) for "
                                 f"{self.total_steps} steps on {len(self.encoded)} examples")
        self.model.train()
        while step < self.total_steps:
            if self.cb.should_stop():
                return self._finish("cancelled", step, tokens, checkpoints, losses, cancelled=True)
            self.optimizer.zero_grad(set_to_none=True)
            parts, step_tokens = self._gradients(self._batch_indices(step), step)
            self.precision.step(self.optimizer, self.params, 1.0)
            self.scheduler.step()
            step += 1
            tokens += step_tokens
            losses.append(parts["train_loss"])
            if step % self.job.log_every_n_steps == 0 or step == self.total_steps:
                elapsed = time.monotonic() - started
                remaining = elapsed / (step - self.first_step) * (self.total_steps - step)
                self.cb.on_metrics({"step": step, "total_steps": self.total_steps,
                                    "epoch": step / self.steps_per_epoch,
                                    "learning_rate": self.scheduler.get_last_lr()[0],
                                    "seconds_remaining": remaining,
                                    **{k: float(v) for k, v in parts.items()}})
            stop_rule = self.hp.stop_at_new_fact_accuracy
            if ((self.job.save_checkpoints or stop_rule) and step < self.total_steps
                    and self._is_checkpoint_step(step)):
                metrics = self._measure()
                self.model.train()
                if stop_rule and (metrics.get("new_fact_accuracy") or 0.0) >= stop_rule:
                    self.cb.on_event("info", f"new-fact accuracy {metrics['new_fact_accuracy']:.1%}"
                                             f" reached {stop_rule:.0%} at step {step}: stopping")
                    return self._finish("succeeded", step, tokens, checkpoints, losses,
                                        report=metrics)
                if self.job.save_checkpoints:
                    checkpoints.append(self._checkpoint(step, metrics, tokens))
        return self._finish("succeeded", step, tokens, checkpoints, losses)

    def _finish(self, status, step, tokens, checkpoints, losses, cancelled=False,
                report: dict | None = None) -> TrainResult:
        from trainer.checkpoint import save_weights

        losses = torch.stack(losses).tolist() if losses else []
        if report is None and not cancelled:
            report = self._measure()
        if report is not None and self.job.measure_pull and self.teacher is not None:
            from trainer.anchor import pull_diagnostics
            report |= pull_diagnostics(self, self.start)
        final_dir = None
        if self.job.save_checkpoints:
            if cancelled:
                # Keep what was learned: the last completed step becomes a checkpoint. A run
                # that learned nothing (cancelled before its first step, say right after a
                # resume) saves none: re-saving the step it resumed from would replace that
                # checkpoint's scores with none.
                if step > self.first_step and (not checkpoints or checkpoints[-1].step != step):
                    checkpoints.append(self._checkpoint(step, {}, tokens))
            else:
                checkpoints.append(self._checkpoint(step, report or {}, tokens))
                final_dir = Path(self.job.output_dir) / "final"
                save_weights(self.model, final_dir / "adapter", self._adapter_files())
        if report and self.categories is not None:
            report["knowledge_categories"] = self.categories
        self.cb.on_event("info", f"training {status} at step {step}/{self.total_steps}")
        return TrainResult(status, self.spec, step, self.total_steps, tokens, report,
                           self.categories, checkpoints, final_dir, losses)


def train(job: TrainJob, callbacks: Callbacks | None = None) -> TrainResult:
    """Run (or resume, when `job.output_dir` holds checkpoints) one fine-tuning job."""
    return _Run(job, callbacks or Callbacks()).run()
