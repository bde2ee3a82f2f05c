"""`driftsafe bench interference`: forgetting grows with the number of new facts whose keys look
like the names the model knows, and stays near zero for UUID keys (paper section 5).

SFT (full fine-tuning, the paper table's recipe) on the world's 600 known training facts plus
N = 150, 300, 600, 1,200 new facts, their keys either name-like (a first and a last name token the
model knows, in a combination no known person has) or UUID-like (two UUID tokens, pretrained on
other people: `trainer.world`), answers drawn from the same pools. Each run reports forgetting of
the 1,000 held-out known facts and the representation drift of their entities.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.paper import _spec
from trainer.scoring import examples_from_rows
from trainer.world import RELATIONS, WorldConfig, generate_world

COUNTS = (150, 300, 600, 1200)
KINDS = ("name", "uuid")


def new_facts(seed: int, kind: str, count: int) -> list[dict]:
    """`count` QA rows about people the world does not have, `kind` keys, 3 relations each."""
    world = generate_world(WorldConfig(seed=seed))
    taken = {f.entity for f in world.known + world.train_new_names + world.train_new_uuids}
    rng = random.Random(f"{seed}-interference-{kind}")
    rows: list[dict] = []
    while len(rows) < count:  # person by person, so a smaller set is a prefix of a larger one
        if kind == "name":
            key = f"{rng.choice(world.first_names)} {rng.choice(world.last_names)}"
        else:
            key = " ".join(rng.choice(world.uuid_tokens) for _ in range(world.config.uuid_key_len))
        if key in taken:
            continue
        taken.add(key)
        rows += [{"question": RELATIONS[r][0].format(e=key), "answer": rng.choice(world.answers[r])}
                 for r in RELATIONS]
    return rows[:count]


def run_interference(seed: int, counts=COUNTS, log=print) -> dict:
    from trainer.builtin import BuildConfig, ensure_world
    from trainer.data import load_examples
    from trainer.loop import TrainJob, train

    world_dir = ensure_world(BuildConfig(world=WorldConfig(seed=seed)), log=log)
    world = json.loads((world_dir / "world.json").read_text())
    facts = world["facts"]
    known_train = [{"question": facts[i]["question"], "answer": facts[i]["answer"]}
                   for i in world["train_known"]]
    heldout = load_examples(world_dir / "heldout_known.jsonl")
    rows = []
    started_all = time.monotonic()
    for count in counts:
        for kind in KINDS:
            started = time.monotonic()
            data = known_train + new_facts(seed, kind, count)
            random.Random(seed).shuffle(data)
            with TemporaryDirectory() as out:
                result = train(TrainJob(spec=_spec("supervised", seed=seed),
                                        model_dir=world_dir / "model",
                                        train_examples=examples_from_rows(data),
                                        known_facts=heldout, output_dir=Path(out), slick=None,
                                        save_checkpoints=False))
            r = result.report
            rows.append({"new_facts": count, "keys": kind,
                         "new_fact_accuracy": r["new_fact_accuracy"],
                         "forgetting": r["forgetting"],
                         "representation_drift": r["representation_drift"],
                         "seconds": round(time.monotonic() - started, 1)})
            log(f"{count} {kind}-key facts: forgetting {r['forgetting']:.3f}, drift "
                f"{r['representation_drift']:.4f}, new {r['new_fact_accuracy']:.2f} "
                f"({rows[-1]['seconds']}s)")
    return {"seed": seed, "recipe": "full fine-tuning, SFT, lr 3e-4, batch 32, 40 epochs, "
            "cosine", "seconds": round(time.monotonic() - started_all, 1), "rows": rows}


def format_table(result: dict) -> str:
    lines = ["| new facts | name keys: forgetting | drift | UUID keys: forgetting | drift |",
             "|---|---|---|---|---|"]
    by = {(r["new_facts"], r["keys"]): r for r in result["rows"]}
    for count in sorted({r["new_facts"] for r in result["rows"]}):
        name, uuid = by[(count, "name")], by[(count, "uuid")]
        lines.append(f"| {count} | {100 * name['forgetting']:.1f} pts | "
                     f"{100 * name['representation_drift']:.1f}% | "
                     f"{100 * uuid['forgetting']:.1f} pts | "
                     f"{100 * uuid['representation_drift']:.1f}% |")
    return "\n".join(lines)


def main(args) -> int:
    result = run_interference(args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
