"""report.html: reading run directories into data, and the page rendered from it (no browser:
tests/test_report_browser.py opens the page in Chromium)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_runs import ATTACK, make_eval_dir, make_train_run, rollout_rows, tool_episode_rows

from mathrl.cli import main
from mathrl.report import ReportConfig, report_safely, write_report
from mathrl.report.build import charts, cut, pick_by_quantile, read_run, rollout_groups, spaced

CFG = ReportConfig(runs="-")


class Page(HTMLParser):
    """The parts of a page the tests look at: series paths, script tags, visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.paths: list[dict[str, str]] = []
        self.scripts = 0
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "path" and "series" in a.get("class", ""):
            self.paths.append(a)
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.text.append(data)


def points(d: str) -> int:
    return len(re.findall(r"[ML]", d))


def page_of(*runs: Path, cfg: ReportConfig = CFG) -> tuple[str, Page]:
    out = runs[0].parent / "page.html"
    write_report(list(runs), out, cfg)
    text = out.read_text()
    return text, Page(text)


def test_groups_are_picked_at_evenly_spaced_reward_quantiles():
    # Sorted (stable): 0.0@1 0.0@5 0.25@3 0.5@0 0.5@7 0.75@4 1.0@2 1.0@6; positions floor(linspace(0, 7, 4))
    # = 0, 2, 4, 7, as tinker-cookbook's _select_representative_inds picks them.
    scores = [0.5, 0.0, 1.0, 0.25, 0.75, 0.0, 1.0, 0.5]
    assert pick_by_quantile(scores, 4) == [1, 3, 7, 6]
    assert pick_by_quantile(scores, 2) == [1, 6]  # the worst and the best
    assert pick_by_quantile([0.3, 0.1], 4) == [1, 0]  # fewer groups than asked: all, lowest first
    assert spaced(list(range(100)), 5) == [0, 25, 50, 74, 99] and spaced([1, 2], 5) == [1, 2]
    assert cut("a" * 50 + "THE END", 30).endswith("THE END") and "characters cut" in cut("x" * 100, 30)


def test_a_step_shows_the_groups_at_reward_quantiles(tmp_path):
    run = make_train_run(tmp_path / "run", steps=1, eval_every=0)
    rows = rollout_rows(0, groups=8)
    right = [2, 0, 4, 1, 3, 0, 4, 2]  # right completions per group: mean rewards as in the test above
    for row, i in zip(rows, [i for _ in range(8) for i in range(4)], strict=True):
        row["reward"] = row["total_reward"] = row["correct"] = float(i < right[row["group"]])
    (run / "rollouts" / "step_000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    view = read_run(run, "run", CFG).views[0]
    assert [g.title for g in view.groups] == ["group 1", "group 3", "group 7", "group 6"]
    assert view.total == 8


def test_a_training_run_reads_into_curves_tables_samples_and_checkpoints(tmp_path):
    run = make_train_run(tmp_path / "run", steps=3)
    text, page = page_of(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_key = {p["data-key"]: p for p in page.paths}
    for key in ("env/all/reward/total", "env/all/correct", "test/env/all/correct", "optim/entropy", "optim/lr",
                "optim/kl_sample_train_v1", "time/sample", "time/train", "time/eval", "env/all/ac_tokens_per_turn",
                "env/all/frac_truncated"):  # fmt: skip
        logged = sum(key in r for r in rows)
        assert logged and points(by_key[key]["d"]) == int(by_key[key]["data-points"]) == logged, key
    assert points(by_key["test/env/all/correct"]["d"]) == 4  # steps 0, 1, 2 and the final evaluation
    assert 'class="band"' in text  # the test accuracy's 95% interval
    assert "6.2 [1.1, 28.0]" in text  # step 0's pass@1 [CI] in percent, in the evaluation table
    assert "checkpoints/step_000003" in text
    data = read_run(run, "run", CFG)
    assert [v.key for v in data.views] == [
        "train-0", "test-0", "train-1", "test-1", "train-2", "test-2", "test-3"
    ]  # fmt: skip
    train = data.views[0]
    assert [g.mean_reward for g in train.groups] == [0.0, 0.25, 0.5, 0.75]  # all 4 groups, lowest first
    c = train.groups[1].completions[0]  # group 1: completion 0 is the right one
    assert (c.correct, c.reward, c.advantage, c.answer, c.reference) == (True, 1.0, 0.75, "16", "16")
    assert train.groups[0].completions[0].advantage is None  # constant-reward group: not trained on
    assert "no reward spread in its group" in text
    assert train.groups[1].completions[3].truncated and "truncated (max_tokens)" in text
    assert (run / "config.json").exists() and "env_args.test_size" in text  # the resolved config, flattened


def test_model_text_is_escaped(tmp_path):
    run = make_train_run(tmp_path / "run", steps=1, text=ATTACK)
    (run / "config.json").write_text(json.dumps({"env": ATTACK, "max_steps": 1}))
    text, page = page_of(run)
    assert page.scripts == 1  # the page's own script only
    assert not any(tag == "img" for tag, _ in page.tags)
    assert ATTACK in "".join(page.text)  # shown as text, whole
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_a_run_without_evaluations_or_rollouts(tmp_path):
    run = make_train_run(tmp_path / "run", steps=2, eval_every=0, rollouts=False)
    text, page = page_of(run)
    keys = {p["data-key"] for p in page.paths}
    assert "env/all/correct" in keys and not any(k.startswith("test/") for k in keys)
    assert 'class="band"' not in text
    assert "no evaluation logged" in text and "no samples in this run" in text
    assert "save_rollouts=false" in text  # says why the browser is empty


def test_a_gap_in_a_series_starts_a_new_line(tmp_path):
    run = make_train_run(tmp_path / "run", steps=4, eval_every=1, rollouts=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[2]["optim/entropy"] = float("nan")  # json writes NaN, as metrics.jsonl does
    rows[1]["test/pass@1/ci_low"] = float("nan")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, page = page_of(run)
    entropy = next(p for p in page.paths if p["data-key"] == "optim/entropy")
    assert points(entropy["d"]) == 3 and entropy["d"].count("M") == 2
    band = re.search(r'<path class="band"[^>]* d="([^"]*)"', text)
    assert band and points(band.group(1)) == 2 * 4 and "nan" not in band.group(1).lower()  # 4 of 5 steps


def test_a_multi_turn_tool_episode_shows_every_turn_and_call(tmp_path):
    group = rollout_groups(tool_episode_rows())[0]
    first, second = group.completions
    assert len(first.turns) == 2 and len(second.turns) == 1
    assert (first.reward, first.advantage, first.answer, first.truncated) == (-0.1, -0.325, None, True)
    assert first.turns[0].tool_calls[0].error == "syntax" and "IndentationError" in first.turns[0].tool_calls[0].output
    assert (second.correct, second.answer, second.reference) == (True, "514359", "514359")
    run = make_train_run(tmp_path / "run", steps=1, eval_every=0)
    (run / "rollouts" / "step_000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tool_episode_rows()))
    text, _ = page_of(run)
    assert "2 turns" in text and "error: syntax" in text and "IndentationError: unexpected indent" in text
    assert "weight = 603" in text and "ended: length" in text


def test_an_eval_output_dir(tmp_path):
    out = make_eval_dir(tmp_path / "eval")
    data = read_run(out, "eval", CFG)
    assert data.kind == "eval" and [v.name for v in data.views] == ["SmolLM2-135M-Instruct / gsm8k"]
    [table] = data.tables
    assert table.rows[0][:5] == ["SmolLM2-135M-Instruct", "gsm8k", "4", "2", "25.0 [7.1, 59.1]"]
    assert table.rows[0][5] == "@1 25.0, @2 50.0"
    assert len(data.views[0].groups[0].completions) == 2


def test_a_comparison_overlays_every_run(tmp_path):
    a = make_train_run(tmp_path / "a", steps=3)
    b = make_train_run(tmp_path / "b", steps=5)
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "learning_rate": 0.0001}))
    text, page = page_of(a, b, make_eval_dir(tmp_path / "base"))
    correct = {p["data-run"]: points(p["d"]) for p in page.paths if p["data-key"] == "env/all/correct"}
    assert correct == {"a": 3, "b": 5}
    assert "mathrl comparison: a vs b vs base" in text
    # the summary puts each run's result side by side: final test accuracy, benchmark pass@1
    assert "<td>test pass@1 25.0 [4.4, 43.0] % at step 3</td>" in text
    assert "<td>SmolLM2-135M-Instruct / gsm8k: pass@1 25.0 [7.1, 59.1] %</td>" in text
    assert re.search(r"<tr><th>learning_rate</th><td>0.001</td><td>0.0001</td><td>—</td></tr>", text)
    assert text.count("<optgroup") == 3 and 'value="r2:SmolLM2-135M-Instruct/gsm8k"' in text


def test_the_page_size_is_bounded_and_the_caps_are_stated(tmp_path):
    run = make_train_run(tmp_path / "run", steps=30, eval_every=0, text="blah " * 600, group_size=16)
    data = read_run(run, "run", CFG)
    assert len(data.views) == CFG.sample_steps
    assert all(len(g.completions) <= CFG.completions_per_group for v in data.views for g in v.groups)
    assert all(len(c.text) < CFG.max_chars + 50 for v in data.views for g in v.groups for c in g.completions)
    text, _ = page_of(run)
    assert len(text) < 1_500_000  # uncapped: 30 steps x 64 completions x 3,000 characters = 5.8 MB
    assert "20 of 30 steps shown" in text and "at most 8 completions per group" in text


def test_an_sft_run_shows_its_nll(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train_file": "t.jsonl", "max_steps": 3}))
    rows = [{"step": 0, "test/nll": 1.2064, "train_mean_nll": 1.4994, "optim/lr": 2e-4, "progress/epoch": 0.14},
            {"step": 1, "train_mean_nll": 1.318, "optim/lr": 1.3e-4, "progress/epoch": 0.29},
            {"step": 2, "test/nll": 1.1242}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, page = page_of(run)
    assert {p["data-key"]: points(p["d"]) for p in page.paths} == {"train_mean_nll": 2, "test/nll": 2, "optim/lr": 2}
    assert "<td>1.2064</td><td>1.4994</td>" in text  # the held-out NLL table


def test_the_command_writes_the_page_and_refuses_bad_input(tmp_path, capsys):
    run = make_train_run(tmp_path / "run")
    assert main(["report", f"runs={run}"]) == 0 and (run / "report.html").exists()
    out = tmp_path / "cmp.html"
    assert main(["report", f"runs={run},{make_eval_dir(tmp_path / 'ev')}", f"output={out}", "labels=rl,base"]) == 0
    assert "mathrl comparison: rl vs base" in out.read_text()
    capsys.readouterr()
    assert main(["report", f"runs={tmp_path / 'nope'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mathrl report: error: runs: {tmp_path / 'nope'} is not a directory; pass a run directory "
        "(a log_path or output_dir)"
    )
    assert main(["report", f"runs={tmp_path}"]) == 2  # a folder that is no run
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["report", f"runs={run}", "labels=a,b"]) == 2
    assert main(["report", f"runs={run}", f"output={tmp_path / 'no' / 'x.html'}"]) == 2
    assert "output: the folder" in capsys.readouterr().err


def test_a_failing_report_never_stops_a_run(tmp_path, capsys):
    run = make_train_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    report_safely(run)  # must not raise
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "metrics.jsonl:5: not valid JSON" in err and len(err.splitlines()) == 1
    assert not (run / "report.html").exists()


def test_reporting_imports_no_torch(tmp_path):
    run = make_train_run(tmp_path / "run")
    code = (
        "import sys; from pathlib import Path; from mathrl.report import report_safely; "
        "from mathrl.cli import main; main(['report', '--help']); report_safely(Path(sys.argv[1])); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules); assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    assert (run / "report.html").exists()


@pytest.mark.parametrize("k", [1, 3])
def test_groups_per_step_is_honoured(tmp_path, k):
    run = make_train_run(tmp_path / "run", steps=1, eval_every=0)
    data = read_run(run, "run", ReportConfig(runs="-", groups_per_step=k))
    assert len(data.views[0].groups) == k
    main_charts, _ = charts([data])
    assert main_charts[0].title == "Reward and accuracy"


def test_rollout_rows_split_into_episodes_by_turn():
    rows = rollout_rows(0, groups=2, group_size=3)
    groups = rollout_groups(rows)
    assert [len(g.completions) for g in groups] == [3, 3]
    assert all(len(c.turns) == 1 for g in groups for c in g.completions)
