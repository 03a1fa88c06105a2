"""Workloads are deterministic and replay the model's replies like a chat client."""

from workbench import workloads as wl


def _drive(workload):
    replies = iter(f"reply {i}" for i in range(100))
    return list(workload.run(lambda req: next(replies)))


def test_agent_session_is_deterministic_and_extends_each_request():
    a, b = _drive(wl.agent_session(seed=3, turns=3, side_every=0)), _drive(wl.agent_session(seed=3, turns=3, side_every=0))
    assert [r.messages for r, _ in a] == [r.messages for r, _ in b]
    assert len(a) == 3
    for (prev, reply), (nxt, _) in zip(a, a[1:]):
        # the next transcript starts with the previous one plus the model's reply
        assert nxt.messages[: len(prev.messages)] == prev.messages
        assert nxt.messages[len(prev.messages)] == {"role": "assistant", "content": reply}
    first = a[0][0]
    assert first.tools and first.messages[0]["role"] == "system"
    assert first.messages[-1]["role"] == "tool" and len(first.messages[-1]["content"]) > 500


def test_agent_seeds_differ():
    a = _drive(wl.agent_session(seed=1, turns=2))
    b = _drive(wl.agent_session(seed=2, turns=2))
    assert [r.messages for r, _ in a] != [r.messages for r, _ in b]


def test_multi_user_interleaves_unrelated_sessions():
    reqs = [r for r, _ in _drive(wl.multi_user(seed=0, users=3, turns=2))]
    assert [r.conversation for r in reqs] == ["user-0", "user-1", "user-2"] * 2
    systems = {r.messages[0]["content"] for r in reqs}
    assert len(systems) == 3  # different prefixes: switching users is a live miss
    assert reqs[3].messages[: len(reqs[0].messages)] == reqs[0].messages


def test_long_document_grows_with_given_text():
    text = "".join(f"riga {i}\n" for i in range(5000))
    reqs = [r for r, _ in _drive(wl.long_document(chunks=3, chunk_chars=1000, text=text))]
    assert len(reqs) == 3
    assert text[:1000] in reqs[0].messages[1]["content"]
    assert text[2000:3000] in reqs[2].messages[-1]["content"]
    assert reqs[2].messages[: len(reqs[1].messages)] == reqs[1].messages


def test_agent_side_requests_are_fresh_and_interleaved():
    reqs = [r for r, _ in _drive(wl.agent_session(seed=0, turns=4, side_every=2))]
    assert [r.conversation for r in reqs] == ["agent-0", "agent-0", "agent-0/title", "agent-0", "agent-0"]
    side = reqs[2]
    assert side.messages[0]["content"] == wl.TITLE_SYSTEM and len(side.messages) == 2 and side.tools is None
    # the agent's transcript is untouched by the side request
    assert reqs[3].messages[: len(reqs[1].messages)] == reqs[1].messages
