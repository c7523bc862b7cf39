"""Rough edges a new user hit (issue 14), each reproduced: progress bars that jumped once per
benchmark, base models (no chat template) refused outright, `mathrl eval` without data or the
`[hub]` extra, an empty benchmark file blamed on its answer column, and run directories
created before the configuration was known to be good."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathrl.cli import main
from mathrl.prompts import PROMPT_FORMAT_CHOICES, PROMPT_FORMATS, math_messages, plain_prompt
from mathrl.types import Message

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _mathrl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mathrl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, **(env or {})})  # fmt: skip


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- 1. progress per problem ----------------------------------------------------------------


@pytest.mark.slow
def test_eval_progress_moves_as_each_problem_finishes_not_once_per_batch():
    # The bar was updated per chunk (64 problems; a whole small benchmark): one jump at the end.
    from mathrl.eval.runner import EvalItem, GenSettings, evaluate
    from mathrl.models import EMBEDDED_MODEL
    from mathrl.rollout.backend import LocalBackend

    backend = LocalBackend.load(EMBEDDED_MODEL, torch.float32)
    forwards = [0]  # model calls so far: the prefill, then one per decoding step
    backend.sampler.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))  # type: ignore[attr-defined]
    questions = [  # replies of different lengths, all in one batch (measured: 8, 10 and >= 12 tokens)
        "What is 2 + 2? Reply with the number only.",
        "Is 5 greater than 3? Answer yes or no only.",
        "Write a long story about a dragon.",
    ]
    items = [EvalItem(f"q{i}", (Message("user", q),), "4") for i, q in enumerate(questions)]
    calls: list[tuple[int, int, int]] = []
    rows = evaluate(
        backend, items, GenSettings(1, 12, 0.0, 1.0, 0), chunk_size=len(items),
        on_progress=lambda done, total: calls.append((done, total, forwards[0])),
    )  # fmt: skip
    assert [(done, total) for done, total, _ in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    at_step = [f for _, _, f in calls[1:]]
    assert at_step == sorted(at_step)
    assert at_step[0] < forwards[0], "the first problem was only reported after the whole batch decoded"
    lengths = sorted(row["samples"][0]["tokens"] for row in rows)
    assert lengths[0] < lengths[-1]  # (what makes the test meaningful: the rows end at different steps)


def test_the_eval_bar_has_an_eta_and_stays_out_of_redirected_output():
    from rich.console import Console

    from mathrl.eval.command import problem_progress

    shown = io.StringIO()
    with problem_progress("m / bench", 4, Console(file=shown, force_terminal=True, width=120)) as advance:
        advance(1, 4)
    assert "1/4" in shown.getvalue() and "eta" in shown.getvalue()
    redirected = io.StringIO()
    with problem_progress("m / bench", 4, Console(file=redirected, force_terminal=False, width=120)) as advance:
        advance(1, 4)
        advance(4, 4)
    assert redirected.getvalue() == ""


# --- 2. prompt_format=plain ---------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tiny_llama_dir) -> Path:
    """A tiny random Llama with the embedded model's tokenizer, saved without a chat template
    (a base model, as Qwen2.5-Math-1.5B is for zero-RL)."""
    from transformers import AutoTokenizer

    path = tiny_llama_dir("base", chat_template=False)
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return path


def test_plain_prompts_are_exactly_the_texts_tokens(base_dir):
    from transformers import AutoTokenizer

    from mathrl.rollout.renderer import Renderer
    from mathrl.tools.formats import Tool
    from mathrl.types import Completion

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with pytest.raises(ValueError, match=r"has no chat template.*pass prompt_format=plain"):
        Renderer(tokenizer)
    renderer = Renderer(tokenizer, prompt_format="plain")
    messages = math_messages("What is 2 + 3?", few_shot=1, system_prompt="Be brief.")
    text = (
        "Be brief.\n\nUser: " + messages[1].content + "\nAssistant: " + messages[2].content + "\n\n"
        "User: What is 2 + 3? Write your answer in \\boxed{} format.\nAssistant:"
    )
    assert plain_prompt(messages) == text
    tokens = renderer.initial_tokens(messages)
    assert tokens == tokenizer(text)["input_ids"]
    assert not set(tokens) & set(tokenizer.all_special_ids)  # no chat markup, no end-of-turn tokens
    assert tokenizer.decode(tokens) == text
    # the reply stops where the model would start the next turn, and that is not part of its text
    assert renderer.stop_strings(()) == ("\nUser:",)
    ids = tokenizer(" 2 + 3 = \\boxed{5}\nUser: and", add_special_tokens=False)["input_ids"]
    action = renderer.parse(Completion(tuple(ids), tuple(0.0 for _ in ids), "stop"))
    assert action.text == " 2 + 3 = \\boxed{5}"
    with pytest.raises(ValueError, match="prompt_format=plain renders single-turn prompts only"):
        renderer.initial_tokens(messages, [Tool("python", "run code", {"type": "object", "properties": {}})])


def test_plain_sft_trains_the_reply_after_the_prompt_rl_samples_from(base_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from mathrl.rollout.renderer import Renderer
    from mathrl.train.sft import plain_loss_mask

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                    {"role": "assistant", "content": "\\boxed{2}"}]  # fmt: skip
    tokens, mask = plain_loss_mask(tokenizer, conversation, "all_assistant_messages")
    prompt = Renderer(tokenizer, prompt_format="plain").initial_tokens(
        [Message("system", "Be brief."), Message("user", "1 + 1?")]
    )
    reply = tokenizer(" \\boxed{2}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokens == prompt + reply and mask == [False] * len(prompt) + [True] * len(reply)
    with pytest.raises(ValueError, match="train_on_what=last_assistant_message"):
        plain_loss_mask(tokenizer, [*conversation, {"role": "user", "content": "2 + 2?"},
                                    {"role": "assistant", "content": "4"}], "all_assistant_messages")  # fmt: skip

    traces, run = tmp_path / "traces.jsonl", tmp_path / "sft"
    traces.write_text("".join(json.dumps({"messages": conversation, "problem_id": str(k)}) + "\n" for k in range(4)))
    args = ["sft", f"model_name={base_dir}", f"train_file={traces}", f"log_path={run}", "batch_size=2",
            "max_steps=1", "test_fraction=0", "num_threads=1"]  # fmt: skip
    assert main(args) == 2
    assert "prompt_format=plain" in capsys.readouterr().err and not run.exists()
    done = _mathrl(*args, "prompt_format=plain")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints.jsonl").exists()


def test_prompt_format_choices_come_from_the_registry():
    from dataclasses import fields

    from mathrl.config import ConfigError, parse_config
    from mathrl.eval.config import EvalConfig
    from mathrl.train.configs import DistillConfig, SFTConfig, TrainConfig

    assert PROMPT_FORMAT_CHOICES == tuple(PROMPT_FORMATS) == ("chat", "plain")
    for config in (TrainConfig, EvalConfig, DistillConfig, SFTConfig):
        (f,) = [f for f in fields(config) if f.name == "prompt_format"]
        assert f.default == "chat" and f.metadata["choices"] == PROMPT_FORMAT_CHOICES
    with pytest.raises(ConfigError, match="prompt_format"):
        parse_config(TrainConfig, ["prompt_format=xml"])


def test_a_base_model_is_refused_naming_prompt_format_plain_then_trains_and_evaluates_with_it(
    base_dir, tmp_path, capsys
):
    from mathrl.envs.registry import make_dataset

    run, out = tmp_path / "run", tmp_path / "eval"
    bench = tmp_path / "three.jsonl"
    bench.write_text(
        "".join(json.dumps({"problem": f"What is {k} + 1?", "answer": str(k + 1)}) + "\n" for k in range(3))
    )
    train = ["train", f"model_name={base_dir}", f"log_path={run}", "max_steps=1", "group_size=2",
             "groups_per_batch=2", "max_tokens=6", "env_args.test_size=2", "num_threads=1"]  # fmt: skip
    evaluate = ["eval", f"model={base_dir}", f"benchmarks={bench}", f"output_dir={out}", "max_tokens=6"]
    for args in (train, evaluate):
        assert main(args) == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert line.startswith(f"mathrl {args[0]}: error: model '{base_dir}' has no chat template")
        assert "prompt_format=plain" in line
        assert not run.exists() and not out.exists()  # refused before anything was created

    trained = _mathrl(*train, "prompt_format=plain")
    assert trained.returncode == 0, trained.stderr[-3000:]
    dataset, _ = make_dataset("arithmetic", {"test_size": 2}, 2, 0)
    expected = {plain_prompt(b.messages) for b in dataset.get_batch(0)}
    rollouts = [json.loads(x) for x in (run / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rollouts} == expected  # the sampled prompt decodes to the plain text, no markup
    assert all(p.endswith("\nAssistant:") and "<|" not in p for p in expected)

    evaluated = _mathrl(*evaluate, "prompt_format=plain")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = [json.loads(x) for x in next(out.glob("*/three.jsonl")).read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["1", "2", "3"] and all(len(r["samples"]) == 1 for r in rows)
    assert json.loads(next(out.glob("*/three.settings.json")).read_text())["prompt_format"] == "plain"


def test_plain_with_a_tool_env_is_refused_in_one_line_before_anything_is_created(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "env=math_python", "prompt_format=plain", f"log_path={run}",
                 f"env_args.data_dir={SHARED}"]) == 2  # fmt: skip
    err = _error_lines(capsys.readouterr().err)
    assert err == [err[0]] and err[0].startswith("mathrl train: error: prompt_format=plain: single-turn envs only")
    assert not run.exists()
    assert main(["eval", "tools=python", "prompt_format=plain", f"output_dir={run}", "benchmarks=gsm8k",
                 "limit=1", f"data_dir={SHARED}"]) == 2  # fmt: skip
    assert "prompt_format=plain: single-turn prompts only" in capsys.readouterr().err and not run.exists()


# --- 3. and 4. benchmark data -----------------------------------------------------------------


def test_eval_without_data_or_the_hub_extra_says_how_to_get_each(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "datasets.py").write_text("raise ImportError('the [hub] extra is not installed')\n")
    empty, out = tmp_path / "data", tmp_path / "out"
    empty.mkdir()
    env = {"PYTHONPATH": str(shim), "MATHRL_DATA_DIR": ""}
    result = _mathrl("eval", f"data_dir={empty}", f"output_dir={out}", "limit=1", env=env)
    assert result.returncode == 2
    assert _error_lines(result.stderr) == [
        f"mathrl eval: error: benchmarks: dataset math500 needs its data: no local file math500_test.jsonl in "
        f"data_dir={empty} or $MATHRL_DATA_DIR (not set); put math500_test.jsonl in a directory given as "
        "data_dir=DIR or $MATHRL_DATA_DIR, or install the `datasets` package to download HuggingFaceH4/MATH-500 "
        "from the HF hub: pip install -e \".[hub]\" (a source checkout) or pip install 'mathrl[hub]'"
    ]
    assert not out.exists()


def test_an_empty_benchmark_file_is_said_to_have_no_rows(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["eval", f"benchmarks={empty}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert err == [f"mathrl eval: error: benchmarks: {empty}: the file has no rows; it needs one problem per row "
                   "(with its answer)"]  # fmt: skip
    assert not (tmp_path / "out").exists()


# --- 5. nothing is created before the configuration is validated ---------------------------

TRACES = '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}\n'


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "env_args.nope=1"], "env_args.nope: not an option of env 'arithmetic'"),
        (["train", "env_args.max_operand=abc"], "env_args.max_operand: expected int"),
        (["train", "env=math_python", "env_args.max_tool_calls=-1"], "env_args.max_tool_calls: expected at least 1"),
        (["train", "nope=1"], "nope"),
        (["train", "model_name=./no/such/model"], "model_name: ./no/such/model does not exist"),
        (["sft", "train_file={traces}", "nope=1"], "nope"),
        (["sft", "train_file={tmp}/missing.jsonl"], "missing.jsonl: No such file or directory"),
        (["sft", "train_file={traces}", "test_fraction=0", "batch_size=5"], "batch_size=5: only 1 training"),
        (["eval", "nope=1"], "nope"),
        (["eval", "tools=python", "tool_args.nope=1", "benchmarks=gsm8k", "limit=1", f"data_dir={SHARED}"],
         "tool_args.nope: not a tool option"),
        (["eval", "model=/no/such/model", "benchmarks=gsm8k", "limit=1", f"data_dir={SHARED}"],
         "model: /no/such/model does not exist"),
        (["distill", "nope=1"], "nope"),
        (["distill", "model=/no/such/model", f"data_dir={SHARED}", "limit=1"], "model: /no/such/model does not exist"),
        (["distill", "datasets=nope"], "unknown dataset 'nope'"),
    ],
)  # fmt: skip
def test_a_bad_configuration_creates_nothing(tmp_path, capsys, args, says):
    traces = tmp_path / "traces.jsonl"
    traces.write_text(TRACES)
    out = tmp_path / "out"
    where = {"train": "log_path", "sft": "log_path", "eval": "output_dir", "distill": "output_dir"}[args[0]]
    argv = [a.format(traces=traces, tmp=tmp_path) for a in args] + [f"{where}={out}"]
    assert main(argv) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"mathrl {args[0]}: error: ") and says in err[0], err
    assert not out.exists(), f"{out} was created before the configuration was refused"
