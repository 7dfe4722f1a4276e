"""Real Claude Code through the proxy, against the stand-in (issue 11).

Claude Code is the npm package @anthropic-ai/claude-code, pinned below. `.ci/run` installs it
into .ci/claude-code (about 10 s and 384 MB, measured); elsewhere point CLAUDE_CODE_BIN at a
`claude` binary, or put one on PATH. Without one these tests are skipped and say so. It runs
offline: headless (`-p ... --output-format json`), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1,
a throwaway HOME, and a fake key the stand-in accepts. Batches are held and released by the
test, so nothing waits on a clock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import batching_harness as bh
from tests.fake_api import FakeAPI, text, tool_calls
from tests.test_proxy import start_proxy, stop_proxy

ROOT = Path(__file__).resolve().parent.parent
CLAUDE_CODE_VERSION = "2.1.332"


def _claude_binary() -> str | None:
    candidates = [os.environ.get("CLAUDE_CODE_BIN"),
                  str(ROOT / ".ci" / "claude-code" / "node_modules" / ".bin" / "claude"),
                  shutil.which("claude")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


CLAUDE = _claude_binary()
pytestmark = pytest.mark.skipif(
    CLAUDE is None, reason="Claude Code is not installed: `npm install --prefix .ci/claude-code "
    f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}` (what .ci/run does), or set "
    "CLAUDE_CODE_BIN")


@pytest.fixture(autouse=True)
def _fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bh, "POLLS_PER_MINUTE", 100_000)


def claude(url: str, home: Path, workdir: Path, prompt: str) -> subprocess.Popen[str]:
    home.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "sk-ant-test",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    assert CLAUDE is not None
    return subprocess.Popen([CLAUDE, "-p", prompt, "--output-format", "json",
                             "--allowedTools", "Bash"], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out)


def test_claude_code_says_hi_from_a_held_batch(tmp_path: Path):
    with FakeAPI(hold=True) as api:
        running = start_proxy(tmp_path, api.base_url)
        try:
            api.script.append(text("hi from a batch"))
            proc = claude(running.url, tmp_path / "home-cc", tmp_path / "work", "say hi")
            [batch_id] = api.wait_for_batches(1, timeout_s=60)
            api.release(batch_id)
            result = result_of(proc)
        finally:
            stop_proxy(running)
    assert result["is_error"] is False and result["result"] == "hi from a batch"
    assert result["usage"]["service_tier"] == "batch"
    [row] = running.rows()
    assert (row.lane, row.state, row.attaches) == ("batch", "delivered", 1)
    assert row.client.startswith("claude-code:")
    betas = json.loads(row.betas or "[]")
    assert "claude-code-20250219" in betas  # Claude Code's betas went into the create call
    create = next(c for c in api.calls if c.endpoint == "create")
    assert create.headers["anthropic-beta"].split(",") == betas


def _bash_then_answer(params: dict[str, Any]) -> Any:
    """The scripted model: call Claude Code's own Bash tool, then answer with its output."""
    for message in params["messages"]:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block.get("type") == "tool_result":
                output = json.dumps(block.get("content"))
                return text(f"Bash said: {'made-by-bash' if 'made-by-bash' in output else '?'}")
    return tool_calls(("Bash", {"command": "echo made-by-bash | tee made-by-bash.txt",
                                "description": "Write a file"}))


def test_three_claude_codes_have_their_turns_pooled_into_shared_batches(tmp_path: Path):
    with FakeAPI(hold=True) as api:
        running = start_proxy(tmp_path, api.base_url, pool_window_s=120.0, pool_width=3)
        api.script.extend([_bash_then_answer] * 12)
        try:
            procs = [claude(running.url, tmp_path / f"home{i}", tmp_path / f"work{i}",
                            "write the file with bash, then tell me") for i in range(3)]
            [first] = api.wait_for_batches(1, timeout_s=60)
            assert api.batch(first)["request_counts"]["processing"] == 3
            api.release(first)
            first, second = api.wait_for_batches(2, timeout_s=60)
            assert api.batch(second)["request_counts"]["processing"] == 3
            api.release(second)
            results = [result_of(p) for p in procs]
        finally:
            stop_proxy(running)
    for i, result in enumerate(results):
        assert result["is_error"] is False and result["result"] == "Bash said: made-by-bash"
        assert (tmp_path / f"work{i}" / "made-by-bash.txt").read_text() == "made-by-bash\n"
    assert running.app.log.summary()["widths"] == [3, 3]
    assert {r.client for r in running.rows()} == {f"claude-code:{r['session_id'][:8]}"
                                                 for r in results}
