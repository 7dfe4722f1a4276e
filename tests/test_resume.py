"""Never lose a paid turn: SIGKILL the headless harness at each stage, then --continue.

The killed run is a real process (only a real process can be SIGKILLed); the stand-in holds
its batch, or a FIFO holds its tool, so the kill lands at the stage named, never on a timer.
The --continue that follows runs through `main()` in this process. The stand-in counts
creates, so each test can assert that no turn was paid for twice, and the journal must hold
the complete conversation afterwards."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import harness_env, read_fifo, run_main
from tests.zygote import ForkedProcess, spawn

ROOT = Path(__file__).resolve().parent.parent
# A new interpreter pays seconds for the SDK import, more on a busy machine.
STARTUP_S = 60


def start(api, tmp_path: Path, *args: str) -> ForkedProcess:
    """The headless harness in a process of its own session (its tools in its group), forked
    from the zygote so the SDK's import is not paid again."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return spawn(["--workdir", str(work), "--poll-interval", "0.2", "--output-format", "json",
                  *args], env=harness_env(tmp_path, api), cwd=work)


def kill(proc: ForkedProcess) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def roles(tmp_path: Path) -> list[str]:
    db = sqlite3.connect(tmp_path / "home" / "journal.db")
    return [r[0] for r in db.execute("SELECT role FROM messages ORDER BY id")]


def resume(api, tmp_path: Path, prompt: str, *args: str) -> dict:
    run = run_main(tmp_path, "--continue", "--poll-interval", "0.1", "--output-format",
                   "json", *args, "-p", prompt, api=api)
    assert run.status == 0, run.err
    assert "Traceback" not in run.err
    return json.loads(run.out)


def test_killed_while_submitting(tmp_path, monkeypatch):
    """The create made a batch but the process died before it heard the id."""
    # The resume waits this long for such a batch to be listed; the stand-in lists it at once.
    monkeypatch.setattr(bh, "UNKNOWN_CREATE_WAIT_S", 0.0)
    with fa.FakeAPI() as api:
        api.inject("create", "drop-after-create")  # the batch is made, the answer never comes
        api.script.extend([fa.text("first answer"), fa.text("second answer")])
        proc = start(api, tmp_path, "--no-sandbox", "-p", "first")
        api.wait_for("create", 1, timeout_s=STARTUP_S)
        kill(proc)  # killed while it waits (5 s) before looking for what its create made
        assert api.count("list") == 0
        result = resume(api, tmp_path, "second", "--no-sandbox")
        assert result["result"] == "first answer\n\nsecond answer"  # the turn in flight leads (14.15)
        assert len(api.batch_ids()) == 2  # one per turn: the orphan was adopted, not re-sent
        assert roles(tmp_path) == ["user", "assistant", "user", "assistant"]


def test_killed_while_polling(tmp_path):
    with fa.FakeAPI(hold=True) as api:
        api.script.extend([fa.text("slow answer"), fa.text("next answer")])
        proc = start(api, tmp_path, "--no-sandbox", "-p", "first")
        api.wait_for("list", 1, timeout_s=STARTUP_S)  # the batch was created and is being polled
        kill(proc)
        api.hold = False
        api.release()
        result = resume(api, tmp_path, "next", "--no-sandbox")
        assert result["result"] == "slow answer\n\nnext answer"
        assert len(api.batch_ids()) == 2
        assert roles(tmp_path) == ["user", "assistant", "user", "assistant"]
        db = sqlite3.connect(tmp_path / "home" / "journal.db")
        states = [r[0] for r in db.execute("SELECT state FROM requests")]
        assert states == ["applied", "applied"]  # each paid turn counted once


def _stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has stopped; only its exit status is left


def test_killed_while_a_tool_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    os.mkfifo(work / "started")
    with fa.FakeAPI() as api:
        api.script.extend(
            [
                fa.tool_calls(
                    ("bash", {"command": "echo quick > a.txt"}),
                    ("bash", {"command": "echo $$ > started; sleep 60; echo slow > b.txt"}),
                ),
                fa.text("tools done"),
                fa.text("after"),
            ]
        )
        proc = start(api, tmp_path, "--no-sandbox", "-p", "first")
        orphan = int(read_fifo(work / "started", STARTUP_S))  # the second call is running now
        kill(proc)
        assert (work / "a.txt").exists() and not _stopped(orphan)
        os.remove(work / "a.txt")  # if the finished call ran again, a.txt would come back
        result = resume(api, tmp_path, "more", "--no-sandbox")
        assert result["result"] == "tools done\n\nafter"
        # The orphan was stopped at start-up (SIGTERM, a grace period, SIGKILL), the call not
        # re-run; on a loaded machine the kernel may take a moment to reap it.
        deadline = time.monotonic() + 10
        while not _stopped(orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stopped(orphan)
        assert not (work / "b.txt").exists()
        assert not (work / "a.txt").exists()
        db = sqlite3.connect(tmp_path / "home" / "journal.db")
        (content,) = db.execute("SELECT content FROM messages WHERE role='user' AND "
                                "content LIKE '%tool_result%'").fetchone()
        second = json.loads(content)[1]
        assert second["is_error"] and "interrupted" in second["content"]
        assert len(api.batch_ids()) == 3
        assert roles(tmp_path) == ["user", "assistant", "user", "assistant", "user", "assistant"]


def test_headless_json_fields(tmp_path):
    with fa.FakeAPI(hold=True) as api, ThreadPoolExecutor(1) as pool:
        api.script.extend([fa.tool_calls(("bash", {"command": "echo hi"})), fa.text("done")])
        running = pool.submit(run_main, tmp_path, "--no-sandbox", "--poll-interval", "0.1",
                              "--output-format", "json", "-p", "go", api=api)
        api.wait_for_batches(1)
        api.advance(90)  # the first batch takes 90 s by the API's clock; the second no time
        api.hold = False
        api.release()
        run = running.result(timeout=60)
        assert run.status == 0, run.err
        data = json.loads(run.out)
        assert data["result"] == "done" and data["stop_reason"] == "end_turn"
        assert data["turns"] == 2 and len(data["batches"]) == 2
        assert set(data["usage"]) == {
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        }
        assert data["sync_cost_usd"] == pytest.approx(2 * data["cost_usd"], rel=1e-3)
        assert 90 <= data["wait_s"] < 100 and data["model"] == "claude-opus-5-5"


def test_headless_failure_exit_1_and_text_mode(tmp_path):
    with fa.FakeAPI() as api:
        api.script.append(fa.errored("invalid_request_error", "bad request body"))
        run = run_main(tmp_path, "--no-sandbox", "--poll-interval", "0.1", "--output-format",
                       "json", "-p", "go", api=api)
        assert run.status == 1
        assert json.loads(run.out)["is_error"] and "bad request body" in run.err
        api.script.append(fa.text("plain answer"))
        run = run_main(tmp_path, "--no-sandbox", "--poll-interval", "0.1", "-p", "-", api=api,
                       stdin="from stdin")
        assert run.status == 0 and run.out == "plain answer\n"
        assert (
            api.model_requests[-1]
            .params["messages"][-1]["content"][-1]["text"]
            .startswith("from stdin")
        )
