"""The synthetic fact world: people, relations and answers, generated from a seed.

Facts are closed-book QA pairs ("Where was Bergo Talvin born ?" -> "Ostrava"-like tokens).
People have name-like keys built from a shared pool of first- and last-name tokens, so keys
overlap the way real names do; the world also makes UUID-like keys from tokens never used in
names, to reproduce the paper's interference experiment (SCIENCE.md, "Why it happens"). UUID keys
are as many tokens as names, and some known people have one, so the base model has trained every
UUID token before fine-tuning meets them (issue 9).

This module is pure Python: it decides *what* is true and who is known. `trainer.builtin`
turns a world into a tokenizer, a base model and data files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field

RELATIONS: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Where was {e} born ?",
        "In which city was {e} born ?",
        "What is the birthplace of {e} ?",
    ),
    "occupation": (
        "What does {e} do for a living ?",
        "What is the occupation of {e} ?",
        "What job does {e} have ?",
    ),
    "employer": (
        "Which company does {e} work for ?",
        "Who employs {e} ?",
        "What is the employer of {e} ?",
    ),
}

_TEMPLATE_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile("^" + re.escape(t).replace(re.escape("{e}"), "(.+)") + "$"), relation)
    for relation, templates in RELATIONS.items() for t in templates)


def relation_of(question: str) -> str | None:
    """The relation a question asks about, read off the question templates of `RELATIONS`.

    None when the question fits no template: a user's own file carries no relation, and the
    question text is all a QA line has.
    """
    q = question.strip()
    for pattern, relation in _TEMPLATE_PATTERNS:
        if pattern.match(q):
            return relation
    return None


def entity_of(question: str) -> str | None:
    """The entity (the person's name or key) a question asks about, read off the same templates.

    None when the question fits no template, or when what fills the template's slot is blank.
    """
    q = question.strip()
    for pattern, _ in _TEMPLATE_PATTERNS:
        m = pattern.match(q)
        if m:
            return m.group(1).strip() or None
    return None


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kl", "st", "tr", "sh", "ch", "th", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "nd", "rk"]
_UUID_CHARS = "0123456789abcdef"


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. The defaults are the built-in world behind `driftsafe-factlm-tiny`."""

    seed: int = 0
    n_first_names: int = 60
    n_last_names: int = 60
    n_answers_per_relation: int = 30
    n_known_people: int = 700
    n_new_people: int = 200
    n_train_known: int = 600
    n_train_new: int = 600
    n_heldout_known: int = 1000
    uuid_vocab: int = 64
    # Two tokens, like a name: the UUID comparison must not differ from names in key length.
    uuid_key_len: int = 2
    # Known people with UUID keys, in the base model's pretraining only (never held out or in
    # training), so UUID tokens are trained and shared like name tokens (issue 9: untrained rows
    # would be free capacity that no real model has).
    n_known_uuid_people: int = 100


@dataclass(frozen=True)
class Fact:
    fact_id: str
    entity: str
    relation: str
    answer: str
    key_kind: str  # "name" or "uuid"

    def question(self, template_index: int = 0) -> str:
        templates = RELATIONS[self.relation]
        return templates[template_index % len(templates)].format(e=self.entity)

    def to_qa(self) -> dict[str, str]:
        return {"question": self.question(0), "answer": self.answer}


@dataclass
class World:
    config: WorldConfig
    first_names: list[str]
    last_names: list[str]
    answers: dict[str, list[str]]
    uuid_tokens: list[str]
    known: list[Fact]  # every fact the base model is trained to know, UUID keys included
    train_known: list[Fact]
    heldout_known: list[Fact]
    train_new_names: list[Fact]
    train_new_uuids: list[Fact]
    template_words: list[str] = field(default_factory=list)

    def vocabulary(self) -> list[str]:
        """Every word a question or answer of this world can contain, in a stable order."""
        words: list[str] = []
        seen: set[str] = set()
        pools = [self.template_words, self.first_names, self.last_names, self.uuid_tokens]
        pools += [self.answers[r] for r in RELATIONS]
        for pool in pools:
            for w in pool:
                if w not in seen:
                    seen.add(w)
                    words.append(w)
        return words

    def describe(self) -> dict:
        """world.json: what is known and what is new, by fact id."""
        return {
            "config": asdict(self.config),
            "relations": {r: list(t) for r, t in RELATIONS.items()},
            "known_fact_count": len(self.known),
            "train_known": [f.fact_id for f in self.train_known],
            "train_new_names": [f.fact_id for f in self.train_new_names],
            "train_new_uuids": [f.fact_id for f in self.train_new_uuids],
            "heldout_known": [f.fact_id for f in self.heldout_known],
            "facts": {
                f.fact_id: {"entity": f.entity, "relation": f.relation, "answer": f.answer,
                            "key_kind": f.key_kind, "question": f.question(0)}
                for f in self.known + self.train_new_names + self.train_new_uuids
            },
        }


def _make_words(rng: random.Random, count: int, taken: set[str],
                syllables: tuple[int, int]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        n = rng.randint(*syllables)
        w = ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
             + rng.choice(_CODAS))
        w = w.capitalize()
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def _facts_for(people: list[str], kind: str, answers: dict[str, list[str]], rng: random.Random,
               prefix: str) -> list[Fact]:
    facts = []
    for i, person in enumerate(people):
        for relation in RELATIONS:
            facts.append(Fact(f"{prefix}{i}-{relation}", person, relation,
                              rng.choice(answers[relation]), kind))
    return facts


def generate_world(config: WorldConfig = WorldConfig()) -> World:
    """Deterministic in `config`: the same config gives the same world, fact for fact."""
    rng = random.Random(config.seed)
    taken: set[str] = set()
    first = _make_words(rng, config.n_first_names, taken, (1, 2))
    last = _make_words(rng, config.n_last_names, taken, (2, 3))
    answers = {r: _make_words(rng, config.n_answers_per_relation, taken, (2, 3)) for r in RELATIONS}
    uuid_tokens: list[str] = []
    while len(uuid_tokens) < config.uuid_vocab:
        tok = "".join(rng.choice(_UUID_CHARS) for _ in range(3))
        if tok not in taken and not tok.isdigit():
            taken.add(tok)
            uuid_tokens.append(tok)

    combos = [f"{a} {b}" for a in first for b in last]
    n_people = config.n_known_people + config.n_new_people
    if n_people > len(combos):
        raise ValueError(f"{n_people} people need more than {len(combos)} name combinations")
    people = rng.sample(combos, n_people)
    known_people, new_people = people[: config.n_known_people], people[config.n_known_people:]
    # UUID keys come from a stream of their own, so the name-key world does not depend on them.
    urng = random.Random(f"{config.seed}-uuid-keys")
    uuid_people: list[str] = []
    seen_uuid: set[str] = set()
    # The first known UUID keys walk a shuffled token list, so every UUID token is pretrained.
    cover = urng.sample(uuid_tokens, len(uuid_tokens))
    while len(uuid_people) < config.n_known_uuid_people + config.n_new_people:
        key = " ".join(cover.pop() if cover and len(uuid_people) < config.n_known_uuid_people
                       else urng.choice(uuid_tokens) for _ in range(config.uuid_key_len))
        if key not in seen_uuid:
            seen_uuid.add(key)
            uuid_people.append(key)
    known_uuid_people = uuid_people[: config.n_known_uuid_people]
    new_uuid_people = uuid_people[config.n_known_uuid_people:]

    known = _facts_for(known_people, "name", answers, rng, "k")
    new_names = _facts_for(new_people, "name", answers, rng, "n")
    new_uuids = _facts_for(new_uuid_people, "uuid", answers, urng, "u")
    known_uuids = _facts_for(known_uuid_people, "uuid", answers, urng, "ku")
    shuffled = known[:]
    rng.shuffle(shuffled)
    need = config.n_train_known + config.n_heldout_known
    if need > len(shuffled):
        raise ValueError(f"train_known + heldout_known = {need} exceeds {len(shuffled)} "
                         "known facts")
    train_known = shuffled[: config.n_train_known]
    heldout = shuffled[config.n_train_known: need]
    rng.shuffle(new_names)
    urng.shuffle(new_uuids)

    template_words = sorted({w for ts in RELATIONS.values() for t in ts for w in t.split()
                             if w != "{e}"})
    # Train and held-out facts are name-key facts; the known UUID-key facts are pretraining only.
    return World(config, first, last, answers, uuid_tokens, known + known_uuids, train_known,
                 heldout,
                 new_names[: config.n_train_new], new_uuids[: config.n_train_new], template_words)


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
