"""Benchmark of the router: a script to run by hand, not a test.

    python tests/bench_router.py            # about 2 minutes
    python tests/bench_router.py --quick    # 8 turns instead of 20

1. A fixed 20-turn session (small and large turns, Opus 5.5 then Haiku 5.5) is replayed under
   --route batch, sync and auto against tests/fake_api.py, with per-model batch turnaround
   (Opus 90 s, Haiku 180 s: smaller models have been seen to wait longer in the queue) and
   a 4 s synchronous answer. Time is scaled 60:1 so the run takes minutes, not an hour: a
   batch "minute" takes one real second, and the router's prior and price of waiting are
   scaled with it, so every decision is the one it would make at full scale. For each
   route it prints total cost, minutes waited (at full scale) and cost + wait x price, for
   the default interactive price ($0.05/min) and for a price of 0.
   Goals: auto at least as good as the better of batch and sync on the combined figure;
   auto no more than 5 % dearer than batch at a price of 0.
2. Time to the first streamed token through the stand-in, and the harness's own overhead per
   sync turn: the agent's turn wall time minus a bare SDK stream of the same request.
   Goal: overhead at most 20 ms.

Nothing reaches the network; the exit status is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import batching_harness_sandbox as sb  # noqa: E402

import batching_harness as bh  # noqa: E402
from tests import fake_api as fa  # noqa: E402

SCALE = 60.0  # one real second stands for one minute
TURNAROUND_S = {"claude-opus-5-5": 90.0, "claude-haiku-5-5": 180.0}
SYNC_ANSWER_S = 4.0
LARGE_CHARS = 120_000  # about 30,000 tokens of pasted material


def session_turns(n: int) -> list[tuple[str, str]]:
    """(model, prompt): the first half on Opus, the rest on Haiku; every third turn large."""
    turns = []
    for i in range(n):
        model = "claude-opus-5-5" if i < n // 2 else "claude-haiku-5-5"
        body = "x" * LARGE_CHARS if i % 3 == 0 else "y" * 400
        turns.append((model, f"turn {i}: review this\n{body}"))
    return turns


def replay(route: str, wait_price: float, turns: list[tuple[str, str]]) -> tuple[float, float]:
    """(dollars, full-scale minutes waited) for the session under `route`."""
    bh.TURNAROUND_PRIOR_S = 120.0 / SCALE
    latency = {m: s / SCALE for m, s in TURNAROUND_S.items()}
    with fa.FakeAPI(latency_by_model=latency, stream_ttft_s=SYNC_ANSWER_S / SCALE) as api, \
            tempfile.TemporaryDirectory() as tmp:
        agent = _agent(api, Path(tmp), route, wait_price * SCALE)
        for model, prompt in turns:
            api.script.append(fa.text("noted"))
            agent.switch_model(model)
            agent.prompt(prompt)
        rows = agent.store.requests()
        agent.toolbox.close()
        dollars = sum(r.cost_usd or 0.0 for r in rows)
        waited = sum(r.wait_s or 0.0 for r in rows)  # the API's own clock, scaled
        return dollars, waited * SCALE / 60


def _agent(api: fa.FakeAPI, tmp: Path, route: str, wait_price_per_real_min: float) -> bh.Agent:
    home, work = tmp / "home", tmp / "work"
    home.mkdir()
    work.mkdir()
    store = bh.SqliteStore(home / "journal.db")
    policy = sb.SandboxPolicy(workdir=work, state_dir=home, enabled=False)
    toolbox = sb.Toolbox(sb.BashTool(policy), sb.EditorTool(policy), tool_timeout_s=30)
    batch_api = bh.BatchAPI(bh.make_client_factory("k", api.base_url),
                            budget=bh.RequestBudget(1000))
    channels = {"batch": bh.BatchChannel(batch_api, poll_interval_s=0.05),
                "sync": bh.SyncChannel(batch_api)}
    router = bh.Router(channels, route=route, wait_price_usd_per_min=wait_price_per_real_min)
    session = store.create_session(policy.workdir, bh.DEFAULT_MODEL)
    return bh.Agent(store, router, toolbox, bh.AgentSettings(model=bh.DEFAULT_MODEL),
                    session, emit=lambda e: None, ask_interrupt=lambda _h: "wait")


def sync_overhead(runs: int) -> tuple[float, float]:
    """(median time to first streamed token, median harness overhead per sync turn), ms."""
    import anthropic

    with fa.FakeAPI() as api, tempfile.TemporaryDirectory() as tmp:
        first: list[float] = []
        agent = _agent(api, Path(tmp), "sync", 0.0)
        started = [0.0]

        def emit(event: Any) -> None:
            if isinstance(event, bh.StreamDelta) and started[0]:
                first.append(time.perf_counter() - started[0])
                started[0] = 0.0

        agent._emit_to = emit
        walls, bare = [], []
        client = anthropic.Anthropic(api_key="k", base_url=api.base_url, max_retries=0)
        params = {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
                  "messages": [{"role": "user", "content": "hi"}]}
        for i in range(runs):
            api.script.extend([fa.text("hello there"), fa.text("hello there")])
            started[0] = t0 = time.perf_counter()
            agent.prompt(f"hi {i}")
            walls.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with client.messages.stream(**params) as stream:
                stream.get_final_message()
            bare.append(time.perf_counter() - t0)
        agent.toolbox.close()
        return statistics.median(first) * 1000, (statistics.median(walls)
                                                 - statistics.median(bare)) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/bench_router.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 turns instead of 20")
    args = parser.parse_args(argv)
    turns = session_turns(8 if args.quick else 20)
    results: dict[tuple[str, float], tuple[float, float]] = {}
    for price in (bh.INTERACTIVE_WAIT_PRICE, 0.0):
        for route in ("batch", "sync", "auto"):
            print(f"bench: {route} at ${price:g}/min", file=sys.stderr, flush=True)
            results[route, price] = replay(route, price, turns)
    print(f"{len(turns)} turns; batch turnaround {TURNAROUND_S}; sync answer {SYNC_ANSWER_S:g} s")
    print(f"{'wait price':>10} {'route':>6} {'cost':>9} {'waited':>9} {'cost + wait x price':>20}")
    for (route, price), (usd, minutes) in results.items():
        print(f"{price:>10g} {route:>6} {bh.fmt_usd(usd):>9} {minutes:>7.1f}m "
              f"{bh.fmt_usd(usd + minutes * price):>20}")
    ttft_ms, overhead_ms = sync_overhead(10 if args.quick else 20)
    print(f"time to first streamed token (stand-in, no added latency): {ttft_ms:.1f} ms")
    print(f"harness overhead per sync turn: {overhead_ms:.1f} ms")

    def combined(route: str, price: float) -> float:
        usd, minutes = results[route, price]
        return usd + minutes * price

    p = bh.INTERACTIVE_WAIT_PRICE
    best = min(combined("batch", p), combined("sync", p))
    auto0, batch0 = results["auto", 0.0][0], results["batch", 0.0][0]
    print(f"goal auto ≤ better of batch/sync at ${p:g}/min: "
          f"{'met' if combined('auto', p) <= best + 1e-9 else 'NOT met'} "
          f"({bh.fmt_usd(combined('auto', p))} vs {bh.fmt_usd(best)})")
    print(f"goal auto ≤ 1.05 x batch on cost at $0/min: "
          f"{'met' if auto0 <= 1.05 * batch0 else 'NOT met'} "
          f"({bh.fmt_usd(auto0)} vs {bh.fmt_usd(batch0)})")
    print(f"goal harness overhead per sync turn ≤ 20 ms: "
          f"{'met' if overhead_ms <= 20 else 'NOT met'} ({overhead_ms:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
