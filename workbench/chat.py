"""ds4's prompt templates, byte for byte.

Two renderers, both from antirez/ds4:

* Single turn (``encode_chat_prompt``, the CLI ``-p`` path and the official test vectors)::

    ⟨BOS⟩ [MAX_PREFIX] [system] ⟨User⟩ prompt ⟨Assistant⟩ <think> | </think>

  :func:`encode_single` inserts the specials by id and BPE-encodes the prefix, the system
  text and the prompt separately with no special recognition, exactly as ds4 does.
* Multi turn (the server's ``render_chat_prompt_text``): OpenAI-style messages become one
  string, to be tokenized with :meth:`workbench.tokenizer.Tokenizer.encode_rendered`
  (which recognises ds4's seven specials, so literal specials in message text do turn
  into special tokens, as in ds4-server).

Think Max is a prompt prefix (:data:`MAX_PREFIX`) in front of ordinary thinking; ds4 only
uses it when the context holds at least :data:`THINK_MAX_MIN_CONTEXT` tokens and falls
back to plain thinking otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError
from workbench.tokenizer import (
    ASSISTANT_TEXT,
    BOS_TEXT,
    DSML_TEXT,
    EOS_TEXT,
    THINK_END_TEXT,
    THINK_TEXT,
    USER_TEXT,
    Tokenizer,
)

MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
"""ds4's ``DS4_REASONING_EFFORT_MAX_PREFIX`` (equal to DeepSeek's ``REASONING_EFFORT_MAX``)."""

THINK_MAX_MIN_CONTEXT = 393_216
"""Smallest context (tokens) at which ds4 honours Think Max (``DS4_THINK_MAX_MIN_CONTEXT``)."""

DEFAULT_CLI_SYSTEM = "You are a helpful assistant"
"""The system text ds4's CLI uses unless told otherwise (the test vectors use none)."""

TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"
DSML_PARAMETER_CLOSE = f"</{DSML_TEXT}parameter>"

TOOLS_PREAMBLE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user question. "
    f'You can invoke tools by writing a "<{DSML_TEXT}tool_calls>" block like the following:\n\n'
    f"<{DSML_TEXT}tool_calls>\n"
    f'<{DSML_TEXT}invoke name="$TOOL_NAME">\n'
    f'<{DSML_TEXT}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{DSML_PARAMETER_CLOSE}\n'
    "...\n"
    f"</{DSML_TEXT}invoke>\n"
    f'<{DSML_TEXT}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"</{DSML_TEXT}invoke>\n"
    f"</{DSML_TEXT}tool_calls>\n\n"
    'String parameters should be specified as raw text and set `string="true"`. '
    "Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string "
    "characters with XML or HTML entity escapes. "
    f"Only if a string value itself contains the exact closing parameter tag `{DSML_PARAMETER_CLOSE}`, "
    f"write that tag as `&lt;{DSML_PARAMETER_CLOSE[1:]}` inside the value. "
    "For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and "
    'set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
"""ds4-server's tools prompt (``append_tools_prompt_text``) up to the schema lines."""

TOOLS_CLOSING = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls. Use the exact parameter names from the schemas."
)
"""What follows the schema lines (no trailing newline)."""


class ChatError(WorkbenchError):
    """A message list or tool list that cannot be rendered."""


def think_max_applies(think_max: bool, ctx: int | None) -> bool:
    """Whether Think Max is used: asked for, and ``ctx`` (tokens) unknown or large enough."""
    return think_max and (ctx is None or ctx >= THINK_MAX_MIN_CONTEXT)


# -- single turn ----------------------------------------------------------------------


def render_single(
    prompt: str,
    system: str = "",
    thinking: bool = False,
    think_max: bool = False,
    ctx: int | None = None,
) -> str:
    """``⟨BOS⟩[MAX_PREFIX][system]⟨User⟩prompt⟨Assistant⟩`` then ``<think>`` or ``</think>``.

    ``think_max`` implies thinking; with ``ctx`` below :data:`THINK_MAX_MIN_CONTEXT` it falls
    back to plain thinking (``ctx=None``: no context limit to check).
    """
    use_max = think_max_applies(think_max, ctx)
    think = thinking or think_max
    return "".join(
        (
            BOS_TEXT,
            MAX_PREFIX if use_max else "",
            system,
            USER_TEXT,
            prompt,
            ASSISTANT_TEXT,
            THINK_TEXT if think else THINK_END_TEXT,
        )
    )


def encode_single(
    tok: Tokenizer,
    prompt: str,
    system: str = "",
    thinking: bool = False,
    think_max: bool = False,
    ctx: int | None = None,
) -> list[int]:
    """Ids of :func:`render_single` built as ds4's ``encode_chat_prompt`` does.

    Specials are inserted by id; the Think Max prefix, the system text and the prompt are
    each BPE-encoded on their own, with no special-token recognition.
    """
    ids = [tok.bos]
    if think_max_applies(think_max, ctx):
        ids += tok.encode(MAX_PREFIX)
    if system:
        ids += tok.encode(system)
    ids.append(tok.user)
    ids += tok.encode(prompt)
    ids.append(tok.assistant)
    ids.append(tok.think if thinking or think_max else tok.think_end)
    return ids


# -- multi turn (ds4-server) ----------------------------------------------------------

_SYSTEM_ROLES = ("system", "developer")
_TOOL_ROLES = ("tool", "function")
_ROLES = (*_SYSTEM_ROLES, "user", "assistant", *_TOOL_ROLES)


def _content_text(value: Any, where: str) -> str:
    """A message's ``content``/``reasoning_content`` as ds4 reads it.

    None gives ""; a list of parts gives its strings and its parts' ``text`` strings
    concatenated (other parts, such as images, are skipped).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for k, part in enumerate(value):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise ChatError(f"{where}[{k}].text is {type(text).__name__}, not a string")
                out.append(text)
            else:
                raise ChatError(f"{where}[{k}] is {type(part).__name__}, not a string or a content part")
        return "".join(out)
    raise ChatError(f"{where} is {type(value).__name__}, not a string, a list of parts or null")


@dataclass(frozen=True)
class _Argument:
    """One tool-call argument: a decoded string, or the minified JSON text of a non-string."""

    name: str
    value: str
    is_string: bool


_DECODER = json.JSONDecoder(strict=False)
_JSON_WS = " \t\n\r"
_C_SPACE = " \t\n\v\f\r"  # C isspace(), which ds4's minifier uses


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _JSON_WS:
        i += 1
    return i


def _minify_json(raw: str) -> str:
    """Drop whitespace outside strings, keeping string literals (and their escapes) as written."""
    out = []
    in_string = escape = False
    for c in raw:
        if in_string:
            out.append(c)
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif c not in _C_SPACE:
            out.append(c)
    return "".join(out)


def _parse_arguments(text: str) -> list[_Argument] | None:
    """The members of a JSON object text in order, or None when it is not an object.

    Like ds4's ``json_args_parse``: duplicate keys are all kept, commas are optional and
    anything after the closing brace is ignored.
    """
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        return None
    i = _skip_ws(text, i + 1)
    args: list[_Argument] = []
    try:
        while i < len(text) and text[i] != "}":
            if text[i] != '"':
                return None
            key, i = _DECODER.raw_decode(text, i)
            i = _skip_ws(text, i)
            if i >= len(text) or text[i] != ":":
                return None
            i = _skip_ws(text, i + 1)
            start = i
            value, i = _DECODER.raw_decode(text, i)
            if isinstance(value, str):
                args.append(_Argument(key, value, True))
            else:
                args.append(_Argument(key, _minify_json(text[start:i]), False))
            i = _skip_ws(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
    except json.JSONDecodeError:
        return None
    return args if i < len(text) else None


def _escape_attribute(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _dsml_argument(arg: _Argument) -> str:
    if arg.is_string:
        value = arg.value.replace(DSML_PARAMETER_CLOSE, "&lt;" + DSML_PARAMETER_CLOSE[1:])
    else:
        value = arg.value.replace(DSML_PARAMETER_CLOSE, "\\u003c" + DSML_PARAMETER_CLOSE[1:])
    return (
        f'<{DSML_TEXT}parameter name="{_escape_attribute(arg.name)}" '
        f'string="{"true" if arg.is_string else "false"}">{value}{DSML_PARAMETER_CLOSE}\n'
    )


def _tool_calls(value: Any, where: str) -> list[tuple[str, str]]:
    """(name, arguments JSON text) of each OpenAI tool call; calls lacking either are skipped."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ChatError(f"{where} is {type(value).__name__}, not a list")
    calls = []
    for k, call in enumerate(value):
        if not isinstance(call, Mapping):
            raise ChatError(f"{where}[{k}] is {type(call).__name__}, not an object")
        function = call.get("function")
        if function is None:
            continue
        if not isinstance(function, Mapping):
            raise ChatError(f"{where}[{k}].function is {type(function).__name__}, not an object")
        name, arguments = function.get("name"), function.get("arguments")
        if name is None or arguments is None:
            continue
        if not isinstance(name, str):
            raise ChatError(f"{where}[{k}].function.name is {type(name).__name__}, not a string")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        calls.append((name, arguments))
    return calls


def render_tool_calls(calls: Sequence[tuple[str, str]]) -> str:
    """The DSML block ds4 appends to an assistant turn for its tool calls ("" for none).

    Each call is (name, arguments as JSON text). Arguments keep their order; string values
    are written raw (only an embedded ``</｜DSML｜parameter>`` is escaped), others as
    minified JSON. Arguments that are not a JSON object become one string parameter
    named ``arguments`` holding the raw text.
    """
    if not calls:
        return ""
    out = [f"\n\n<{DSML_TEXT}tool_calls>\n"]
    for name, arguments in calls:
        out.append(f'<{DSML_TEXT}invoke name="{_escape_attribute(name)}">\n')
        args = _parse_arguments(arguments)
        if args is None:
            args = [_Argument("arguments", arguments, True)]
        out.extend(_dsml_argument(a) for a in args)
        out.append(f"</{DSML_TEXT}invoke>\n")
    out.append(f"</{DSML_TEXT}tool_calls>")
    return "".join(out)


def render_tool_result(content: str) -> str:
    """``<tool_result>content</tool_result>``; an embedded ``</tool_result>`` gets ``&lt;``."""
    escaped = content.replace(TOOL_RESULT_CLOSE, "&lt;" + TOOL_RESULT_CLOSE[1:])
    return f"{TOOL_RESULT_OPEN}{escaped}{TOOL_RESULT_CLOSE}"


def render_tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """ds4-server's tools section: preamble, one schema per line, closing sentence.

    OpenAI tools (``{"type": "function", "function": {...}}``) contribute their
    ``function`` object; other objects (Anthropic-style schemas) are used whole. ds4 copies
    the client's raw JSON text; here each schema is serialised compactly
    (``separators=(",", ":")``, non-ASCII kept), as JSON HTTP clients send it.
    Returns "" for no tools.
    """
    schemas = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatError(f"tools[{k}] is {type(tool).__name__}, not an object")
        schema = tool.get("function", tool)
        schemas.append(json.dumps(schema, ensure_ascii=False, separators=(",", ":")))
    if not schemas:
        return ""
    return TOOLS_PREAMBLE + "\n".join(schemas) + TOOLS_CLOSING


def render_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    think_max: bool = False,
    ctx: int | None = None,
) -> str:
    """One prompt string for an OpenAI-style conversation, as ds4-server renders it.

    Layout: ``⟨BOS⟩ [MAX_PREFIX] [tools prompt] [system/developer contents]`` (the tools
    prompt and every system/developer message, wherever it sits, joined by "\\n\\n"), then
    each message in order:

    * user: ``⟨User⟩content``;
    * tool / function: ``<tool_result>content</tool_result>``, preceded by ``⟨User⟩`` unless
      the previous message was a tool result too (consecutive results share one turn);
    * assistant: ``⟨Assistant⟩`` (only if it answers a user or tool turn) then, when
      thinking, ``<think>reasoning</think>`` if there is tool context or it follows the
      last user/tool message, else ``</think>`` (older reasoning is dropped); without
      thinking ``</think>``; then content, DSML tool calls and ``⟨EOS⟩``.

    A conversation ending in a user or tool turn ends ``⟨Assistant⟩<think>`` (thinking) or
    ``⟨Assistant⟩</think>``. Tool context means tools were given, or any assistant message
    has tool calls, or any tool message exists. ``think_max`` implies thinking; it adds
    :data:`MAX_PREFIX` unless ``ctx`` is below :data:`THINK_MAX_MIN_CONTEXT`.

    Raises:
        ChatError: a message that is not an object, an unknown role, or content, reasoning
            or tool calls of the wrong type.
    """
    think = thinking or think_max
    parsed = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"messages[{k}] is {type(m).__name__}, not an object")
        role = m.get("role", "user")
        if role not in _ROLES:
            raise ChatError(f"messages[{k}].role is {role!r}; expected one of {', '.join(_ROLES)}")
        content = _content_text(m.get("content"), f"messages[{k}].content")
        reasoning = _content_text(m.get("reasoning_content"), f"messages[{k}].reasoning_content")
        calls = _tool_calls(m.get("tool_calls"), f"messages[{k}].tool_calls")
        parsed.append((role, content, reasoning, calls))

    tools_prompt = render_tools_prompt(tools or ())
    tool_context = bool(tools_prompt) or any(
        (role == "assistant" and calls) or role in _TOOL_ROLES for role, _, _, calls in parsed
    )
    user_like = ("user", *_TOOL_ROLES)
    last_user = max((k for k, (role, *_) in enumerate(parsed) if role in user_like), default=-1)

    system = tools_prompt
    for role, content, _, _ in parsed:
        if role in _SYSTEM_ROLES:
            system += ("\n\n" if system else "") + content

    out = [BOS_TEXT]
    if think_max_applies(think_max, ctx):
        out.append(MAX_PREFIX)
    out.append(system)
    pending_assistant = pending_tool_result = False
    for k, (role, content, reasoning, calls) in enumerate(parsed):
        if role in _SYSTEM_ROLES:
            continue
        if role == "user":
            out += (USER_TEXT, content)
            pending_assistant, pending_tool_result = True, False
        elif role in _TOOL_ROLES:
            if not pending_tool_result:
                out.append(USER_TEXT)
            out.append(render_tool_result(content))
            pending_assistant = pending_tool_result = True
        else:
            if pending_assistant:
                out.append(ASSISTANT_TEXT)
                if think and (tool_context or k > last_user):
                    out += (THINK_TEXT, reasoning, THINK_END_TEXT)
                else:
                    out.append(THINK_END_TEXT)
            out += (content, render_tool_calls(calls), EOS_TEXT)
            pending_assistant = pending_tool_result = False
    if pending_assistant:
        out += (ASSISTANT_TEXT, THINK_TEXT if think else THINK_END_TEXT)
    return "".join(out)
