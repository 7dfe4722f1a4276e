"""Route each turn: the sync lane (streamed, full price), auto's choice from measured
turnaround and the price of waiting, hurry, and --max-wait. Driven through the real SDK
against the stand-in; batches are held and released by the test, never timed."""

from __future__ import annotations

import json

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import journal_in_flight, make_rig
from tests.zygote import spawn_in_terminal

HAIKU, OPUS = "claude-haiku-5-5", "claude-opus-5-5"


def routed(api, tmp_path, route: str, *, wait_price: float = 0.05, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rig = make_rig(api, tmp_path, **settings)
    batch = rig.agent.router.channel("batch")
    rig.agent.router = bh.Router({"batch": batch, "sync": bh.SyncChannel(batch.api,
                                                                          clock=batch.clock)},
                                 route=route, wait_price_usd_per_min=wait_price)
    return rig


def test_a_sync_routed_session_makes_no_batch_request(fake_api, tmp_path):
    fake_api.script.extend([fa.tool_calls(("bash", {"command": "echo hi"})), fa.text("done")])
    rig = routed(fake_api, tmp_path, "sync")
    assert rig.agent.prompt("go").text == "done"
    assert fake_api.count("create") == 0 and fake_api.count("list") == 0
    assert fake_api.count("messages") == 2
    rows = rig.requests()
    assert [r.lane for r in rows] == ["sync", "sync"]
    assert all(r.cost_usd == pytest.approx(r.sync_cost_usd) and r.cost_usd > 0 for r in rows)
    streamed = "".join(e.text for e in rig.events if isinstance(e, bh.StreamDelta))
    assert "done" in streamed


def test_auto_sends_a_small_cheap_turn_sync_and_a_large_dear_one_batch(fake_api, tmp_path):
    fake_api.script.extend([fa.text("small"), fa.text("large")])
    small = routed(fake_api, tmp_path / "a", "auto", model=HAIKU)
    assert small.agent.prompt("hi").text == "small"
    assert small.requests()[0].lane == "sync"
    assert small.requests()[0].route.startswith("sync · saves $")
    large = routed(fake_api, tmp_path / "b", "auto", model=OPUS)
    assert large.agent.prompt("review this:\n" + "x" * 400_000).text == "large"
    row = large.requests()[0]
    assert row.lane == "batch" and "≥ $0.0500/min" in row.route
    assert fake_api.count("create") == 1


def test_auto_uses_a_prior_until_five_turnarounds_are_measured():
    router = bh.Router({}, route="auto", wait_price_usd_per_min=0.05)
    params = {"model": OPUS, "max_tokens": 1000,
              "messages": [{"role": "user", "content": "x" * 40_000}]}
    prior = router.choose(params, previous=None, waits=[10.0] * 4)
    measured = router.choose(params, previous=None, waits=[10.0] * 5)
    assert "~2:00 (prior)" in prior.why and "~0:10 →" in measured.why
    free = bh.Router({}, route="auto", wait_price_usd_per_min=0.0)
    assert free.choose(params, previous=None, waits=[]).lane == "batch"


def test_max_wait_cancels_the_batch_and_streams_the_same_turn(tmp_path):
    with fa.FakeAPI(hold=True) as api:
        api.script.extend([fa.text("from the stream")])  # the held batch never answers
        rig = routed(api, tmp_path, "batch", max_wait_s=0.2)
        assert rig.agent.prompt("go").text == "from the stream"
        assert [c.endpoint for c in api.calls if c.endpoint in ("create", "cancel",
                                                                "messages")] == [
            "create", "cancel", "messages"]
        lanes_states = [(r.lane, r.state) for r in rig.requests()]
        assert lanes_states == [("batch", "hurried"), ("sync", "applied")]
        assert [m["role"] for m in rig.messages()] == ["user", "assistant"]


def test_a_hurried_batch_that_still_succeeds_is_waste_and_never_applied(tmp_path):
    with fa.FakeAPI(hold=True) as api:
        api.cancel_succeeds = True
        api.script.extend([fa.text("streamed"), fa.text("too late")])  # in answer order
        rig = routed(api, tmp_path, "batch", interrupts=["hurry"])
        fired = []

        def ctrl_c_once(_timeout):
            if not fired:
                fired.append(1)
                raise KeyboardInterrupt

        rig.clock.on_wait = ctrl_c_once
        assert rig.agent.prompt("go").text == "streamed"
        rig.clock.on_wait = None
        hurried = rig.requests()[0]
        api.release()
        api.wait_for("results", 1)  # the poller saw the end and fetched the answer
        for _ in range(100):  # ...and records it as waste right after the download
            if rig.journal.request(hurried.custom_id).cost_usd is not None:
                break
            rig.agent.router.channel("batch").clock.sleep(0.01)
        wasted = rig.journal.request(hurried.custom_id)
        assert wasted.state == "hurried" and wasted.result_type == "succeeded"
        assert wasted.cost_usd > 0
        assert [m["role"] for m in rig.messages()] == ["user", "assistant"]
        assert "too late" not in json.dumps(rig.messages())
        assert bh.stats_totals(rig.requests()).waste_usd == pytest.approx(wasted.cost_usd)


def test_a_stream_cut_midway_is_sent_again_and_the_conversation_stays_valid(fake_api,
                                                                            tmp_path):
    fake_api.inject("messages", "stream-drop", after_events=4)
    fake_api.script.extend([fa.text("a long answer that is cut"), fa.text("whole")])
    rig = routed(fake_api, tmp_path, "sync")
    assert rig.agent.prompt("go").text == "whole"
    states = [(r.state, r.error_type) for r in rig.requests()]
    assert states == [("failed", "stream_lost"), ("applied", None)]
    assert [m["role"] for m in rig.messages()] == ["user", "assistant"]


def test_ctrl_c_during_a_stream_stops_it_and_applies_nothing(tmp_path):
    with fa.FakeAPI(stream_ttft_s=0.3) as api:
        api.script.append(fa.text("never shown"))
        rig = routed(api, tmp_path, "sync")

        def ctrl_c(_timeout):
            rig.clock.on_wait = None
            raise KeyboardInterrupt

        rig.clock.on_wait = ctrl_c
        with pytest.raises(bh.TurnFailed, match="stream was stopped"):
            rig.agent.prompt("go")
        assert [m["role"] for m in rig.messages()] == ["user"]
        assert rig.requests()[0].result_type == "canceled"


def test_a_stream_cut_by_a_crash_is_sent_again_and_says_it_is_paid_again(fake_api, tmp_path):
    fake_api.script.append(fa.text("again"))
    rig = routed(fake_api, tmp_path, "sync")
    journal_in_flight(rig, "sync_lost")
    rig.journal._db.execute("UPDATE requests SET lane='sync'")
    assert rig.agent.resume().text == "again"
    assert any("paid again" in n for n in rig.notices())


def test_route_command_and_the_json_lanes(fake_api, tmp_path, capsys):
    fake_api.script.extend([fa.text("one"), fa.text("two")])
    rig = routed(fake_api, tmp_path, "batch")
    rig.agent.prompt("first")
    rig.agent.set_route("sync")
    rig.agent.prompt("second")
    bh.print_headless(rig.agent.report(), bh.parse_config(["-p", "x", "--output-format", "json"], {}),
                      None)
    out = json.loads(capsys.readouterr().out)
    assert out["lanes"] == {"batch": 1, "sync": 1}
    assert [t["lane"] for t in out["per_turn"]] == ["batch", "sync"]
    assert len(out["batches"]) == 1


@pytest.mark.terminal
def test_hurry_in_a_real_terminal(tmp_path):
    """Ctrl-C, then 's': the held batch is cancelled and the same turn streams at once."""
    import os

    import pexpect

    with fa.FakeAPI(hold=True) as api:
        api.script.append(fa.text("streamed instead"))
        work = tmp_path / "work"
        work.mkdir()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "TERM": "xterm-256color", "LANG": "C.UTF-8", "PROMPT_TOOLKIT_NO_CPR": "1",
               "NO_COLOR": "1", "ANTHROPIC_API_KEY": "test-key",
               "ANTHROPIC_BASE_URL": api.base_url,
               "BATCHING_HARNESS_HOME": str(tmp_path / "home")}
        child = spawn_in_terminal(["--workdir", str(work), "--no-sandbox"], env=env, cwd=work,
                                  timeout=30, dimensions=(40, 160))
        child.logfile_read = open(tmp_path / "terminal.log", "a")  # noqa: SIM115
        child.expect("›")
        child.sendline("hello")
        api.wait_for_batches(1)
        child.expect("waiting")
        child.sendintr()
        child.expect("send now, synchronously")
        child.send("s")
        child.expect("streamed instead")
        child.expect("›")
        child.sendeof()
        child.expect(pexpect.EOF, timeout=20)
        child.wait()
        assert child.exitstatus == 0
        assert api.count("cancel") == 1 and api.count("messages") == 1
