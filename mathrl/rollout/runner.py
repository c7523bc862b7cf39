"""Run episodes on token sequences: sample, parse, step the envs in a batch, bridge, repeat.

Every episode is one token sequence that only grows at its end (:mod:`mathrl.rollout.renderer`):
the first observation, then each turn's sampled tokens verbatim and the bridged
observation that follows them. Nothing sampled is ever decoded and encoded again, so what
the trainer scores is exactly what the sampler produced. All live episodes advance turn
by turn together: each turn is one batched sampler call (identical prompts, such as a
group's first observation, are prefilled once) and one batched env step
(:func:`mathrl.envs.base.step_envs`: one grading call, all tool calls at once).
"""

from __future__ import annotations

from collections.abc import Sequence

from mathrl.envs.base import Env, GroupBuilder, step_envs
from mathrl.rollout.renderer import Renderer
from mathrl.rollout.sampler import Sampler
from mathrl.types import Message, Trajectory, TrajectoryGroup, Transition


def turn_seed(seed: int, turn: int) -> int:
    """The random stream of turn ``turn`` of an episode seeded ``seed`` (turn 0: ``seed`` itself)."""
    return seed if turn == 0 else (seed * 1_000_003 + 7919 * turn) % 2**62


def run_episodes(
    envs: Sequence[Env],
    sampler: Sampler,
    renderer: Renderer,
    *,
    max_tokens: int,
    temperature: float,
    max_turns: int,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
    top_p: float = 1.0,
) -> list[Trajectory]:
    """One trajectory per env. ``seed`` seeds each turn's sampler call (training); with
    ``row_seeds`` every episode draws from its own streams instead, so it does not depend on
    what it is batched with (evaluation). Envs are closed when their episode ends."""
    tokens: list[list[int]] = []
    history: list[list[Message]] = []
    rendered: dict[tuple[tuple[Message, ...], tuple[str, ...]], list[int]] = {}  # a group shares one rendering
    for env in envs:
        messages = env.initial_messages()
        key = (tuple(messages), tuple(t.name for t in env.tools))
        if key not in rendered:
            rendered[key] = renderer.initial_tokens(messages, env.tools)
        tokens.append(list(rendered[key]))
        history.append(list(messages))
    transitions: list[list[Transition]] = [[] for _ in envs]
    active = list(range(len(envs)))
    try:
        for turn in range(max_turns):
            if not active:
                break
            prompts = [tokens[e] for e in active]
            stop = sorted({s for e in active for s in renderer.stop_strings(envs[e].tools)})
            completions = sampler.sample(
                prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seed=seed + 7919 * turn, stop=stop,
                row_seeds=[turn_seed(row_seeds[e], turn) for e in active] if row_seeds is not None else None,
            )  # fmt: skip
            actions = [renderer.parse(c, envs[e].tools, turn) for e, c in zip(active, completions, strict=True)]
            results = step_envs([envs[e] for e in active], actions)
            still = []
            for e, prompt, comp, action, result in zip(active, prompts, completions, actions, results, strict=True):
                done = result.episode_done or turn == max_turns - 1
                transitions[e].append(
                    Transition(tuple(prompt), comp, action.text, result.reward, done,
                               {**result.metrics, "turn": float(turn)}, result.logs)
                )  # fmt: skip
                if done:
                    envs[e].close()
                    continue
                bridge = renderer.bridge_tokens(history[e], action, comp, result.next_messages, envs[e].tools)
                tokens[e] = [*prompt, *comp.tokens_T, *bridge]
                history[e] += [action.message, *result.next_messages]
                still.append(e)
            active = still
    finally:
        for env in {id(env): env for env in envs}.values():
            env.close()
    return [Trajectory(tuple(trs)) for trs in transitions]


def run_groups(
    builders: Sequence[GroupBuilder],
    group_size: int,
    sampler: Sampler,
    renderer: Renderer,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    max_turns: int,
) -> list[TrajectoryGroup]:
    """Sample ``group_size`` episodes for every builder; return one TrajectoryGroup each."""
    envs: list[Env] = []
    owner: list[int] = []
    for g, builder in enumerate(builders):
        made = builder.make_envs(group_size)
        envs += made
        owner += [g] * len(made)
    trajectories = run_episodes(
        envs, sampler, renderer, max_tokens=max_tokens, temperature=temperature, max_turns=max_turns, seed=seed
    )
    groups: list[list[Trajectory]] = [[] for _ in builders]
    for e, trajectory in enumerate(trajectories):
        groups[owner[e]].append(trajectory)
    return [TrajectoryGroup(tuple(trajs), b.tag) for trajs, b in zip(groups, builders, strict=True)]
