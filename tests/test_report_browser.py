"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package, driven by
the ``playwright`` Python package through ``executable_path``; no browser download) opens the
page of a run directory and checks what a reader sees: every curve drawn with one point per
logged value, the sample browser switching steps and filtering right/wrong, model text shown
as text, and no error in the console. Skipped, saying why, where Chromium is not installed
(``setup.sh`` installs it with apt where apt is available).

``MATHRL_REPORT_SCREENSHOT=FILE`` also saves the screenshot there."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from report_runs import ATTACK, make_train_run, rollout_rows, tool_episode_rows

from mathrl.report import report_safely

CHROMIUM = next((p for p in (os.environ.get("MATHRL_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)  # fmt: skip
# What a probe on this machine needed: no sandbox (root, containers), no GPU, nothing networked.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium; setup.sh does it where apt is available)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_report_in_chromium(browser, tmp_path):
    run = make_train_run(tmp_path / "run", steps=3)
    attack = rollout_rows(0)
    for row in attack:
        row["completion"] = ATTACK
    _write(run / "rollouts" / "step_000000.jsonl", attack)
    _write(run / "rollouts" / "step_000001.jsonl", tool_episode_rows())  # a multi-turn step
    report_safely(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    page = browser.new_page(viewport={"width": 1300, "height": 900})
    problems, dialogs = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)  # fmt: skip
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith("file:") else None)
    page.goto((run / "report.html").as_uri())

    # Curves: each series is drawn (a real length on screen) with one point per logged value.
    series = page.eval_on_selector_all(
        "path.series",
        "ps => ps.map(p => ({key: p.dataset.key, d: p.getAttribute('d'), length: p.getTotalLength(), "
        "width: p.getBoundingClientRect().width}))",
    )
    assert len(series) > 20
    for s in series:
        logged = sum(1 for r in rows if isinstance(r.get(s["key"]), int | float))
        assert len(re.findall(r"[ML]", s["d"])) == logged, s["key"]
        assert s["length"] > 0 and s["width"] > 0, s["key"]  # drawn, not a degenerate path
    assert {"env/all/correct", "test/env/all/correct", "optim/entropy", "time/sample"} <= {s["key"] for s in series}
    assert page.locator("path.band").count() == 1
    # Hovering step 1 of the first chart reads out each series' value there.
    x, y = page.evaluate(
        "() => { const c = [...document.querySelector('figure.chart').querySelectorAll('circle')]"
        ".find(c => c.textContent === 'train reward: step 1: 0.2375').getBoundingClientRect();"
        " return [c.x + c.width / 2, c.y + c.height / 2]; }"
    )
    page.mouse.move(x, y)
    readout = page.locator("figure.chart .readout").first.inner_text()
    got = dict(re.findall(r"(train reward|train correct|test pass@1) ([0-9.]+)", readout))
    assert readout.startswith("step 1: ") and got.keys() == {"train reward", "train correct", "test pass@1"}, readout
    want = {"train reward": 0.2375, "train correct": 0.2375, "test pass@1": 0.125}  # metrics.jsonl's step 1
    assert all(abs(float(got[k]) - v) < 1e-3 for k, v in want.items()), readout

    # The sample browser: one step visible, the last training step first; switch steps, filter.
    def visible() -> list[str]:
        return page.eval_on_selector_all("section.view", "vs => vs.filter(v => !v.hidden).map(v => v.dataset.view)")

    assert visible() == ["r0:train-2"]
    page.select_option("#view", "r0:train-0")
    assert visible() == ["r0:train-0"]
    shown = page.locator("section.view:not([hidden]) .completion:visible")
    assert shown.count() == 16
    attack_text = page.locator("section.view:not([hidden]) .completion pre").first.inner_text()
    assert attack_text == ATTACK and not dialogs  # the model's markup is text, never run

    page.check("input[name=filter][value=right]")
    flags = shown.evaluate_all("cs => cs.map(c => c.dataset.correct)")
    assert flags == ["1"] * 6  # group g has g right completions: 0 + 1 + 2 + 3
    assert page.locator("#count").inner_text() == "6 of 16 completions shown"
    assert page.locator("section.view:not([hidden]) .empty:visible").count() == 1  # group 0 has none right
    page.check("input[name=filter][value=wrong]")
    assert shown.evaluate_all("cs => cs.map(c => c.dataset.correct)") == ["0"] * 10

    page.click("#next")  # -> the test problems of step 0, still filtered to wrong ones
    assert visible() == ["r0:test-0"]
    assert shown.evaluate_all("cs => cs.map(c => c.dataset.correct)") == ["0"] * 2  # of 4 picked problems
    page.check("input[name=filter][value=all]")
    page.click("#next")  # -> step 1's tool episodes: every turn with its call, output and error kind
    assert visible() == ["r0:train-1"]
    episode = page.locator("section.view:not([hidden]) .completion").first
    assert episode.locator("ol.turns > li").count() == 2
    assert "error: syntax" in episode.inner_text() and "IndentationError" in episode.inner_text()

    shot = tmp_path / "report.png"
    page.select_option("#view", "r0:train-2")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("MATHRL_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["MATHRL_REPORT_SCREENSHOT"])
    assert not problems, problems
    page.close()
