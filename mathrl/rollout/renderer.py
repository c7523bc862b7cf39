"""The renderer owns the chat template: first observation, bridges between turns, parsing.

Multi-turn RL must train on the tokens the model actually produced. A rollout that
re-renders the whole conversation from decoded text every turn re-tokenizes what was
sampled, and a template that rewrites history (Qwen3 drops past ``<think>`` blocks)
renders something the model never saw: the "token prefix mismatch" of multi-turn RL. Here
an episode is one token sequence, grown only at its end:

    first observation   render(messages, tools) with the assistant header
    + sampled tokens    verbatim: never decoded and encoded again
    + bridge            what the template puts after an assistant turn (closing it when the
                        sample stopped at a tool call rather than the end-of-turn token),
                        then the env's messages, then the next assistant header
    + sampled tokens ...

The bridge is computed from the template itself: the conversation's *skeleton* (every
assistant content replaced by a placeholder, tool calls kept) is rendered with and without
the new messages, and the difference is tokenized. Earlier assistant contents never enter
it, so a history-rewriting template changes nothing already in the sequence.

Tools. A template that renders ``tools=`` (Qwen-style) gets them natively, and tool
results as ``role: tool`` messages, rendered as the template does. A template without tool
support (the embedded SmolLM2's), or a format other than the one the template writes, gets
the tools described in the system message in the chosen format (:meth:`ToolFormat.describe`),
assistant tool calls written out in that format, and each tool result as a user turn
(:meth:`ToolFormat.wrap_result`: ``<tool_response>\\n...\\n</tool_response>``, or an
``output`` code block). Either way sampling stops at the end of a call (``</tool_call>``, or a
code block's closing fence), so the model cannot go on to invent the tool's answer.

Plain text (``prompt_format=plain``, :data:`mathrl.prompts.PROMPT_FORMATS`): for a model without
a chat template, the first observation is the format's text tokenized as the tokenizer does by
default (a BOS token where the model uses one; no chat special tokens); the reply stops at the
format's stop string as well as the end-of-text token, and that stop string is cut from its
text. Single-turn only: no tools, no bridges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from mathrl.prompts import PromptFormat, find_prompt_format, no_chat_template
from mathrl.tools.formats import FORMATS, Tool, ToolFormat, format_for_template
from mathrl.types import Action, Completion, Message

_PLACEHOLDER = "\u2063mathrl-placeholder\u2063"  # an invisible separator: no template rewrites it


class Renderer:
    """Chat template + tool-call format of one tokenizer.

    ``tool_parser``: ``auto`` (the format the template writes calls in; hermes when it has
    no tool support) or a name from :data:`mathrl.tools.formats.FORMATS`. ``prompt_format``:
    ``chat`` (the template) or a plain-text format of :data:`mathrl.prompts.PROMPT_FORMATS`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tool_parser: str = "auto", prompt_format: str = "chat"):
        self.tokenizer = tokenizer
        self.prompt_format: PromptFormat = find_prompt_format(prompt_format)
        if self.prompt_format.render is None and not tokenizer.chat_template:
            raise ValueError(no_chat_template(str(getattr(tokenizer, "name_or_path", "") or "this model")))
        if tool_parser != "auto" and tool_parser not in FORMATS:
            raise ValueError(f"tool_parser: expected auto or one of {', '.join(FORMATS)}, got {tool_parser!r}")
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        native = format_for_template(template)  # None: no tool support, or calls in another syntax
        self.format: ToolFormat = FORMATS[(native or "hermes") if tool_parser == "auto" else tool_parser]
        # the template's own tool rendering, when it writes calls the way the model is asked to
        self.native_tools = native is not None and self.format.name == native and _renders_tools(tokenizer)
        self.eos_ids = _eos_ids(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_texts = sorted(
            {*tokenizer.all_special_tokens, *(t.content for t in added.values() if getattr(t, "special", False))},
            key=len,
            reverse=True,
        )

    # -- what the model reads ---------------------------------------------------------------

    def template_messages(self, messages: Sequence[Message], tools: Sequence[Tool]) -> list[dict[str, Any]]:
        """The messages as the chat template receives them (see the module docstring): as they
        are for a template with tool support, else with calls and results written out (and the
        tools described in the system message when there are any)."""
        if self.native_tools or (not tools and not any(m.role == "tool" or m.tool_calls for m in messages)):
            return [m.as_dict() for m in messages]
        out: list[dict[str, Any]] = []
        description = self.format.describe(tools) if tools else ""
        if description and (not messages or messages[0].role != "system"):
            out.append({"role": "system", "content": description})
        for m in messages:
            if m.role == "system" and not out and description:
                out.append({"role": "system", "content": f"{m.content}\n\n{description}"})
            elif m.role == "assistant" and m.tool_calls:
                calls = "\n".join(self.format.format_call(c) for c in m.tool_calls)
                out.append({"role": "assistant", "content": f"{m.content}\n{calls}" if m.content else calls})
            elif m.role == "tool":
                block = self.format.wrap_result(m.content)
                if out and out[-1].get("_tool_results"):  # consecutive results share one user turn
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_tool_results": True})
            else:
                out.append(m.as_dict())
        return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]

    def render_text(self, messages: Sequence[Message], tools: Sequence[Tool], generation_prompt: bool) -> str:
        if self.prompt_format.render is not None:
            _single_turn(self.prompt_format, tools)
            return self.prompt_format.render(messages)
        kwargs: dict[str, Any] = {"tools": [t.as_dict() for t in tools]} if tools and self.native_tools else {}
        text = self.tokenizer.apply_chat_template(
            self.template_messages(messages, tools), tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
        return str(text)

    def initial_tokens(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        """The first observation: ``messages`` (and the tools) with the assistant header."""
        if self.prompt_format.render is not None:  # plain text: the tokenizer's own tokens, no template
            _single_turn(self.prompt_format, tools)
            return list(self.tokenizer(self.prompt_format.render(messages))["input_ids"])
        kwargs: dict[str, Any] = {"tools": [t.as_dict() for t in tools]} if tools and self.native_tools else {}
        tokens = self.tokenizer.apply_chat_template(
            self.template_messages(messages, tools), tokenize=True, add_generation_prompt=True,
            return_dict=False, **kwargs,
        )  # fmt: skip
        return list(tokens)

    def bridge_tokens(
        self,
        history: Sequence[Message],
        action: Action,
        completion: Completion,
        next_messages: Sequence[Message],
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """Tokens to append after ``completion``'s: the end of this assistant turn, then
        ``next_messages``, then the next assistant header. ``history`` is the conversation
        before this turn (only its roles and tool calls matter)."""
        if self.prompt_format.render is not None:
            raise ValueError(_SINGLE_TURN.format(name=self.prompt_format.name))
        skeleton = [_skeleton(m) for m in history]
        turn = Message("assistant", _PLACEHOLDER, tool_calls=action.message.tool_calls)
        closed = self.render_text([*skeleton, Message("assistant", _PLACEHOLDER)], tools, False)
        closer = closed[closed.rindex(_PLACEHOLDER) + len(_PLACEHOLDER) :]  # e.g. "<|im_end|>\n"
        following = [replace(m, content=self.defang(m.content)) for m in next_messages]
        after = self.render_text([*skeleton, turn, *following], tools, True)
        # after this turn's placeholder: its calls as the template writes them (the model wrote its
        # own), the end of the turn, then what follows. Found in this one rendering, so a template
        # that renders a last turn differently (Qwen3 adds an empty think block) changes nothing.
        tail = after[after.rindex(_PLACEHOLDER) + len(_PLACEHOLDER) :]
        end = tail.find(closer) if closer else -1
        if end < 0:
            raise ValueError("the chat template ends an assistant turn differently when messages follow it")
        rest = closer  # what the sample did not write of the turn's end
        if completion.tokens_T and completion.tokens_T[-1] in self.eos_ids:
            eos_text = self.tokenizer.convert_ids_to_tokens(completion.tokens_T[-1])
            rest = closer[len(eos_text) :] if isinstance(eos_text, str) and closer.startswith(eos_text) else closer
        text = rest + tail[end + len(closer) :]
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def defang(self, text: str) -> str:
        """``text`` with the tokenizer's special-token strings broken by a zero-width space, so
        tool output cannot forge turn structure (``<|im_end|>`` in it stays text, not a token)."""
        for special in self.special_texts:
            if special and special in text:
                text = text.replace(special, special[0] + "\u200b" + special[1:])
        return text

    # -- what the model wrote ---------------------------------------------------------------

    def parse(self, completion: Completion, tools: Sequence[Tool] = (), turn: int = 0) -> Action:
        """The sampled tokens as an env action: decoded text, content and tool calls."""
        text = str(self.tokenizer.decode(list(completion.tokens_T), skip_special_tokens=True))
        truncated = completion.finish_reason == "length"
        cuts = [i for i in (text.find(s) for s in self.prompt_format.stop) if i >= 0]
        text = text[: min(cuts)] if cuts else text  # "\nUser:": the model began a turn of its own
        if not tools:
            return Action(text, Message("assistant", text), (), len(completion.tokens_T), truncated)
        parsed = self.format.parse(text, tools, id_prefix=f"call_{turn}")
        message = Message("assistant", parsed.content, tool_calls=parsed.calls)
        return Action(text, message, parsed.errors, len(completion.tokens_T), truncated)

    def stop_strings(self, tools: Sequence[Tool]) -> tuple[str, ...]:
        """Where sampling stops besides the end-of-turn token: the end of a tool call, or where a
        plain-text prompt format's reply would start the next turn."""
        return (self.format.call_end,) if tools else self.prompt_format.stop


_SINGLE_TURN = (
    "prompt_format={name} renders single-turn prompts only (no tools, no later turns); "
    "tool use needs prompt_format=chat and a model with a chat template"
)


def _single_turn(fmt: PromptFormat, tools: Sequence[Tool]) -> None:
    if tools:
        raise ValueError(_SINGLE_TURN.format(name=fmt.name))


def _skeleton(message: Message) -> Message:
    return replace(message, content=_PLACEHOLDER) if message.role == "assistant" else message


def _eos_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    from mathrl.models import eos_token_ids

    return set(eos_token_ids(tokenizer))


def _renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template does something with ``tools=`` (and renders tool messages)."""
    probe = Tool("probe_tool_x", "probe", {"type": "object", "properties": {}})
    messages = [{"role": "user", "content": "x"}]
    try:
        plain = tokenizer.apply_chat_template(messages, tokenize=False)
        with_tools = tokenizer.apply_chat_template(messages, tokenize=False, tools=[probe.as_dict()])
    except Exception:
        return False
    return plain != with_tools and "probe_tool_x" in str(with_tools)
