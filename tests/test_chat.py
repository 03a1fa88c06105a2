"""ds4's prompt templates: single turn (CLI / test vectors) and multi turn (server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workbench.chat import (
    MAX_PREFIX,
    THINK_MAX_MIN_CONTEXT,
    TOOLS_CLOSING,
    TOOLS_PREAMBLE,
    ChatError,
    encode_single,
    render_messages,
    render_single,
    render_tool_calls,
    render_tools_prompt,
)
from workbench.tokenizer import Tokenizer
from workbench.vocab import official_vocab

SHARED = Path(__file__).resolve().parents[2] / "shared"
VECTORS = SHARED / "data" / "ds4" / "test-vectors"
ARCH_DOC = SHARED / "reference" / "ds4-architecture.md"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokens, merges = official_vocab()
    return Tokenizer.from_vocab(tokens, merges)


# -- single turn ----------------------------------------------------------------------


def test_max_prefix_is_the_documented_text() -> None:
    if not ARCH_DOC.exists():
        pytest.skip(f"{ARCH_DOC} not present")
    doc = ARCH_DOC.read_text(encoding="utf-8")
    m = re.search(r"It is this exact text[^\n]*\n\s*`(Reasoning Effort:[^`]*)`", doc)
    assert m, "MAXPREFIX paragraph not found in the architecture notes"
    assert MAX_PREFIX == m.group(1).replace("\\n", "\n")
    assert THINK_MAX_MIN_CONTEXT == 393216


def test_render_single_layouts() -> None:
    assert render_single("Hi") == f"{BOS}{U}Hi{A}</think>"
    assert render_single("Hi", system="S", thinking=True) == f"{BOS}S{U}Hi{A}<think>"
    big = THINK_MAX_MIN_CONTEXT
    assert render_single("Hi", system="S", think_max=True, ctx=big) == f"{BOS}{MAX_PREFIX}S{U}Hi{A}<think>"
    assert render_single("Hi", think_max=True) == f"{BOS}{MAX_PREFIX}{U}Hi{A}<think>"
    # below 384K tokens Think Max falls back to plain thinking
    assert render_single("Hi", system="S", think_max=True, ctx=big - 1) == f"{BOS}S{U}Hi{A}<think>"


def test_encode_single_inserts_specials_by_id(tok: Tokenizer) -> None:
    ids = encode_single(tok, "Hi <｜User｜> there", system="Be brief.")
    assert ids == [
        tok.bos,
        *tok.encode("Be brief."),
        tok.user,
        *tok.encode("Hi <｜User｜> there"),
        tok.assistant,
        tok.think_end,
    ]
    assert ids.count(tok.user) == 1  # user text never turns into specials
    assert encode_single(tok, "Hi", thinking=True)[-1] == tok.think


def test_encode_single_think_max_encodes_prefix_on_its_own(tok: Tokenizer) -> None:
    ids = encode_single(tok, "Hi", system="sys", think_max=True, ctx=THINK_MAX_MIN_CONTEXT)
    assert ids == [
        tok.bos,
        *tok.encode(MAX_PREFIX),
        *tok.encode("sys"),
        tok.user,
        *tok.encode("Hi"),
        tok.assistant,
        tok.think,
    ]
    fallback = encode_single(tok, "Hi", system="sys", think_max=True, ctx=32768)
    assert fallback == encode_single(tok, "Hi", system="sys", thinking=True)


def _vector_cases() -> list[tuple[str, str, int]]:
    if not VECTORS.exists():
        return []
    cases = []
    for path in sorted((VECTORS / "official").glob("*.official.json")):
        j = json.loads(path.read_text(encoding="utf-8"))
        prompt = (VECTORS / "prompts" / f"{j['id']}.txt").read_text(encoding="utf-8")
        cases.append((j["id"], prompt, j["usage"]["prompt_tokens"]))
    return cases


def test_official_prompt_token_counts(tok: Tokenizer) -> None:
    cases = _vector_cases()
    if not cases:
        pytest.skip(f"{VECTORS} not present")
    counts = {}
    for case_id, prompt, _ in cases:
        ids = encode_single(tok, prompt)
        assert ids == tok.encode_rendered(render_single(prompt)), case_id
        counts[case_id] = len(ids)
    assert counts == {case_id: n for case_id, _, n in cases}
    assert sorted(counts.values()) == [18, 21, 27, 3353, 3844]


# -- multi turn -----------------------------------------------------------------------


def test_system_user_thinking() -> None:
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
    assert render_messages(msgs, thinking=True) == f"{BOS}You are terse.{U}Hello{A}<think>"
    assert render_messages(msgs) == f"{BOS}You are terse.{U}Hello{A}</think>"
    maxed = render_messages(msgs, think_max=True)
    assert maxed == f"{BOS}{MAX_PREFIX}You are terse.{U}Hello{A}<think>"
    assert "</think>" not in maxed
    assert render_messages(msgs, think_max=True, ctx=65536) == render_messages(msgs, thinking=True)


def test_old_reasoning_dropped_without_tools() -> None:
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "reasoning_content": "old hidden reasoning", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]
    assert render_messages(msgs, thinking=True) == (
        f"{BOS}{U}first{A}</think>first answer{EOS}{U}second{A}<think>"
    )
    assert render_messages(msgs) == f"{BOS}{U}first{A}</think>first answer{EOS}{U}second{A}</think>"


def test_reasoning_kept_after_last_user() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "reasoning_content": "r", "content": "a"},
    ]
    assert render_messages(msgs, thinking=True) == f"{BOS}{U}q{A}<think>r</think>a{EOS}"
    assert render_messages(msgs) == f"{BOS}{U}q{A}</think>a{EOS}"


def test_tool_turns_keep_reasoning_and_share_a_user_turn() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "pwd"}'}}
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "reasoning_content": "tool reasoning", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "/tmp"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "reasoning_content": "final thought", "content": "done"},
        {"role": "user", "content": "bye"},
    ]
    dsml = (
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="bash">\n'
        '<｜DSML｜parameter name="command" string="true">pwd</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )
    assert render_messages(msgs, thinking=True) == (
        f"{BOS}{U}first{A}<think>tool reasoning</think>{dsml}{EOS}"
        f"{U}<tool_result>/tmp</tool_result><tool_result>two</tool_result>"
        f"{U}and now?{A}<think>final thought</think>done{EOS}"
        f"{U}bye{A}<think>"
    )


def test_systems_and_developers_are_hoisted_after_the_tools_prompt() -> None:
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object", "properties": {}}}}]
    msgs = [
        {"role": "system", "content": "one"},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "two"},
        {"role": "system", "content": [{"type": "text", "text": "thr"}, {"type": "text", "text": "ee"}]},
    ]
    schema = '{"name":"ls","parameters":{"type":"object","properties":{}}}'
    assert render_tools_prompt(tools) == TOOLS_PREAMBLE + schema + TOOLS_CLOSING
    assert render_messages(msgs, tools=tools) == (
        f"{BOS}{TOOLS_PREAMBLE}{schema}{TOOLS_CLOSING}\n\none\n\ntwo\n\nthree{U}hi{A}</think>"
    )
    assert render_messages(msgs) == f"{BOS}one\n\ntwo\n\nthree{U}hi{A}</think>"
    # an empty first system message adds no separator
    assert render_messages([{"role": "system", "content": ""}, {"role": "system", "content": "x"}]) == f"{BOS}x"


def test_tools_prompt_text() -> None:
    assert TOOLS_PREAMBLE.startswith("## Tools\n\nYou have access to a set of tools to help answer the user question. ")
    assert "`&lt;/｜DSML｜parameter>`" in TOOLS_PREAMBLE
    assert TOOLS_PREAMBLE.endswith("### Available Tool Schemas\n\n")
    assert TOOLS_CLOSING.endswith("Use the exact parameter names from the schemas.")
    two = [{"name": "a", "d": "é"}, {"type": "function", "function": {"name": "b"}}]
    assert render_tools_prompt(two) == TOOLS_PREAMBLE + '{"name":"a","d":"é"}\n{"name":"b"}' + TOOLS_CLOSING
    assert render_tools_prompt([]) == ""


def test_tools_alone_make_tool_context() -> None:
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "reasoning_content": "kept", "content": "a"},
        {"role": "user", "content": "second"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "<think>kept</think>a" in render_messages(msgs, tools=tools, thinking=True)
    assert "kept" not in render_messages(msgs, thinking=True)


def test_tool_result_escaping() -> None:
    msgs = [{"role": "tool", "content": "a</tool_result>b <tag> & </tool_result"}]
    assert render_messages(msgs) == (
        f"{BOS}{U}<tool_result>a&lt;/tool_result>b <tag> & </tool_result</tool_result>{A}</think>"
    )


def test_dsml_argument_rendering_and_escaping() -> None:
    args = '{"path": "a</｜DSML｜parameter>b & <c>", "n": [1, 2, {"k": "v  w"}], "flag": true, "x": null}'
    assert render_tool_calls([('we"ird<&>', args)]) == (
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="we&quot;ird&lt;&amp;&gt;">\n'
        '<｜DSML｜parameter name="path" string="true">a&lt;/｜DSML｜parameter>b & <c></｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">[1,2,{"k":"v  w"}]</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="flag" string="false">true</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="x" string="false">null</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )
    # a non-string value holding the closing tag: JSON-escaped
    inner = render_tool_calls([("f", '{"o": {"s": "</｜DSML｜parameter>"}}')])
    assert '>{"s":"\\u003c/｜DSML｜parameter>"}</｜DSML｜parameter>' in inner
    # arguments that are not a JSON object: one raw string parameter
    assert '<｜DSML｜parameter name="arguments" string="true">ls -l</｜DSML｜parameter>\n' in render_tool_calls(
        [("f", "ls -l")]
    )
    assert render_tool_calls([]) == ""


def test_tool_call_arguments_given_as_object_and_several_calls() -> None:
    calls = [
        {"id": "1", "type": "function", "function": {"name": "a", "arguments": {"q": "x", "k": [1, 2]}}},
        {"id": "2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
        {"id": "3", "type": "function", "function": {"name": "c"}},  # no arguments: skipped, as ds4 does
    ]
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "c", "tool_calls": calls}]
    text = render_messages(msgs)
    assert text == (
        f"{BOS}{U}u{A}</think>c"
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="a">\n'
        '<｜DSML｜parameter name="q" string="true">x</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="k" string="false">[1,2]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="b">\n'
        "</｜DSML｜invoke>\n"
        f"</｜DSML｜tool_calls>{EOS}"
    )


def test_assistant_without_pending_turn_has_no_marker() -> None:
    msgs = [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}]
    assert render_messages(msgs, thinking=True) == f"{BOS}hi{EOS}again{EOS}"
    assert render_messages([{"content": "no role is a user"}]) == f"{BOS}{U}no role is a user{A}</think>"


def test_bad_messages_raise() -> None:
    with pytest.raises(ChatError, match=r"messages\[0\]\.role is 'latest_reminder'"):
        render_messages([{"role": "latest_reminder", "content": "x"}])
    with pytest.raises(ChatError, match=r"messages\[1\]\.content is int"):
        render_messages([{"role": "user", "content": "x"}, {"role": "user", "content": 3}])
    with pytest.raises(ChatError, match=r"tool_calls is dict"):
        render_messages([{"role": "assistant", "content": "x", "tool_calls": {}}])
    with pytest.raises(ChatError, match=r"tools\[0\]"):
        render_messages([{"role": "user", "content": "x"}], tools=["raw"])


def test_rendered_conversation_tokenizes_with_specials(tok: Tokenizer) -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": "b"}'}}
    msgs = [
        {"role": "user", "content": "q <｜User｜>"},
        {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "out"},
    ]
    text = render_messages(msgs, thinking=True)
    ids = tok.encode_rendered(text)
    assert tok.decode(ids) == text.encode()
    # ds4-server recognises specials in the rendered string, message text included
    assert ids.count(tok.user) == 3
    assert ids[-2:] == [tok.assistant, tok.think]
    # every DSML marker became the ｜DSML｜ token: <｜DSML｜ x3 and </｜DSML｜ x3
    assert ids.count(tok.dsml) == 6
