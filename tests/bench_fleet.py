"""Fleet benchmark against the local stand-in (a script that prints, not a test).

    python -m tests.bench_fleet [--latency 10] [--agents 20] [--turns 5] [--big 100]

Runs the real CLI as a child process (so its CPU time and peak memory are the harness's
alone, the stand-in runs in this process) for: one agent alone (`-p`), a fleet with the
primer, the same fleet with --no-prime, and a big fleet. Every turn but the last asks for one
bash call (the sandbox is off: srt is not installed on the bench machine, and its cost is a
separate question). All agents share a cacheable preamble, so priming has something to save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import fake_api as fa

ROOT = Path(__file__).resolve().parent.parent
BATCH_ENDPOINTS = ("create", "list", "retrieve", "results", "cancel", "delete")
PREAMBLE = "Project conventions shared by every task.\n" + "Keep each change small. " * 150


def scripted(turns: int):
    """Turn k < turns asks for `echo k`; the last turn answers in text."""

    def step(params):
        done = sum(1 for m in params["messages"] if m["role"] == "assistant")
        if done < turns - 1:
            return fa.tool_calls(("bash", {"command": f"echo turn {done + 1}"}))
        return fa.text("All done.")

    return step


def run_child(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int, str]:
    """(wall s, CPU s, peak RSS MB, stdout) of one child process."""
    started = time.monotonic()
    out = open(cwd / "stdout.txt", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "batching_harness.py"), *argv],
                            env=env, cwd=cwd, stdout=out, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    out.seek(0)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, out.read()


def scenario(name: str, latency_s: float, n_agents: int, turns: int, flags: list[str]) -> dict:
    with fa.FakeAPI(latency_s=latency_s) as api, tempfile.TemporaryDirectory() as tmp:
        api.script.extend([scripted(turns)] * (max(1, n_agents) * turns * 3))
        work = Path(tmp) / "project"  # the state dir beside it: a work dir may not hold it
        work.mkdir()
        (work / "preamble.md").write_text(PREAMBLE)
        env = {"ANTHROPIC_API_KEY": "bench", "ANTHROPIC_BASE_URL": api.base_url,
               "BATCHING_HARNESS_HOME": str(Path(tmp) / "home"), "PATH": os.environ["PATH"]}
        if n_agents == 0:  # one agent alone, the plain harness
            argv = ["-p", "do the task", "--no-sandbox", "--workdir", str(work),
                    "--output-format", "json"]
            rounds = turns
        else:
            tasks = work / "tasks.jsonl"
            tasks.write_text("".join(json.dumps({"id": f"a{i}", "prompt": "do the task"}) + "\n"
                                     for i in range(n_agents)))
            argv = ["fleet", str(tasks), "--no-sandbox", "--preamble", str(work / "preamble.md"),
                    "--output-format", "json", *flags]
            rounds = turns + (1 if "--no-prime" not in flags else 0)
        wall, cpu, rss, _ = run_child(argv, env, work)
        return summarize(name, api, wall, cpu, rss, rounds)


def summarize(name: str, api: fa.FakeAPI, wall: float, cpu: float, rss: int, rounds: int) -> dict:
    widths = [len(api._batches[b].requests) for b in api.batch_ids()]
    calls = [c for c in api.calls if c.endpoint in BATCH_ENDPOINTS]
    writes = sum((r.usage or {}).get("cache_creation_input_tokens", 0)
                 for r in api.model_requests)
    firsts = [r for r in api.model_requests if len(r.params["messages"]) == 1]
    first = [(r.usage or {}).get("cache_creation_input_tokens", 0) for r in firsts]
    shared = [shared_prefix_written(r.params, r.usage or {}) for r in firsts]
    return {"name": name, "first_turn_writes": sum(first), "one_prefix": first[0] if first else 0,
            "shared_writes": sum(shared), "shared_prefix": shared_prefix_tokens(firsts),
            "wall_s": wall, "batches": len(widths), "rounds": rounds,
            "widths": widths, "requests": len(calls), "rpm": len(calls) / (wall / 60),
            "cache_writes": writes, "cpu_s": cpu, "rss_mb": rss}


def shared_prefix_tokens(requests) -> int:
    """Tokens of tools + system: the part every agent's prompt has in common."""
    if not requests:
        return 0
    params = requests[0].params
    n = len(params.get("tools") or []) + (1 if isinstance(params.get("system"), str)
                                         else len(params.get("system") or []))
    return sum(b.tokens for b in fa.prompt_blocks(params)[:n])


def shared_prefix_written(params: dict, usage: dict) -> int:
    """Of this request's cache write, the tokens inside the shared prefix: the write covers
    prompt positions [read, read + written); the prefix is [0, shared)."""
    read = usage.get("cache_read_input_tokens", 0)
    written = usage.get("cache_creation_input_tokens", 0)
    shared = shared_prefix_tokens([type("R", (), {"params": params})])
    return max(0, min(read + written, shared) - read)


def show(r: dict) -> None:
    w = r["widths"]
    print(f"{r['name']}: wall {r['wall_s']:.1f} s; batches {r['batches']} "
          f"({r['batches'] / r['rounds']:.2f} per round over {r['rounds']} rounds); width mean "
          f"{statistics.mean(w):.1f} / median {statistics.median(w):g} / max {max(w)}; "
          f"batch API requests {r['requests']} ({r['rpm']:.1f}/min); cache write tokens "
          f"{r['cache_writes']:,}; harness CPU {r['cpu_s']:.1f} s; peak RSS {r['rss_mb']} MB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=10.0)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--big", type=int, default=100)
    p.add_argument("--big-turns", type=int, default=3)
    a = p.parse_args()
    print(f"stand-in batch latency {a.latency:g} s; {os.cpu_count()} CPUs; sandbox off")
    alone = scenario("one agent alone", a.latency, 0, a.turns, [])
    show(alone)
    primed = scenario(f"{a.agents} agents, primed", a.latency, a.agents, a.turns, [])
    show(primed)
    unprimed = scenario(f"{a.agents} agents, --no-prime", a.latency, a.agents, a.turns,
                        ["--no-prime"])
    show(unprimed)
    print(f"wall vs one agent: primed {primed['wall_s'] / alone['wall_s']:.2f}x, not primed "
          f"{unprimed['wall_s'] / alone['wall_s']:.2f}x (goal <= 1.2x)")
    print(f"requests/min vs one agent: primed {primed['rpm'] / alone['rpm']:.2f}x, not primed "
          f"{unprimed['rpm'] / alone['rpm']:.2f}x (goal <= 1.5x)")
    print(f"cache write tokens: primed {primed['cache_writes']:,}, not primed "
          f"{unprimed['cache_writes']:,} ({unprimed['cache_writes'] / max(1, primed['cache_writes']):.1f}x)")
    print(f"shared prefix (tools + system + preamble, {primed['shared_prefix']:,} tokens) "
          f"written on first turns: primed {primed['shared_writes']:,} = "
          f"{primed['shared_writes'] / max(1, primed['shared_prefix']):.2f}x one prefix "
          f"(goal <= 1.1x); not primed {unprimed['shared_writes']:,} = "
          f"{unprimed['shared_writes'] / max(1, unprimed['shared_prefix']):.2f}x")
    # The goal is the line above; this one also counts each agent's own, unshared prompt.
    print(f"all cache writes of first turns (each agent's own prompt too): primed "
          f"{primed['first_turn_writes']:,} tokens = "
          f"{primed['first_turn_writes'] / max(1, primed['one_prefix']):.2f}x the primer's "
          f"write ({primed['one_prefix']:,}); not primed {unprimed['first_turn_writes']:,}")
    # All at once (the default --concurrency of 64 would run 100 agents in two waves).
    big = scenario(f"{a.big} agents x {a.big_turns} turns, --concurrency {a.big}", a.latency,
                   a.big, a.big_turns, ["--concurrency", str(a.big)])
    show(big)


if __name__ == "__main__":
    main()
