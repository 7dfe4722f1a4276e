"""Flags and environment, and the polling schedule's rate budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import batching_harness as bh
from tests.support import run_main

ROOT = Path(__file__).resolve().parent.parent


def test_defaults(tmp_path):
    c = bh.parse_config([], {"BATCHING_HARNESS_HOME": str(tmp_path)})
    assert c.model == "claude-opus-5-5" and c.cache_ttl == "1h" and c.sandbox
    assert c.home == tmp_path.resolve() and c.api_key is None


def test_flags_and_environment(tmp_path):
    c = bh.parse_config(
        ["--model", "claude-haiku-5-5", "--workdir", str(tmp_path), "--poll-interval", "3",
         "--max-turns", "4", "--max-tokens", "900", "--tool-timeout", "7",
         "--allow-domain", "pypi.org", "--allow-domain", "example.com", "--no-sandbox",
         "--cache-ttl", "off", "--max-budget-usd", "1.5", "-p", "hi", "--output-format", "json"],
        {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://x"})
    assert (c.model, c.workdir, c.poll_interval_s, c.max_turns, c.max_tokens) == (
        "claude-haiku-5-5", tmp_path.resolve(), 3.0, 4, 900)
    assert c.allow_domains == ("pypi.org", "example.com") and not c.sandbox
    assert c.cache_ttl is None and c.max_budget_usd == 1.5 and c.prompt == "hi"
    assert (c.api_key, c.base_url, c.output_format) == ("k", "http://x", "json")


@pytest.mark.parametrize("argv,match", [
    (["--poll-interval", "0"], "poll-interval"), (["--max-turns", "0"], "max-turns"),
    (["--workdir", "/no/such/dir"], "no such directory"),
    (["--continue", "--resume", "x"], "not both"),
])
def test_bad_values_are_config_errors(argv, match):
    with pytest.raises(bh.ConfigError, match=match):
        bh.parse_config(argv, {})


def _run(args, env_extra=None, tmp_path=None, stdin=None):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "BATCHING_HARNESS_HOME": str(tmp_path / "home")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "batching_harness.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60, input=stdin,
                          cwd=tmp_path)


def test_missing_api_key_is_one_line_and_exit_2(tmp_path):
    """In a real process: the exit status and stderr a shell script sees."""
    r = _run(["-p", "hello"], tmp_path=tmp_path)
    assert r.returncode == 2
    assert "ANTHROPIC_API_KEY is not set" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_usage_exits_2_and_version_works(tmp_path):
    r = run_main(tmp_path, "--cache-ttl", "2h")
    assert r.status == 2 and "--cache-ttl" in r.err
    r = run_main(tmp_path, "--version")
    assert r.status == 0 and bh.__version__ in r.out
    r = run_main(tmp_path, "--help")
    assert r.status == 0 and "--allow-domain" in r.out


def _polls_per_minute(latency_s: float, expected_s: float | None, base_s: float = 2.5):
    t, polls, lag = bh.next_poll_delay_s(0.0, base_s, expected_s), 0, None
    while True:
        polls += 1
        if t >= latency_s:
            lag = t - latency_s
            break
        t += bh.next_poll_delay_s(t, base_s, expected_s)
    return polls / (t / 60), lag


@pytest.mark.parametrize("latency_s", [20, 45, 60, 90, 180, 600])
def test_poll_schedule_stays_within_30_per_minute(latency_s):
    rate, lag = _polls_per_minute(latency_s, None)
    assert rate <= 25 and lag <= 2.5  # leaves room for the create and the results fetch
    rate, lag = _polls_per_minute(latency_s, expected_s=latency_s)
    assert rate <= 28 and lag <= 1.0


def test_poll_schedule_slows_down_for_long_batches():
    assert bh.next_poll_delay_s(2 * 3600, 2.0, None) == 60.0
    assert bh.next_poll_delay_s(1200, 2.0, 60.0) == 15.0


def test_a_fast_poll_interval_holds_for_the_first_ten_seconds_only():
    assert bh.next_poll_delay_s(5, 0.5, None) == 0.5
    assert bh.next_poll_delay_s(30, 0.5, None) == bh.STEADY_POLL_S


def test_resume_command_carries_limits_and_sandbox_flags(tmp_path):
    """Regression: the printed resume command dropped --max-budget-usd and --no-sandbox."""
    c = bh.parse_config(["--max-budget-usd", "0.001", "--no-sandbox", "--allow-domain",
                         "pypi.org", "--cache-ttl", "off"], {})
    line = bh.resume_command("S1", c)
    assert "--resume S1" in line and "--max-budget-usd 0.001" in line
    assert "--no-sandbox" in line and "--allow-domain pypi.org" in line
    assert "--cache-ttl off" in line
    assert bh.carried_flags(bh.parse_config([], {})) == []
