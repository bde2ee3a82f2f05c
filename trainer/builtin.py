"""The built-in base model `driftsafe-factlm-tiny`, its tokenizer and its data files.

A word-level Hugging Face tokenizer with a chat template, and a small Llama trained from scratch to
memorise the known facts of a `World`, saved with `save_pretrained` so it loads like any hub model.
Builds are cached by their configuration, built under a lock and moved into place atomically, so
concurrent callers (a worker and a test run, say) build once and never see a half-written world.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.world import RELATIONS, World, WorldConfig, generate_world, write_jsonl

MODEL_ID = "driftsafe-factlm-tiny"
BUILD_VERSION = 2  # bump when the build's output changes for the same config
SPECIALS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


@dataclass(frozen=True)
class BaseModelConfig:
    """The architecture and the from-scratch training recipe of the base model."""

    hidden_size: int = 128
    intermediate_size: int = 512
    layers: int = 4
    heads: int = 4
    max_epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    target_accuracy: float = 0.995  # stop once this share of known facts is answered right
    check_every: int = 5  # epochs between accuracy checks
    loss_on_all_tokens: bool = True
    max_turns: int = 1  # >1 packs facts into multi-turn chats, for few-shot prompting


@dataclass(frozen=True)
class BuildConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: BaseModelConfig = field(default_factory=BaseModelConfig)

    def key(self) -> str:
        blob = json.dumps({"v": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer(world: World):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + world.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>",
        additional_special_tokens=SPECIALS[2:], model_max_length=256,
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, config: BaseModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=end_id, bos_token_id=None)
    model = LlamaForCausalLM(llama)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_id
    model.generation_config.bos_token_id = None
    return model


def _turn_encodings(tokenizer, world: World) -> list[list]:
    """For each known fact, the encoded single-turn conversation under each question template.

    The template is concatenative (no BOS, each turn closed by <|end|>), so a multi-turn
    conversation is the concatenation of its turns; tests check this against the template.
    """
    from trainer.data import Example
    from trainer.tokenize import encode_example

    out = []
    for f in world.known:
        per_template = []
        for t in range(len(RELATIONS[f.relation])):
            ex = Example(({"role": "user", "content": f.question(t)},
                          {"role": "assistant", "content": f.answer}), (0, 1), (f.answer,), 0)
            per_template.append(encode_example(tokenizer, ex, max_len=256))
        out.append(per_template)
    return out


def train_base_model(model, tokenizer, world: World, config: BaseModelConfig, seed: int,
                     log=print) -> None:
    """Memorise every known fact: full training from scratch (loss on every token by default)."""
    from trainer.losses import answer_cross_entropy
    from trainer.scoring import accuracy
    from trainer.tokenize import IGNORE, Encoded, collate

    turns = _turn_encodings(tokenizer, world)
    known_qa = [f.to_qa() for f in world.known]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    warmup = 200  # steps; then a constant rate: memorisation needs many full-size updates
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    started, step = time.monotonic(), 0
    for epoch in range(config.max_epochs):
        order = list(range(len(turns)))
        rng.shuffle(order)
        convs: list[Encoded] = []
        while order:
            k = rng.randint(1, config.max_turns)
            chunk, order = order[:k], order[k:]
            parts = [turns[i][rng.randrange(len(turns[i]))] for i in chunk]
            convs.append(Encoded([t for p in parts for t in p.input_ids],
                                 [t for p in parts for t in p.labels]))
        for b in range(0, len(convs), config.batch_size):
            batch = collate(convs[b: b + config.batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            # Pretraining: every token carries loss, so names are learned as entities too.
            targets = (batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
                       if config.loss_on_all_tokens else batch["labels"])
            loss = answer_cross_entropy(logits, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
        if (epoch + 1) % config.check_every == 0:
            acc = float(accuracy(model, tokenizer, known_qa).float().mean())
            model.train()
            log(f"base model: epoch {epoch + 1} loss {loss.item():.4f} known accuracy {acc:.3f} "
                f"({time.monotonic() - started:.0f}s)")
            if acc >= config.target_accuracy:
                break
    model.eval()


def _write_world(out: Path, world: World, build: BuildConfig, log=print) -> None:
    from trainer.scoring import accuracy

    torch.manual_seed(build.world.seed)
    tokenizer = build_tokenizer(world)
    model = build_model(tokenizer, build.model, build.world.seed)
    train_base_model(model, tokenizer, world, build.model, build.world.seed, log=log)
    heldout_acc = accuracy(model, tokenizer,
                           [f.to_qa() for f in world.heldout_known]).float().mean()
    log(f"base model: held-out known accuracy {heldout_acc:.3f}")
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    known_rows = [f.to_qa() for f in world.train_known]
    write_jsonl(out / "train.jsonl", _mix(known_rows, [f.to_qa() for f in world.train_new_names],
                                          build.world.seed))
    write_jsonl(out / "train_uuid.jsonl",
                _mix(known_rows, [f.to_qa() for f in world.train_new_uuids], build.world.seed))
    write_jsonl(out / "heldout_known.jsonl", [f.to_qa() for f in world.heldout_known])
    description = world.describe()
    description["model_id"] = MODEL_ID
    description["build_key"] = build.key()
    description["base_heldout_known_accuracy"] = round(float(heldout_acc), 6)
    (out / "world.json").write_text(json.dumps(description, sort_keys=True, indent=1))


def _mix(known: list[dict], new: list[dict], seed: int) -> list[dict]:
    rows = known + new
    random.Random(seed + 1).shuffle(rows)
    return rows


def cache_root() -> Path:
    """Built worlds are a per-machine cache, shared by every data dir (and test) on it."""
    explicit = os.environ.get("DRIFTSAFE_WORLDS_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "driftsafe" / "worlds"


def _world_dir(build: BuildConfig, root: Path | None) -> Path:
    root = Path(root) if root else cache_root()
    return root / f"{MODEL_ID}-seed{build.world.seed}-{build.key()}"


def world_dir_if_built(build: BuildConfig, root: Path | None = None) -> Path | None:
    """The directory of a finished build in the cache, or None (nothing is built)."""
    final = _world_dir(build, root)
    return final if (final / "world.json").exists() else None


def ensure_world(build: BuildConfig = BuildConfig(), root: Path | None = None, log=print) -> Path:
    """The directory of a built world, building it first if no finished build is cached."""
    final = _world_dir(build, root)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    if (final / "world.json").exists():
        return final
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "world.json").exists():  # another process built it while we waited
            return final
        tmp = root / f".{final.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log(f"building world seed={build.world.seed} into {final}")
        _write_world(tmp, generate_world(build.world), build, log=log)
        os.rename(tmp, final)
    return final


def default_world_dir(log=print) -> Path:
    """The world behind the built-in model, built once per machine (per data dir)."""
    return ensure_world(BuildConfig(), log=log)


def build_world_to(out: Path, seed: int | None, log=print) -> Path:
    """`driftsafe world build`: copy a cached build (made first if needed) to `out`."""
    build = BuildConfig() if seed is None else BuildConfig(world=WorldConfig(seed=seed))
    src = ensure_world(build, log=log)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    shutil.copytree(src, out, dirs_exist_ok=True)
    return out
