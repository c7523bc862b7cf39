"""Tool-call formats: how a model writes a call, how it is parsed, how tools are described.

``hermes``: a JSON object inside ``<tool_call></tool_call>``::

    <tool_call>
    {"name": "python", "arguments": {"code": "print(6 * 7)"}}
    </tool_call>

``qwen3_coder``: XML-ish, raw argument text (no JSON escaping, so code is written as is)::

    <tool_call>
    <function=python>
    <parameter=code>
    print(6 * 7)
    </parameter>
    </function>
    </tool_call>

``code_block``: a fenced code block named after the tool, its one string argument as the
body; the result comes back in an ``output`` block (the tool-integrated reasoning style of
ToRA and Qwen2.5-Math, and what small models trained on Markdown write readily)::

    ```python
    print(6 * 7)
    ```

``FORMATS`` is the registry (``tool_parser=`` choices derive from it). :meth:`ToolFormat.parse`
never raises: a call it cannot read becomes an error text (the env answers it with a tool
message carrying that text, counted as a ``parse`` error), and the text before the first
call is the reply's content. :meth:`ToolFormat.describe` is the tool description a chat
template without tool support gets in its system message (what the model then reads is
written out in the README's "Tool use" section).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mathrl.types import ToolCall

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
RESPONSE_START, RESPONSE_END = "<tool_response>", "</tool_response>"


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, its JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any] = field(hash=False)

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's (and chat templates') shape."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @property
    def required(self) -> list[str]:
        return list(self.parameters.get("required", []))


@dataclass(frozen=True)
class Parsed:
    """A reply split into its content (the text before the first call), the calls, and one
    error text per call that could not be read."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    errors: tuple[str, ...] = ()


class ToolFormat:
    """A way of writing tool calls; subclasses say how one call's body reads and writes.
    ``call_start``/``call_end`` delimit a call; sampling stops at ``call_end``."""

    name = ""
    call_start, call_end = CALL_START, CALL_END

    def format_call(self, call: ToolCall) -> str:
        """The text of one call, as the model writes it (tags included)."""
        raise NotImplementedError

    def _parse_body(self, body: str, tools: Sequence[Tool]) -> ToolCall | str:
        """One call from the text between the tags, or an error text."""
        raise NotImplementedError

    def parse(self, text: str, tools: Sequence[Tool], id_prefix: str = "call") -> Parsed:
        """Content, calls and errors of a reply (calls get ids ``{id_prefix}_{k}``)."""
        start, end_tag = self.call_start, self.call_end
        first = text.find(start)
        if first < 0:
            stray = end_tag.strip() in text and start == CALL_START
            return Parsed(text.strip(), errors=(f"a {end_tag} without {start}",) if stray else ())
        content = text[:first].strip()
        calls: list[ToolCall] = []
        errors: list[str] = []
        position = first
        while position >= 0:
            end = text.find(end_tag, position + len(start))
            if end < 0 and end_tag.rstrip() != end_tag and text.endswith(end_tag.rstrip()):
                end = len(text) - len(end_tag.rstrip())  # the closing line ended the reply
            if end < 0:
                errors.append(f"a {start.strip()} without {end_tag.strip()}")
                break
            parsed = self._parse_body(text[position + len(start) : end], tools)
            if isinstance(parsed, str):
                errors.append(parsed)
            else:
                calls.append(ToolCall(parsed.name, parsed.arguments, f"{id_prefix}_{len(calls)}"))
            position = text.find(start, end + len(end_tag.rstrip()))
        return Parsed(content, tuple(calls), tuple(errors))

    def wrap_result(self, text: str) -> str:
        """A tool result as the model reads it when the chat template has no tool role."""
        return f"{RESPONSE_START}\n{text}\n{RESPONSE_END}"

    def describe(self, tools: Sequence[Tool]) -> str:
        """The tools and how to call them, for a system message."""
        specs = "\n".join(json.dumps(t.as_dict(), ensure_ascii=False) for t in tools)
        example = tools[0]
        args = {name: _EXAMPLE_VALUES.get(name, "...") for name in example.required}
        call = self.format_call(ToolCall(example.name, json.dumps(args)))
        result = self.wrap_result("...").replace("\n...\n", "")
        return (
            f"You can call {'this tool' if len(tools) == 1 else 'these tools'}:\n<tools>\n{specs}\n</tools>\n"
            f"To call a tool, reply with only the call, like this:\n{call}\n"
            f"Its result comes back in {result}. "
            "When you have the final answer, reply without a tool call."
        )


_EXAMPLE_VALUES = {"code": "print(2 + 3)"}


def _checked(name: Any, arguments: Any, tools: Sequence[Tool] | None) -> ToolCall | str:
    """A call to a known tool with its required arguments, or what is wrong with it
    (``tools=None``: any name, arguments only checked to be an object)."""
    if not isinstance(name, str) or not name:
        return 'the call has no tool "name"'
    if not isinstance(arguments, dict):
        return f'the "arguments" of {name} must be an object, got {type(arguments).__name__}'
    if tools is None:
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))
    known = {t.name: t for t in tools}
    if name not in known:
        return f"unknown tool {name!r}; the tools are: {', '.join(known)}"
    missing = [p for p in known[name].required if p not in arguments]
    if missing:
        return f"{name} needs the argument(s) {', '.join(missing)}"
    properties = known[name].parameters.get("properties", {})
    for key, value in arguments.items():
        if properties.get(key, {}).get("type") == "string" and not isinstance(value, str):
            return f"argument {key!r} of {name} must be a string"
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


class HermesFormat(ToolFormat):
    name = "hermes"

    def format_call(self, call: ToolCall) -> str:
        body = json.dumps({"name": call.name, "arguments": call.args}, ensure_ascii=False)
        return f"{CALL_START}\n{body}\n{CALL_END}"

    def _parse_body(self, body: str, tools: Sequence[Tool]) -> ToolCall | str:
        try:
            value = json.loads(body, strict=False)  # strict=False: raw newlines inside strings are fine
        except ValueError as e:
            return f"the call is not valid JSON ({e})"
        if not isinstance(value, dict):
            return 'the call must be a JSON object with "name" and "arguments"'
        return check_call(value.get("name"), value.get("arguments", {}), tools)  # arguments: object or its text


_FUNCTION = re.compile(r"^\s*<function=([^>\s]+)>(.*)</function>\s*$", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)


class Qwen3CoderFormat(ToolFormat):
    name = "qwen3_coder"

    def format_call(self, call: ToolCall) -> str:
        params = "".join(f"<parameter={k}>\n{_raw(v)}\n</parameter>\n" for k, v in call.args.items())
        return f"{CALL_START}\n<function={call.name}>\n{params}</function>\n{CALL_END}"

    def _parse_body(self, body: str, tools: Sequence[Tool]) -> ToolCall | str:
        match = _FUNCTION.match(body)
        if match is None:
            return "the call must be <function=NAME> ... </function> inside the tool_call tags"
        name, inner = match.group(1), match.group(2)
        if inner.count("<parameter=") != inner.count("</parameter>"):
            return "a <parameter=...> without </parameter>"
        schema: dict[str, Any] = next((t.parameters.get("properties", {}) for t in tools if t.name == name), {})
        arguments: dict[str, Any] = {}
        for key, raw in _PARAMETER.findall(inner):
            arguments[key] = raw if schema.get(key, {}).get("type", "string") == "string" else _json_or_raw(raw)
        return _checked(name, arguments, tools)


class CodeBlockFormat(ToolFormat):
    """```TOOL fenced blocks; for tools with one string argument (python's ``code``)."""

    name = "code_block"
    call_start, call_end = "```", "\n```\n"

    def format_call(self, call: ToolCall) -> str:
        body = next(iter(call.args.values()), "")
        return f"```{call.name}\n{_raw(body)}\n```"

    def _parse_body(self, body: str, tools: Sequence[Tool]) -> ToolCall | str:
        name, newline, code = body.partition("\n")
        name = name.strip()
        known = {t.name: t for t in tools}
        if not newline or name not in known:
            return f"a code block must start with ```{next(iter(known), 'python')} on its own line, got ```{name}"
        required = known[name].required
        if len(required) != 1:
            return f"{name} takes {len(required)} arguments: it cannot be called with a code block"
        return _checked(name, {required[0]: code}, tools)

    def wrap_result(self, text: str) -> str:
        return f"```output\n{text}\n```"

    def describe(self, tools: Sequence[Tool]) -> str:
        names = ", ".join(t.name for t in tools)
        return (
            f"To run {names} code, write it in a ```{tools[0].name} block, like this:\n"
            f"{self.format_call(ToolCall(tools[0].name, json.dumps({'code': 'print(2 + 3)'})))}\n"
            "Its output comes back in an ```output block. When you have the final answer, reply without a code block."
        )


def _raw(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _json_or_raw(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


FORMATS: dict[str, ToolFormat] = {
    "hermes": HermesFormat(),
    "qwen3_coder": Qwen3CoderFormat(),
    "code_block": CodeBlockFormat(),
}
PARSER_CHOICES = ("auto", *FORMATS)
"""Values of ``tool_parser=``: ``auto`` is the format the model's chat template writes, else hermes."""


def check_call(name: Any, arguments: Any, tools: Sequence[Tool] | None, call_id: str = "") -> ToolCall | str:
    """A call (from any source: a parsed reply, an API's ``tool_calls``) to one of ``tools``, or
    what is wrong with it. ``arguments``: a mapping, or its JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments, strict=False)
        except ValueError:
            return f"the arguments of {name} are not a JSON object"
    checked = _checked(name, arguments, tools)
    return checked if isinstance(checked, str) else ToolCall(checked.name, checked.arguments, call_id)


def format_for_template(template: str | None) -> str | None:
    """The format a chat template writes calls in: qwen3_coder (``<function=``), hermes
    (``<tool_call>``), or None (no tool support, or a syntax mathrl does not parse, such as
    Llama 3's or Mistral's: such models get the tools in the prompted form)."""
    if template and "<function=" in template:
        return "qwen3_coder"
    if template and "<tool_call>" in template:
        return "hermes"
    return None
