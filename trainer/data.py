"""Training and known-fact files: parse, validate, and tokenize with the loss on answer tokens.

Both line forms of API.md are accepted:
  chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}
  QA:   {"question": str, "answer": str} (or "prompt"/"completion"; "answers": [str] for known
        facts)
Parsing never touches torch, so the API validates uploads with the same code the trainer uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10
# One example's size. Far past any model's context, and bounded because the API validates and a
# worker tokenizes one example at a time: a file with no newline in 512 MB was read as one line,
# several times its size in memory, and each learned turn re-renders the conversation so far.
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_MESSAGES = 256


class _TooLong:
    """Stands for a line over MAX_LINE_BYTES, whose bytes were not kept (`bounded_lines`)."""


TOO_LONG = _TooLong()


class DataFileError(ValueError):
    """A file that cannot be used, with every problem found as (line number, reason)."""

    def __init__(self, problems: list[tuple[int, str]], total: int | None = None):
        self.problems = problems
        total = total if total is not None else len(problems)
        shown = "; ".join(f"line {n}: {why}" for n, why in problems)
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        super().__init__(shown + more)

    @property
    def first_line(self) -> int:
        return self.problems[0][0]


@dataclass(frozen=True)
class Example:
    """One training conversation. `weights[i]` is 1 where message i is an assistant turn to
    learn."""

    messages: tuple[dict, ...]
    weights: tuple[int, ...]
    answers: tuple[str, ...]  # accepted answers of the last assistant turn (for scoring)
    line: int

    @property
    def is_single_qa(self) -> bool:
        """One user turn and its answer: what a known-fact file may hold."""
        return len(self.messages) == 2 and self.messages[0]["role"] == "user"

    @property
    def prompt_messages(self) -> list[dict]:
        """Everything before the last assistant turn: what a model is asked when scoring."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return [dict(m) for m in self.messages[:last]]


def _parse_messages(obj: dict) -> tuple[tuple[dict, ...], tuple[int, ...]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    if len(msgs) > MAX_MESSAGES:
        raise ValueError(f"{len(msgs)} messages; an example holds at most {MAX_MESSAGES}")
    out, weights = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        unknown = set(m) - {"role", "content", "weight", "name"}
        if unknown:
            raise ValueError(f"messages[{i}] has unknown keys {sorted(unknown)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}].content must be a non-empty string")
        weight = m.get("weight", 1 if role == "assistant" else 0)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"messages[{i}].weight must be 0 or 1")
        if weight == 1 and role != "assistant":
            raise ValueError(f"messages[{i}].weight applies to assistant messages only")
        out.append({"role": role, "content": content})
        weights.append(weight)
    if msgs[-1].get("role") != "assistant":
        raise ValueError("the last message must be from the assistant")
    if not any(weights):
        raise ValueError("no assistant message to learn from (all have weight 0)")
    return tuple(out), tuple(weights)


def _parse_qa(obj: dict) -> tuple[str, list[str]]:
    q_key = "question" if "question" in obj else "prompt"
    question = obj.get(q_key)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"'{q_key}' must be a non-empty string")
    answers: list[str] = []
    a_key = "answer" if "answer" in obj else "completion"
    if a_key in obj:
        if not isinstance(obj[a_key], str) or not obj[a_key].strip():
            raise ValueError(f"'{a_key}' must be a non-empty string")
        answers.append(obj[a_key])
    if "answers" in obj:
        extra = obj["answers"]
        if not isinstance(extra, list) or not extra or not all(
                isinstance(a, str) and a.strip() for a in extra):
            raise ValueError("'answers' must be a non-empty list of non-empty strings")
        answers += [a for a in extra if a not in answers]
    if not answers:
        raise ValueError("a QA line needs 'answer' (or 'completion' or 'answers')")
    return question, answers


_QA_KEYS = {"question", "prompt", "answer", "completion", "answers", "id", "metadata"}


def parse_line(text: str, line: int) -> Example:
    example = _parse_object(text, line)
    for part in [m["content"] for m in example.messages] + list(example.answers):
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape one: "\\ud800"; no tokenizer can encode it
            raise ValueError("a string holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape), which is not text") from None
    return example


def _parse_object(text: str, line: int) -> Example:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # '[' * 100000: the decoder recurses once per level
        raise ValueError("not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        unknown = set(obj) - {"messages", "id", "metadata"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} beside 'messages'")
        messages, weights = _parse_messages(obj)
        return Example(messages, weights, (messages[-1]["content"],), line)
    if "question" in obj or "prompt" in obj:
        unknown = set(obj) - _QA_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        question, answers = _parse_qa(obj)
        messages = ({"role": "user", "content": question},
                    {"role": "assistant", "content": answers[0]})
        return Example(messages, (0, 1), tuple(answers), line)
    raise ValueError("expected 'messages' (chat form) or 'question'/'answer' (QA form)")


@dataclass(frozen=True)
class FileSummary:
    """What validating a file tells the API without keeping its examples."""

    examples: int
    qa_only: bool  # every example is a single QA turn (usable as known facts)


def iter_examples(lines: Iterable[str | bytes]) -> Iterator[Example]:
    """Parse JSONL lines one at a time, yielding each good example.

    Lines may be bytes (decoded here, so a bad byte is reported on its own line) or text. A UTF-8
    byte order mark at the start is dropped; blank lines are skipped. After the last line, raises
    DataFileError naming every bad line (the first MAX_REPORTED_ERRORS of them), or if there was
    no example at all.
    """
    problems: list[tuple[int, str]] = []
    bad = good = 0
    for n, raw in enumerate(lines, start=1):
        if raw is TOO_LONG or len(raw) > MAX_LINE_BYTES + 2:  # + "\r\n"
            bad += 1
            if len(problems) < MAX_REPORTED_ERRORS:
                problems.append((n, f"longer than {MAX_LINE_BYTES} bytes, the limit of one "
                                    "example"))
            continue
        if isinstance(raw, bytes):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
                if len(problems) < MAX_REPORTED_ERRORS:
                    problems.append((n, "not valid UTF-8"))
                continue
        else:
            text = raw.removeprefix("\ufeff") if n == 1 else raw
        if not text.strip():
            continue
        try:
            example = parse_line(text, n)
        except ValueError as e:
            bad += 1
            if len(problems) < MAX_REPORTED_ERRORS:
                problems.append((n, str(e)))
            continue
        good += 1
        yield example
    if bad:
        raise DataFileError(problems, bad)
    if not good:
        raise DataFileError([(0, "the file holds no examples")])


def parse_lines(lines: Iterable[str | bytes], *, max_examples: int | None = None
                ) -> list[Example]:
    """Parse JSONL lines; blank lines are skipped. Raises DataFileError naming each bad line."""
    examples = list(iter_examples(lines))
    if max_examples is not None and len(examples) > max_examples:
        raise DataFileError([(0, f"{len(examples)} examples exceed the limit of {max_examples}")])
    return examples


def summarize_lines(lines: Iterable[str | bytes]) -> FileSummary:
    """Validate a file by the rules of parse_lines while holding one line at a time."""
    count, qa_only = 0, True
    for example in iter_examples(lines):
        count += 1
        qa_only = qa_only and example.is_single_qa
    return FileSummary(count, qa_only)


def split_lines(data: bytes) -> list[bytes]:
    """JSONL lines end at b"\n" only: U+2028 and friends may sit unescaped inside JSON strings."""
    return data.split(b"\n")


def parse_bytes(data: bytes) -> list[Example]:
    return parse_lines(split_lines(data))


def bounded_lines(source: BinaryIO, on_bytes: Callable[[bytes], object] | None = None
                  ) -> Iterator[bytes | _TooLong]:
    """A binary file's lines (split at b"\n", as split_lines splits), never holding more of one
    than MAX_LINE_BYTES and its line end: a longer line is read through in chunks and comes out
    as TOO_LONG. `on_bytes` sees every byte read (an upload's digest)."""
    feed = on_bytes or (lambda _piece: None)
    limit = MAX_LINE_BYTES + 2
    while line := source.readline(limit):
        feed(line)
        if len(line) < limit or line.endswith(b"\n"):
            yield line
            continue
        del line  # too long: the rest of it goes by in small pieces, none kept
        ended = False
        while not ended:
            piece = source.readline(64 * 1024)
            feed(piece)
            ended = not piece or piece.endswith(b"\n")
        yield TOO_LONG


def load_examples(path) -> list[Example]:
    with open(path, "rb") as f:
        return parse_lines(bounded_lines(f))


def require_qa_facts(examples: list[Example], what: str) -> None:
    """Known-fact files are scored by asking the question: each line must be a single QA turn."""
    for ex in examples:
        if not ex.is_single_qa:
            raise DataFileError([(ex.line, f"{what} lines must be QA form (question and answer)")])
