"""The batch channel owns all waiting: one poller for every batch in flight, one list call
per tick, one request budget per API key, results in one request. The schedule is checked
on a fake clock against a stub of our own BatchAPI (the SDK is never mocked); the wire
behaviour against the stand-in through the real SDK."""

from __future__ import annotations

import threading

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import make_channel


class FakeClock(bh.Clock):
    """Time moves only when someone waits: the poller's gaps cost no real time."""

    def __init__(self) -> None:
        self.t = 0.0
        self._lock = threading.Lock()
        self.frozen = threading.Event()  # set: time stands still (the test is setting up)

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.t += max(seconds, 0.0)

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        if self.frozen.is_set():
            return event.wait(0.001)
        if not event.is_set():
            self.sleep(timeout_s)
        return event.is_set()


class StubAPI:
    """Our BatchAPI's calls, answered from a table of when each batch ends."""

    def __init__(self, clock: FakeClock, ends: dict[str, float], *, hidden: set[str] = frozenset(),
                 null_urls: int = 0) -> None:
        self.clock, self.ends, self.hidden = clock, ends, set(hidden)
        self.lists: list[float] = []
        self.retrieves: list[tuple[float, str]] = []
        self.results_calls = 0
        self.null_urls = null_urls

    def _view(self, batch_id: str) -> bh.BatchView:
        ended = self.clock.now() >= self.ends[batch_id]
        url = None
        if ended and self.null_urls > 0:
            self.null_urls -= 1
        elif ended:
            url = f"https://stub/{batch_id}/results"
        return bh.BatchView(batch_id, "ended" if ended else "in_progress", 0.0, 1,
                            self.ends[batch_id] if ended else None, url)

    def list_views(self, *, oldest, notify):
        self.lists.append(self.clock.now())
        return {b: self._view(b) for b in self.ends if b not in self.hidden}

    def retrieve(self, batch_id, notify):
        self.retrieves.append((self.clock.now(), batch_id))
        return self._view(batch_id)

    def results(self, url, notify):
        self.results_calls += 1
        batch_id = url.split("/")[-2]
        return {f"c_{batch_id}": bh.EntryResult(f"c_{batch_id}", "succeeded",
                                                {"content": [], "stop_reason": "end_turn"})}


def _wait_all(channel, ends, expected_s=None):
    channel.clock.frozen.set()  # every batch is sent at once, as a pooled round would be
    tickets = [channel.watch(f"c_{b}", b, sent_at=channel.clock.now(), expected_s=expected_s,
                             on_status=lambda s: None, notify=print) for b in ends]
    channel.clock.frozen.clear()
    for ticket in tickets:
        assert ticket.event.wait(10), "the poller never resolved the ticket"
    return [t.result() for t in tickets]


@pytest.mark.parametrize("expected_s,end_s", [(70, 110), (200, 260), (20, 20), (None, 300)])
def test_no_minute_holds_more_than_the_poll_budget(expected_s, end_s):
    """Regression: polling every second from 0.85x to 1.5x the expected wait made 54 polls
    in one minute when a batch ran late."""
    clock = FakeClock()
    stub = StubAPI(clock, {"b": end_s})
    _wait_all(bh.BatchChannel(stub, poll_interval_s=2.5, clock=clock), stub.ends, expected_s)
    polls = stub.lists
    worst = max(sum(1 for t in polls if start <= t < start + 60) for start in polls)
    assert worst <= bh.POLLS_PER_MINUTE
    assert polls[-1] - end_s <= 2.5 + 1e-9


def test_a_tiny_poll_interval_spreads_polls_instead_of_stalling():
    """Regression: at --poll-interval 0.1 the budget ran out in 2.8 s and a batch that ended
    at 4 s was seen after a minute."""
    clock = FakeClock()
    stub = StubAPI(clock, {"b": 4.0})
    _wait_all(bh.BatchChannel(stub, poll_interval_s=0.1, clock=clock), stub.ends)
    assert stub.lists[-1] - 4.0 <= 60.0 / bh.POLLS_PER_MINUTE + 1e-9


def test_twenty_waiters_cost_one_list_call_per_tick():
    """Twenty batches in flight are polled as cheaply as one: one list call per tick."""
    one, twenty = FakeClock(), FakeClock()
    stub_one = StubAPI(one, {"b0": 95.0})
    stub_twenty = StubAPI(twenty, {f"b{i}": 95.0 for i in range(20)})
    _wait_all(bh.BatchChannel(stub_one, clock=one), stub_one.ends)
    arrivals = _wait_all(bh.BatchChannel(stub_twenty, clock=twenty), stub_twenty.ends)
    assert len(stub_twenty.lists) == len(stub_one.lists)
    assert not stub_twenty.retrieves
    assert all(a.entry is not None and a.entry.type == "succeeded" for a in arrivals)


def test_a_batch_the_list_does_not_show_is_retrieved_after_two_ticks():
    clock = FakeClock()
    stub = StubAPI(clock, {"shown": 30.0, "old": 30.0}, hidden={"old"})
    _wait_all(bh.BatchChannel(stub, clock=clock), stub.ends)
    assert stub.retrieves and stub.retrieves[0][1] == "old"
    first_retrieve = stub.retrieves[0][0]
    assert sum(1 for t in stub.lists if t <= first_retrieve) == 2


def test_an_ended_batch_without_results_url_is_asked_again_not_a_crash():
    """Regression (issue 14.5): results_url null on an ended batch made every attempt, and
    every resume, end in an internal error."""
    clock = FakeClock()
    stub = StubAPI(clock, {"b": 5.0}, null_urls=2)
    (arrival,) = _wait_all(bh.BatchChannel(stub, clock=clock), stub.ends)
    assert arrival.entry is not None and stub.results_calls == 1


def test_a_batch_that_never_gets_a_results_url_fails_with_a_clear_message():
    clock = FakeClock()
    stub = StubAPI(clock, {"b": 5.0}, null_urls=1000)
    channel = bh.BatchChannel(stub, clock=clock)
    ticket = channel.watch("c_b", "b", sent_at=0.0, expected_s=None, on_status=print,
                           notify=lambda _t: None)
    assert ticket.event.wait(10)
    with pytest.raises(bh.TransportError, match="no results_url"):
        ticket.result()


def test_the_request_budget_is_shared_by_every_caller_of_one_key():
    clock = FakeClock()
    budget = bh.RequestBudget(per_minute=3, clock=clock)
    for _ in range(3):
        budget.take()
    assert clock.now() == 0.0 and budget.in_last_minute() == 3
    budget.take()  # the fourth waits for the first to leave the minute
    assert clock.now() == pytest.approx(60.0)


def test_one_turn_polls_by_list_and_downloads_results_in_one_request(fake_api):
    """On the wire: no retrieve at all, and the results file in one GET of results_url."""
    fake_api.script.append(fa.text("hi"))
    channel = make_channel(fake_api)
    batch_id = channel.send("c1", {"model": "claude-opus-5-5", "max_tokens": 10,
                                   "messages": [{"role": "user", "content": "hi"}]},
                            exclude=set, notify=print)
    ticket = channel.watch("c1", batch_id, sent_at=0.0, expected_s=None, on_status=print,
                           notify=print)
    assert ticket.event.wait(10)
    arrival = ticket.result()
    assert arrival.entry.message["content"][0]["text"] == "hi"
    assert fake_api.count("retrieve") == 0 and fake_api.count("results") == 1
    assert fake_api.count("list") >= 1


def test_back_to_back_turns_keep_the_one_second_endgame():
    """Regression: the budget of the turn before counted against the next one's endgame,
    spreading its last polls to 2.1 s and the detection lag to 1.8 s."""
    clock = FakeClock()
    channel, polls = None, []
    for turn in range(5):
        start = clock.now()
        stub = StubAPI(clock, {f"b{turn}": start + 20.0})
        channel = channel or bh.BatchChannel(stub, poll_interval_s=2.5, clock=clock)
        channel.api = stub
        _wait_all(channel, stub.ends, expected_s=20.0 if turn else None)
        polls += stub.lists
        assert stub.lists[-1] - (start + 20.0) <= 1.0 + 1e-9
        clock.sleep(1.0)  # the tool run between two turns
    assert max(sum(1 for t in polls if s <= t < s + 60) for s in polls) <= bh.POLLS_PER_MINUTE
