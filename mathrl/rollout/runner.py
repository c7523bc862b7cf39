"""Run episodes: render each env's conversation, sample, step the env, repeat until done.

All envs of a batch advance turn by turn together, so each turn is one batched call to
the sampler (which prefills identical prompts, e.g. a group's first turn, only once).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mathrl.envs.base import Env, GradedEnv, GroupBuilder
from mathrl.grading import Grade, grade_batch
from mathrl.prompts import render_prompt
from mathrl.rollout.sampler import Sampler
from mathrl.types import Message, Trajectory, TrajectoryGroup, Transition


def run_groups(
    builders: Sequence[GroupBuilder],
    group_size: int,
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    max_turns: int = 1,
) -> list[TrajectoryGroup]:
    """Sample ``group_size`` episodes for every builder; return one TrajectoryGroup each."""
    envs: list[Env] = []
    owner: list[int] = []
    for g, builder in enumerate(builders):
        made = builder.make_envs(group_size)
        envs += made
        owner += [g] * len(made)
    convo: list[list[Message]] = [env.initial_messages() for env in envs]
    transitions: list[list[Transition]] = [[] for _ in envs]
    active = list(range(len(envs)))
    for turn in range(max_turns):
        if not active:
            break
        rendered: dict[tuple[Message, ...], list[int]] = {}  # a group's copies share one rendering
        for e in active:
            if tuple(convo[e]) not in rendered:
                rendered[tuple(convo[e])] = render_prompt(tokenizer, convo[e])
        prompts = [rendered[tuple(convo[e])] for e in active]
        completions = sampler.sample(prompts, max_tokens=max_tokens, temperature=temperature, seed=seed + 7919 * turn)
        texts = [str(tokenizer.decode(list(c.tokens_T), skip_special_tokens=True)) for c in completions]
        grades = _grade_turn([envs[e] for e in active], texts)
        still = []
        for e, prompt, comp, text, grade in zip(active, prompts, completions, texts, grades, strict=True):
            env = envs[e]
            if isinstance(env, GradedEnv) and grade is not None:
                result = env.step_graded(text, grade, len(comp.tokens_T))
            else:
                result = env.step(text)
            done = result.episode_done or turn == max_turns - 1
            transitions[e].append(
                Transition(tuple(prompt), comp, text, result.reward, done, {**result.metrics, "turn": float(turn)})
            )
            if not done:
                convo[e] = [*convo[e], Message("assistant", text), *result.next_messages]
                still.append(e)
        active = still
    groups: list[list[Trajectory]] = [[] for _ in builders]
    for e, trs in enumerate(transitions):
        groups[owner[e]].append(Trajectory(tuple(trs)))
    return [TrajectoryGroup(tuple(trajs), b.tag) for trajs, b in zip(groups, builders, strict=True)]


def _grade_turn(envs: Sequence[Env], texts: Sequence[str]) -> list[Grade | None]:
    """Grade every GradedEnv's action of this turn in one parallel batch."""
    requests = {k: env.grading_request(text) for k, (env, text) in enumerate(zip(envs, texts, strict=True))
                if isinstance(env, GradedEnv)}  # fmt: skip
    graded = grade_batch([r for r, _, _ in requests.values()], [ref for _, ref, _ in requests.values()],
                         style=[st for _, _, st in requests.values()])  # fmt: skip
    grades: list[Grade | None] = [None] * len(envs)
    for k, grade in zip(requests, graded, strict=True):
        grades[k] = grade
    return grades
