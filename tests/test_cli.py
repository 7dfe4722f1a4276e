"""The command line around the loop: --stats history, --doctor, resuming a batch whose
results the API no longer keeps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import detach_first_turn, make_rig

ROOT = Path(__file__).resolve().parent.parent


def run_cli(tmp_path: Path, *args: str, api=None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "LANG": "C.UTF-8", "BATCHING_HARNESS_HOME": str(tmp_path / "home"),
           "COLUMNS": "160"}
    if api is not None:
        env.update(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=api.base_url)
    (tmp_path / "work").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(ROOT / "batching_harness.py"), "--workdir",
                           str(tmp_path / "work"), *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path / "work")


def test_stats_history_per_model_and_day(tmp_path):
    with fa.FakeAPI(latency_s=0.2) as api:
        api.script.extend([fa.text("a"), fa.text("b")])
        assert run_cli(tmp_path, "-p", "one", api=api).returncode == 0
        assert run_cli(tmp_path, "--model", "claude-haiku-5-5", "-p", "two",
                       api=api).returncode == 0
    r = run_cli(tmp_path, "--stats")
    assert r.returncode == 0, r.stderr
    assert "spend per model" in r.stdout and "spend per day" in r.stdout
    assert "claude-opus-5-5" in r.stdout and "claude-haiku-5-5" in r.stdout
    assert "How these figures are computed" in r.stdout


def test_doctor_reports_each_check(tmp_path):
    r = run_cli(tmp_path, "--doctor")
    assert r.returncode in (0, 1)
    for name in ("srt", "bwrap", "socat", "probe"):
        assert name in r.stdout.lower()
    if r.returncode == 1:
        assert "fix:" in r.stdout


@pytest.mark.parametrize("journal_knows_age", [True, False])
def test_resuming_after_results_expired_says_so(tmp_path, journal_knows_age):
    with fa.FakeAPI(latency_s=60) as api:
        rig = make_rig(api, tmp_path, interrupts=["detach"])

        detach_first_turn(rig, "go")
        api.advance(30 * 86400)
        rig2 = make_rig(api, tmp_path, session=rig.agent.session)
        if journal_knows_age:  # our clock says 30 days passed too
            rig2.journal._db.execute("UPDATE requests SET submitted_at = submitted_at - ?",
                                     (30 * 86400,))
        with pytest.raises(bh.TurnFailed, match=r"29 days|no longer available"):
            rig2.agent.resume()
        assert api.count("create") == 1


def test_unknown_model_price_is_null_not_free(tmp_path):
    """Regression: a model missing from the price table was reported as costing $0."""
    import json

    with fa.FakeAPI(latency_s=0.1) as api:
        api.script.append(fa.text("hi"))
        r = run_cli(tmp_path, "--model", "claude-foo-9", "--output-format", "json", "-p", "x",
                    api=api)
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["cost_usd"] is None and data["sync_cost_usd"] is None
    assert "price unknown" in run_cli(tmp_path, "--stats").stdout
