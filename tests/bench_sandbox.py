"""Benchmark of what the sandbox costs per bash call: a script to run by hand, not a test.

    python tests/bench_sandbox.py              # 30 calls per route, 20 concurrent callers
    python tests/bench_sandbox.py --calls 10 --callers 5

Routes, each timed as BashTool.run("true") end to end (the work-dir lock, the git guard's
walks, the cgroup, the run record, srt, the clean-up) beside a plain `bash -c true`:

- cli:    one srt CLI process per call (SandboxPolicy(srt_server=False)), as before issue 10;
- helper: one long-lived srt helper per BashTool that only wraps each command (the default);
  its leader shell starts, and joins the cgroup, while srt wraps.

Also srt alone, without the harness around it: `srt --settings F -c true`, and the helper's
wrap plus running the wrapped line (one after the other, outside any cgroup: the helper route
overlaps them, so it can come out below this line); the helper's start-up and memory; and N
callers at once, each with its own work dir and BashTool (as the fleet runs agents), per route.

Nothing reaches the network. It prints; judging is for the reader.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: make `batching_harness` and `tests` importable

import batching_harness  # noqa: E402  (it loads the sandbox module beside it, not an installed one)
from tests.bench import timed_ms  # noqa: E402
from tests.sandbox_helpers import sandbox_missing_reason  # noqa: E402

sb = batching_harness._load_sandbox_module()

GOAL_MS = 60.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(label: str, times_ms: Sequence[float], base_ms: float | None = None) -> str:
    med, p90 = statistics.median(times_ms), percentile(times_ms, 0.9)
    over = f"   overhead {med - base_ms:7.1f} ms" if base_ms is not None else ""
    return f"  {label:<34} median {med:7.1f} ms   p90 {p90:7.1f} ms{over}"


def make_tool(root: Path, name: str, *, server: bool) -> sb.BashTool:
    work, state = root / name / "work", root / name / "state"
    work.mkdir(parents=True)
    state.mkdir()
    return sb.BashTool(sb.SandboxPolicy(workdir=work, state_dir=state, srt_server=server))


def checked(tool: sb.BashTool, command: str = "true") -> None:
    result = tool.run(command, 60)
    if result.is_error or result.warnings:
        raise SystemExit(f"the sandbox did not run {command!r}: {result.output} {result.warnings}")


def rss_mib(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def one_caller(root: Path, calls: int) -> dict[str, list[float]]:
    """Each measure once per round, round after round: on a shared machine the load drifts,
    and interleaving gives every route the same share of it. The order turns by one each
    round: what an srt CLI run leaves the kernel to finish (its namespaces, its bridges)
    must not always land on the same next measure."""
    cli, helper = make_tool(root, "one-cli", server=False), make_tool(root, "one-helper", server=True)
    try:
        first = {f"  first call via {name}": timed_ms(lambda t=tool: checked(t), 1)
                 for name, tool in (("cli", cli), ("helper", helper))}  # fmt: skip
        measures = {
            "bash -c true": lambda: subprocess.run(["bash", "-c", "true"], check=True),
            "BashTool.run('true') via cli": lambda: checked(cli),
            "BashTool.run('true') via helper": lambda: checked(helper),
            **srt_alone(helper),
        }
        results: dict[str, list[float]] = {label: [] for label in measures}
        order = list(measures.items())
        for turn in range(calls):
            shift = turn % len(order)
            for label, measure in order[shift:] + order[:shift]:
                results[label] += timed_ms(measure, 1)
        return {**results, **first}
    finally:
        cli.close()
        helper.close()


def srt_alone(tool: sb.BashTool) -> dict[str, Callable[[], object]]:
    """srt without the harness's lock, guard and cgroup: the CLI vs the helper's wrap + run."""
    argv = [str(tool.policy.srt), "--settings", str(tool._settings), "-c", "true"]
    cwd = tool.policy.workdir
    server = tool._server
    assert server is not None

    def wrap_and_run() -> None:
        wrapped = server.wrap("true", 30)
        subprocess.run(["/bin/sh", "-c", f"{wrapped}\nexit $?"], env=tool._server_env, cwd=cwd,
                       check=True)  # fmt: skip
        server.cleanup()

    def wrap() -> None:
        server.wrap("true", 30)
        server.cleanup()

    return {
        "srt --settings F -c true": lambda: subprocess.run(argv, env=tool._env, cwd=cwd, check=True),
        "helper: wrap + sh -c LINE": wrap_and_run,
        "helper: wrap (+ srt's clean-up)": wrap,
    }


def many_callers(root: Path, callers: int, calls: int, *, server: bool) -> tuple[list[float], float]:
    """Every call's latency, and the wall time, with `callers` BashTools in threads at once."""
    tools = [make_tool(root, f"many-{server}-{i}", server=server) for i in range(callers)]
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    try:
        for tool in tools:  # probed and (helper) started before the clock runs
            checked(tool)

        def caller(tool: sb.BashTool) -> None:
            try:
                times = timed_ms(lambda: checked(tool), calls)
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                latencies.extend(times)

        threads = [threading.Thread(target=caller, args=(t,)) for t in tools]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - started
        helper_rss = [rss_mib(t._server.proc.pid) for t in tools if t._server is not None]
    finally:
        for tool in tools:
            tool.close()
    if errors:
        raise SystemExit(f"a caller failed: {errors[0]!r}")
    if helper_rss:
        print(f"  ({len(helper_rss)} helpers: {statistics.median(helper_rss):.0f} MiB RSS each, "
              f"{sum(helper_rss):.0f} MiB in all)")  # fmt: skip
    return latencies, wall_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/bench_sandbox.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30, help="calls per route (default 30)")
    parser.add_argument("--callers", type=int, default=20, help="concurrent callers (default 20)")
    parser.add_argument("--calls-each", type=int, default=5,
                        help="calls per concurrent caller (default 5)")
    args = parser.parse_args(argv)
    if reason := sandbox_missing_reason():
        print(f"not measured: {reason}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        root = Path(tmp)
        print(f"one caller, {args.calls} calls each (after one warm-up call)")
        results = one_caller(root, args.calls)
        base = statistics.median(results["bash -c true"])
        for label, times in results.items():
            print(line(label, times, None if label == "bash -c true" else base))
        helper = statistics.median(results["BashTool.run('true') via helper"]) - base
        print(f"  goal: overhead per call <= {GOAL_MS:g} ms via the helper: "
              f"{'met' if helper <= GOAL_MS else 'NOT met'} ({helper:.1f} ms)")
        print(f"\n{args.callers} callers at once, {args.calls_each} calls each, own work dirs")
        for route, server in (("cli", False), ("helper", True)):
            latencies, wall_s = many_callers(root, args.callers, args.calls_each, server=server)
            print(line(f"via {route}", latencies) +
                  f"   {len(latencies) / wall_s:5.1f} calls/s ({wall_s:.1f} s wall)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
