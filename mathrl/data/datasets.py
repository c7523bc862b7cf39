"""Named datasets, local files and hub datasets -> ``list[Problem]``.

Each :class:`DatasetSpec` knows the local file names of its splits (the schema of
``../shared/data``) and its public hub copy, with how to map that copy's columns. A
name that is not registered is read as a file path (``.jsonl``, ``.json``, ``.csv``,
``.parquet``) or, failing that, as a hub id; ``fields`` maps our field names to the
file's columns and ``answer_from`` says where the answer is (a field, the last
``\\boxed{}`` of the solution, or the ``#### N`` line of a GSM8K-style solution).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mathrl.grading import extract_answer
from mathrl.types import Problem

DATA_DIR_ENV = "MATHRL_DATA_DIR"
AnswerFrom = Literal["field", "boxed", "hashes"]
FIELDS = ("id", "problem", "answer", "solution", "level", "subject")


class DataError(ValueError):
    """A dataset file or option is wrong; the message names file, line and field."""


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the HF hub and how its columns map to ours."""

    repo: str
    config: str | None = None
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    fields: Mapping[str, str] = field(default_factory=dict)
    answer_from: AnswerFrom = "field"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: Mapping[str, str]  # split -> file name in a data_dir (the shared schema)
    hub: HubSource
    description: str
    exclude_math500: bool = False  # training splits of MATH must not contain MATH-500 problems


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "gsm8k",
            {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"},
            HubSource(
                "openai/gsm8k", "main", fields={"problem": "question", "solution": "answer"}, answer_from="hashes"
            ),
            "GSM8K grade-school word problems (7,473 train / 1,319 test); integer answers",
        ),
        DatasetSpec(
            "math",
            {"train": "math_train.jsonl", "test": "math_test.jsonl"},
            HubSource("DigitalLearningGmbH/MATH-lighteval", fields={"subject": "type"}, answer_from="boxed"),
            "Hendrycks MATH (7,500 train / 5,000 test), levels 1-5, 7 subjects; split train_12k = "
            "train + the test problems not in MATH-500 (PRM800K's training set)",
            exclude_math500=True,
        ),
        DatasetSpec(
            "math500",
            {"test": "math500_test.jsonl"},
            HubSource("HuggingFaceH4/MATH-500", splits={"test": "test"}, fields={"id": "unique_id"}),
            "MATH-500 (Lightman et al.'s test subset of MATH)",
        ),
        DatasetSpec(
            "aime2024",
            {"test": "aime2024.jsonl"},
            HubSource("HuggingFaceH4/aime_2024", splits={"test": "train"}),
            "AIME 2024 I and II (30 problems, integer answers)",
        ),
        DatasetSpec(
            "aime2025",
            {"test": "aime2025.jsonl"},
            HubSource("math-ai/aime25", splits={"test": "test"}),
            "AIME 2025 I and II (30 problems, integer answers)",
        ),
        DatasetSpec(
            "amc2023",
            {"test": "amc2023.jsonl"},
            HubSource("math-ai/amc23", splits={"test": "test"}, fields={"problem": "question"}),
            "AMC 12 2023 (40 problems)",
        ),
        DatasetSpec(
            "olympiadbench",
            {"test": "olympiadbench_test.jsonl"},
            HubSource(
                "Hothan/OlympiadBench",
                "OE_TO_maths_en_COMP",
                splits={"test": "train"},
                fields={"problem": "question", "answer": "final_answer", "subject": "subfield"},
            ),
            "OlympiadBench, open-ended English text-only math competition problems (675)",
        ),
        DatasetSpec(
            "minerva",
            {"test": "minerva_math.jsonl"},
            HubSource("math-ai/minervamath", splits={"test": "test"}, fields={"problem": "question"}),
            "Minerva's MIT OpenCourseWare science problems (272)",
        ),
        DatasetSpec(
            "limo",
            {"train": "limo.jsonl"},
            HubSource("GAIR/LIMO", splits={"train": "train"}, fields={"problem": "question"}),
            "LIMO: 817 curated problems with long reasoning traces (training)",
        ),
    )
}


@dataclass(frozen=True)
class LoadedProblems:
    """Problems plus what was left out and why, for the run's log."""

    problems: list[Problem]
    source: str
    skipped_no_answer: int = 0
    excluded_overlap: int = 0

    def describe(self) -> str:
        notes = []
        if self.skipped_no_answer:
            notes.append(f"{self.skipped_no_answer} rows without an answer skipped")
        if self.excluded_overlap:
            notes.append(f"{self.excluded_overlap} MATH-500 problems excluded")
        extra = f" ({'; '.join(notes)})" if notes else ""
        return f"{len(self.problems)} problems from {self.source}{extra}"


def load_problems(
    name: str,
    split: str = "test",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    fields: Mapping[str, str] | None = None,
    answer_from: AnswerFrom | None = None,
    levels: Iterable[int] | None = None,
    subjects: Iterable[str] | None = None,
    limit: int | None = None,
) -> LoadedProblems:
    """The problems of dataset ``name`` (registered name, file path or hub id), filtered."""
    spec = DATASETS.get(name)
    if spec is not None:
        loaded = _load_named(spec, split, data_dir)
    else:
        loaded = _load_unregistered(name, split, fields or {}, answer_from or "field")
    problems = loaded.problems
    if levels is not None:
        wanted = set(levels)
        problems = [p for p in problems if p.level in wanted]
    if subjects is not None:
        wanted_s = {s.strip().lower() for s in subjects}
        problems = [p for p in problems if (p.subject or "").lower() in wanted_s]
    if limit is not None:
        problems = problems[:limit]
    return LoadedProblems(problems, loaded.source, loaded.skipped_no_answer, loaded.excluded_overlap)


def _load_named(spec: DatasetSpec, split: str, data_dir: str | os.PathLike[str] | None) -> LoadedProblems:
    splits = set(spec.files) | ({"train_12k"} if spec.name == "math" else set())
    if split not in splits:
        raise DataError(f"dataset {spec.name}: no split {split!r}; it has {', '.join(sorted(splits))}")
    if split == "train_12k":
        train, test = (_load_named(spec, s, data_dir) for s in ("train", "test"))
        merged = LoadedProblems(
            train.problems + test.problems,
            f"{train.source} + {test.source}",
            train.skipped_no_answer + test.skipped_no_answer,
        )
        return _without_math500(merged, data_dir)
    local = _local_file(spec.files[split], data_dir)
    if local is not None:
        loaded = read_problems(local, source=spec.name)
    else:
        hub = spec.hub
        if _datasets_module() is None:
            raise DataError(_missing_data(spec.name, spec.files[split], hub.repo, data_dir))
        loaded = load_hub(hub.repo, hub.splits.get(split, split), hub.config, hub.fields, hub.answer_from, spec.name)
    return _without_math500(loaded, data_dir) if spec.exclude_math500 and split == "train" else loaded


def _without_math500(loaded: LoadedProblems, data_dir: str | os.PathLike[str] | None) -> LoadedProblems:
    """Drop problems whose text is a MATH-500 problem (so MATH-500 stays a clean test)."""
    try:
        held_out = {p.problem.strip() for p in _load_named(DATASETS["math500"], "test", data_dir).problems}
    except DataError as e:
        print(f"warning: could not load MATH-500 to exclude it from MATH training data: {e}", file=sys.stderr)
        return loaded
    kept = [p for p in loaded.problems if p.problem.strip() not in held_out]
    return LoadedProblems(
        kept, loaded.source, loaded.skipped_no_answer, loaded.excluded_overlap + len(loaded.problems) - len(kept)
    )


def _missing_data(name: str, file_name: str, repo: str, data_dir: str | os.PathLike[str] | None) -> str:
    """How to get a named dataset that has no local file and no hub client: both ways, with
    where the file was looked for (no traceback, no guessing which extra is missing)."""
    searched = [f"data_dir={data_dir}" if data_dir else "data_dir (not set)"]
    env_dir = os.environ.get(DATA_DIR_ENV)
    searched.append(f"${DATA_DIR_ENV}={env_dir}" if env_dir else f"${DATA_DIR_ENV} (not set)")
    return (
        f"dataset {name} needs its data: no local file {file_name} in {' or '.join(searched)}; put {file_name} in "
        f"a directory given as data_dir=DIR or ${DATA_DIR_ENV}, or install the `datasets` package to download "
        f"{repo} from the HF hub: pip install -e \".[hub]\" (a source checkout) or pip install 'mathrl[hub]'"
    )


def _datasets_module() -> Any:
    """The HF ``datasets`` package, or None where it is not installed (the ``[hub]`` extra)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        return None
    return datasets


def _local_file(file_name: str, data_dir: str | os.PathLike[str] | None) -> Path | None:
    for directory in (data_dir, os.environ.get(DATA_DIR_ENV)):
        if directory:
            path = Path(directory) / file_name
            if path.exists():
                return path
    return None


def _load_unregistered(name: str, split: str, fields: Mapping[str, str], answer_from: AnswerFrom) -> LoadedProblems:
    path = Path(name)
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet") or path.exists():
        if not path.exists():
            raise DataError(f"dataset file {name} does not exist")
        return read_problems(path, fields=fields, answer_from=answer_from, source=path.stem)
    if "/" in name:
        return load_hub(name, split, None, fields, answer_from, name)
    raise DataError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, a .jsonl/.json/.csv/.parquet path or a hub id"
    )


def read_problems(
    path: Path, *, fields: Mapping[str, str] | None = None, answer_from: AnswerFrom = "field", source: str = ""
) -> LoadedProblems:
    """Problems of a local file; errors name the file, the line and the field."""
    return _to_problems(_rows(path), str(path), fields or {}, answer_from, source)


def load_hub(
    repo: str, split: str, config: str | None, fields: Mapping[str, str], answer_from: AnswerFrom, source: str
) -> LoadedProblems:
    """Problems of a hub dataset (needs the ``datasets`` package and internet)."""
    datasets = _datasets_module()
    if datasets is None:
        raise DataError(
            f"dataset {source}: loading {repo} from the HF hub needs the `datasets` package: "
            f"pip install -e \".[hub]\" (a source checkout) or pip install 'mathrl[hub]'; or use a local file"
        )
    try:
        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # no network, no such repo or split: one line, not the hub client's traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"dataset {source}: could not load {repo} from the HF hub ({type(e).__name__}: {first}); "
            f"download it where there is a network, or use a local file (data_dir=DIR or ${DATA_DIR_ENV})"
        ) from None
    where = f"hf://{repo}" + (f"/{config}" if config else "") + f"[{split}]"
    return _to_problems(((i + 1, dict(r)) for i, r in enumerate(rows)), where, fields, answer_from, source)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, row) of a JSONL, JSON (a list of objects), CSV or Parquet file."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                yield i, dict(row)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # type: ignore[import-not-found]
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {i}: expected an object, got {type(row).__name__}")
            yield i, row
    else:
        with path.open() as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                yield i, row


def _to_problems(
    rows: Iterable[tuple[int, dict[str, Any]]],
    where: str,
    fields: Mapping[str, str],
    answer_from: AnswerFrom,
    source: str,
) -> LoadedProblems:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise DataError(
            f"fields: unknown target field(s) {', '.join(sorted(unknown))}; expected some of {', '.join(FIELDS)}"
        )
    column = {f: fields.get(f, f) for f in FIELDS}
    problems: list[Problem] = []
    skipped = 0
    seen_ids: set[str] = set()
    for line, row in rows:
        text = _text(row.get(column["problem"]))
        if not text:
            raise DataError(
                f"{where}:{line}: missing field {column['problem']!r} (the problem text); the row has "
                f"{', '.join(sorted(row)) or 'no fields'}; map another column with fields=problem:COLUMN"
            )
        answer = _answer(row, column, answer_from)
        if not answer:
            skipped += 1
            continue
        pid = _text(row.get(column["id"])) or f"{source or 'row'}/{line}"
        if pid in seen_ids:
            raise DataError(f"{where}:{line}: duplicate id {pid!r}")
        seen_ids.add(pid)
        problems.append(
            Problem(
                id=pid,
                problem=text,
                answer=answer,
                solution=_text(row.get(column["solution"])) or None,
                level=_level(row.get(column["level"]), where, line),
                subject=_text(row.get(column["subject"])) or None,
                source=source,
            )
        )
    if not problems and not skipped:
        raise DataError(f"{where}: the file has no rows; it needs one problem per row (with its answer)")
    if not problems:
        raise DataError(
            f"{where}: no usable problems (no row has a non-empty {column['answer']!r}; "
            "map the answer column with fields=answer:COLUMN)"
        )
    return LoadedProblems(problems, where, skipped)


def _answer(row: Mapping[str, Any], column: Mapping[str, str], answer_from: AnswerFrom) -> str:
    if answer_from == "field":
        return _text(row.get(column["answer"]))
    solution = _text(row.get(column["solution"]) or row.get(column["answer"]))
    found = extract_answer(solution, "boxed" if answer_from == "boxed" else "gsm8k")
    return found.replace(",", "") if found and answer_from == "hashes" else (found or "")


def _text(value: Any) -> str:
    """A field as text: lists (OlympiadBench's final_answer) are joined with ", "."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value if _text(v))
    return str(value).strip()


def _level(value: Any, where: str, line: int) -> int | None:
    """``3``, ``"3"`` or ``"Level 3"``; ``"Level ?"`` and empty are None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(?:Level\s*)?(\d+|\?)", str(value).strip())
    if m is None:
        raise DataError(f"{where}:{line}: field 'level': expected an integer or 'Level N', got {value!r}")
    return None if m.group(1) == "?" else int(m.group(1))


def parse_fields(text: str) -> dict[str, str]:
    """``"problem:question,answer:final"`` -> ``{"problem": "question", "answer": "final"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = part.partition(":")
        if not sep or not theirs.strip():
            raise DataError(f"fields: expected OURS:THEIRS pairs separated by commas, got {part!r}")
        out[ours.strip()] = theirs.strip()
    return out


def split_list(text: str | Sequence[Any] | None) -> list[str] | None:
    """``"4,5"`` -> ``["4", "5"]``; None stays None (option not given)."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        return [t.strip() for t in text.split(",") if t.strip()]
    return [str(t) for t in text]
