"""Benchmark of the proxy (issue 11) against the local stand-in: `python -m tests.bench_proxy`.

1. N concurrent clients x T turns (official SDK, streaming, one tool call per turn): batches
   created against requests, widths, batch-API requests per minute at the stand-in.
2. The sync lane's added latency: the same small request straight to the stand-in and
   through the proxy, over kept-alive connections (goal: p50 <= 5 ms).
3. Memory per open stream: the proxy's RSS with K streams waiting on held batches.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import anthropic

from tests.fake_api import FakeAPI, tool_calls

ROOT = Path(__file__).resolve().parent.parent
MODEL = "claude-opus-5-5"
TOOLS = [{"name": "bash", "type": "bash_20250124"}]


def spawn_proxy(upstream: str, home: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "BATCHING_HARNESS_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "batching_harness.py"), "proxy",
                             "--port", "0", "--upstream", upstream, "--output-format", "json",
                             *extra], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline())
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc, started["base_url"]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(30)


def agent_turns(url: str, client_id: int, turns: int, waits: list[float]) -> None:
    client = anthropic.Anthropic(api_key="sk-ant-bench", base_url=url, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": f"client {client_id}: go"}]
    for _ in range(turns):
        started = time.monotonic()
        with client.messages.stream(model=MODEL, max_tokens=4096, tools=TOOLS,
                                    messages=messages) as stream:
            message = stream.get_final_message()
        waits.append(time.monotonic() - started)
        call = next(b for b in message.content if b.type == "tool_use")
        messages += [{"role": "assistant", "content": message.to_param()["content"]},
                     {"role": "user", "content": [{"type": "tool_result",
                                                   "tool_use_id": call.id, "content": "ok"}]}]


def bench_pooling(clients: int, turns: int, latency_s: float, window_s: float,
                  home: Path) -> dict[str, Any]:
    with FakeAPI(latency_s=latency_s) as api:
        api.script.extend([tool_calls(("bash", {"command": "true"}))] * (clients * turns))
        proc, url = spawn_proxy(api.base_url, home, "--pool-window", str(window_s),
                                "--poll-interval", "0.5")
        waits: list[float] = []
        started = time.monotonic()
        threads = [threading.Thread(target=agent_turns, args=(url, i, turns, waits))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.monotonic() - started
        stop(proc)
        widths = [len(api.batch(b)["request_counts"]) and
                  sum(api.batch(b)["request_counts"].values()) for b in api.batch_ids()]
        batch_calls = [c for c in api.calls if c.endpoint in
                       ("create", "list", "retrieve", "results", "cancel")]
    return {"clients": clients, "turns": turns, "requests": clients * turns,
            "batches": len(widths), "width_mean": statistics.mean(widths),
            "width_max": max(widths), "wall_s": wall_s,
            "batch_api_rpm": len(batch_calls) / (wall_s / 60),
            "turn_wait_p50_s": statistics.median(waits)}


def _timed_posts(url: str, path: str, body: bytes, n: int) -> list[float]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    headers = {"x-api-key": "sk-ant-bench", "anthropic-version": "2023-06-01",
               "content-type": "application/json"}
    times = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        times.append(time.perf_counter() - started)
        assert response.status == 200, response.status
    conn.close()
    return times


def bench_sync_overhead(n: int, home: Path) -> dict[str, float]:
    """The stand-in runs in a process of its own here, as the real API would: sharing this
    process's GIL with the timing loop it added milliseconds to both sides."""
    body = json.dumps({"model": "claude-haiku-5-5", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    port, proxy_port = _free_port(), _free_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_api", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    upstream = f"http://127.0.0.1:{port}"
    try:
        # Its lines go to /dev/null: a pipe read here would wake this process per request.
        proc = subprocess.Popen([sys.executable, str(ROOT / "batching_harness.py"), "proxy",
                                 "--port", str(proxy_port), "--upstream", upstream],
                                env={**os.environ, "BATCHING_HARNESS_HOME": str(home)},
                                stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{proxy_port}"
        _wait_for_port(proxy_port)
        _wait_for_port(port)
        _timed_posts(url, "/v1/messages", body, 20)  # warm both connections
        direct = _timed_posts(upstream, "/v1/messages", body, n)
        proxied = _timed_posts(url, "/v1/messages", body, n)
        stop(proc)
    finally:
        fake.terminate()
        fake.wait(10)
    return {"direct_p50_ms": statistics.median(direct) * 1000,
            "proxy_p50_ms": statistics.median(proxied) * 1000,
            "added_p50_ms": (statistics.median(proxied) - statistics.median(direct)) * 1000,
            "added_p90_ms": (sorted(proxied)[int(0.9 * n)] - sorted(direct)[int(0.9 * n)])
            * 1000}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bench_open_streams(k: int, home: Path) -> dict[str, float]:
    with FakeAPI(hold=True) as api:
        proc, url = spawn_proxy(api.base_url, home, "--pool-window", "0.5", "--max-width",
                                str(k))
        parts = urllib.parse.urlsplit(url)
        opener = http.client.HTTPConnection(parts.hostname, parts.port)
        opener.request("GET", "/v1/models", headers={"x-api-key": "k"})
        opener.getresponse().read()
        time.sleep(1.0)  # let start-up (the SDK import) settle before the baseline
        before = _rss_kib(proc.pid)
        conns = []
        for i in range(k):
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            body = json.dumps({"model": MODEL, "max_tokens": 4096, "tools": TOOLS,
                               "stream": True,
                               "messages": [{"role": "user", "content": f"stream {i}"}]})
            conn.request("POST", "/v1/messages", body=body,
                         headers={"x-api-key": "sk-ant-bench", "content-type":
                                  "application/json"})
            conns.append(conn)
        for conn in conns:
            response = conn.getresponse()
            assert response.status == 200
            assert response.readline().startswith(b"event: message_start")
        after = _rss_kib(proc.pid)
        api.release()
        for conn in conns:
            conn.close()
        stop(proc)
    return {"streams": k, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
            "kib_per_stream": (after - before) / k}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--latency", type=float, default=3.0, help="batch latency at the stand-in")
    p.add_argument("--window", type=float, default=1.0, help="the proxy's --pool-window")
    p.add_argument("--sync-requests", type=int, default=300)
    p.add_argument("--streams", type=int, default=200)
    args = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        pooling = bench_pooling(args.clients, args.turns, args.latency, args.window,
                                home / "a")
        print(f"pooling  {pooling['clients']} clients x {pooling['turns']} turns = "
              f"{pooling['requests']} requests -> {pooling['batches']} batches (width mean "
              f"{pooling['width_mean']:.1f}, max {pooling['width_max']}); wall "
              f"{pooling['wall_s']:.1f} s at {args.latency:g} s batch latency; turn wait p50 "
              f"{pooling['turn_wait_p50_s']:.2f} s; batch API {pooling['batch_api_rpm']:.0f} "
              "requests/min")
        single = bench_pooling(1, args.turns, args.latency, args.window, home / "b")
        print(f"alone    1 client x {single['turns']} turns -> {single['batches']} batches; "
              f"batch API {single['batch_api_rpm']:.0f} requests/min")
        sync = bench_sync_overhead(args.sync_requests, home / "c")
        print(f"sync     {args.sync_requests} small requests: direct p50 "
              f"{sync['direct_p50_ms']:.2f} ms, through the proxy p50 "
              f"{sync['proxy_p50_ms']:.2f} ms: added p50 {sync['added_p50_ms']:.2f} ms, "
              f"p90 {sync['added_p90_ms']:.2f} ms")
        streams = bench_open_streams(args.streams, home / "d")
        print(f"streams  {streams['streams']} open streams on held batches: RSS "
              f"{streams['rss_before_mib']:.1f} -> {streams['rss_after_mib']:.1f} MiB, "
              f"{streams['kib_per_stream']:.0f} KiB per stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
