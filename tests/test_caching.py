"""Where add_cache_breakpoints puts cache_control, and what it must never do to the input."""

from __future__ import annotations

import copy
from typing import Any

import pytest

import batching_harness as bh

ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}
FIVE_MIN = {"type": "ephemeral", "ttl": "5m"}


def marks(params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every place that carries cache_control, as (where..., ttl), in prompt order."""
    found: list[tuple[Any, ...]] = []
    if "cache_control" in params:
        found.append(("request", params["cache_control"].get("ttl")))
    for i, tool in enumerate(params.get("tools") or []):
        if "cache_control" in tool:
            found.append(("tools", i, tool["cache_control"]["ttl"]))
    system = params.get("system")
    for i, block in enumerate(system if isinstance(system, list) else []):
        if "cache_control" in block:
            found.append(("system", i, block["cache_control"]["ttl"]))
    for m, message in enumerate(params.get("messages") or []):
        content = message["content"]
        for b, block in enumerate(content if isinstance(content, list) else []):
            if "cache_control" in block:
                found.append(("messages", m, b, block["cache_control"].get("ttl")))
            inner = block.get("content")
            for k, sub in enumerate(inner if isinstance(inner, list) else []):
                if "cache_control" in sub:
                    found.append(("messages", m, b, "content", k, sub["cache_control"].get("ttl")))
    return found


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def tool_use(tool_id: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": "bash", "input": {"command": "ls"}}


def tool_result(tool_id: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}


def transcript() -> dict[str, Any]:
    """Tools, a two-block system prompt and a five-message tool-using transcript."""
    return {
        "model": "claude-opus-5-5",
        "max_tokens": 1_000,
        "tools": [
            {"type": "bash_20250124", "name": "bash"},
            {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
            {"name": "lookup", "input_schema": {"type": "object", "properties": {}}},
        ],
        "system": [text("You are a coding agent."), text("Work in /repo.")],
        "messages": [
            {"role": "user", "content": "fix the bug"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    text("Looking."),
                    tool_use("t1"),
                ],
            },
            {"role": "user", "content": [tool_result("t1")]},
            {"role": "assistant", "content": [text("Again."), tool_use("t2")]},
            {"role": "user", "content": [tool_result("t2"), text("also check tests")]},
        ],
    }


# ---------------------------------------------------------------- placement


def test_breakpoints_on_last_tool_last_system_previous_end_and_last_message():
    out = bh.add_cache_breakpoints(transcript(), "1h", previous_end=2)
    assert marks(out) == [
        ("tools", 2, "1h"),
        ("system", 1, "1h"),
        ("messages", 2, 0, "1h"),
        ("messages", 4, 1, "1h"),
    ]
    assert out["messages"][4]["content"][1]["cache_control"] == ONE_HOUR


def test_without_previous_end_three_breakpoints():
    out = bh.add_cache_breakpoints(transcript(), "1h")
    assert marks(out) == [("tools", 2, "1h"), ("system", 1, "1h"), ("messages", 4, 1, "1h")]


def test_previous_end_equal_to_last_message_is_one_breakpoint_not_two():
    out = bh.add_cache_breakpoints(transcript(), "1h", previous_end=4)
    assert marks(out) == [("tools", 2, "1h"), ("system", 1, "1h"), ("messages", 4, 1, "1h")]


@pytest.mark.parametrize("previous_end", [5, 99, -1])
def test_previous_end_outside_the_transcript_is_skipped(previous_end):
    out = bh.add_cache_breakpoints(transcript(), "1h", previous_end=previous_end)
    assert len(marks(out)) == 3


def test_previous_end_walks_back_past_thinking():
    params = transcript()
    params["messages"][1]["content"] = [
        text("Looking."),
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "redacted_thinking", "data": "xyz"},
    ]
    out = bh.add_cache_breakpoints(params, "1h", previous_end=1)
    assert ("messages", 1, 0, "1h") in marks(out)


def test_string_system_and_string_content_become_text_blocks():
    params = {
        "system": "You are a coding agent.",
        "messages": [{"role": "user", "content": "fix the bug"}],
    }
    out = bh.add_cache_breakpoints(params, "1h")
    assert out["system"] == [
        {"type": "text", "text": "You are a coding agent.", "cache_control": ONE_HOUR}
    ]
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "fix the bug", "cache_control": ONE_HOUR}
    ]


def test_fewer_places_fewer_breakpoints():
    params = {"messages": [{"role": "user", "content": "hi"}]}
    assert marks(bh.add_cache_breakpoints(params, "1h")) == [("messages", 0, 0, "1h")]
    assert bh.add_cache_breakpoints({}, "1h") == {}
    assert bh.add_cache_breakpoints({"tools": [], "messages": []}, "1h") == {
        "tools": [],
        "messages": [],
    }


def test_never_more_than_four_even_when_the_input_already_carries_many():
    """Breakpoints replayed from earlier turns would pile up past the API limit of 4 (a 400)."""
    params = transcript()
    for tool in params["tools"]:
        tool["cache_control"] = dict(FIVE_MIN)
    for message in params["messages"][1:]:
        for block in message["content"]:
            if block.get("type") != "thinking":
                block["cache_control"] = dict(ONE_HOUR)
    params["cache_control"] = {"type": "ephemeral"}
    out = bh.add_cache_breakpoints(params, "1h", previous_end=2)
    assert len(marks(out)) == 4
    assert marks(out) == [
        ("tools", 2, "1h"),
        ("system", 1, "1h"),
        ("messages", 2, 0, "1h"),
        ("messages", 4, 1, "1h"),
    ]


def test_one_ttl_everywhere_so_no_5m_entry_precedes_a_1h_one():
    params = transcript()
    params["tools"][0]["cache_control"] = dict(FIVE_MIN)
    params["system"][0]["cache_control"] = dict(FIVE_MIN)
    out = bh.add_cache_breakpoints(params, "1h", previous_end=2)
    assert {mark[-1] for mark in marks(out)} == {"1h"}
    five = bh.add_cache_breakpoints(params, "5m", previous_end=2)
    assert {mark[-1] for mark in marks(five)} == {"5m"}
    assert len(marks(five)) == 4


# ---------------------------------------------------------------- ineligible blocks


def test_empty_and_whitespace_text_blocks_are_skipped():
    params = {"messages": [{"role": "user", "content": [text("real"), text(""), text("  \n")]}]}
    out = bh.add_cache_breakpoints(params, "1h")
    assert marks(out) == [("messages", 0, 0, "1h")]


def test_last_message_of_only_thinking_gets_no_breakpoint():
    params = transcript()
    params["messages"].append(
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]}
    )
    out = bh.add_cache_breakpoints(params, "1h")
    assert marks(out) == [("tools", 2, "1h"), ("system", 1, "1h")]


def test_empty_strings_stay_strings_and_get_no_breakpoint():
    """An empty text block is a 400; converting "" to one would break the request."""
    params = {"system": "", "messages": [{"role": "user", "content": ""}]}
    out = bh.add_cache_breakpoints(params, "1h")
    assert out == params


def test_system_walks_back_past_an_empty_block():
    params = {"system": [text("rules"), text("")], "messages": []}
    out = bh.add_cache_breakpoints(params, "1h")
    assert marks(out) == [("system", 0, "1h")]


# ---------------------------------------------------------------- ttl None (off)


def test_ttl_none_strips_every_cache_control_and_adds_none():
    params = transcript()
    params["cache_control"] = {"type": "ephemeral"}
    params["tools"][0]["cache_control"] = dict(ONE_HOUR)
    params["system"][1]["cache_control"] = dict(ONE_HOUR)
    params["messages"][2]["content"][0]["cache_control"] = dict(FIVE_MIN)
    params["messages"][2]["content"][0]["content"] = [{**text("out"), "cache_control": ONE_HOUR}]
    params["messages"][4]["content"][1]["cache_control"] = dict(ONE_HOUR)
    before = copy.deepcopy(params)
    out = bh.add_cache_breakpoints(params, None, previous_end=2)
    assert marks(out) == []
    assert params == before
    expected = transcript()
    expected["messages"][2]["content"][0]["content"] = [text("out")]
    assert out == expected


def test_ttl_none_leaves_a_clean_request_unchanged():
    params = transcript()
    assert bh.add_cache_breakpoints(params, None) == transcript()


def test_tool_input_keys_named_cache_control_are_model_data_not_markers():
    params = transcript()
    params["messages"][3]["content"][1]["input"] = {"cache_control": "keep me"}
    out = bh.add_cache_breakpoints(params, None)
    assert out["messages"][3]["content"][1]["input"] == {"cache_control": "keep me"}


@pytest.mark.parametrize("ttl", ["off", "10m", ""])
def test_unknown_ttl_is_a_bug(ttl):
    with pytest.raises(ValueError):
        bh.add_cache_breakpoints(transcript(), ttl)


# ---------------------------------------------------------------- no mutation


@pytest.mark.parametrize("ttl", ["1h", "5m", None])
def test_input_is_never_mutated(ttl):
    params = transcript()
    params["tools"][0]["cache_control"] = dict(FIVE_MIN)
    params["messages"][0]["content"] = [{**text("fix"), "cache_control": dict(FIVE_MIN)}]
    before = copy.deepcopy(params)
    out = bh.add_cache_breakpoints(params, ttl, previous_end=2)
    assert params == before
    assert out is not params


def test_changed_blocks_are_deep_copies():
    """The loop may keep editing what it sends; that must not reach the stored transcript."""
    params = transcript()
    out = bh.add_cache_breakpoints(params, "1h", previous_end=2)
    out["tools"][2]["input_schema"]["properties"]["x"] = {"type": "string"}
    out["messages"][4]["content"][1]["text"] = "edited"
    out["messages"][4]["content"].append(text("more"))
    out["system"][1]["cache_control"]["ttl"] = "5m"
    assert params == transcript()
    # Each breakpoint has its own marker dict.
    assert out["tools"][2]["cache_control"] == ONE_HOUR


def test_docstring_gives_the_money_reasons():
    doc = bh.add_cache_breakpoints.__doc__ or ""
    assert "20 blocks" in doc
    assert "5 minutes" in doc
    assert "1h" in doc
