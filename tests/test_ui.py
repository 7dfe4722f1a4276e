"""What a person sees (issue 14.10-14.14, 14.17-14.20): typing during a wait, the Ctrl-C
menu, resume, Markdown, narrow terminals, honest numbers. Consoles render to strings; clocks
and keys are injected."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from rich.console import Console

import batching_harness as bh
from tests import fake_api as fa
from tests.support import detach_first_turn, make_rig
from tests.test_repl import make_repl


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
        yield server


def render(renderable, width=100):
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


# -- 14.10: typing during a wait is one input, shown, and becomes the next prompt ----------


def test_a_paste_and_enter_during_a_wait_stay_one_input():
    typed = bh.TypeAhead()
    typed.feed("fix the\x1b[200~ first\r\nsecond")
    typed.feed(" line\x1b[201~\rthird\x1b\rfourth\x1b[D\x7f!")
    assert typed.text() == "fix the first\nsecond line\nthird\nfourt!"
    typed.feed("\x15again")
    assert typed.stop() == "again" and typed.text() == ""


def test_ctrl_l_during_a_wait_clears_the_screen():
    cleared = []
    typed = bh.TypeAhead(on_clear=lambda: cleared.append(True))
    typed.feed("a\x0cb")
    assert cleared == [True] and typed.text() == "ab"


def test_what_is_typed_while_a_turn_runs_becomes_the_next_prompt_whole(api, tmp_path):
    """Regression: a multi-line paste during a wait became two paid prompts."""
    rig = make_rig(api, tmp_path)
    repl, out = make_repl(rig, [], tmp_path)

    def typing_while_waiting(_params):
        repl.ui.typeahead.feed("\x1b[200~line one\nline two\x1b[201~")
        return fa.text("first answer")

    api.script.extend([typing_while_waiting, fa.text("second answer")])
    defaults = []

    def read_line(default=""):
        defaults.append(default)
        if len(defaults) > 2:
            raise EOFError
        return "go" if len(defaults) == 1 else default  # Enter on what is shown

    repl.read_line = read_line
    assert repl.run() == 0
    assert defaults[1] == "line one\nline two"
    assert "typed meanwhile is back at the prompt" in out.getvalue()
    assert api.count("create") == 2  # one prompt, one paid turn: never split
    assert api.model_requests[-1].params["messages"][-1]["content"][-1]["text"] == \
        "line one\nline two"


def test_the_wait_line_shows_what_was_typed_and_stays_one_line():
    state = bh.WaitState("msgbatch_" + "x" * 40, 3, 0.0, 31.0, note="rate limited; retry 1/7")
    line = bh.WaitLine(state, lambda: 55.0, typed=lambda: "first\nsecond half")
    shown = render(line, width=60).splitlines()
    assert len(shown) == 2 and "0:55" in shown[0] and "taking longer" in render(line, 300)
    assert "(2 lines)" in shown[1] and "second half" in shown[1]


def test_what_was_typed_before_a_detach_is_shown_not_dropped(api, tmp_path):
    """Seen in tmux: text typed during a wait vanished when Ctrl-C, d detached (the REPL
    ends, so there is no next prompt to hand it to)."""
    rig = make_rig(api, tmp_path, interrupts=["detach"])
    repl, out = make_repl(rig, ["go"], tmp_path)

    def type_then_ctrl_c(_timeout_s):
        repl.ui.typeahead.feed("fix the [parser]\rthen test it")
        raise KeyboardInterrupt

    rig.clock.on_wait = type_then_ctrl_c
    assert repl.run() == 0
    text = out.getvalue()
    assert "detached" in text
    assert "not sent, typed during the wait:\n  fix the [parser]\n  then test it" in text


# -- 14.12: a prompt that could not be sent is never dropped silently ----------------------


def test_a_prompt_that_could_not_be_sent_is_kept_at_the_prompt(api, tmp_path):
    rig = make_rig(api, tmp_path, retry_attempts=2)
    api.inject("create", "drop", count=50)  # the first prompt's create: outcome unknown
    repl, out = make_repl(rig, [], tmp_path)
    lines = iter(["first", "second"])
    defaults = []

    def read_line(default=""):
        defaults.append(default)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    repl.read_line = read_line
    repl.run()
    assert "your prompt (not sent) is back at the prompt" in out.getvalue()
    assert defaults[-1] == "second"


# -- 14.11: the Ctrl-C menu does not stop the world ---------------------------------------


def test_the_menu_keeps_counting_and_announces_the_end(api, tmp_path):
    api.hold = True
    api.script.append(fa.text("collected"))
    rig = make_rig(api, tmp_path)
    out = io.StringIO()
    now = [time.time()]
    ui = bh.ConsoleUI(Console(file=out, width=200, color_system=None),
                      clock=lambda: now[0], interactive=True)
    rig.agent._emit_to = ui.handle
    rig.agent.collector.ask_interrupt = ui.ask_interrupt
    shown = []

    def read_key(timeout_s):
        assert timeout_s <= bh.WAIT_SLICE_S
        shown.append(bh.WaitLine(ui._wait, ui.clock).text())
        now[0] += 10  # the counter goes on while the menu is up
        if len(shown) == 3:
            api.release()
        if len(shown) > 400:
            return "d"
        time.sleep(0.01)
        return None

    ui.read_key = read_key
    interrupted = threading.Event()

    def ctrl_c_once(_timeout_s):
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    rig.clock.on_wait = ctrl_c_once
    assert rig.agent.prompt("go").text == "collected"
    ui.stop_live()
    assert "ended while the menu was open" in out.getvalue()
    assert shown[0] != shown[1]  # not frozen
    assert rig.requests()[0].wait_s < 5  # the turnaround is the batch's, not the menu's


# -- 14.13: resume shows where you are ------------------------------------------------------


def test_resume_list_tells_sessions_apart_and_enter_stays(api, tmp_path):
    api.script.append(fa.text("an answer"))
    old = make_rig(api, tmp_path)
    old.agent.prompt("refactor the parser module please")
    old.journal.create_session(old.workdir.resolve(), "claude-opus-5-5")  # empty: not listed
    rig = make_rig(api, tmp_path, session=old.journal.create_session(old.workdir.resolve(),
                                                                     "claude-opus-5-5"))
    repl, out = make_repl(rig, ["/resume"], tmp_path)
    repl.read_line_with = lambda _prompt: ""
    repl.run()
    text = out.getvalue()
    assert "refactor the parser module please · 1 turn · $0.0" in text
    assert "just now" in text and "  2." not in text
    assert "staying in this session" in text and rig.agent.session.id != old.agent.session.id


def test_resume_recaps_the_conversation_and_the_true_age_of_the_batch(api, tmp_path):
    api.script.append(fa.text("the earlier answer"))
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("an earlier question")
    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    bh.render_recap(console, rig.messages(), rig.requests())
    assert "› an earlier question" in out.getvalue() and "the earlier answer" in out.getvalue()
    assert "1 turn, paid $" in out.getvalue()
    ui = bh.ConsoleUI(console, clock=lambda: 1000.0, interactive=False)
    ui.handle(bh.TurnWaiting("msgbatch_1", "in_progress", sent_at=1000.0 - 192, expected_s=70,
                             turn=6))
    assert "re-attached to turn 6, batch msgbatch_1, submitted 3:12 ago" in out.getvalue()
    assert "3:12 · turn 6 ·" in bh.WaitLine(ui._wait, ui.clock).text()


def test_a_re_attached_batch_carries_its_turn_number(api, tmp_path):
    """The live line of a batch collected after a restart showed no turn number, while the
    turn it collects is row N of /stats and 'turn N' of the JSON."""
    api.script.extend([fa.text("one"), fa.text("two")])
    rig = make_rig(api, tmp_path, interrupts=["detach"])
    rig.agent.prompt("first")
    detach_first_turn(rig, "second")
    rig.clock.on_wait = None
    before = len(rig.events)
    rig.agent.resume()
    waits = [e for e in rig.events[before:] if isinstance(e, bh.TurnWaiting)]
    assert waits and {e.turn for e in waits} == {2}


def test_output_never_lands_on_a_prompt_line():
    """Issue 14.13: a notice printed while a prompt was up landed in the typed text, and a
    resumed session's first line landed on the early prompt ('› re-attached to ...'). Here
    the early prompt is erased first; output while a plain prompt is up waits for Enter
    (in a terminal, prompt_toolkit prints it above its prompt: tests/test_terminal.py)."""
    out = io.StringIO()
    ui = bh.ConsoleUI(Console(file=out, width=100, color_system=None), interactive=False)
    ui.prompt_line.drawn_early()
    ui.info("re-attached to batch msgbatch_1")
    assert out.getvalue() == "\r\x1b[Kre-attached to batch msgbatch_1\n"
    assert not ui.prompt_line.take_early()  # the real prompt starts on a line of its own
    with ui.prompt_line.prompting():
        poller = threading.Thread(target=ui.say, args=("rate limited (429) [retry]",))
        poller.start()
        poller.join()
        ui.handle(bh.TurnWaiting("msgbatch_2", "in_progress", sent_at=0.0))
        assert "rate limited" not in out.getvalue() and ui._live is None
    assert out.getvalue().endswith("rate limited (429) [retry]\n")


# -- 14.14: Markdown only where it is Markdown --------------------------------------------


def test_plain_text_keeps_its_lines_and_markdown_keeps_single_breaks():
    listing = "a.py\nb.py\n  c.py *draft*"
    assert render(bh.render_answer(listing)).splitlines() == ["a.py", "b.py", "  c.py *draft*"]
    shown = render(bh.render_answer("**Files**\nfoo.py\nbar.py\n\n- one\n- two"))
    assert "**" not in shown
    assert [ln.strip() for ln in shown.splitlines()[:3]] == ["Files", "foo.py", "bar.py"]


# -- 14.17 / 14.18 / 14.20: numbers, narrow terminals, the tool spinner --------------------


def stats_rows(n=2, **overrides):
    u = bh.Usage(1200, 160, 3000, 50000, None, 3000)
    c = bh.cost_breakdown("claude-opus-5-5", u, lane="batch", requested_ttl="1h")
    row = dict(session_id="s", conversation=0, n_messages=1, model="claude-opus-5-5",
               cache_ttl="1h", max_tokens=10, request_hash="h", attempt=1, state="applied",
               batch_id="msgbatch_x", submitted_at=time.time(), result_type="succeeded",
               usage=json.dumps(u.to_json()), cost_usd=c.paid_usd, sync_cost_usd=c.sync_usd,
               cache_saved_usd=c.cache_saved_usd, wait_s=65)
    return [bh.RequestRow(custom_id=f"c{i}", **{**row, **overrides}) for i in range(n)]


def test_stats_at_60_columns_folds_and_never_cuts_a_figure():
    rows = stats_rows()
    text = render_stats(rows, 60)
    assert "…" not in text and text.count("$0.0210") == 2 and text.count("$0.0420") >= 2


def test_a_folded_row_names_no_outcome_as_a_figure():
    """Seen at 60 columns: a canceled (hurried) turn read 'waited 0:04 · uncached canceled'."""
    text = render_stats(stats_rows(1, result_type="canceled", state="hurried"), 60)
    assert "uncached canceled" not in text and "· canceled ·" in text


def render_stats(rows, width):
    out = io.StringIO()
    bh.render_stats(Console(file=out, width=width, color_system=None), rows,
                    "claude-opus-5-5", rows)
    return out.getvalue()


def test_numbers_say_what_they_are():
    one = render_stats(stats_rows(1), 300)
    assert "1 batch ·" in one and "per minute spent waiting" in one
    assert "uncached" in one  # the live line's "(N uncached)" is this column
    negative = render_stats(stats_rows(1, cache_saved_usd=-0.01), 300)
    assert "cache cost $0.0100 extra so far" in negative
    in_flight = render_stats(stats_rows(1, state="submitted", result_type=None, estimate_usd=0.3,
                                        cost_usd=None), 300)
    assert "≤ $0.3000" in in_flight and "est." not in in_flight
    out = io.StringIO()
    ui = bh.ConsoleUI(Console(file=out, width=300), interactive=False)
    ui.handle(bh.TurnSent("msgbatch_1", "c", "claude-opus-5-5", 1, 0.0, 0.3034, None))
    assert "up to $0.3034" in out.getvalue()
    assert bh.plural(1, "turn") == "1 turn" and bh.plural(2, "batch") == "2 batches"
    assert bh.plural(2, "entry") == "2 entries" and bh.plural(2, "key") == "2 keys"


def test_a_retry_notice_tells_the_truth_about_the_next_try(tmp_path):
    notes = []
    api = bh.BatchAPI(bh.make_client_factory("k", "http://127.0.0.1:1", timeout_s=5),
                      retry=bh.RetryPolicy(base_delay_s=0.01, max_delay_s=0.02))
    with pytest.raises(bh.Unreachable):
        api.create([{"custom_id": "x", "params": {}}], exclude=set, notify=notes.append)
    assert notes and all("/2 in 0.0s" in n for n in notes)


def test_the_tool_spinner_shows_elapsed_time():
    now = [0.0]
    line = bh.ToolLine("bash $ make test", lambda: now[0])
    now[0] = 75
    assert "running 1:15 · bash $ make test" in render(line)


def test_a_turn_makes_no_retrieve_once_the_list_shows_the_end(api, tmp_path):
    """Issue 14.20: one extra retrieve after the batch had ended, on every turn."""
    api.script.append(fa.text("ok"))
    make_rig(api, tmp_path).agent.prompt("go")
    assert api.count("retrieve") == 0 and api.count("results") == 1


@pytest.mark.terminal
def test_in_a_real_terminal_a_paste_during_a_wait_is_one_prompt(tmp_path):
    from tests.test_terminal import PROMPT, finish, spawn

    with fa.FakeAPI(hold=True) as server:  # the batch ends once the paste is in
        server.script.extend([fa.text("first"), fa.text("second")])
        child = spawn(server, tmp_path, "--no-sandbox")
        child.expect_exact(PROMPT)
        child.sendline("go")
        child.expect(r"waiting 0:0[01]")
        child.send("\x1b[200~line one\nline two\x1b[201~\r")
        child.expect("typed, for the next prompt")
        server.hold = False
        server.release()
        child.expect("typed meanwhile is back at the prompt")
        child.expect_exact(PROMPT)
        child.send("\r")
        child.expect("second")
        child.expect_exact(PROMPT)
        child.sendeof()
        assert finish(child) == 0
        assert server.count("create") == 2
        sent = server.model_requests[-1].params["messages"][-1]["content"][-1]["text"]
        assert sent == "line one\nline two"


def test_the_model_is_told_once_what_srts_placeholders_are(tmp_path):
    """Issue 14.19: `ls -la` in the sandbox shows character-device placeholders (.bashrc,
    .mcp.json, .claude/, ...) that are not on disk; the model reasoned about them."""
    settings = bh.AgentSettings(model="claude-opus-5-5")
    params = bh.build_params(settings, tmp_path, [], [{"role": "user", "content": "hi"}], None)
    system = params["system"][0]["text"]
    assert system.count("placeholders") == 1 and ".mcp.json" in system
