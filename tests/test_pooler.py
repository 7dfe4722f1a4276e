"""The pooler: many agents' turns in one batch. Driven through the real SDK against the
stand-in with held batches (a batch ends when the test releases it), so what is pooled,
when, and why is checked on the wire; the window is checked on an injected clock."""

from __future__ import annotations

import threading
import time

import pytest

import batching_harness as bh
from tests.support import TestClock, make_channel


def params(text: str = "hi", *, model: str = "claude-opus-5-5", max_tokens: int = 100) -> dict:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}]}


class JumpClock(TestClock):
    """Real time plus an offset that a wait moves forward by its whole timeout: a window of
    seconds passes at once, and nothing else is faked."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def wait(self, event, timeout_s):
        if not event.is_set():
            self.offset += max(timeout_s, 0.0)
        return event.is_set()


def make_pool(api, *, active: int, clock=None, **kwargs) -> bh.PooledBatchChannel:
    pool = bh.PooledBatchChannel(make_channel(api), clock=clock or TestClock(), **kwargs)
    for _ in range(active):
        pool.join()
    return pool


def send_all(pool, items) -> tuple[dict[str, str], list[threading.Thread]]:
    """Each (custom_id, params) sent from a thread of its own, as agents do."""
    handles: dict[str, str] = {}

    def one(custom_id, body):
        handles[custom_id] = pool.send(custom_id, body, exclude=set, notify=print)

    threads = [threading.Thread(target=one, args=item) for item in items]
    for t in threads:
        t.start()
    return handles, threads


def join(threads) -> None:
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a send never returned"


def widths(api) -> list[int]:
    return [len(api._batches[b].requests) for b in api.batch_ids()]


def test_ready_turns_of_every_active_agent_go_into_one_batch(fake_api):
    fake_api.hold = True
    pool = make_pool(fake_api, active=3, window_s=lambda _m: 1000.0)
    handles, threads = send_all(pool, [(f"c{i}", params()) for i in range(3)])
    join(threads)
    assert widths(fake_api) == [3] and fake_api.count("create") == 1
    assert len(set(handles.values())) == 1
    assert [f.reason for f in pool.flushes] == ["all waiting"]


def test_a_window_flushes_when_another_agent_is_still_busy(fake_api):
    """Two agents active, one ready: it goes when the window passes (on the injected clock)."""
    fake_api.hold = True
    clock = JumpClock()
    pool = make_pool(fake_api, active=2, clock=clock, window_s=lambda _m: 5.0)
    _handles, threads = send_all(pool, [("c0", params())])
    join(threads)
    (flush,) = pool.flushes
    assert flush.reason == "window" and flush.width == 1
    assert flush.delays_s[0] >= 5.0


def test_the_width_cap_splits_a_round(fake_api):
    fake_api.hold = True
    pool = make_pool(fake_api, active=5, max_width=2, window_s=lambda _m: 1000.0)
    _, threads = send_all(pool, [(f"c{i}", params()) for i in range(5)])
    join(threads)
    assert sorted(widths(fake_api)) == [1, 2, 2]
    assert sorted(f.reason for f in pool.flushes).count("width cap") >= 1


def test_turns_are_grouped_by_model_and_by_size(fake_api):
    """A huge max_tokens runs long: it must not hold small turns back, nor another model's."""
    fake_api.hold = True
    pool = make_pool(fake_api, active=4, window_s=lambda _m: 1000.0)
    _, threads = send_all(pool, [
        ("small1", params()), ("small2", params()),
        ("huge", params(max_tokens=64_000)), ("other", params(model="claude-sonnet-5"))])
    join(threads)
    assert sorted(widths(fake_api)) == [1, 1, 2]


def test_a_batch_holding_an_entry_nobody_waits_for_resolves_the_others(fake_api):
    """An unknown custom_id in the results (here: one whose agent went away) is skipped; a
    foreign or damaged id is not ours and parses to None."""
    pool = make_pool(fake_api, active=2, window_s=lambda _m: 1000.0)
    handles, threads = send_all(pool, [("mine", params()), ("gone", params())])
    join(threads)
    ticket = pool.watch("mine", handles["mine"], sent_at=0.0, expected_s=None,
                        on_status=lambda _s: None, notify=print)
    assert ticket.event.wait(10)
    assert ticket.result().entry.type == "succeeded"
    assert bh.parse_custom_id("gone") is None and bh.parse_custom_id(None) is None
    assert bh.parse_custom_id(bh.fleet_custom_id("0123abcd", 7, 5, 2))[1:] == (7, 5, 2)


def test_a_refused_key_halts_the_pool_and_leaves_every_turn_unsent(fake_api):
    """401/402/403 on the create: no request of this key can go, so every queued turn gets
    Halted (its row stays 'submitting', resumable) and later sends are refused at once."""
    fake_api.inject("create", "402")
    pool = bh.PooledBatchChannel(make_channel(fake_api), window_s=lambda _m: 0.0)
    with pytest.raises(bh.AccountRefused):
        pool.send("c0", params(), exclude=set, notify=print)
    with pytest.raises(bh.AccountRefused):
        pool.send("c1", params(), exclude=set, notify=print)
    assert fake_api.batch_ids() == []


def test_cancel_of_a_shared_batch_is_sent_once(fake_api):
    fake_api.hold = True
    pool = make_pool(fake_api, active=2, window_s=lambda _m: 1000.0)
    handles, threads = send_all(pool, [("a", params()), ("b", params())])
    join(threads)
    pool.cancel(handles["a"], print)
    pool.cancel(handles["b"], print)
    assert fake_api.count("cancel") == 1


def test_recover_finds_a_pooled_create_the_crash_never_journaled(fake_api, tmp_path):
    """Killed between the create and journaling its id: `fleet --continue` finds the N-wide
    batch by time and width and gives every entry its id, so none is created twice."""
    store = bh.FleetStore(tmp_path / "journal.db")
    run = store.create_run("tasks", {})
    session = store.create_session(tmp_path, "claude-opus-5-5")
    ids = ["c0", "c1", "c2"]
    for i, custom_id in enumerate(ids):
        store.begin_request(bh.RequestRow(
            custom_id=custom_id, session_id=session.id, conversation=0, n_messages=1 + i,
            model="claude-opus-5-5", cache_ttl="1h", max_tokens=10, request_hash="h",
            attempt=1, state="submitting", batch_id=None, submitted_at=time.time()))
    fake_api.hold = True
    journal = bh.RunPoolJournal(store, run.id)
    sent_at = time.time()
    journal.begin_pool_batch("claude-opus-5-5", "all waiting", sent_at, ids, [0, 0, 0])
    client = bh.make_client_factory("k", fake_api.base_url)()
    made = client.messages.batches.create(
        requests=[{"custom_id": c, "params": params()} for c in ids]).id
    client.messages.batches.create(requests=[{"custom_id": "x", "params": params()}])  # width 1
    clock = JumpClock()
    clock.offset = 10.0  # the crash was a while ago: no need to wait for the list to show it
    pool = bh.PooledBatchChannel(make_channel(fake_api), clock=clock)
    assert pool.recover(store, run.id, print) == [made]
    assert {store.request(c).batch_id for c in ids} == {made}
    assert {store.request(c).state for c in ids} == {"submitted"}
    assert pool.recover(store, run.id, print) == []  # looked up once, never again
    assert fake_api.count("create") == 2
    store.close()
