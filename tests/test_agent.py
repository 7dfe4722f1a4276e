"""The agent loop end to end: the real SDK over HTTP to the local stand-in, a real journal,
real tools (sandbox off here; tests/test_sandbox.py covers srt)."""

from __future__ import annotations

import json

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import detach_first_turn, journal_in_flight, make_channel, make_rig


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
        yield server


def test_one_turn_text_answer(api, tmp_path):
    api.script.append(fa.text("Hello **there**."))
    rig = make_rig(api, tmp_path)
    result = rig.agent.prompt("say hello")
    assert result.text == "Hello **there**."
    assert rig.texts() == ["Hello **there**."]
    assert [m["role"] for m in rig.messages()] == ["user", "assistant"]
    (req,) = rig.requests()
    assert req.state == "applied" and req.result_type == "succeeded"
    assert bh.CUSTOM_ID_RE.match(req.custom_id)
    assert req.batch_id and req.batch_id.startswith("msgbatch_")
    assert req.cost_usd is not None and req.sync_cost_usd == pytest.approx(2 * req.cost_usd)
    assert api.count("create") == 1
    # The request really went through the batch endpoint with the right custom_id.
    assert api.model_requests[0].custom_id == req.custom_id


def test_parallel_tool_calls_answered_in_one_message(api, tmp_path):
    def check_results(params):
        last = params["messages"][-1]
        assert last["role"] == "user"
        kinds = [b["type"] for b in last["content"]]
        assert kinds == ["tool_result", "tool_result"]
        return fa.text("both done")

    api.script.extend([
        fa.tool_calls(("bash", {"command": "echo from-bash"}),
                      ("str_replace_based_edit_tool",
                       {"command": "create", "path": "notes.txt", "file_text": "hi\n"})),
        check_results,
    ])
    rig = make_rig(api, tmp_path)
    result = rig.agent.prompt("do two things")
    assert result.text == "both done"
    assert (rig.workdir / "notes.txt").read_text() == "hi\n"
    tool_msg = rig.messages()[2]
    outputs = [b["content"] for b in tool_msg["content"]]
    assert "from-bash" in outputs[0]
    labels = [e.label for e in rig.events if isinstance(e, bh.ToolFinished)]
    assert len(labels) == 2 and "echo from-bash" in labels[0]
    assert api.count("create") == 2


def test_bad_tool_calls_become_error_results(api, tmp_path):
    api.script.extend([
        fa.tool_calls(("no_such_tool", {"x": 1}), ("bash", {"cmd": "typo"}),
                      ("str_replace_based_edit_tool", {"command": "view", "path": 42})),
        fa.text("recovered"),
    ])
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "recovered"
    results = rig.messages()[2]["content"]
    assert [b.get("is_error") for b in results] == [True, True, True]
    assert "no_such_tool" in results[0]["content"]


def test_invalid_request_ends_turn_and_conversation_stays_usable(api, tmp_path):
    api.script.extend([fa.errored("invalid_request_error", "messages: bad thing"),
                       fa.text("second try works")])
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.TurnFailed, match="bad thing"):
        rig.agent.prompt("first")
    assert rig.requests()[0].state == "failed"
    assert rig.agent.prompt("again").text == "second try works"
    msgs = rig.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert [b["text"] for b in msgs[0]["content"]] == ["first", "again"]
    assert api.count("create") == 2


@pytest.mark.parametrize("failure", [fa.expired, lambda: fa.errored("overloaded_error", "busy")])
def test_expired_and_transient_errors_are_resubmitted(api, tmp_path, failure):
    api.script.extend([failure(), fa.text("made it")])
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "made it"
    states = [(r.state, r.result_type, r.attempt) for r in rig.requests()]
    assert states[0][0] == "failed" and states[1] == ("applied", "succeeded", 2)
    assert any("resubmitting" in n for n in rig.notices())


def test_resubmission_is_bounded(api, tmp_path):
    api.script.extend([fa.expired(), fa.expired(), fa.expired(), fa.text("never")])
    rig = make_rig(api, tmp_path, max_resubmits=3)
    with pytest.raises(bh.TurnFailed, match="3 times"):
        rig.agent.prompt("go")
    assert api.count("create") == 3


def test_canceled_result_ends_turn(api, tmp_path):
    api.script.append(fa.canceled())
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.TurnFailed, match="canceled"):
        rig.agent.prompt("go")


def test_max_tokens_mid_tool_call_is_answered_not_run(api, tmp_path):
    api.script.extend([
        fa.raw([{"type": "tool_use", "id": "toolu_cut", "name": "bash",
                 "input": {"command": "touch should-not-exist"}}], "max_tokens"),
        fa.text("ok"),
    ])
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "ok"
    result = rig.messages()[2]["content"][0]
    assert result["is_error"] and "max_tokens" in result["content"]
    assert not (rig.workdir / "should-not-exist").exists()


def test_pause_turn_is_sent_back(api, tmp_path):
    def continued(params):
        assert params["messages"][-1]["role"] == "assistant"
        return fa.text("finished")

    api.script.extend([fa.raw([{"type": "text", "text": "working…"}], "pause_turn"), continued])
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("long job").text == "finished"


def test_a_refusal_with_partial_output_is_billed_and_never_acted_on(api, tmp_path):
    """Regression (issue 14.1): a refused turn holding a tool_use was kept; the next prompt
    ran the tool and resent the refused turn with every later request."""
    partial = [{"type": "text", "text": "sure, "},
               {"type": "tool_use", "id": "toolu_bad", "name": "bash",
                "input": {"command": "touch planted"}}]
    api.script.extend([fa.raw(partial, "refusal"), fa.text("fine")])
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.TurnFailed, match=r"declined.*billed and discarded"):
        rig.agent.prompt("go")
    assert rig.requests()[0].cost_usd > 0  # output was produced: billed
    assert rig.agent.prompt("something else").text == "fine"
    assert not (rig.workdir / "planted").exists()
    sent = api.model_requests[-1].params["messages"]
    assert [m["role"] for m in sent] == ["user"]  # the refused turn is never resent
    assert "toolu_bad" not in json.dumps(sent)


def test_a_refusal_before_any_output_is_free(api, tmp_path):
    """Regression (issue 14.2): a refusal with content [] was billed though the API does not
    charge it."""
    api.script.append(fa.raw([], "refusal"))
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.TurnFailed, match="not billed"):
        rig.agent.prompt("go")
    row = rig.requests()[0]
    assert row.cost_usd == 0 and row.sync_cost_usd == 0 and row.usage_value.input_tokens > 0


def test_a_full_context_window_keeps_the_answer_and_says_what_to_do(api, tmp_path):
    """Regression (issue 14.6): model_context_window_exceeded is a valid answer, not a
    failed turn."""
    api.script.append(fa.raw([{"type": "text", "text": "partial"}],
                             "model_context_window_exceeded"))
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "partial"
    assert any("context window" in n and "/clear" in n for n in rig.notices())
    assert rig.requests()[0].state == "applied"


def test_max_tokens_text_only_warns(api, tmp_path):
    api.script.append(fa.raw([{"type": "text", "text": "cut sho"}], "max_tokens"))
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("go")
    assert any("max_tokens" in n for n in rig.notices())


@pytest.mark.parametrize("endpoint,kind", [
    ("create", "429"), ("create", "529"), ("list", "500"), ("list", "drop"),
    ("results", "503"), ("results", "drop"), ("list", "504"), ("create", "502"),
])
def test_api_faults_are_waited_out(api, tmp_path, endpoint, kind):
    api.inject(endpoint, kind, count=2, retry_after=0.01)
    api.script.append(fa.text("fine"))
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "fine"
    assert api.count("create") >= 1
    assert len({r.batch_id for r in rig.requests()}) == 1
    assert len(api.batch_ids()) == 1
    assert any("retry" in n or "exists" in n for n in rig.notices())


def test_create_dropped_after_creation_is_reconciled_not_resent(api, tmp_path):
    api.inject("create", "drop-after-create")
    api.script.append(fa.text("once"))
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "once"
    assert len(api.batch_ids()) == 1  # never two paid batches for one turn
    assert api.count("list") >= 1


def test_spend_limit_is_not_retried(api, tmp_path):
    api.inject("create", "429-spend", count=5)
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.SpendLimitReached):
        rig.agent.prompt("go")
    assert api.count("create") == 1


def test_retries_are_bounded_and_turn_stays_resumable(api, tmp_path):
    api.script.append(fa.text("later"))
    api.inject("list", "500", count=50)
    rig = make_rig(api, tmp_path, retry_attempts=3)
    with pytest.raises(bh.RetriesExhausted):
        rig.agent.prompt("go")
    (req,) = rig.requests()
    assert req.state == "submitted" and req.batch_id
    api.clear_faults()
    rig2 = make_rig(api, tmp_path, session=rig.agent.session)
    assert rig2.agent.resume().text == "later"
    assert api.count("create") == 1


def test_ctrl_c_cancel(api, tmp_path):
    api.hold = True
    api.script.append(fa.text("too late"))
    rig = make_rig(api, tmp_path, interrupts=["cancel"])
    calls = {"n": 0}

    def interrupting_sleep(_s):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        if api.count("cancel"):
            api.release()  # the held batch ends, canceled

    rig.clock.on_wait = interrupting_sleep
    with pytest.raises(bh.TurnFailed, match="canceled"):
        rig.agent.prompt("go")
    assert api.count("cancel") == 1


def test_ctrl_c_detach_keeps_batch_and_resume_collects_it(api, tmp_path):
    api.hold = True
    api.script.append(fa.text("collected later"))
    rig = make_rig(api, tmp_path, interrupts=["detach"])

    def interrupting_sleep(_s):
        raise KeyboardInterrupt

    rig.clock.on_wait = interrupting_sleep
    with pytest.raises(bh.Detached) as info:
        rig.agent.prompt("go")
    assert info.value.batch_id == rig.requests()[0].batch_id
    api.release()
    rig2 = make_rig(api, tmp_path, session=rig.agent.session)
    assert rig2.agent.resume().text == "collected later"
    assert api.count("create") == 1
    assert api.count("cancel") == 0


def test_budget_refuses_before_submitting(api, tmp_path):
    rig = make_rig(api, tmp_path, max_budget_usd=0.000001)
    with pytest.raises(bh.BudgetExceeded, match="max-budget-usd"):
        rig.agent.prompt("go")
    assert api.count("create") == 0


def test_budget_counts_in_flight_estimate_then_actual(api, tmp_path):
    api.script.extend([fa.text("one"), fa.text("two")])
    rig = make_rig(api, tmp_path, max_budget_usd=10.0)
    rig.agent.prompt("go")
    (req,) = rig.requests()
    assert req.committed_usd == req.cost_usd  # the estimate was replaced, not added
    assert req.estimate_usd is not None and req.estimate_usd > 0


def test_max_turns(api, tmp_path):
    api.script.extend([fa.tool_calls(("bash", {"command": "true"})),
                       fa.tool_calls(("bash", {"command": "true"}))])
    rig = make_rig(api, tmp_path, max_turns=1)
    with pytest.raises(bh.BudgetExceeded, match="max-turns"):
        rig.agent.prompt("go")
    assert api.count("create") == 1


def test_cache_ttl_off_sends_no_breakpoints(api, tmp_path):
    api.script.append(fa.text("x"))
    rig = make_rig(api, tmp_path, cache_ttl=None)
    rig.agent.prompt("go")
    assert "cache_control" not in json.dumps(api.model_requests[0].params)


def test_second_turn_reads_the_cache_written_by_the_first(api, tmp_path):
    big = "line of tool output that makes the prefix long enough to cache\n" * 120
    api.script.extend([fa.tool_calls(("bash", {"command": f"printf '{big}'"})),
                       fa.tool_calls(("bash", {"command": "echo again"})),
                       fa.text("done")])
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("go")
    usages = [r.usage_value for r in rig.requests()]
    assert usages[1].cache_creation_input_tokens > 0
    assert usages[2].cache_read_input_tokens >= usages[1].cache_read_input_tokens
    assert usages[2].cache_read_input_tokens > 0
    params = api.model_requests[2].params
    ttl = {b["cache_control"]["ttl"] for b in params["messages"][-1]["content"]
           if "cache_control" in b}
    assert ttl == {"1h"}


def test_clear_keeps_session_totals(api, tmp_path):
    api.script.extend([fa.text("a"), fa.text("b")])
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("one")
    rig.agent.clear()
    rig.agent.prompt("two")
    assert [m["role"] for m in rig.messages()] == ["user", "assistant"]
    assert len(rig.requests()) == 2
    totals = bh.stats_totals(rig.requests())
    assert totals.paid_usd == pytest.approx(sum(r.cost_usd for r in rig.requests()))


def test_prompt_after_a_stuck_turn_answers_both(api, tmp_path):
    """Regression: a prompt typed while a turn was in flight was folded into the message the
    paid batch had already carried, and never answered."""
    api.script.extend([fa.text("answer to FIRST"), fa.text("answer to SECOND")])
    api.inject("list", "500", count=50)
    rig = make_rig(api, tmp_path, retry_attempts=2)
    with pytest.raises(bh.RetriesExhausted):
        rig.agent.prompt("FIRST")
    api.clear_faults()
    assert rig.agent.prompt("SECOND").text == "answer to SECOND"
    msgs = rig.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [b["text"] for b in msgs[0]["content"]] == ["FIRST"]
    assert rig.texts() == ["answer to FIRST", "answer to SECOND"]


def test_a_batch_the_api_no_longer_knows_ends_the_turn(api, tmp_path):
    """Regression: a 404 while polling left the turn 'in flight' forever."""
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, "msgbatch_unknown")
    with pytest.raises(bh.TurnFailed, match="no longer at the API"):
        rig.agent.resume()
    assert rig.journal.pending_request(rig.agent.session.id) is None
    api.script.append(fa.text("fresh"))
    assert rig.agent.prompt("again").text == "fresh"


def test_an_empty_answer_ends_the_turn_without_paying_again(api, tmp_path):
    """Regression: an empty end_turn answer was resubmitted, paid, with no limit."""
    api.script.extend([fa.tool_calls(("bash", {"command": "true"})),
                       fa.raw([], "end_turn"), fa.text("never sent")])
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("go")
    assert api.count("create") == 2
    assert any("empty answer" in n for n in rig.notices())
    api.script.clear()
    api.script.append(fa.text("next prompt works"))
    assert rig.agent.prompt("more").text == "next prompt works"


def test_cancel_after_the_batch_ended_still_collects_it(api, tmp_path):
    """Regression: canceling a batch that had just ended (a 400) threw the paid result away."""
    api.hold = True
    api.script.append(fa.text("paid and kept"))
    rig = make_rig(api, tmp_path, interrupts=["cancel"])
    state = {"n": 0}

    def end_then_interrupt(_s):
        state["n"] += 1
        if state["n"] == 1:
            (batch_id,) = api.release()  # the batch ends while the user reads the menu
            assert api.batch(batch_id)["processing_status"] == "ended"
            raise KeyboardInterrupt

    rig.clock.on_wait = end_then_interrupt
    assert rig.agent.prompt("go").text == "paid and kept"
    assert any("cancel refused" in n for n in rig.notices())


def test_turnaround_is_the_batch_s_own_duration(api, tmp_path):
    """Regression: a result collected long after the batch ended counted the whole delay."""
    api.hold = True
    api.script.append(fa.text("late"))
    rig = make_rig(api, tmp_path, interrupts=["detach"])

    detach_first_turn(rig, "go")
    api.release()
    api.advance(60)  # collected a minute after the batch ended
    rig2 = make_rig(api, tmp_path, session=rig.agent.session)
    rig2.clock.offset_s = 60  # ... by the harness's clock too
    rig2.agent.resume()
    (req,) = rig2.requests()
    assert req.wait_s < 1.0


def test_backoff_jitter_stays_under_the_cap():
    policy = bh.RetryPolicy(base_delay_s=1, max_delay_s=30)
    assert max(policy.delay_s(n, None, 0.999) for n in range(1, 12)) <= 30


def _foreign_batch(api, custom_id="someone_else"):
    """A one-entry batch another client made with the same key."""
    import anthropic

    client = anthropic.Anthropic(api_key="k", base_url=api.base_url, max_retries=0)
    params = {"model": "claude-opus-5-5", "max_tokens": 10,
              "messages": [{"role": "user", "content": "not ours"}]}
    return client.messages.batches.create(
        requests=[{"custom_id": custom_id, "params": params}]).id


def test_foreign_batches_are_tried_once_each_then_the_turn_is_sent(api, tmp_path):
    """Regression: after an unknown create, two foreign one-entry batches were adopted in
    turn forever (910 results downloads in 15 s)."""
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, None, custom_id="bh_unknown")
    api.script.extend([fa.text("a"), fa.text("b"), fa.text("ours at last")])
    _foreign_batch(api, "other_1")
    _foreign_batch(api, "other_2")
    assert rig.agent.resume().text == "ours at last"
    assert len(api.batch_ids()) == 3 and api.count("results") < 10


def test_an_orphan_batch_is_found_past_the_first_page_of_list(api, tmp_path):
    """Regression: reconciling read only list()'s first 100 batches."""
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, None, custom_id="bh_orphan")
    api.script.append(fa.text("the orphan's answer"))
    orphan = _foreign_batch(api, "bh_orphan")  # the create that landed unseen
    import anthropic

    client = anthropic.Anthropic(api_key="k", base_url=api.base_url, max_retries=0)
    two = [{"custom_id": f"p{i}", "params": {"model": "m", "max_tokens": 5,
                                              "messages": [{"role": "user", "content": "x"}]}}
           for i in range(2)]
    for _ in range(105):  # a pooled job's newer two-entry batches push it off page one
        client.messages.batches.create(requests=two)
    assert rig.agent.resume().text == "the orphan's answer"
    assert rig.requests()[0].batch_id == orphan


def test_a_create_that_times_out_but_lands_is_not_sent_twice(api, tmp_path):
    """Regression: list() was checked at once after a create timeout, before the API had
    made the batch, so a second paid batch followed."""
    api.inject("create", "slow", delay_s=2.0)
    api.script.append(fa.text("once"))
    rig = make_rig(api, tmp_path)
    rig.agent.router.channels["batch"] = make_channel(api, timeout_s=1.0)
    assert rig.agent.prompt("go").text == "once"
    assert len(api.batch_ids()) == 1


def test_a_canceled_tool_result_turn_is_not_sent_again_with_the_next_prompt(api, tmp_path):
    """Regression: a failed turn ending in tool results was resent, and paid, before every
    later prompt."""
    api.script.extend([fa.tool_calls(("bash", {"command": "true"})), fa.canceled(),
                       fa.text("hi")])
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.TurnFailed, match="canceled"):
        rig.agent.prompt("go")
    assert rig.agent.resume() is None
    assert rig.agent.prompt("forget that; just say hi").text == "hi"
    assert len(api.batch_ids()) == 3
    last_user = rig.messages()[-2]["content"]
    assert [b["type"] for b in last_user] == ["tool_result", "text"]


def test_a_prompt_after_an_in_flight_turn_that_failed_still_runs(api, tmp_path):
    """Regression: --continue -p exited 1 without running its prompt when the re-attached
    batch had ended canceled."""
    api.hold = True
    api.script.extend([fa.canceled(), fa.text("second answered")])
    rig = make_rig(api, tmp_path, interrupts=["detach"])

    detach_first_turn(rig, "first")
    api.hold = False
    api.release()
    rig2 = make_rig(api, tmp_path, session=rig.agent.session)
    assert rig2.agent.prompt("second").text == "second answered"
    assert any("canceled" in n for n in rig2.notices())


def test_an_interrupted_tool_call_is_reported_not_rerun(api, tmp_path):
    rig = make_rig(api, tmp_path)
    api.script.extend([fa.tool_calls(("bash", {"command": "echo once >> log.txt"})),
                       fa.text("done")])
    rig.agent.toolbox.run = lambda name, inp: (_ for _ in ()).throw(SystemExit("killed"))
    with pytest.raises(SystemExit):
        rig.agent.prompt("go")  # the process 'dies' mid-tool: started, never finished
    rig2 = make_rig(api, tmp_path, session=rig.agent.session)
    assert rig2.agent.resume().text == "done"
    assert not (rig2.workdir / "log.txt").exists()
    result = rig2.messages()[2]["content"][0]
    assert result["is_error"] and "interrupted" in result["content"]


def test_a_prompt_merged_after_an_empty_answer_is_resubmitted_when_it_expires(api, tmp_path):
    """Regression: the empty answer's applied request made the merged prompt look answered,
    so its expired batch was announced as resubmitted and then dropped."""
    api.script.extend([fa.raw([], "end_turn"), fa.expired(), fa.text("answered")])
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("a")
    assert rig.agent.prompt("b").text == "answered"
    assert len(api.batch_ids()) == 3


def test_results_missing_from_our_own_batch_are_resubmitted_a_bounded_number_of_times(
        api, tmp_path):
    """Regression: a batch with no entry for us led to unbounded paid resubmissions."""
    rig = make_rig(api, tmp_path, max_resubmits=3)
    rig.agent.router.channel("batch").api.results = lambda url, notify: {}  # every download lacks us
    with pytest.raises(bh.TurnFailed, match="3 times"):
        rig.agent.prompt("go")
    assert len(api.batch_ids()) == 3


def test_a_prompt_that_cannot_be_sent_yet_says_so(api, tmp_path):
    """Regression: a prompt typed while an earlier turn could not be collected vanished."""
    api.hold = True
    rig = make_rig(api, tmp_path, interrupts=["detach"], retry_attempts=2)
    detach_first_turn(rig)
    api.inject("list", "500", count=50)
    rig2 = make_rig(api, tmp_path, session=rig.agent.session, retry_attempts=2)
    with pytest.raises(bh.RetriesExhausted):
        rig2.agent.prompt("second")
    assert any("NOT sent" in n for n in rig2.notices())
