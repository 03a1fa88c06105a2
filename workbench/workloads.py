"""Deterministic generators of realistic request streams for studying the KV cache.

A workload is a set of conversations plus a schedule saying whose turn comes next. It
is driven by a ``complete(request) -> reply_text`` callable (an engine, or a stub in
tests); each reply becomes that conversation's assistant turn, exactly as a chat client
replays the model's own output, so the next request extends the previous one and a live
or disk prefix hit is possible.

* :func:`agent_session` — a coding agent: system prompt, tool schemas, then turns in which
  the assistant calls a tool and the tool result is a real source file (from the Python
  standard library). Like real agent clients, it sends a small unrelated side request
  now and then (a conversation title): that replaces the live state, so the next agent
  turn is served from the disk checkpoint the switch saved.
* :func:`multi_user` — several unrelated agent sessions interleaved, so each switch
  replaces the live state (an *evict* save) and coming back is a *disk* hit.
* :func:`long_document` — a long text read in growing chunks (``promessi_sposi.txt`` when
  the ds4 benchmark text is available, else standard-library sources), one question per
  chunk.
* :func:`coding_agent` — what real agent clients do that the others lack: file reads *and
  edits* as tool results, parallel sessions sharing one system prompt and tool set, a
  context compaction (the transcript rewritten as a summary, which breaks the prefix), and
  a system prompt that changes mid-way (e.g. a new date line).

Sizes are in characters of source text; token counts follow from the tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

TOOLS: list[dict] = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a source file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "grep", "description": "Search the repository for a regular expression.",
        "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}, "path": {"type": "string"}},
                       "required": ["pattern"]}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run the test-suite, optionally a single test file.",
        "parameters": {"type": "object", "properties": {"target": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "edit_file", "description": "Replace a unique snippet of a file with new text.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
            "required": ["path", "old", "new"]}}},
]

AGENT_SYSTEM = (
    "You are a careful senior software engineer working inside a repository through tools. "
    "Read code before changing it, keep changes small and explain your reasoning briefly. "
    "When a tool result is long, summarise only what matters for the task.\n"
    "House rules: type hints everywhere; docstrings with shapes and units; tests pin behaviour; "
    "never delete user data; report measured numbers with the command that produced them."
)

TASKS = [
    "Find where this module handles errors and explain the failure modes.",
    "Summarise the public API of this module and point out anything surprising.",
    "Is there dead code here? List candidates with line references.",
    "How would you add type hints to the main entry points? Sketch the signatures.",
    "Which functions here would you test first, and with what inputs?",
]


@dataclass
class Request:
    """One request of a workload: a chat transcript to complete."""

    conversation: str  # conversation id, e.g. "agent-0"
    turn: int  # 0-based turn within the conversation
    messages: list[dict]
    tools: list[dict] | None
    max_tokens: int


@dataclass
class Conversation:
    """A scripted conversation; the assistant's text comes from the model's replies."""

    name: str
    system: str
    tools: list[dict] | None
    user_turns: list[tuple[str, list[tuple]]]  # (user text, [(path, result) or (tool, path, result)])
    max_tokens: int = 16
    stateless: bool = False  # every request starts a fresh transcript (side requests)
    compact_at: dict[int, str] = field(default_factory=dict)  # turn -> summary replacing the transcript
    system_at: dict[int, str] = field(default_factory=dict)  # turn -> new system prompt from then on
    messages: list[dict] = field(default_factory=list)
    turn: int = 0

    def done(self) -> bool:
        return self.turn >= len(self.user_turns)

    def next_request(self) -> Request:
        """Append the next user turn (and its tool exchange) and return the request."""
        if self.turn in self.system_at:
            self.system = self.system_at[self.turn]
            if self.messages and self.messages[0]["role"] == "system":
                self.messages[0] = {"role": "system", "content": self.system}
        if self.stateless or self.turn in self.compact_at:
            self.messages = []
        if not self.messages and self.system:
            self.messages.append({"role": "system", "content": self.system})
        if self.turn in self.compact_at:
            self.messages += [{"role": "user", "content": self.compact_at[self.turn]},
                              {"role": "assistant", "content": "Understood, continuing from the summary."}]
        text, tool_results = self.user_turns[self.turn]
        self.messages.append({"role": "user", "content": text})
        for i, exchange in enumerate(tool_results):
            tool, path, result = exchange if len(exchange) == 3 else ("read_file", *exchange)
            call_id = f"call_{self.name}_{self.turn}_{i}"
            arguments = {"path": path} if tool == "read_file" else {"path": path, "old": "...", "new": "..."}
            self.messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": tool, "arguments": json.dumps(arguments)}}]})
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        return Request(self.name, self.turn, [dict(m) for m in self.messages], self.tools, self.max_tokens)

    def record_reply(self, text: str) -> None:
        """The model's answer becomes the assistant turn that the next request replays."""
        self.messages.append({"role": "assistant", "content": text})
        self.turn += 1


@dataclass
class Workload:
    """Conversations and the order in which they speak (indices into ``conversations``)."""

    name: str
    conversations: list[Conversation]
    schedule: list[int]

    def __len__(self) -> int:
        return len(self.schedule)

    def run(self, complete: Callable[[Request], str]) -> Iterator[tuple[Request, str]]:
        """Drive the workload: yields (request, reply) as each request completes."""
        for index in self.schedule:
            conv = self.conversations[index]
            if conv.done():
                continue
            request = conv.next_request()
            reply = complete(request)
            conv.record_reply(reply)
            yield request, reply


def stdlib_sources(seed: int, count: int, max_chars: int) -> list[tuple[str, str]]:
    """``count`` (path, text) pairs from the standard library, deterministic per seed.

    Files are the top-level ``*.py`` modules of this interpreter's standard library, sorted
    by name and shuffled with ``seed``; each text is cut to ``max_chars`` at a line end.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in root.glob("*.py") if p.stat().st_size > 2000)
    random.Random(seed).shuffle(names)
    out = []
    for name in names[:count]:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        if len(text) > max_chars:
            text = text[: text.rfind("\n", 0, max_chars) + 1]
        out.append((f"Lib/{name}", text))
    return out


TITLE_SYSTEM = "Summarize the conversation topic as a title of at most five words. Reply with the title only."


def agent_session(seed: int = 0, turns: int = 4, file_chars: int = 3000, max_tokens: int = 16,
                  name: str = "agent-0", system: str = AGENT_SYSTEM, side_every: int = 2) -> Workload:
    """A coding-agent session: every turn reads one standard-library file with a tool.

    After every ``side_every`` agent turns (0: never) the client sends a side request for a
    conversation title, with its own system prompt (conversation ``<name>/title``).
    """
    main = _agent_conversation(seed, turns, file_chars, max_tokens, name, system)
    schedule: list[int] = []
    titles = []
    for t in range(turns):
        schedule.append(0)
        if side_every and (t + 1) % side_every == 0 and t + 1 < turns:
            schedule.append(1)
            titles.append((f"Conversation so far: {main.user_turns[t][0]}", []))
    side = Conversation(f"{name}/title", TITLE_SYSTEM, None, titles, max_tokens=8, stateless=True)
    return Workload("agent", [main, side], schedule)


def _agent_conversation(seed: int, turns: int, file_chars: int, max_tokens: int, name: str,
                        system: str) -> Conversation:
    rng = random.Random(seed)
    files = stdlib_sources(seed, turns, file_chars)
    user_turns = []
    for path, text in files:
        task = rng.choice(TASKS)
        user_turns.append((f"Open {path}. {task}", [(path, text)]))
    return Conversation(name, system, TOOLS, user_turns, max_tokens)


def multi_user(seed: int = 0, users: int = 3, turns: int = 3, file_chars: int = 2000,
               max_tokens: int = 8) -> Workload:
    """``users`` unrelated agent sessions, interleaved round-robin, then revisited.

    Each user has its own system prompt, so a switch is a live miss (evict save of the
    previous user's state) and a return to a user is a disk hit on its evicted state.
    """
    convs = [
        _agent_conversation(seed * 100 + u, turns, file_chars, max_tokens, f"user-{u}",
                            f"{AGENT_SYSTEM}\nYou are assisting user #{u}; their project codename is "
                            f"{random.Random(seed * 100 + u).choice(['kestrel', 'moraine', 'quill', 'tundra', 'zephyr'])}-{u}.")
        for u in range(users)
    ]
    schedule = [u for _ in range(turns) for u in range(users)]
    return Workload("multi-user", convs, schedule)


def long_document(seed: int = 0, chunks: int = 4, chunk_chars: int = 6000, max_tokens: int = 8,
                  text: str | None = None) -> Workload:
    """Read a long document in growing pieces, one question per piece.

    ``text`` defaults to ds4's benchmark novel (``promessi_sposi.txt``) when it is found
    beside the repository (``../shared/data/ds4/speed-bench/``) or via the environment
    variable ``DS4_BENCH_TEXT``, and otherwise to concatenated standard-library sources.
    """
    if text is None:
        text = _default_document(seed, chunks * chunk_chars)
    questions = ["Who are the characters introduced so far?", "Summarise this passage in two sentences.",
                 "What is the setting of this part?", "What happens next, in your opinion?"]
    rng = random.Random(seed)
    turns = []
    for i in range(chunks):
        piece = text[i * chunk_chars:(i + 1) * chunk_chars]
        turns.append((f"Part {i + 1}:\n{piece}\n\n{rng.choice(questions)}", []))
    conv = Conversation("document", "You are a literary assistant. Answer in Italian.", None, turns, max_tokens)
    return Workload("long-document", [conv], [0] * chunks)


def _default_document(seed: int, n_chars: int) -> str:
    candidates = [os.environ.get("DS4_BENCH_TEXT", "")]
    here = Path(__file__).resolve()
    candidates += [str(p / "shared/data/ds4/speed-bench/promessi_sposi.txt") for p in here.parents[1:3]]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c).read_text(encoding="utf-8")[: n_chars]
    return "".join(t for _, t in stdlib_sources(seed, 50, n_chars))[:n_chars]


def _edit_result(path: str, text: str, rng: random.Random) -> str:
    """A plausible edit_file tool result: a unified-diff hunk of one changed line."""
    lines = [ln for ln in text.splitlines() if ln.strip()] or ["pass"]
    old = rng.choice(lines)
    return (f"Applied edit to {path}.\n--- a/{path}\n+++ b/{path}\n@@ @@\n-{old}\n"
            f"+{old.rstrip()}  # reviewed\n")


def coding_agent(seed: int = 0, sessions: int = 2, turns: int = 4, file_chars: int = 1500,
                 max_tokens: int = 8) -> Workload:
    """``sessions`` parallel coding-agent sessions (same system prompt and tools), interleaved.

    Each turn reads a file and, every other turn, edits it (the tool result is the diff).
    Session 0 compacts its context at the turn after the middle (its transcript becomes
    [system, summary]); from the last round on, every session's system prompt starts with a
    new date line, so all prefixes break at the start of the system prompt (after the tools).
    """
    rng = random.Random(seed)
    later = "Current date: 2026-08-06. The repository moved to a new branch.\n" + AGENT_SYSTEM
    convs = []
    for k in range(sessions):
        files = stdlib_sources(seed * 10 + k, turns, file_chars)
        user_turns = []
        for t, (path, text) in enumerate(files):
            exchanges: list[tuple] = [("read_file", path, text)]
            if t % 2 == 1:
                exchanges.append(("edit_file", path, _edit_result(path, text, rng)))
            user_turns.append((f"Open {path}. {rng.choice(TASKS)}", exchanges))
        conv = Conversation(f"coder-{k}", AGENT_SYSTEM, TOOLS, user_turns, max_tokens)
        if turns > 1:
            conv.system_at[turns - 1] = later
        if k == 0 and turns > 2:
            done = ", ".join(p for p, _ in files[: turns // 2 + 1])
            conv.compact_at[turns // 2 + 1 if turns // 2 + 1 < turns - 1 else turns // 2] = (
                f"Summary of the work so far: read and reviewed {done}; no tests run yet.")
        convs.append(conv)
    schedule = [k for _ in range(turns) for k in range(sessions)]
    return Workload("coding-agent", convs, schedule)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "agent": agent_session,
    "multi-user": multi_user,
    "long-document": long_document,
    "coding-agent": coding_agent,
}
