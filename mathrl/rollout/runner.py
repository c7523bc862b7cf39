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
from typing import Protocol

from mathrl.envs.base import Env, GroupBuilder, step_envs
from mathrl.rollout.renderer import Renderer
from mathrl.rollout.sampler import Sampler
from mathrl.types import Action, Completion, Message, StepResult, Trajectory, TrajectoryGroup, Transition


def turn_seed(seed: int, turn: int) -> int:
    """The random stream of turn ``turn`` of an episode seeded ``seed`` (turn 0: ``seed`` itself)."""
    return seed if turn == 0 else (seed * 1_000_003 + 7919 * turn) % 2**62


class Driver(Protocol):
    """How the episodes of :func:`play` get their replies: on token sequences with a local
    sampler (:class:`TokenDriver`), or over a chat API (:class:`mathrl.rollout.openai_backend.ChatDriver`)."""

    def can_continue(self, e: int) -> bool:
        """Whether episode ``e`` can take another turn (its context is not full)."""
        ...

    def sample(self, episodes: Sequence[int], turn: int) -> list[Action]:
        """This turn's reply of each of ``episodes``."""
        ...

    def extend(self, e: int, action: Action, result: StepResult) -> None:
        """Episode ``e`` goes on: append its reply and what the env answered."""
        ...


def play(envs: Sequence[Env], driver: Driver, max_turns: int) -> list[list[tuple[Action, StepResult]]]:
    """The turn loop every episode runs in: all live episodes take a turn together (one batched
    ``sample``, one batched :func:`step_envs`), an episode ends when its env says so, at
    ``max_turns`` or when its context is full; every env is closed when its episode ends."""
    played: list[list[tuple[Action, StepResult]]] = [[] for _ in envs]
    active = list(range(len(envs)))
    try:
        for turn in range(max_turns):
            for e in [e for e in active if not driver.can_continue(e)]:
                envs[e].close()
                active.remove(e)
            if not active:
                break
            actions = driver.sample(active, turn)
            results = step_envs([envs[e] for e in active], actions)
            still = []
            for e, action, result in zip(active, actions, results, strict=True):
                played[e].append((action, result))
                if result.episode_done or turn == max_turns - 1:
                    envs[e].close()
                else:
                    driver.extend(e, action, result)
                    still.append(e)
            active = still
    finally:
        for env in {id(env): env for env in envs}.values():
            env.close()
    return played


class TokenDriver:
    """Episodes as token sequences (see the module docstring) on a local sampler. ``seed``
    seeds each turn's sampler call (training); with ``row_seeds`` every episode draws from its
    own streams, so it does not depend on what it is batched with (evaluation)."""

    def __init__(
        self,
        envs: Sequence[Env],
        sampler: Sampler,
        renderer: Renderer,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
        row_seeds: Sequence[int] | None = None,
        max_context: int | None = None,
    ):
        self.envs, self.sampler, self.renderer = envs, sampler, renderer
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.seed, self.row_seeds, self.max_context = seed, row_seeds, max_context
        self.tokens: list[list[int]] = []
        self.history: list[list[Message]] = []
        self.turns: list[list[tuple[tuple[int, ...], Completion]]] = [[] for _ in envs]  # (prompt, sample)
        rendered: dict[tuple[tuple[Message, ...], tuple[str, ...]], list[int]] = {}  # a group shares one rendering
        for env in envs:
            messages = env.initial_messages()
            key = (tuple(messages), tuple(t.name for t in env.tools))
            if key not in rendered:
                rendered[key] = renderer.initial_tokens(messages, env.tools)
            self.tokens.append(list(rendered[key]))
            self.history.append(list(messages))

    def can_continue(self, e: int) -> bool:
        return self.max_context is None or len(self.tokens[e]) + self.max_tokens <= self.max_context

    def sample(self, episodes: Sequence[int], turn: int) -> list[Action]:
        prompts = [self.tokens[e] for e in episodes]
        stop = sorted({s for e in episodes for s in self.renderer.stop_strings(self.envs[e].tools)})
        row_seeds = [turn_seed(self.row_seeds[e], turn) for e in episodes] if self.row_seeds is not None else None
        completions = self.sampler.sample(
            prompts, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed + 7919 * turn, stop=stop, row_seeds=row_seeds,
        )  # fmt: skip
        for e, prompt, completion in zip(episodes, prompts, completions, strict=True):
            self.turns[e].append((tuple(prompt), completion))
        return [self.renderer.parse(c, self.envs[e].tools, turn) for e, c in zip(episodes, completions, strict=True)]

    def extend(self, e: int, action: Action, result: StepResult) -> None:
        prompt, completion = self.turns[e][-1]
        bridge = self.renderer.bridge_tokens(
            self.history[e], action, completion, result.next_messages, self.envs[e].tools
        )
        self.tokens[e] = [*prompt, *completion.tokens_T, *bridge]
        self.history[e] += [action.message, *result.next_messages]

    def trajectories(self, played: Sequence[Sequence[tuple[Action, StepResult]]]) -> list[Trajectory]:
        """What :func:`play` returned, as training data: each turn's prompt tokens and sample."""
        out = []
        for turns, steps in zip(self.turns, played, strict=True):
            out.append(Trajectory(tuple(
                Transition(prompt, completion, action.text, result.reward, k == len(steps) - 1,
                           {**result.metrics, "turn": float(k)}, result.logs)
                for k, ((prompt, completion), (action, result)) in enumerate(zip(turns, steps, strict=False))
            )))  # fmt: skip
        return out


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
    max_context: int | None = None,
) -> list[Trajectory]:
    """One trajectory per env, on token sequences (:class:`TokenDriver`, :func:`play`)."""
    driver = TokenDriver(
        envs, sampler, renderer, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
        row_seeds=row_seeds, max_context=max_context,
    )  # fmt: skip
    return driver.trajectories(play(envs, driver, max_turns))


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
    max_context: int | None = None,
) -> list[TrajectoryGroup]:
    """Sample ``group_size`` episodes for every builder; return one TrajectoryGroup each."""
    envs: list[Env] = []
    owner: list[int] = []
    for g, builder in enumerate(builders):
        made = builder.make_envs(group_size)
        envs += made
        owner += [g] * len(made)
    trajectories = run_episodes(
        envs, sampler, renderer, max_tokens=max_tokens, temperature=temperature, max_turns=max_turns, seed=seed,
        max_context=max_context,
    )  # fmt: skip
    groups: list[list[Trajectory]] = [[] for _ in builders]
    for e, trajectory in enumerate(trajectories):
        groups[owner[e]].append(trajectory)
    return [TrajectoryGroup(tuple(trajs), b.tag) for trajs, b in zip(groups, builders, strict=True)]
