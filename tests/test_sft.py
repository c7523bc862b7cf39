"""``mathrl sft``: the loss mask on a real chat template, truncation, the LR schedule,
gradient accumulation = one big batch, resume, held-out NLL going down, and chaining an
SFT run into ``mathrl train load_checkpoint_path=...`` (merge and continue)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathrl.config import ConfigError
from mathrl.models import EMBEDDED_MODEL, eos_token_ids, load_tokenizer
from mathrl.rl.batching import ActionScorer
from mathrl.train.sft import (
    Example,
    SFTConfig,
    batch_indices,
    loss_mask,
    lr_multiplier,
    make_examples,
    read_conversations,
    sft,
    split_by_problem,
    train_step,
    truncate,
)

CONVERSATION = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42.\nSo the answer is \\boxed{42}."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "2 * 42 = 84"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_MODEL)


def _spans(tokens: list[int], mask: list[bool]) -> list[list[int]]:
    """Maximal runs of consecutive loss tokens."""
    spans: list[list[int]] = []
    for t, (tok, m) in enumerate(zip(tokens, mask, strict=True)):
        if m:
            if t == 0 or not mask[t - 1]:
                spans.append([])
            spans[-1].append(tok)
    return spans


@pytest.mark.parametrize(("mode", "trained"), [("all_assistant_messages", [2, 4]), ("last_assistant_message", [4])])
def test_loss_mask_is_exactly_the_assistant_tokens_and_end_of_turn(tokenizer, mode, trained):
    tokens, mask = loss_mask(tokenizer, CONVERSATION, mode, eos_token_ids(tokenizer))
    assert tokens == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    spans = [tokenizer.decode(s) for s in _spans(tokens, mask)]
    # Content + <|im_end|>; not the "<|im_start|>assistant\n" header, not the newline after <|im_end|>.
    assert spans == [CONVERSATION[i]["content"] + "<|im_end|>" for i in trained]
    unmasked = tokenizer.decode([t for t, m in zip(tokens, mask, strict=True) if not m])
    assert unmasked.count("<|im_start|>assistant\n") == 2
    assert "What is 12 + 30?" in unmasked and "careful calculator" in unmasked
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(m for t, m in zip(tokens, mask, strict=True) if t == im_end) == len(trained)


def test_loss_mask_refuses_a_template_that_rewrites_earlier_turns(tokenizer):
    # Like templates that strip the reasoning of earlier assistant turns (Qwen3): only the last shows.
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="not a prefix of the whole conversation"):
        loss_mask(rewriting, CONVERSATION, "all_assistant_messages", eos_token_ids(tokenizer))
    tokens, mask = loss_mask(rewriting, CONVERSATION, "last_assistant_message", eos_token_ids(tokenizer))
    assert [rewriting.decode(s) for s in _spans(tokens, mask)] == ["2 * 42 = 84<|im_end|>"]


def test_truncation_is_counted_only_when_loss_tokens_are_cut(tokenizer, tmp_path):
    assert truncate([1, 2, 3, 4, 5, 6], [False, True, True, False, False, False], 4) == ([1, 2, 3], [0, 1, 1], False)
    assert truncate([1, 2, 3, 4, 5, 6], [False, True, True, True, True, False], 3) == ([1, 2, 3], [0, 1, 1], True)
    # A conversation ending in a user turn loses that turn (no loss) and is not truncated by it.
    rows = [("p", CONVERSATION), ("q", CONVERSATION[:3]), ("r", CONVERSATION[:4])]
    full = make_examples(rows, tokenizer, SFTConfig(train_file="x"), "x")
    n = len(full[1].tokens_T)
    assert full[2] == Example(full[1].tokens_T, full[1].loss_mask_T, False, "r")
    assert full[1].tokens_T[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and full[1].loss_mask_T[-1]
    cut = make_examples(rows, tokenizer, SFTConfig(train_file="x", max_length=n), "x")
    assert [e.truncated for e in full] == [False, False, False]
    assert [e.truncated for e in cut] == [True, False, False]
    assert cut[0].tokens_T == full[0].tokens_T[:n] and cut[1] == full[1]


def test_lr_schedule_values():
    assert [lr_multiplier(s, 10, 0, "linear") for s in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert [lr_multiplier(s, 10, 2, "linear") for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_multiplier(0, 10, 0, "cosine") == 1.0
    assert lr_multiplier(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert lr_multiplier(4, 10, 4, "cosine") == 1.0
    assert [lr_multiplier(s, 10, 3, "constant") for s in (0, 2, 9)] == [pytest.approx(1 / 3), 1.0, 1.0]


def test_data_order_is_a_pure_function_of_seed_and_step():
    epoch0 = [i for s in range(3) for i in batch_indices(10, 3, s, seed=1)]  # 3 steps per epoch, 1 left out
    assert len(set(epoch0)) == 9
    assert batch_indices(10, 3, 3, seed=1) != batch_indices(10, 3, 0, seed=1)  # a fresh shuffle per epoch
    assert batch_indices(10, 3, 4, seed=1) == batch_indices(10, 3, 4, seed=1)


def test_held_out_split_keeps_each_problem_on_one_side():
    rows = [(f"p{i % 7}", CONVERSATION) for i in range(21)]
    train, test = split_by_problem(rows, 0.3, seed=0)
    assert len({p for p, _ in test}) == 2 and len(train) + len(test) == 21
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert split_by_problem(rows, 0.3, seed=0) == (train, test)  # seeded: the same split every time


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": 3}]})
        + "\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:2: messages\[0\].content: expected a string"):
        read_conversations(str(path))


def test_a_max_length_that_leaves_no_trained_token_is_refused_or_drops_those_conversations(tmp_path, capsys):
    # Found by a run: with every assistant token cut, train_step crashed in backward ("does not
    # require grad"). All cut: one line, nothing created; some cut: dropped, and said so.
    from mathrl.cli import main

    data = tmp_path / "conv.jsonl"
    long = [{"role": "user", "content": "What is 2 + 2? " * 30}, {"role": "assistant", "content": "4"}]
    data.write_text(json.dumps({"messages": long}) + "\n")
    run = tmp_path / "run"
    assert main(["sft", f"train_file={data}", "max_length=32", "batch_size=1", "test_fraction=0",
                 f"log_path={run}"]) == 2  # fmt: skip
    assert "max_length=32 cuts every conversation" in capsys.readouterr().err
    assert not run.exists()
    rows = [("p", long), ("q", CONVERSATION)]
    examples = make_examples(
        rows, tokenizer=load_tokenizer(EMBEDDED_MODEL), cfg=SFTConfig(train_file="x", max_length=48), source="x"
    )
    assert [any(e.loss_mask_T) for e in examples] == [False, True]


def test_help_and_config_errors(capsys):
    from dataclasses import fields

    from mathrl.cli import main

    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f.name in out for f in fields(SFTConfig))
    assert main(["sft"]) == 2
    assert "missing required key(s): train_file" in capsys.readouterr().err
    assert main(["sft", "train_file=/nonexistent.jsonl", "train_on_what=everything"]) == 2
    assert "train_on_what: expected one of" in capsys.readouterr().err


def test_gradient_accumulation_gives_the_same_update_as_one_batch(tiny_model):
    # Different lengths and loss-token counts per micro-batch: a per-micro-batch mean would differ.
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, n_loss in [(5, 1), (9, 6), (14, 3), (20, 12)]:
        tokens = torch.randint(3, 97, (n,), generator=g).tolist()
        examples.append(Example(tuple(tokens), tuple([False] * (n - n_loss) + [True] * n_loss)))
    results = []
    for accum in (1, 2):
        model = copy.deepcopy(tiny_model).train()
        # SGD: its update is proportional to the gradient (Adam's first step is nearly its sign).
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = train_step(
            ActionScorer(model),
            optimizer,
            examples,
            lr=1.0,
            grad_accum_steps=accum,
            pad_id=0,
            bf16=False,
            max_grad_norm=0.0,
        )
        delta = {k: v - before[k] for k, v in model.state_dict().items()}
        results.append((out, delta))
    (out1, d1), (out2, d2) = results
    assert out1["train_mean_nll"] == pytest.approx(out2["train_mean_nll"], rel=1e-6)
    assert out1["num_loss_tokens"] == 22 and out1["num_tokens"] == 48
    assert max(float(d.abs().max()) for d in d1.values()) > 1e-2  # far above the tolerance
    for k in d1:
        torch.testing.assert_close(d1[k], d2[k], rtol=1e-4, atol=1e-6)


def _arith_traces(path: Path, n: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            x, y = rng.randint(0, 20), rng.randint(0, 20)
            messages = [
                {"role": "user", "content": f"What is {x} + {y}?"},
                {"role": "assistant", "content": f"{x} + {y} = {x + y}. The answer is {x + y}."},
            ]
            f.write(json.dumps({"messages": messages, "problem_id": f"p{i}"}) + "\n")
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_sft_lowers_held_out_nll_and_writes_a_run(tmp_path):
    data = _arith_traces(tmp_path / "traces.jsonl", 16)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mathrl.cli", "sft", f"train_file={data}", f"test_file={data}", "batch_size=4",
         "max_steps=6", "learning_rate=1e-3", "eval_every=3", "save_every=3", "max_length=64", f"log_path={run}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    for key in ("train_mean_nll", "optim/lr", "progress/epoch", "num_tokens", "num_truncated", "time/step"):
        assert key in rows[0], key
    nll = {r["step"]: r["test/nll"] for r in rows if "test/nll" in r}
    assert list(nll) == [0, 3, 6]
    assert nll[6] < nll[0] - 0.3, nll  # overfitting 16 conversations: held-out (= train) NLL falls
    assert rows[0]["progress/epoch"] == 0.25 and rows[0]["optim/lr"] == pytest.approx(1e-3)
    ckpts = [json.loads(line) for line in (run / "checkpoints.jsonl").read_text().splitlines()]
    assert [(c["step"], c["final"]) for c in ckpts] == [(3, False), (6, True)]
    assert json.loads((run / "config.json").read_text())["lora_rank"] == 64
    assert (run / "plot.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_continues_at_the_checkpoint_with_the_same_data(tmp_path):
    data = _arith_traces(tmp_path / "traces.jsonl", 14)
    cfg = SFTConfig(
        train_file=str(data), test_fraction=0.2, batch_size=3, max_steps=4, save_every=2, eval_every=2,
        learning_rate=1e-3, lora_rank=8, log_path=str(tmp_path / "straight"),
    )  # fmt: skip
    straight = sft(cfg, progress=False)
    # The same run killed after its step-2 checkpoint: drop the final checkpoint, keep later rows.
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step_000004")
    lines = (killed / "checkpoints.jsonl").read_text().splitlines()
    (killed / "checkpoints.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        sft(SFTConfig(**{**cfg.__dict__, "log_path": str(killed), "learning_rate": 1e-4}), progress=False)
    sft(SFTConfig(**{**cfg.__dict__, "log_path": str(killed)}), progress=False)

    def deterministic(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]

    got, want = deterministic(_rows(killed)), deterministic(_rows(straight))
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def _greedy_texts(model_name: str, cfg) -> dict[str, str]:
    """Greedy test-set answers of ``model_name`` as mathrl train's step-0 evaluation asks them."""
    from mathrl.envs.registry import make_dataset
    from mathrl.eval.runner import EvalItem, GenSettings, evaluate
    from mathrl.rollout.backend import LocalBackend

    dataset, _ = make_dataset(cfg.env, cfg.env_args, cfg.groups_per_batch, cfg.seed)
    items = [EvalItem(b.problem_id or str(i), b.messages, b.reference, b.style)
             for i, b in enumerate(dataset.test_builders())]  # fmt: skip
    rows = evaluate(LocalBackend.load(model_name), items, GenSettings(1, cfg.max_tokens, 0.0, 1.0, 0),
                    chunk_size=len(items))  # fmt: skip
    return {r["id"]: r["samples"][0]["text"] for r in rows}


@pytest.mark.slow
def test_train_starts_from_the_sft_weights_merged_or_continued(tmp_path):
    from mathrl.models import load_for_inference
    from mathrl.train.rl import TrainConfig, train

    data = _arith_traces(tmp_path / "traces.jsonl", 8)
    sft_run = sft(
        SFTConfig(train_file=str(data), test_fraction=0, batch_size=4, max_steps=2, learning_rate=3e-3,
                  lora_rank=8, log_path=str(tmp_path / "sft")),
        progress=False,
    )  # fmt: skip
    base = dict(
        group_size=2, groups_per_batch=2, max_tokens=6, max_steps=1, eval_every=1, save_rollouts=False,
        remove_constant_reward_groups=False,
        env_args={"max_operand": 9, "test_size": 4}, load_checkpoint_path=str(sft_run), lora_rank=8,
    )  # fmt: skip
    sft_texts = _greedy_texts(str(sft_run), TrainConfig(**base))
    assert sft_texts != _greedy_texts(EMBEDDED_MODEL, TrainConfig(**base)), "SFT changed nothing: test is vacuous"
    sft_checkpoint = str((sft_run / "checkpoints" / "step_000002").resolve())
    for mode in ("merge", "continue"):
        run = train(TrainConfig(**base, load_checkpoint_mode=mode, log_path=str(tmp_path / mode)), progress=False)
        step0 = [json.loads(line) for line in (run / "eval" / "step_000000.jsonl").read_text().splitlines()]
        assert {r["id"]: r["samples"][0]["text"] for r in step0} == sft_texts, mode  # starts from the SFT weights
        assert json.loads((run / "config.json").read_text())["load_checkpoint_path"] == sft_checkpoint
        adapter = json.loads((run / "checkpoints" / "step_000001" / "adapter_config.json").read_text())
        if mode == "merge":  # new adapters over the merged SFT weights: loaders must merge both
            assert adapter["base_model_name_or_path"] == sft_checkpoint
        else:
            assert adapter["base_model_name_or_path"] != sft_checkpoint
        load_for_inference(str(run))  # what mathrl eval model=<sft run>,<rl run> does per model
    with pytest.raises(ConfigError, match="lora_rank=8"):
        train(TrainConfig(**{**base, "lora_rank": 4}, load_checkpoint_mode="continue", log_path=str(tmp_path / "x")))
