"""Datasets: named local files in the shared schema, custom files with a field mapping,
filters, MATH-500 kept out of MATH training data, and errors that name file, line, field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathrl.data import load_problems
from mathrl.data.datasets import DataError, parse_fields
from mathrl.envs.registry import make_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")


@needs_shared
def test_named_datasets_load_from_a_data_dir_with_their_fields():
    gsm = load_problems("gsm8k", "test", data_dir=SHARED)
    assert len(gsm.problems) == 1319 and gsm.problems[0].answer == "18"
    math500 = load_problems("math500", "test", data_dir=SHARED)
    first = math500.problems[0]
    assert (first.id, first.level, first.subject) == ("test/precalculus/807.json", 2, "Precalculus")
    hard = load_problems("math", "train", data_dir=SHARED, levels=[4, 5])
    assert {p.level for p in hard.problems} == {4, 5}
    assert len(hard.problems) == 3992 and hard.skipped_no_answer == 2  # the two empty \boxed{} rows


@needs_shared
def test_math_training_data_never_contains_math500(monkeypatch):
    monkeypatch.setenv("MATHRL_DATA_DIR", str(SHARED))
    held_out = {p.problem.strip() for p in load_problems("math500").problems}
    train = load_problems("math", "train_12k")  # train + test; all of MATH-500 is in the test split
    assert train.excluded_overlap == 500
    assert not held_out & {p.problem.strip() for p in train.problems}


def test_custom_jsonl_with_field_mapping_filters_and_skipped_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "1+1?", "final": "2", "lvl": "Level 1", "topic": "Algebra"},
        {"question": "2+2?", "final": "", "lvl": "Level 2", "topic": "Algebra"},  # no answer: skipped
        {"question": "3+3?", "final": "6", "lvl": 3, "topic": "Geometry"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mapping = parse_fields("problem:question, answer:final, level:lvl, subject:topic")
    loaded = load_problems(str(path), fields=mapping)
    assert [p.answer for p in loaded.problems] == ["2", "6"] and loaded.skipped_no_answer == 1
    assert [p.id for p in loaded.problems] == ["mine/1", "mine/3"]  # line numbers when there is no id
    assert [p.level for p in load_problems(str(path), fields=mapping, subjects=["geometry"]).problems] == [3]


def test_csv_and_gsm8k_style_answers(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text('problem,solution\n"Eggs?","16-3-4=9, 9*2=18\n#### 1,018"\n')
    loaded = load_problems(str(path), answer_from="hashes")
    assert loaded.problems[0].answer == "1018"


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": 2\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_problems(str(path))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"q\.jsonl:2: missing field 'problem'.*question.*fields=problem:COLUMN"):
        load_problems(str(path))


def test_a_file_without_any_answer_is_an_error_not_an_empty_run(tmp_path):
    path = tmp_path / "noanswers.jsonl"
    path.write_text('{"problem": "a", "solution": "x"}\n')
    with pytest.raises(DataError, match="no row has a non-empty 'answer'"):
        load_problems(str(path))


def test_unknown_names_splits_and_levels_are_explained(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mth500'"):
        load_problems("mth500")
    with pytest.raises(DataError, match="no split 'validation'"):
        load_problems("gsm8k", "validation", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"no local file .* `datasets` package"):
        load_problems("aime2025", data_dir=tmp_path)
    path = tmp_path / "l.jsonl"
    path.write_text('{"problem": "a", "answer": "1", "level": "hard"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl:1: field 'level'"):
        load_problems(str(path))


@needs_shared
def test_math_env_batches_are_a_pure_function_of_the_step_and_cover_an_epoch():
    args = {"data_dir": str(SHARED), "levels": "5", "limit": 40, "test_limit": 10}
    data, _ = make_dataset("math", args, groups_per_batch=8, seed=3)
    again, _ = make_dataset("math", args, groups_per_batch=8, seed=3)
    assert [b.messages for b in data.get_batch(2)] == [b.messages for b in again.get_batch(2)]
    epoch = [b.reference for i in range(5) for b in data.get_batch(i)]  # 5 * 8 = the 40 problems once
    assert sorted(epoch) == sorted(p.answer for p in data.train)  # type: ignore[attr-defined]
    first = data.get_batch(0)[0]
    assert first.messages[-1].content.endswith("Write your answer in \\boxed{} format.")
    assert len(data.test_builders()) == 10 and data.test_builders()[0].problem_id.startswith("test/")


def test_env_equals_a_file_is_a_math_env_over_it(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(6)))
    data, _ = make_dataset(str(path), {"test_dataset": str(path), "few_shot": 1}, groups_per_batch=2, seed=0)
    builder = data.get_batch(0)[0]
    assert [m.role for m in builder.messages] == ["user", "assistant", "user"]  # one solved example first
    with pytest.raises(ValueError, match=r"env_args\.levls: not an option"):
        make_dataset(str(path), {"levls": "4"}, groups_per_batch=2, seed=0)
