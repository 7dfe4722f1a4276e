"""Headless runs (-p) are for machines, and the CLI's first lines for people (issue 14.15,
14.16, 14.20): what lands on stdout and stderr, and with which exit status."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

import batching_harness as bh
from tests import fake_api as fa
from tests.support import detach_first_turn, make_rig


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
        yield server


def env_for(api, tmp_path, **extra):
    (tmp_path / "work").mkdir(exist_ok=True)
    env = {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": api.base_url if api else "",
           "BATCHING_HARNESS_HOME": str(tmp_path / "home"), **extra}
    return {k: v for k, v in env.items() if v}


def argv_for(tmp_path, *args):
    return ["--workdir", str(tmp_path / "work"), "--no-sandbox", "--poll-interval", "0.05",
            *args]


def test_output_format_without_p_is_a_usage_error(tmp_path, capsys):
    assert bh.main(argv_for(tmp_path, "--output-format", "json"), env_for(None, tmp_path)) == 2
    assert "-p" in capsys.readouterr().err


def test_a_missing_key_still_prints_the_json_error_object(tmp_path, capsys):
    env = env_for(None, tmp_path, ANTHROPIC_API_KEY="")
    assert bh.main(argv_for(tmp_path, "-p", "hi", "--output-format", "json"), env) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["is_error"] and "ANTHROPIC_API_KEY" in data["error"]
    assert data["session_id"] is None and data["result"] == "" and data["cost_usd"] == 0
    assert "ANTHROPIC_API_KEY" in captured.err


def test_json_answer_is_on_stdout_only_and_stderr_is_not_wrapped(api, tmp_path, capsys):
    api.script.extend([fa.tool_calls(("bash", {"command": "echo hi"}), text="let me look"),
                       fa.text("the final answer " * 8)])
    assert bh.main(argv_for(tmp_path, "-p", "go", "--output-format", "json"),
                   env_for(api, tmp_path)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["result"].startswith("the final answer")
    assert "final answer" not in captured.err and "let me look" not in captured.err
    ended = [line for line in captured.err.splitlines() if "succeeded after" in line]
    assert len(ended) == 2 and all(len(line) > 80 and "(sync $" in line for line in ended)
    assert not any(line != line.rstrip() for line in captured.err.splitlines())


def test_headless_resume_collects_the_turn_in_flight_and_reports_its_answer(
        api, tmp_path, capsys):
    """After `--resume ID -p`, the JSON result held only the new prompt's answer, though the
    turn left in flight was paid for and collected in the same run."""
    api.script.extend([fa.text("answer of the detached turn"), fa.text("answer of the new one")])
    rig = make_rig(api, tmp_path, interrupts=["detach"])
    detach_first_turn(rig, "first")
    session_id = rig.agent.session.id
    rig.journal.close()
    argv = argv_for(tmp_path, "--resume", session_id, "-p", "second", "--output-format", "json")
    assert bh.main(argv, env_for(api, tmp_path)) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert result == "answer of the detached turn\n\nanswer of the new one"


def test_headless_resume_hint_is_the_headless_form(api, tmp_path, capsys):
    api.inject("list", "503", count=50)
    rig = make_rig(api, tmp_path, retry_attempts=2)
    err = io.StringIO()
    config = bh.parse_config(["-p", "go", "--output-format", "json", "--max-turns", "3"], {})
    assert bh.run_headless(rig.agent, config, "go", Console(file=err, width=300)) == 1
    hint = err.getvalue().split("resume with: ")[1]
    assert f"--resume {rig.agent.session.id} --max-turns 3 --output-format json -p" in hint


def test_interactive_without_a_terminal_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert bh.main(argv_for(tmp_path), env_for(None, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "terminal" in err and "-p" in err and len(err.strip().splitlines()) == 1


def test_a_state_location_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "home").write_text("not a directory")
    for argv in (["--stats"], argv_for(tmp_path, "-p", "hi")):
        assert bh.main(argv, env_for(None, tmp_path)) == 2
        err = capsys.readouterr().err
        assert "BATCHING_HARNESS_HOME" in err and len(err.strip().splitlines()) == 1


def test_headless_keeps_streamed_and_final_text_off_stderr():
    err = io.StringIO()
    ui = bh.ConsoleUI(Console(file=err, width=200), interactive=False, answers=False)
    ui.handle(bh.StreamDelta("text", "streamed answer"))
    ui.handle(bh.AssistantText("streamed answer"))
    assert err.getvalue() == ""


def test_json_turns_are_the_turns_the_live_line_and_stats_number(api, tmp_path, capsys):
    """Issue 14.18: the JSON's `turns` counted succeeded requests while the live line and
    /stats number every model request, so a run whose turn errored once and was sent again
    showed 'turn 2' and 'turn 3' and reported "turns": 1. A turn is one model request;
    per_turn carries each one's number (in the session, as on screen)."""
    api.script.extend([fa.text("earlier"), fa.errored("overloaded_error", "Overloaded"),
                       fa.text("the answer")])
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("first")  # turn 1, in an earlier run
    session_id = rig.agent.session.id
    rig.journal.close()
    argv = argv_for(tmp_path, "--resume", session_id, "-p", "second", "--output-format", "json")
    assert bh.main(argv, env_for(api, tmp_path)) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    shown = [int(n) for n in re.findall(r"^turn (\d+) ·", captured.err, re.M)]
    assert shown == [2, 3] == [t["turn"] for t in data["per_turn"]]
    assert data["turns"] == 2 and data["lanes"] == {"batch": 1, "sync": 0}
    assert [t["result"] for t in data["per_turn"]] == ["errored", "succeeded"]
    journal = bh.open_store(None, tmp_path / "home")
    out = io.StringIO()
    rows = journal.requests(session_id)
    bh.render_stats(Console(file=out, width=200), rows, "claude-opus-5-5", rows)
    assert re.findall(r"(\d+) +batch +claude-opus", out.getvalue()) == ["1", "2", "3"]
    journal.close()
