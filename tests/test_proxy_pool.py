"""`proxy --pool postgresql://…` (issue 12): proxies on many hosts share one PostgreSQL pool,
so their clients' entries fill the same batches, and a client whose proxy died is answered
by another without paying twice. A real server (conftest's pg_url), the real SDK against the
stand-in; held batches and release() make each wait deterministic."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import anthropic
import psycopg
import pytest

import batching_harness as bh
from tests.fake_api import FakeAPI, text
from tests.test_pool_faults import cut_pool  # noqa: F401 - a fixture, by name
from tests.test_proxy import (
    MODEL,
    Running,
    body_of,
    in_one_batch,
    start_proxy,
    stop_proxy,
    wait_until,
)
from tests.zygote import ForkedProcess, spawn

pytestmark = pytest.mark.usefixtures("_fast_ticks")


@pytest.fixture
def _fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bh, "POLLS_PER_MINUTE", 100_000)
    monkeypatch.setattr(bh, "ROLE_RETRY_S", 0.1)  # a dead holder's role moves at once


@pytest.fixture
def api() -> Any:
    with FakeAPI(hold=True) as fake:
        yield fake


def _echo(api: FakeAPI, n: int) -> None:
    api.script.extend([lambda p: text("answer to " + p["messages"][0]["content"])] * n)


def _ask(running: Running, prompt: str, answers: dict[str, str], key: str = "sk-ant-a") -> None:
    message = running.client(key).messages.create(**body_of(prompt))
    answers[prompt] = message.content[0].text


def _ledger(pg_url: str) -> list[bh.RequestRow]:
    store = bh.open_store(pg_url, Path("/nonexistent"))
    try:
        return [r for r in store.requests() if r.session_id == bh.PROXY_SESSION]
    finally:
        store.close()


def test_two_proxies_on_one_pool_fill_one_batch(api: FakeAPI, pg_url: str, tmp_path: Path):
    """Two proxies (two hosts, each its own home) and one key: their clients' entries go
    into ONE batch through the shared queue, each proxy answers its own client, and the
    pool's ledger holds both entries, priced, without the key."""
    one = start_proxy(tmp_path / "a", api.base_url, pool=pg_url, pool_window_s=60.0,
                      pool_width=2)
    two = start_proxy(tmp_path / "b", api.base_url, pool=pg_url, pool_window_s=60.0,
                      pool_width=2)
    _echo(api, 2)
    answers: dict[str, str] = {}
    try:
        batch_id = in_one_batch(api, [threading.Thread(target=_ask, args=(p, q, answers))
                                      for p, q in ((one, "first"), (two, "second"))])
        wait_until(lambda: [r.state for r in one.rows() if r.custom_id in
                            {x.custom_id for x in _ledger(pg_url)}].count("delivered") == 2)
    finally:
        stop_proxy(one)
        stop_proxy(two)
    assert answers == {"first": "answer to first", "second": "answer to second"}
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 2
    ledger = _ledger(pg_url)
    assert {(r.state, r.batch_id) for r in ledger} == {("ended", batch_id)}
    assert all(r.cost_usd and r.sync_cost_usd == pytest.approx(2 * r.cost_usd) for r in ledger)
    assert {r.client for r in one.rows()} == {"sdk-python"}
    assert one.app.log.summary()["widths"] == [2] and two.app.log.summary()["widths"] == [2]
    with psycopg.connect(pg_url.split("?")[0]) as db:  # the key is in no table of the pool
        dump = db.execute("SELECT string_agg(t::text, ' ') FROM (SELECT * FROM "
                          f"{pg_url.split('schema=')[1]}.proxy_requests) t").fetchone()[0]
    assert "sk-ant-a" not in dump


def test_keys_and_betas_never_share_a_batch(api: FakeAPI, pg_url: str, tmp_path: Path):
    """A batch is created with one client's key and betas: a shared pool keeps pooling
    them apart, and each create carries its entries' betas."""
    running = start_proxy(tmp_path, api.base_url, pool=pg_url, pool_window_s=60.0,
                          pool_width=2)
    _echo(api, 6)
    answers: dict[str, str] = {}

    def ask_beta(prompt: str) -> None:
        message = running.client().beta.messages.create(betas=["b-one"], **body_of(prompt))
        answers[prompt] = message.content[0].text

    threads = [threading.Thread(target=_ask, args=(running, "a1", answers)),
               threading.Thread(target=_ask, args=(running, "k1", answers, "sk-ant-k")),
               threading.Thread(target=ask_beta, args=("beta1",)),
               threading.Thread(target=_ask, args=(running, "a2", answers)),
               threading.Thread(target=_ask, args=(running, "k2", answers, "sk-ant-k")),
               threading.Thread(target=ask_beta, args=("beta2",))]
    try:
        for t in threads:
            t.start()
        batches = api.wait_for_batches(3)
        api.release()
        for t in threads:
            t.join(10)
    finally:
        stop_proxy(running)
    assert answers == {p: f"answer to {p}" for p in ("a1", "a2", "k1", "k2", "beta1", "beta2")}
    creates = [c for c in api.calls if c.endpoint == "create"]
    assert len(creates) == 3 == len(batches)
    by_batch: dict[str | None, set[str]] = {}
    for m in api.model_requests:
        by_batch.setdefault(m.batch_id, set()).add(m.params["messages"][0]["content"])
    assert sorted(map(sorted, by_batch.values())) == [["a1", "a2"], ["beta1", "beta2"],
                                                      ["k1", "k2"]]
    assert sorted((c.headers["authorization"], c.headers.get("anthropic-beta", ""))
                  for c in creates) == [("Bearer sk-ant-a", ""), ("Bearer sk-ant-a", "b-one"),
                                        ("Bearer sk-ant-k", "")]


def _spawn_proxy(home: Path, upstream: str, pool_url: str) -> tuple[ForkedProcess, str]:
    log = home.parent / f"proxy-{time.monotonic_ns()}.log"
    home.mkdir(parents=True, exist_ok=True)
    proc = spawn(["proxy", "--port", "0", "--upstream", upstream, "--poll-interval", "0.05",
                  "--pool-window", "60", "--max-width", "2", "--output-format", "json",
                  "--pool", pool_url],
                 env={**os.environ, "BATCHING_HARNESS_HOME": str(home)}, cwd=home.parent,
                 stdout=log)
    wait_until(lambda: log.exists() and log.read_text().endswith("\n"), timeout_s=60)
    started = json.loads(log.read_text().splitlines()[0])
    assert started["event"] == "started", started
    return proc, started["base_url"]


@pytest.mark.parametrize("killed", ["queued", "in a batch"])
def test_a_proxy_killed_its_clients_retry_on_another_proxy_pays_once(
        api: FakeAPI, pg_url: str, tmp_path: Path, killed: str):
    """SIGKILL the proxy holding a client's entry, queued or already in a batch: the
    client's retry, sent to another proxy of the pool, re-attaches to that same entry (the
    new proxy takes the dead one's flusher and poller roles: it has seen the key) and the
    model answers it once."""
    _echo(api, 2)
    proc, url = _spawn_proxy(tmp_path / "a", api.base_url, pg_url)
    dead = Running(None, None, url)  # type: ignore[arg-type]
    lost: dict[str, str] = {}
    partner = "partner" if killed == "in a batch" else "newcomer"
    for n, prompt in enumerate(["kept", partner] if killed == "in a batch" else ["kept"], 1):
        threading.Thread(target=_swallow, args=(dead, prompt, lost), daemon=True).start()
        wait_until(lambda n=n: len(_ledger(pg_url)) == n)  # journaled, queued
    if killed == "in a batch":
        api.wait_for_batches(1)
        wait_until(lambda: all(r.batch_id for r in _ledger(pg_url)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    other = start_proxy(tmp_path / "b", api.base_url, pool=pg_url, pool_window_s=60.0,
                        pool_width=2)
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=_ask, args=(other, p, answers))
               for p in (["kept"] if killed == "in a batch" else ["kept", partner])]
    try:
        for t in threads:
            t.start()
        api.wait_for_batches(1)
        api.release()
        for t in threads:
            t.join(10)
    finally:
        stop_proxy(other)
    assert answers["kept"] == "answer to kept" and not lost
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 2
    assert sorted(m.params["messages"][0]["content"] for m in api.model_requests) == sorted(
        ["kept", partner])
    delivered = sorted(r.attaches for r in other.rows() if r.state == "delivered")
    assert delivered == ([1, 2] if killed == "queued" else [2])  # kept: its retry re-attached


def _swallow(running: Running, prompt: str, answers: dict[str, str]) -> None:
    """A client of a proxy about to be killed: its connection just breaks."""
    with contextlib.suppress(Exception):  # killed mid-request: any way of failing will do
        _ask(running, prompt, answers)


def test_proxy_pool_from_the_command_line_and_stats(api: FakeAPI, pg_url: str,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]):
    """`--pool` and BATCHING_HARNESS_POOL reach the proxy; `--stats --pool` shows the
    proxied entries once, in the proxy's table, not again among agent turns."""
    env = {"HOME": str(tmp_path)}
    assert bh.parse_proxy_config(["--pool", pg_url], env).pool == pg_url
    assert bh.parse_proxy_config([], {**env, "BATCHING_HARNESS_POOL": pg_url}).pool == pg_url
    api.hold = False
    _echo(api, 1)
    running = start_proxy(tmp_path, api.base_url, pool=pg_url, pool_window_s=0.0)
    try:
        assert running.client().messages.create(**body_of("hi")).content[0].text == \
            "answer to hi"
    finally:
        stop_proxy(running)
    assert bh.main(["--stats", "--pool", pg_url], {**env, "BATCHING_HARNESS_HOME":
                                                   str(tmp_path / "h")}) == 0
    out = capsys.readouterr().out
    assert "proxy" in out.lower() and "sdk-python" in out
    assert f"{MODEL}" not in out.split("spend per day")[0], out  # no agent turn of that model


def test_a_fleet_and_a_proxy_with_one_key_share_a_batch(fake_api: FakeAPI, pg_url: str,
                                                        tmp_path: Path):
    """Fleets and proxies pool together: a fleet's agent (its own process) and a proxy's
    client that send with the same key to the same endpoint ride in one batch. The test
    holds the flusher role until both are queued (they start at different moments)."""
    from tests.test_shared_pool import Host, _flusher_key

    store = bh.PostgresStore(pg_url)
    gate = store.hold_role("flusher", _flusher_key(fake_api))
    assert gate is not None
    running = start_proxy(tmp_path / "proxy", fake_api.base_url, pool=pg_url,
                          pool_window_s=60.0, pool_width=2)  # the fleet's turns: 0.5 s
    answers: dict[str, Any] = {}

    def ask() -> None:
        answers["proxy"] = running.client("test-key").messages.create(
            model=bh.DEFAULT_MODEL, max_tokens=bh.DEFAULT_MAX_TOKENS,
            messages=[{"role": "user", "content": "hello from a proxy client"}])

    client = threading.Thread(target=ask)
    try:
        client.start()
        host = Host(0, fake_api, pg_url, tmp_path, agents=1, window_s=0.5)
        wait_until(lambda: store.queued_turns(_flusher_key(fake_api)) == 2, timeout_s=60)
        gate.release()
        out = host.finish()
        client.join(30)
    finally:
        stop_proxy(running)
        store.close()
    assert out["agents"][0]["state"] == "done"
    assert answers["proxy"].content
    first = [r["custom_id"] for r in fake_api._batches[fake_api.batch_ids()[0]].requests]
    assert len(first) == 2 and sum(c.startswith("bh_") for c in first) == 1, first


def test_a_pool_that_cannot_be_reached_is_a_529_and_the_retry_is_answered(
        api: FakeAPI, cut_pool, tmp_path: Path):  # noqa: F811 - the fixture above
    """The pool's server went away: the client heard a 500 "internal error" and a bug was
    logged. It hears the API's 529 (its SDK sends the request again), nothing is logged as
    a bug, and once the server is back the same request is answered."""
    api.hold = False
    _echo(api, 1)
    running = start_proxy(tmp_path, api.base_url, pool=cut_pool.url, pool_window_s=0.0)
    try:
        cut_pool.cut()
        with pytest.raises(anthropic.InternalServerError) as refused:
            running.client().messages.create(**body_of("while cut off"))
        assert refused.value.status_code == 529 and "cannot be used" in str(refused.value)
        cut_pool.restore()
        message = running.client().messages.create(**body_of("while cut off"))
        assert message.content[0].text == "answer to while cut off"
    finally:
        stop_proxy(running)
    assert not (tmp_path / "home" / "errors.log").exists()
    assert len(api.model_requests) == 1


def test_a_proxy_keeps_no_pool_connection_per_request_it_served(api: FakeAPI, pg_url: str,
                                                                 tmp_path: Path):
    """Each client connection is served on a thread of its own, and each thread kept its
    own connection to the store for as long as the proxy ran: a proxy sharing a pool ran
    the server out of connection slots after about a hundred clients. A thread's
    connection now closes with the thread."""
    api.hold = False
    _echo(api, 12)
    running = start_proxy(tmp_path, api.base_url, pool=pg_url, pool_window_s=0.0)
    try:
        for n in range(12):  # a new client each time: a new connection, a new thread
            with running.client() as client:
                assert client.messages.create(**body_of(f"q{n}")).content
        wait_until(lambda: len(running.app.store._connections) <= 6, timeout_s=3)
        # (6: the pool's listener, flusher and poller, the journal writer, the main thread's)
    finally:
        stop_proxy(running)


def test_a_model_name_with_a_slash_keeps_its_pool_key_whole():
    """A gateway-style model ("vendor/model") split the pool key: its size class was read
    as betas (the create went out with `anthropic-beta: 0`, refused) and the window was
    looked up for "vendor"."""
    key = bh.shared_pool_key("kacct", {"model": "anthropic/claude-x", "max_tokens": 100},
                             ["b-one"])
    assert bh.pool_key_model(key) == "anthropic/claude-x"
    assert bh.pool_key_betas(key) == ["b-one"]
    assert bh.pool_key_betas(bh.shared_pool_key("kacct", {"model": "a/b"})) == []


def test_a_retry_waiting_on_a_stopping_proxys_queued_entry_is_queued_again(
        api: FakeAPI, pg_url: str, tmp_path: Path):
    """A rolling restart: the client's retry reached proxy B while proxy A still had the
    entry queued; A, stopping, took its queued entries back out of the queue, and B waited
    on it for good. B now hears it was withdrawn and queues it itself: answered, once."""
    _echo(api, 1)
    one = start_proxy(tmp_path / "a", api.base_url, pool=pg_url, pool_window_s=60.0)
    two = start_proxy(tmp_path / "b", api.base_url, pool=pg_url, pool_window_s=0.5)
    answers: dict[str, str] = {}
    lost: dict[str, str] = {}
    try:
        threading.Thread(target=_swallow, args=(one, "kept", lost), daemon=True).start()
        wait_until(lambda: len(_ledger(pg_url)) == 1)  # queued by A (its window: a minute)
        retry = threading.Thread(target=_ask, args=(two, "kept", answers))
        retry.start()
        # B waits on A's queued entry (in B's shared channel), then A stops and withdraws it
        wait_until(lambda: any(p._sending for p in two.app.pool._pools.values()))
        stop_proxy(one)
        api.wait_for_batches(1, timeout_s=20)
        api.release()
        retry.join(20)
    finally:
        stop_proxy(two)
    assert answers == {"kept": "answer to kept"}
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 1


def test_the_pool_restarting_under_a_queued_entry_loses_and_repeats_nothing(
        api: FakeAPI, cut_pool, tmp_path: Path):  # noqa: F811 - the fixture above
    """The pool's server went away while an entry waited in the queue: a write on a broken
    connection failed the entry although its batch was about to be made, and its retry paid
    again. Writes after the batch are best effort; the entry ends with its batch."""
    _echo(api, 2)
    running = start_proxy(tmp_path, api.base_url, pool=cut_pool.url, pool_window_s=60.0,
                          pool_width=2)
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=_ask, args=(running, p, answers))
               for p in ("first", "second")]
    try:
        threads[0].start()
        look = bh.PostgresStore(cut_pool.url)
        try:  # queued: its thread's connection is then one the cut breaks
            wait_until(lambda: [look.queue_entry(r.custom_id) for r in running.rows()][:1] ==
                       [("queued", None, None, mock.ANY)])
        finally:
            look.close()
        cut_pool.cut()
        cut_pool.restore()
        threads[1].start()  # the width cap: the batch is made
        api.wait_for_batches(1, timeout_s=20)
        api.release()
        for t in threads:
            t.join(20)
    finally:
        stop_proxy(running)
    assert answers == {"first": "answer to first", "second": "answer to second"}
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 2
    assert not (tmp_path / "home" / "errors.log").exists()
