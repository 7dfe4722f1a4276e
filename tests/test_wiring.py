"""The harness side of the security boundary: what sandbox/ decides reaches the user."""

from __future__ import annotations

import io

import batching_harness as bh


def test_a_dangerous_work_dir_is_refused_in_one_line_with_the_flag_named(tmp_path, capsys):
    env = {"ANTHROPIC_API_KEY": "k", "BATCHING_HARNESS_HOME": str(tmp_path / "home")}
    assert bh.main(["--workdir", "/", "-p", "hi"], env) == 2
    err = capsys.readouterr().err.strip()
    assert "refused work directory /" in err and "--dangerously-allow-workdir" in err
    assert len(err.splitlines()) == 1


def test_the_flag_is_carried_into_the_resume_command():
    config = bh.parse_config(["--dangerously-allow-workdir"], {})
    assert "--dangerously-allow-workdir" in bh.resume_command("S", config)


def test_text_from_outside_cannot_drive_the_terminal():
    """Regression (issue 13.9): OSC 52, titles and cursor movement reached the terminal from
    the model's text and tool output."""
    from rich.console import Console

    out = io.StringIO()
    ui = bh.ConsoleUI(Console(file=out, force_terminal=False, width=100), interactive=False)
    evil = "ok\x1b]52;c;ZXZpbA==\x07\x1b[2K\x1b[1A✓ fake"
    ui.handle(bh.AssistantText(evil))
    ui.handle(bh.ToolFinished("bash $ cat x", bh.ToolResult(evil, exit_code=0)))
    ui.handle(bh.StreamDelta("text", evil))
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "^[" in out.getvalue()


def test_the_live_turn_number_is_the_row_stats_shows(fake_api, tmp_path):
    """Regression (issue 14.18): the live line counted turns per prompt, /stats per request."""
    from tests import fake_api as fa
    from tests.support import make_rig

    fake_api.script.extend([fa.text("one"), fa.text("two")])
    rig = make_rig(fake_api, tmp_path)
    rig.agent.prompt("first")
    rig.agent.prompt("second")
    sent = [e.turn for e in rig.events if isinstance(e, bh.TurnSent)]
    assert sent == [1, 2] and len(rig.requests()) == 2
