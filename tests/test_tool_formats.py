"""Tool-call formats: parsing what models write (well-formed or not) and writing calls back."""

from __future__ import annotations

import json

import pytest

from mathrl.tools.formats import FORMATS, HermesFormat, Qwen3CoderFormat, format_for_template
from mathrl.tools.python import PYTHON
from mathrl.types import ToolCall

TOOLS = (PYTHON,)
HERMES, CODER = HermesFormat(), Qwen3CoderFormat()
CODE = 'import sympy as sp\nx = sp.Symbol("x")\nprint(sp.solve(x**2 - 2, x), "\\\\n", \'\u00e9\')'


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_a_written_call_parses_back_to_the_same_call(fmt):
    call = ToolCall("python", json.dumps({"code": CODE}))
    parsed = fmt.parse(f"Let me compute.\n{fmt.format_call(call)}", TOOLS)
    assert parsed.content == "Let me compute."
    assert parsed.errors == ()
    assert [c.args for c in parsed.calls] == [{"code": CODE}]
    assert parsed.calls[0].id == "call_0"


def test_hermes_reads_json_and_tolerates_raw_newlines_and_string_arguments():
    text = '<tool_call>\n{"name": "python", "arguments": {"code": "a = 1\nprint(a)"}}\n</tool_call>'
    assert HERMES.parse(text, TOOLS).calls[0].args == {"code": "a = 1\nprint(a)"}
    stringly = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(2)\\"}"}</tool_call>'
    assert HERMES.parse(stringly, TOOLS).calls[0].args == {"code": "print(2)"}
    two = HERMES.parse(
        '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>\n'
        '<tool_call>{"name": "python", "arguments": {"code": "2"}}</tool_call>',
        TOOLS,
        id_prefix="call_3",
    )
    assert [(c.id, c.args["code"]) for c in two.calls] == [("call_3_0", "1"), ("call_3_1", "2")]


def test_qwen3_coder_reads_raw_code_without_escaping():
    text = (
        "<tool_call>\n<function=python>\n<parameter=code>\n"
        'print("a\\nb")\nfor i in range(2):\n    print(i)\n'
        "</parameter>\n</function>\n</tool_call>"
    )
    (call,) = CODER.parse(text, TOOLS).calls
    assert call.args == {"code": 'print("a\\nb")\nfor i in range(2):\n    print(i)'}


@pytest.mark.parametrize(
    ("fmt", "text", "error"),
    [
        (HERMES, "<tool_call>{'name': 'python'}</tool_call>", "not valid JSON"),
        (HERMES, '<tool_call>["python"]</tool_call>', "JSON object"),
        (HERMES, '<tool_call>{"arguments": {"code": "1"}}</tool_call>', 'no tool "name"'),
        (HERMES, '<tool_call>{"name": "bash", "arguments": {"code": "ls"}}</tool_call>', "unknown tool 'bash'"),
        (HERMES, '<tool_call>{"name": "python", "arguments": {}}</tool_call>', "needs the argument(s) code"),
        (HERMES, '<tool_call>{"name": "python", "arguments": {"code": 5}}</tool_call>', "must be a string"),
        (HERMES, '<tool_call>{"name": "python", "arguments": [1]}</tool_call>', "must be an object"),
        (HERMES, '<tool_call>{"name": "python", "arguments": "nope"}</tool_call>', "not a JSON object"),
        (HERMES, '<tool_call>{"name": "python", "arguments": {"code": "1"}}', "without </tool_call>"),
        (HERMES, "the answer </tool_call> is 4", "without <tool_call>"),
        (CODER, "<tool_call>\n<function=python>\n<parameter=code>\n1\n</tool_call>", "must be <function=NAME>"),
        (CODER, "<tool_call><function=python><parameter=code>1</function></tool_call>", "without </parameter>"),
        (CODER, "<tool_call><function=shell><parameter=cmd>ls</parameter></function></tool_call>", "unknown tool"),
        (CODER, "<tool_call><function=python></function></tool_call>", "needs the argument(s) code"),
        (CODER, "<tool_call>print(1)</tool_call>", "must be <function=NAME>"),
    ],
)
def test_a_malformed_call_is_an_error_text_never_an_exception(fmt, text, error):
    parsed = fmt.parse(text, TOOLS)
    assert parsed.calls == ()
    assert len(parsed.errors) == 1 and error in parsed.errors[0], parsed.errors


def test_a_good_call_next_to_a_bad_one_still_runs():
    parsed = HERMES.parse(
        '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call><tool_call>oops</tool_call>', TOOLS
    )
    assert len(parsed.calls) == 1 and len(parsed.errors) == 1


def test_no_call_means_the_whole_text_is_the_content():
    assert HERMES.parse("  The answer is \\boxed{4}.\n", TOOLS).content == "The answer is \\boxed{4}."


def test_the_description_shows_the_tool_and_a_call_in_the_chosen_format():
    hermes, coder = HERMES.describe(TOOLS), CODER.describe(TOOLS)
    assert '"name": "python"' in hermes and '{"name": "python", "arguments": {"code": "print(2 + 3)"}}' in hermes
    assert "<function=python>\n<parameter=code>\nprint(2 + 3)\n</parameter>" in coder
    for description, fmt in ((hermes, HERMES), (coder, CODER)):  # the example in it parses
        example = description[description.index("<tool_call>\n") : description.index("</tool_call>") + 12]
        assert fmt.parse(example, TOOLS).calls[0].args == {"code": "print(2 + 3)"}


def test_the_default_format_follows_the_template():
    assert format_for_template("... <function={{ name }}> ...") == "qwen3_coder"
    assert format_for_template("... <tool_call> ...") == "hermes"
    assert format_for_template("{{ '<|python_tag|>' + call | tojson }}") is None  # Llama 3: not parsed here
    assert format_for_template(None) is None
