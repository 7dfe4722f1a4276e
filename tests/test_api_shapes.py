"""Real API shapes replayed to the harness (issue 14): what the API sends back is kept, billed
and reported exactly as the API means it."""

from __future__ import annotations

import io
import json
import time

import anthropic
import pytest
from rich.console import Console

import batching_harness as bh
from tests import fake_api as fa
from tests.support import make_channel, make_rig


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
        yield server


# -- items the core re-cut fixed: one check each --------------------------------------------


def test_assistant_content_is_resent_as_received(api, tmp_path):
    """Regression (issue 14.7): content was re-serialised (citations: null dropped, empty text
    removed). Only empty text blocks may go (the API refuses them as input)."""
    content = [{"type": "text", "text": "", "citations": None},
               {"type": "text", "text": "see", "citations": None},
               {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "true"}}]
    api.script.extend([fa.raw(content, "tool_use"), fa.text("done")])
    rig = make_rig(api, tmp_path)
    assert rig.agent.prompt("go").text == "done"
    sent = api.model_requests[-1].params["messages"][1]["content"]
    assert [{k: v for k, v in b.items() if k != "cache_control"} for b in sent] == content[1:]


def test_a_create_refused_with_an_http_error_is_never_sent_not_in_flight(api, tmp_path, capsys):
    """Regression (issue 14.4): a create that failed with an HTTP error made no batch, yet the
    harness said "still in flight (and billed)"."""
    api.inject("create", "429", count=50, retry_after=0.01)
    rig = make_rig(api, tmp_path, retry_attempts=2)
    config = bh.parse_config(["-p", "go", "--output-format", "json"], {})
    err = io.StringIO()
    assert bh.run_headless(rig.agent, config, "go", Console(file=err, width=200)) == 1
    assert "in flight" not in err.getvalue() and "nothing was created" in err.getvalue()
    (row,) = rig.requests()
    assert row.state == "failed" and row.error_message == "never sent" and row.batch_id is None
    assert json.loads(capsys.readouterr().out)["batches"] == []


def test_a_proxy_html_error_page_is_one_line(api, tmp_path):
    """Regression (issue 14.8): a 413 from a proxy was reported as raw HTML."""
    api.inject("create", "413", html=True)
    rig = make_rig(api, tmp_path)
    with pytest.raises(bh.TurnFailed) as caught:
        rig.agent.prompt("go")
    message = str(caught.value)
    assert "413" in message and "<" not in message and "\n" not in message


def test_connection_refused_fails_fast_in_one_line(tmp_path):
    """Regression (issue 14.9): an unreachable URL was retried for 84 s and then called
    'still in flight (and billed)'."""
    api = bh.BatchAPI(bh.make_client_factory("k", "http://127.0.0.1:1", timeout_s=5))
    started = time.monotonic()
    with pytest.raises(bh.Unreachable) as caught:
        api.create([{"custom_id": "x", "params": {}}], exclude=set, notify=lambda _t: None)
    assert time.monotonic() - started < 10
    assert "127.0.0.1:1" in str(caught.value) and "nothing was sent" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_reconcile_never_adopts_a_batch_made_before_the_request(api):
    """Regression (issue 14.9): batches created 16-30 s before the request were candidates."""
    client = anthropic.Anthropic(api_key="k", base_url=api.base_url)
    params = {"model": "claude-opus-5-5", "max_tokens": 5,
              "messages": [{"role": "user", "content": "hi"}]}
    older = client.messages.batches.create(requests=[{"custom_id": "a", "params": params}]).id
    batch_api = make_channel(api).api
    later = time.time() + 30  # a request sent half a minute after that batch was made
    assert batch_api.find(not_before=later, size=1, exclude=set(), notify=print) is None
    assert batch_api.find(not_before=time.time(), size=1, exclude=set(), notify=print) == older


# -- 14.3: inference_geo ----------------------------------------------------------------------


def test_us_inference_geo_bills_ten_percent_more_everywhere(api, tmp_path, capsys):
    """Regression (issue 14.3): turns the API ran in the US (a workspace default can set it)
    were priced 10 % low in /stats, JSON and budgets."""
    api.inference_geo = "us"
    api.script.extend([fa.text("one"), fa.text("two")])
    rig = make_rig(api, tmp_path)
    rig.agent.prompt("go")
    first = rig.requests()[0]
    usage = first.usage_value
    assert usage.inference_geo == "us"  # kept in the journal
    plain = bh.cost_usd("claude-opus-5-5", bh.Usage(**{**usage.to_json(), "inference_geo": None}),
                        lane="batch", requested_ttl="1h")
    assert first.cost_usd == pytest.approx(1.1 * plain)
    assert first.sync_cost_usd == pytest.approx(2 * first.cost_usd)
    # The next turn's estimate (what the budget counts while it is in flight) assumes it too.
    row, params = rig.agent._prepare()
    assert row.estimate_usd == pytest.approx(1.1 * bh.estimate_cost_usd("claude-opus-5-5", params))
    out = io.StringIO()
    bh.render_stats(Console(file=out, width=200), rig.requests(), "claude-opus-5-5",
                    rig.requests())
    assert "us ×1.1" in out.getvalue()
    config = bh.parse_config(["-p", "x", "--output-format", "json"], {})
    bh.print_headless(rig.agent.report(), config, None)
    assert json.loads(capsys.readouterr().out)["cost_usd"] == pytest.approx(first.cost_usd,
                                                                          abs=1e-6)


# -- 14.8: max_tokens checked before paying to learn ---------------------------------------


def env_for(api, tmp_path, **extra):
    (tmp_path / "work").mkdir(exist_ok=True)
    return {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": api.base_url,
            "BATCHING_HARNESS_HOME": str(tmp_path / "home"), **extra}


@pytest.mark.parametrize("model,max_tokens,limit", [
    ("claude-haiku-4-5", 64_001, "64,000"), ("claude-opus-5-5", 300_001, "300,000"),
    ("claude-fable-5-1-20260601", 128_001, "128,000"), ("claude-opus-4-1", 40_000, "32,000")])
def test_max_tokens_over_the_model_limit_is_refused_before_anything_is_sent(
        api, tmp_path, capsys, model, max_tokens, limit):
    """Regression (issue 14.8): an impossible --max-tokens was learnt only when the batch
    ended."""
    argv = ["--workdir", str(tmp_path / "work"), "--no-sandbox", "--model", model,
            "--max-tokens", str(max_tokens), "-p", "hi"]
    assert bh.main(argv, env_for(api, tmp_path)) == 2
    err = capsys.readouterr().err
    assert limit in err and "--max-tokens" in err and len(err.strip().splitlines()) == 1
    assert api.count("any") == 0
    assert bh.Journal(tmp_path / "home" / "journal.db").recent_sessions() == []


def test_the_batch_only_300k_beta_is_asked_for_when_a_turn_needs_it(api, tmp_path, capsys):
    request = {"custom_id": "x", "params": {"model": "claude-opus-5-5", "max_tokens": 200_000}}
    assert bh.batch_betas([request]) == [bh.OUTPUT_300K_BETA]
    request["params"]["max_tokens"] = 128_000
    assert bh.batch_betas([request]) == []
    api.script.append(fa.text("long"))
    argv = ["--workdir", str(tmp_path / "work"), "--no-sandbox", "--max-tokens", "300000",
            "--poll-interval", "0.05", "-p", "hi"]
    assert bh.main(argv, env_for(api, tmp_path)) == 0
    assert capsys.readouterr().out == "long\n"
    assert api.model_requests[0].params["max_tokens"] == 300_000


def test_switching_to_a_model_that_cannot_write_max_tokens_is_refused(api, tmp_path):
    from tests.test_repl import make_repl

    rig = make_rig(api, tmp_path, max_tokens=100_000)
    repl, out = make_repl(rig, ["/model claude-haiku-4-5"], tmp_path)
    repl.run()
    assert "64,000" in out.getvalue() and rig.agent.settings.model == "claude-opus-5-5"
