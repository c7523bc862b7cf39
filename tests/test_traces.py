"""Trace utilities on hand-written rows, and ``mathrl traces`` (files + a dataset's own solutions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathrl import traces as tr
from mathrl.config import parse_config
from mathrl.train.distill import TracesConfig, run_traces

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _t(pid: str, text: str, *, source: str = "teacher", dataset: str = "d", index: int = 0) -> dict:
    return tr.make_trace(
        [{"role": "user", "content": f"problem {pid}"}], text, problem_id=pid, source=source, dataset=dataset,
        level=None, subject=None, reference="1", answer="1", sample_index=index, num_tokens=len(text.split()),
    )  # fmt: skip


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_make_trace_has_the_documented_fields():
    t = _t("p1", "so \\boxed{1}")
    assert t["messages"][-1] == {"role": "assistant", "content": "so \\boxed{1}"}
    assert set(t) == {"messages", "problem_id", "source", "dataset", "level", "subject", "reference", "answer",
                      "sample_index", "num_chars", "num_tokens"}  # fmt: skip
    assert t["num_chars"] == len("so \\boxed{1}")


def test_read_traces_fills_defaults_and_recomputes_num_chars(tmp_path):
    minimal = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}],
               "problem_id": "x", "num_chars": 99}  # fmt: skip
    [row] = tr.read_traces(_write(tmp_path / "a.jsonl", [minimal]))
    assert row["num_chars"] == 3 and row["source"] == "" and row["level"] is None and row["sample_index"] == 0
    assert tr.read_traces(_write(tmp_path / "b.jsonl", [_t("p", "x")])) == [_t("p", "x")]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("{not json", ":2: invalid JSON"),
        ([1, 2], ":2: expected a JSON object, got list"),
        ({"problem_id": "p"}, ":2: field 'messages': expected a non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}], "problem_id": "p"}, ":2: field 'messages': expected user"),
        ({"messages": [{"role": "bot", "content": "q"}], "problem_id": "p"}, ":2: field 'messages'[0]: expected"),
        ({"messages": [{"role": "assistant", "content": "a"}], "problem_id": "p"}, "got ['assistant']"),
        ({**_t("p", "a"), "problem_id": 7}, ":2: field 'problem_id': expected a non-empty string, got 7"),
        ({**_t("p", "a"), "level": "5"}, ":2: field 'level': expected an integer or null, got '5'"),
        ({**_t("p", "a"), "sample_index": True}, ":2: field 'sample_index': expected an integer, got True"),
        ({**_t("p", "a"), "num_tokens": 1.5}, ":2: field 'num_tokens': expected an integer, got 1.5"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, expected):
    path = _write(tmp_path / "t.jsonl", [_t("ok", "fine"), bad])
    with pytest.raises(tr.TraceError) as e:
        tr.read_traces(path)
    assert str(e.value).startswith(f"{path}:2") and expected in str(e.value)


def test_drop_duplicates_keeps_the_first_of_each_identical_reply():
    a, a_again, a_other, a_other_dataset = (
        _t("p", "x", index=0),
        _t("p", "x", index=3),
        _t("p", "y"),
        _t("p", "x", dataset="e"),
    )
    assert tr.drop_duplicates([a, a_other, a_again, a_other_dataset]) == [a, a_other, a_other_dataset]
    assert tr.drop_duplicates([a_again, a])[0]["sample_index"] == 3


def test_per_problem_keeps_the_first_k_of_each_problem_in_order():
    rows = [_t("p", "1"), _t("q", "1"), _t("p", "2"), _t("p", "3"), _t("q", "2"), _t("p", "1", dataset="e")]
    assert [(t["problem_id"], tr.reply(t)) for t in tr.per_problem(rows, 1)] == [("p", "1"), ("q", "1"), ("p", "1")]
    kept = tr.per_problem(rows, 2)
    assert [(t["dataset"], t["problem_id"], tr.reply(t)) for t in kept] == [
        ("d", "p", "1"), ("d", "q", "1"), ("d", "p", "2"), ("d", "q", "2"), ("e", "p", "1"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="per_problem"):
        tr.per_problem(rows, 0)


def test_length_and_source_filters():
    rows = [_t("a", "x" * 5, source="big"), _t("b", "x" * 10), _t("c", "x" * 20, source="big"), _t("d", "")]
    assert [t["problem_id"] for t in tr.by_length(rows, max_chars=10)] == ["a", "b", "d"]
    assert [t["problem_id"] for t in tr.by_length(rows, min_chars=6, max_chars=20)] == ["b", "c"]
    words = [_t("a", "one two three"), _t("b", "one two"), _t("c", "one")]
    assert [t["problem_id"] for t in tr.by_length(words, max_tokens=2, count_tokens=lambda s: len(s.split()))] == [
        "b", "c",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="count_tokens"):
        tr.by_length(words, max_tokens=2)
    assert [t["problem_id"] for t in tr.by_source(rows, ["big"])] == ["a", "c"]
    assert tr.by_source(rows, ["nobody"]) == []


def test_shuffle_is_a_seeded_permutation():
    rows = [_t(str(i), "x") for i in range(30)]
    one, again, other = tr.shuffled(rows, 1), tr.shuffled(rows, 1), tr.shuffled(rows, 2)
    assert one == again and one != other and one != rows
    assert sorted(t["problem_id"] for t in one) == sorted(t["problem_id"] for t in rows)
    assert [t["problem_id"] for t in rows] == [str(i) for i in range(30)]  # input untouched


def test_reference_reply_rewrites_gsm8k_and_keeps_boxed_solutions():
    gsm = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert (
        tr.reference_reply(gsm, "1072") == "Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\n\n\\boxed{1072}"
    )
    math_solution = "So $x = \\boxed{\\frac{1}{2}}$."
    assert tr.reference_reply(math_solution, "\\frac{1}{2}") == math_solution
    assert tr.reference_reply("It is two.", "2") == "It is two.\n\n\\boxed{2}"


def test_traces_command_combines_filters_and_reports_each_step(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [_t("p", "short"), _t("p", "second reply"), _t("q", "x" * 50)])
    b = _write(tmp_path / "b.jsonl", [_t("p", "short"), _t("r", "other", source="human")])
    out = tmp_path / "out" / "all.jsonl"
    cfg = parse_config(TracesConfig, [f"inputs={a},{b}", f"output={out}", "max_chars=20", "per_problem=1", "seed=3"])
    result = run_traces(cfg)
    printed = capsys.readouterr().out
    assert "exact duplicates: removed 1, 4 left" in printed
    assert "length (max_chars=20): removed 1, 3 left" in printed
    assert "per_problem=1: removed 1, 2 left" in printed
    assert sorted((t["problem_id"], tr.reply(t)) for t in result) == [("p", "short"), ("r", "other")]
    assert tr.read_traces(out) == result
    only = run_traces(parse_config(TracesConfig, [f"inputs={a},{b}", f"output={out}", "sources=human"]))
    assert [t["problem_id"] for t in only] == ["r"]
    bad = _write(tmp_path / "bad.jsonl", [_t("p", "x"), {"messages": []}])
    with pytest.raises(ValueError, match=r"^inputs: .*bad\.jsonl:2: field 'messages'") as e:
        run_traces(parse_config(TracesConfig, [f"inputs={a},{bad}", f"output={out}"]))
    assert type(e.value) is ValueError  # so the CLI prints it as one line
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        run_traces(parse_config(TracesConfig, [f"inputs={tmp_path / 'missing.jsonl'}", f"output={out}"]))


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")
def test_traces_from_a_datasets_reference_solutions(tmp_path):
    from mathrl.grading import grade_batch

    out = tmp_path / "gsm.jsonl"
    cfg = parse_config(TracesConfig, ["from_dataset=gsm8k", f"data_dir={SHARED}", "limit=5", f"output={out}",
                                      "shuffle=false", "max_tokens=100"])  # fmt: skip
    rows = run_traces(cfg)
    assert 0 < len(rows) <= 5 and rows == tr.read_traces(out)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["problem_id"] == "gsm8k/train/0" and first["source"] == first["dataset"] == "gsm8k"
    assert first["messages"][0]["content"].endswith("Write your answer in \\boxed{} format.")
    assert first["messages"][1]["content"].endswith("\\boxed{72}") and "<<" not in first["messages"][1]["content"]
    assert first["answer"] == first["reference"] == "72" and 0 < first["num_tokens"] <= 100
    grades = grade_batch([tr.reply(t) for t in rows], [t["reference"] for t in rows], style="boxed")
    assert all(g.correct for g in grades)  # every reference trace grades as correct
