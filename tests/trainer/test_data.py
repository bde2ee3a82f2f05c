import json

import pytest

from trainer.data import DataFileError, parse_bytes, require_qa_facts


def lines(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_qa_and_chat_forms_parse_to_conversations():
    data = lines(
        {"question": "Where was Ana Bo born ?", "answer": "Lisa"},
        {"prompt": "Who employs Ana Bo ?", "completion": "Kor"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello", "weight": 0},
                      {"role": "user", "content": "Where was Ana Bo born ?"},
                      {"role": "assistant", "content": "Lisa"}]},
    )
    qa, pc, chat = parse_bytes(data)
    assert [m["role"] for m in qa.messages] == ["user", "assistant"]
    assert qa.weights == (0, 1) and qa.answers == ("Lisa",)
    assert pc.messages[1]["content"] == "Kor"
    assert chat.weights == (0, 0, 0, 0, 1)
    assert chat.prompt_messages[-1]["content"] == "Where was Ana Bo born ?"


def test_several_accepted_answers_are_kept_in_order():
    (ex,) = parse_bytes(lines({"question": "q", "answer": "a", "answers": ["b", "a", "c"]}))
    assert ex.answers == ("a", "b", "c")


@pytest.mark.parametrize("row, line, reason", [
    ("{not json", 2, "not valid JSON"),
    ('["a list"]', 2, "expected a JSON object"),
    ({"question": "", "answer": "x"}, 2, "'question' must be a non-empty string"),
    ({"question": "q"}, 2, "needs 'answer'"),
    ({"question": "q", "answer": "a", "extra": 1}, 2, "unknown keys ['extra']"),
    ({"messages": [{"role": "user", "content": "q"}]}, 2,
     "last message must be from the assistant"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, 2,
     "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a", "weight": 0}]}, 2, "all have weight 0"),
    ({"foo": "bar"}, 2, "expected 'messages'"),
])
def test_bad_lines_are_named_with_their_reason(row, line, reason):
    with pytest.raises(DataFileError) as e:
        parse_bytes(lines({"question": "q", "answer": "a"}, row))
    assert e.value.problems[0][0] == line
    assert reason in e.value.problems[0][1]
    assert f"line {line}:" in str(e.value)


def test_every_bad_line_is_counted_and_blank_lines_skipped():
    rows = [{"question": "q", "answer": "a"}, "", "oops", "", "nope"]
    with pytest.raises(DataFileError) as e:
        parse_bytes(lines(*rows))
    assert [n for n, _ in e.value.problems] == [3, 5]


def test_empty_file_and_invalid_utf8_are_rejected():
    with pytest.raises(DataFileError, match="no examples"):
        parse_bytes(b"\n\n")
    with pytest.raises(DataFileError, match="line 2: not valid UTF-8"):
        parse_bytes(b'{"question": "q", "answer": "a"}\n\xff\xfe')


def test_known_fact_files_must_be_single_qa_turns():
    chat = parse_bytes(lines({"messages": [{"role": "system", "content": "s"},
                                           {"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a"}]}))
    with pytest.raises(DataFileError, match="line 1: known-fact lines must be QA form"):
        require_qa_facts(chat, "known-fact")


def test_an_example_holds_at_most_max_messages():
    from trainer.data import MAX_MESSAGES

    turns = [{"role": r, "content": "x"} for _ in range(MAX_MESSAGES // 2 + 1)
             for r in ("user", "assistant")]
    line = json.dumps({"messages": turns}).encode()
    with pytest.raises(DataFileError, match=f"line 1: {len(turns)} messages; an example holds "
                                            f"at most {MAX_MESSAGES}"):
        parse_bytes(line)
    assert len(parse_bytes(json.dumps({"messages": turns[:MAX_MESSAGES]}).encode())) == 1


def test_bounded_lines_split_as_files_do_and_never_hold_a_long_line(monkeypatch):
    import io

    from trainer import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 8)
    seen = []
    text = b"short\n" + b"y" * 30 + b"\nexactly8\r\n" + b"tail-no-newline-but-long" + b"\nend"
    out = list(data.bounded_lines(io.BytesIO(text), on_bytes=seen.append))
    assert out == [b"short\n", data.TOO_LONG, b"exactly8\r\n", data.TOO_LONG, b"end"]
    assert b"".join(seen) == text  # every byte reaches the digest, the skipped ones too


def test_common_prefix_by_bisection_agrees_with_a_character_scan():
    import random

    from trainer.tokenize import _common_prefix

    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab\u00e9\U0001f600") for _ in range(rng.randrange(0, 40)))
        b = a[: rng.randrange(0, len(a) + 1)] + "".join(
            rng.choice("ab") for _ in range(rng.randrange(0, 5)))
        scan = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        assert _common_prefix(a, b) == scan, (a, b)


def test_a_chat_template_that_refuses_a_conversation_says_which_line_and_why(builtin_world):
    """Templates such as Llama's and Mistral's raise for turns that do not alternate: a Jinja
    TemplateError, which failed the job as an 'internal error (TemplateError)'."""
    from transformers import AutoTokenizer

    from trainer.tokenize import encode_example

    tokenizer = AutoTokenizer.from_pretrained(builtin_world / "model")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == "
        "messages[loop.index0 - 1]['role'] %}{{ raise_exception('Conversation roles must "
        "alternate') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    (example,) = parse_bytes(b"\n\n" + json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}]}).encode())
    with pytest.raises(ValueError, match="line 3: the model's chat template refuses this "
                                         "conversation: Conversation roles must alternate"):
        encode_example(tokenizer, example, 64)
