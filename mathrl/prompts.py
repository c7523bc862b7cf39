"""Math prompts: the problem in chat messages, with tinker-cookbook's suffix and optional few-shot
examples (:class:`mathrl.rollout.renderer.Renderer` turns messages into tokens), and the
registry of prompt formats: how messages become the text a model reads.

Prompt formats (``prompt_format=``, :data:`PROMPT_FORMATS`):

- ``chat`` (default): the model's own chat template (instruct and chat models).
- ``plain``: plain text for models without a chat template (a base model, as in "zero-RL" runs
  from Qwen2.5-Math-1.5B), in DeepSeek-R1-Zero's "User: ... Assistant:" shape::

      [system prompt]\n\n            (when there is one)
      User: <example>\nAssistant: <solution>\n\n   (each few-shot example)
      User: <problem> Write your answer in \\boxed{} format.\nAssistant:

  The model's continuation is the reply; it ends at the end-of-text token or where the model
  starts the next "User:" turn (a stop string, cut from the reply's text), and is graded as a
  chat reply is. Single-turn only: a tool env (``env=math_python``, ``tools=python``) needs turns
  the model can tell apart, which is what a chat template is for.

This module imports neither torch nor transformers: the commands' ``--help`` lists the formats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mathrl.types import Message

TINKER_SUFFIX = " Write your answer in \\boxed{} format."

# Two short worked examples for an optional few-shot prefix (written for mathrl).
FEW_SHOT: tuple[tuple[str, str], ...] = (
    (
        "A rectangle has a perimeter of 30 and a length of 9. What is its area?",
        "The perimeter is 2(length + width) = 30, so length + width = 15 and the width is 15 - 9 = 6. "
        "The area is 9 * 6 = 54.\n\n\\boxed{54}",
    ),
    (
        "Solve for $x$: $\\frac{x}{4} + 2 = 5$.",
        "Subtract 2 from both sides: $\\frac{x}{4} = 3$. Multiply by 4: $x = 12$.\n\n\\boxed{12}",
    ),
)


def math_messages(
    problem: str, *, suffix: str = TINKER_SUFFIX, few_shot: int = 0, system_prompt: str | None = None
) -> list[Message]:
    """The conversation for one math problem: optional system prompt, ``few_shot`` solved
    examples as earlier turns (each ending in a boxed answer), then the problem + ``suffix``."""
    if not 0 <= few_shot <= len(FEW_SHOT):
        raise ValueError(f"few_shot: expected 0..{len(FEW_SHOT)}, got {few_shot}")
    messages = [Message("system", system_prompt)] if system_prompt else []
    for question, answer in FEW_SHOT[:few_shot]:
        messages += [Message("user", question + suffix), Message("assistant", answer)]
    messages.append(Message("user", problem + suffix))
    return messages


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes the model's prompt. ``render`` is None for the tokenizer's own
    chat template; otherwise it writes the messages as plain text (single-turn prompts only:
    ``stop`` is where the model starts a turn of its own that nobody asked for)."""

    name: str
    description: str
    render: Callable[[Sequence[Message]], str] | None = None
    stop: tuple[str, ...] = ()


def plain_prompt(messages: Sequence[Message]) -> str:
    """``messages`` as DeepSeek-R1-Zero-style plain text ending in the ``Assistant:`` cue: a
    system message as a leading paragraph, then ``User: ...`` / ``Assistant: ...`` turns."""
    parts: list[str] = []
    for m in messages:
        if m.role == "system":
            parts.append(f"{m.content}\n\n")
        elif m.role == "user":
            parts.append(f"User: {m.content}\n")
        elif m.role == "assistant" and not m.tool_calls:
            parts.append(f"Assistant: {m.content}\n\n")
        else:
            raise ValueError(
                "prompt_format=plain renders single-turn prompts (system, user, earlier assistant replies); "
                f"got a {m.role} message{' with tool calls' if m.tool_calls else ''}: use prompt_format=chat"
            )
    return "".join(parts) + "Assistant:"


PROMPT_FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in (
        PromptFormat("chat", "the model's chat template"),
        PromptFormat(
            "plain",
            "'User: <problem>\\nAssistant:' text, for models without a chat template (base models)",
            plain_prompt,
            stop=("\nUser:",),
        ),
    )
}
PROMPT_FORMAT_CHOICES = tuple(PROMPT_FORMATS)
"""Values of ``prompt_format=``, derived from the registry."""

PROMPT_FORMAT_HELP = "How prompts become text: " + "; ".join(
    f"{f.name} = {f.description}" for f in PROMPT_FORMATS.values()
)


def find_prompt_format(name: str) -> PromptFormat:
    """The registered format ``name``; a ValueError naming the key and the choices otherwise."""
    if name not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: expected one of {', '.join(PROMPT_FORMATS)}, got {name!r}")
    return PROMPT_FORMATS[name]


def no_chat_template(model_name: str) -> str:
    """Why a model without a chat template is refused with the default prompt format, and what to do."""
    return (
        f"model {model_name!r} has no chat template, which prompt_format=chat (the default) renders prompts "
        "with; pass prompt_format=plain to prompt it with plain text (a base model: 'User: ...\\nAssistant:'), "
        "or use a model that has one"
    )
