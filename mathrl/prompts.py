"""Math prompts: the problem in chat messages, with tinker-cookbook's suffix and optional few-shot
examples (:class:`mathrl.rollout.renderer.Renderer` turns messages into tokens)."""

from __future__ import annotations

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
