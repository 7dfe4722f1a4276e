"""Never lose a paid turn: SIGKILL the headless harness at each stage, then --continue.

The stand-in counts creates, so each test can assert that no turn was paid for twice, and
the journal must hold the complete conversation afterwards."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import fake_api as fa

ROOT = Path(__file__).resolve().parent.parent


def start(api, tmp_path: Path, *args: str) -> subprocess.Popen:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": api.base_url,
        "BATCHING_HARNESS_HOME": str(tmp_path / "home"),
    }
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "batching_harness.py"),
            "--workdir",
            str(work),
            "--poll-interval",
            "0.2",
            "--output-format",
            "json",
            *args,
        ],
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the stage"
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def roles(tmp_path: Path) -> list[str]:
    db = sqlite3.connect(tmp_path / "home" / "journal.db")
    return [r[0] for r in db.execute("SELECT role FROM messages ORDER BY id")]


def resume(api, tmp_path: Path, prompt: str) -> dict:
    proc = start(api, tmp_path, "--continue", "-p", prompt)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return json.loads(out)


def test_killed_while_submitting(tmp_path):
    with fa.FakeAPI(latency_s=0.5) as api:
        api.inject("create", "slow", delay_s=2.0)
        api.script.extend([fa.text("first answer"), fa.text("second answer")])
        proc = start(api, tmp_path, "-p", "first")
        wait_until(lambda: api.count("create") >= 1)
        kill(proc)  # the create is in flight: the server makes the batch, nobody hears of it
        time.sleep(2.5)
        result = resume(api, tmp_path, "second")
        assert result["result"] == "first answer\n\nsecond answer"  # the turn in flight leads (14.15)
        assert len(api.batch_ids()) == 2  # one per turn: the orphan was adopted, not re-sent
        assert roles(tmp_path) == ["user", "assistant", "user", "assistant"]


def test_killed_while_polling(tmp_path):
    with fa.FakeAPI(latency_s=3.0) as api:
        api.script.extend([fa.text("slow answer"), fa.text("next answer")])
        proc = start(api, tmp_path, "-p", "first")
        wait_until(lambda: api.count("list") >= 1)
        kill(proc)
        result = resume(api, tmp_path, "next")
        assert result["result"] == "slow answer\n\nnext answer"
        assert len(api.batch_ids()) == 2
        assert roles(tmp_path) == ["user", "assistant", "user", "assistant"]
        db = sqlite3.connect(tmp_path / "home" / "journal.db")
        states = [r[0] for r in db.execute("SELECT state FROM requests")]
        assert states == ["applied", "applied"]  # each paid turn counted once


def test_killed_while_a_tool_runs(tmp_path):
    with fa.FakeAPI(latency_s=0.2) as api:
        api.script.extend(
            [
                fa.tool_calls(
                    ("bash", {"command": "echo quick > a.txt"}),
                    ("bash", {"command": "sleep 3; echo slow > b.txt"}),
                ),
                fa.text("tools done"),
                fa.text("after"),
            ]
        )
        proc = start(api, tmp_path, "--no-sandbox", "-p", "first")
        work = tmp_path / "work"
        wait_until(lambda: (work / "a.txt").exists())
        time.sleep(0.5)
        kill(proc)
        assert not (work / "b.txt").exists()
        os.remove(work / "a.txt")  # if the finished call ran again, a.txt would come back
        result = resume(api, tmp_path, "more")
        assert result["result"] == "tools done\n\nafter"
        time.sleep(3)  # past when the killed run's `echo slow` would have written
        assert not (work / "b.txt").exists()  # the orphan was stopped, the call not re-run
        assert not (work / "a.txt").exists()
        db = sqlite3.connect(tmp_path / "home" / "journal.db")
        (content,) = db.execute("SELECT content FROM messages WHERE role='user' AND "
                                "content LIKE '%tool_result%'").fetchone()
        second = json.loads(content)[1]
        assert second["is_error"] and "interrupted" in second["content"]
        assert len(api.batch_ids()) == 3
        assert roles(tmp_path) == ["user", "assistant", "user", "assistant", "user", "assistant"]


def test_headless_json_fields(tmp_path):
    with fa.FakeAPI(latency_s=0.1) as api:
        api.script.extend([fa.tool_calls(("bash", {"command": "echo hi"})), fa.text("done")])
        proc = start(api, tmp_path, "--no-sandbox", "-p", "go")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        data = json.loads(out)
        assert data["result"] == "done" and data["stop_reason"] == "end_turn"
        assert data["turns"] == 2 and len(data["batches"]) == 2
        assert set(data["usage"]) == {
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        }
        assert data["sync_cost_usd"] == pytest.approx(2 * data["cost_usd"], rel=1e-3)
        assert data["wait_s"] > 0 and data["model"] == "claude-opus-5-5"


def test_headless_failure_exit_1_and_text_mode(tmp_path):
    with fa.FakeAPI() as api:
        api.script.append(fa.errored("invalid_request_error", "bad request body"))
        proc = start(api, tmp_path, "-p", "go")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert json.loads(out)["is_error"] and "bad request body" in err
        api.script.append(fa.text("plain answer"))
        work = tmp_path / "work"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "batching_harness.py"), "--workdir", str(work), "-p", "-"],
            input="from stdin",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=work,
            env={
                "PATH": os.environ["PATH"],
                "HOME": str(tmp_path),
                "ANTHROPIC_API_KEY": "k",
                "ANTHROPIC_BASE_URL": api.base_url,
                "BATCHING_HARNESS_HOME": str(tmp_path / "home"),
            },
        )
        assert proc.returncode == 0 and proc.stdout == "plain answer\n"
        assert (
            api.model_requests[-1]
            .params["messages"][-1]["content"][-1]["text"]
            .startswith("from stdin")
        )
