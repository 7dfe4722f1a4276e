"""The shared pool when things go wrong: a store that is cut off or full, a batch the API no
longer knows, a Ctrl-C on one host of many. Against a real PostgreSQL server (conftest's
pg_server) and the stand-in; the store is cut off for real, by a role the test locks out."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import batching_harness as bh
from tests.support import make_channel, request_row
from tests.test_shared_pool import _role_holder_pid


def _until(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@dataclass
class CutPool:
    """A pool reached as a login role of its own, so that the test can shut it out: every
    session of the role ended and no new one let in (CONNECTION LIMIT 0: "too many
    connections for role"), which is what a full or vanished server looks like to a host."""

    url: str
    role: str
    admin: object

    def cut(self) -> None:
        self.admin.execute(f"ALTER ROLE {self.role} CONNECTION LIMIT 0")
        self.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE usename=%s", (self.role,))

    def restore(self) -> None:
        self.admin.execute(f"ALTER ROLE {self.role} CONNECTION LIMIT -1")

    def advisory_locks(self) -> int:
        return self.admin.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid=l.pid "
            "WHERE l.locktype='advisory' AND l.granted AND a.usename=%s",
            (self.role,)).fetchone()[0]


@pytest.fixture
def cut_pool(pg_server: str, pg_url: str) -> Iterator[CutPool]:
    import psycopg

    role, schema = "r_" + secrets.token_hex(5), pg_url.rsplit("schema=", 1)[1]
    user = pg_server.split("://", 1)[1].split("@", 1)[0]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
        try:
            yield CutPool(pg_url.replace(f"//{user}@", f"//{role}@", 1), role, admin)
        finally:
            admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename=%s", (role,))
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            admin.execute(f"DROP ROLE {role}")


class CountingOutage(bh.PoolOutage):
    """The pool's outage reporter, counting every failure its threads run into."""

    def __init__(self, say) -> None:
        super().__init__(say)
        self.failures = 0

    def down(self, exc: bh.JournalError) -> None:
        self.failures += 1
        super().down(exc)


def test_a_full_server_is_named_with_its_own_fix_and_waited_for(cut_pool):
    """Running out of connections (each agent thread holds one) told the user to start the
    server; the fix is more slots, fewer agents or a pooler, and the pool waits meanwhile."""
    cut_pool.cut()
    with pytest.raises(bh.PoolUnreachable) as caught:
        bh.PostgresStore(cut_pool.url)
    text = str(caught.value)
    assert "too many connections" in text and "max_connections" in text
    assert "--concurrency" in text and "start the server" not in text


def test_the_pool_is_called_reachable_only_after_a_round_trip(fake_api, cut_pool,
                                                              monkeypatch):
    """The poller announced "reachable again" after any pass that made no store call at all
    (between its role checks), while the server was still down; every later failure then
    fell in the quiet time after a recovery and was never announced."""
    monkeypatch.setattr(bh, "POOL_RETRY_S", 0.05)  # passes between role checks: no store call
    monkeypatch.setattr(bh, "ROLE_CHECK_S", 0.5)
    monkeypatch.setattr(bh, "IN_FLIGHT_REFRESH_S", 60.0)
    store = bh.PostgresStore(cut_pool.url)
    said: list[str] = []
    outage = CountingOutage(said.append)
    channel = bh.SharedPoolChannel(store, make_channel(fake_api), account="acct",
                                   say=said.append, outage=outage)
    try:
        channel.join()
        _until(lambda: cut_pool.advisory_locks() >= 1, "the channel polls the account")
        cut_pool.cut()
        _until(lambda: not store._held, "the poller knows its role is lost")
        failed = outage.failures
        _until(lambda: outage.failures >= failed + 20, "the threads have failed a while")
        assert [t for t in said if "Waiting for it" in t], said
        assert not [t for t in said if "the pool the pool" in t], said  # the wake-ups' line
        assert not [t for t in said if "reachable again" in t], said
        cut_pool.restore()
        _until(lambda: any("reachable again" in t for t in said), "the pool is back")
    finally:
        cut_pool.restore()
        channel.close()
        store.close()


def _one_agent_fleet(store: bh.Store, api, make_toolbox, outage: bh.PoolOutage) -> bh.Fleet:
    plan = bh.FleetPlan("system", 4, 0.0, False, {})
    run = store.create_run("tasks.jsonl", plan.to_json())
    session = store.create_session(Path("/w"), bh.DEFAULT_MODEL)
    store.add_agent(bh.FleetAgentRow(run.id, 0, "a0", session.id, "hi", "/w", bh.DEFAULT_MODEL,
                                     None, "queued"))
    pool = bh.PooledBatchChannel(make_channel(api), journal=bh.RunPoolJournal(store, run.id))
    return bh.Fleet(store, run, plan, pool, make_toolbox, concurrency=1, tool_slots=1,
                    outage=outage)


def test_an_agent_starting_while_the_pool_is_cut_off_waits_and_starts(fake_api, cut_pool,
                                                                      monkeypatch):
    """The start of an agent was journaled outside the outage handling: a pool cut off at
    that moment failed the agent for good as "never started" (a resume skips failed agents,
    so its task was lost). It waits for the pool, then starts."""
    monkeypatch.setattr(bh, "POOL_RETRY_S", 0.05)
    store = bh.PostgresStore(cut_pool.url)
    said: list[str] = []
    started, finish = threading.Event(), threading.Event()

    def make_toolbox(_row):  # the agent has started: hold it here while the test looks
        started.set()
        finish.wait(30)
        raise bh.HarnessError("the test ends here")

    fleet = _one_agent_fleet(store, fake_api, make_toolbox, CountingOutage(said.append))
    (row,) = fleet.agents
    cut_pool.cut()
    def run_agent() -> None:
        with contextlib.suppress(bh.HarnessError):  # the toolbox's, which ends the test
            fleet._run_agent(row)

    agent = threading.Thread(target=run_agent, daemon=True)
    agent.start()
    try:
        _until(lambda: fleet.outage.failures >= 1, "the start has met the outage")
        cut_pool.restore()
        _until(started.is_set, "the agent starts once the pool is back")
        look = bh.PostgresStore(cut_pool.url)  # the test's own connection was cut too
        (row,) = look.fleet_agents(row.run_id)
        look.close()
        assert row.state == "running", row
    finally:
        cut_pool.restore()
        finish.set()
        agent.join(10)
        store.close()


def _in_a_batch(store: bh.Store, account: str, batch_id: str) -> str:
    """One turn of the account, claimed and recorded as riding in `batch_id`."""
    params = {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
              "messages": [{"role": "user", "content": "hi"}]}
    key = bh.shared_pool_key(account, params)
    row = request_row(store.create_session(Path("/w"), bh.DEFAULT_MODEL), max_tokens=100)
    store.begin_request(row)
    store.queue_turn(row.custom_id, key, params)
    claim = store.claim_turns(key, "host-gone", limit=1, lease_s=60)
    assert store.record_claim_batch(claim.intent_id, batch_id)
    return row.custom_id


def test_a_batch_the_api_does_not_know_ends_its_turns_on_every_host(fake_api, pg_url):
    """A batch the API answers 404 for stayed in flight forever: the poller said "trying
    again" every refresh, and the agent waiting on it (on any host) waited for good. Its
    turns now end, and the agent on the other host fails the turn as the in-process path
    does (the Collector: "no longer at the API; send the prompt again")."""
    account = bh.pool_account("test-key", fake_api.base_url)
    bogus = "msgbatch_01bogusbogusbogusbogus"
    poller_store, agent_store = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    custom_id = _in_a_batch(agent_store, account, bogus)
    said: list[str] = []
    poller = bh.SharedPoolChannel(poller_store, make_channel(fake_api), account=account,
                                  say=said.append)
    other = bh.SharedPoolChannel(agent_store, make_channel(fake_api), account=account)
    try:
        poller.join()
        _until(lambda: _role_holder_pid(agent_store._db, agent_store.schema, "poller", account),
               "a host polls the account")
        ticket = other.watch(custom_id, bogus, sent_at=time.time(), expected_s=None,
                             on_status=lambda _s: None, notify=print)
        assert ticket.event.wait(20), f"the turn in the unknown batch never ended: {said}"
        with pytest.raises(bh.BatchNotFound):
            ticket.result()
        row = agent_store.request(custom_id)
        assert (row.state, row.result_type, row.error_message) == (
            "ended", "missing", bh.BATCH_UNKNOWN)
        assert agent_store.batches_in_flight(account) == []  # nobody polls it any more
        # the poller says so just after the write that woke this agent: wait for its line
        _until(lambda: any(bogus in t for t in said), "the poller tells its user")
        assert len([t for t in said if bogus in t]) == 1, said
    finally:
        for channel in (poller, other):
            channel.close()
        poller_store.close()
        agent_store.close()


def _shared_batch(api, store: bh.Store, account: str, custom_ids: list[str]) -> str:
    """Turns (of any runs) created at the stand-in as ONE batch, recorded in the pool."""
    params = {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
              "messages": [{"role": "user", "content": "hi"}]}
    key = bh.shared_pool_key(account, params)
    session = store.create_session(Path("/w"), bh.DEFAULT_MODEL)
    for custom_id in custom_ids:
        store.begin_request(request_row(session, custom_id=custom_id, max_tokens=100))
        store.queue_turn(custom_id, key, params)
    claim = store.claim_turns(key, "host-a", limit=len(custom_ids), lease_s=60)
    batch_id = make_channel(api).api.create(
        [{"custom_id": c, "params": p} for c, p in claim.turns], exclude=lambda: set(),
        notify=print)
    assert store.record_claim_batch(claim.intent_id, batch_id)
    return batch_id


def _verdict(store: bh.Store, ticket: bh.Ticket) -> bh.Verdict:
    """What the agent does with the arrival: the Collector's record, then classify."""
    request = store.request(ticket.custom_id)
    store.record_outcome(ticket.custom_id, bh.outcome_of(request, ticket.result(), time.time()))
    return bh.classify(store.request(ticket.custom_id), max_resubmits=3)


def test_ctrl_c_cancel_on_one_host_cancels_only_batches_of_its_own_run(fake_api, pg_url):
    """`c` on host A cancelled the whole shared batch and failed host B's agents, whose
    user did nothing. A cancels only a batch all of whose turns are its run's; from a shared
    one its turns are detached (and A's user is told). A turn cancelled by a run that is not
    its own goes into a later batch, as an expired one does."""
    fake_api.hold = True
    account = bh.pool_account("test-key", fake_api.base_url)
    store_a, store_b = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    shared = _shared_batch(fake_api, store_a, account, ["runA-ag0-t1-at1-aaaaaa",
                                                        "runB-ag0-t1-at1-bbbbbb"])
    own = _shared_batch(fake_api, store_a, account, ["runA-ag1-t1-at1-cccccc"])
    said: list[str] = []
    host_a = bh.SharedPoolChannel(store_a, make_channel(fake_api), account=account,
                                  say=said.append, own_prefix="runA-")
    host_b = bh.SharedPoolChannel(store_b, make_channel(fake_api), account=account,
                                  own_prefix="runB-")
    try:
        for _agent in range(2):  # every agent of A asks; the user hears it once
            with pytest.raises(bh.BatchShared):
                host_a.cancel(shared, print)
        assert len([t for t in said if shared in t and "detached" in t]) == 1, said
        # the agent asking (Fleet.stop("cancel") answers its Ctrl-C with "cancel") detaches
        notices: list[bh.Event] = []
        collector = bh.Collector(store_a, bh.Router({"batch": host_a}, route="batch"),
                                 bh.Clock(), notices.append, lambda _handle: "cancel",
                                 lambda: None)
        mine = host_a.watch("runA-ag0-t1-at1-aaaaaa", shared, sent_at=time.time(),
                            expected_s=None, on_status=lambda _s: None, notify=print)
        with pytest.raises(bh.Detached):
            collector._on_interrupt(mine, host_a, store_a.request(mine.custom_id))
        assert [n.text for n in notices if "shared with other runs" in n.text], notices
        host_a.cancel(own, print)
        assert [fake_api._batches[b].status for b in (shared, own)] == [
            "in_progress", "canceling"], "only A's own batch is cancelled"
        # The shared batch is cancelled after all, by something that is not run B
        # (an older harness on host A, the console): B's turn is not at its end.
        make_channel(fake_api).api.cancel(shared, print)
        tickets = {cid: channel.watch(cid, batch, sent_at=time.time(), expected_s=None,
                                      on_status=lambda _s: None, notify=print)
                   for cid, channel, batch in (("runB-ag0-t1-at1-bbbbbb", host_b, shared),
                                               ("runA-ag1-t1-at1-cccccc", host_a, own))}
        fake_api.release()
        for ticket in tickets.values():
            assert ticket.event.wait(20), f"{ticket.custom_id} never ended"
        assert _verdict(store_b, tickets["runB-ag0-t1-at1-bbbbbb"]).action == "resubmit"
        assert _verdict(store_a, tickets["runA-ag1-t1-at1-cccccc"]).action == "fail"
    finally:
        fake_api.release()
        for channel in (host_a, host_b):
            channel.close()
        store_a.close()
        store_b.close()


def test_a_landed_turn_survives_a_failed_write_after_its_role_was_lost(fake_api, cut_pool):
    """The poller put a landed turn back for later by looking its ticket up in `watched`;
    a lost role empties that, so a second failed write (a flapping server) raised KeyError
    and halted the whole process as an "internal error"."""
    store = bh.PostgresStore(cut_pool.url)
    channel = bh.SharedPoolChannel(store, make_channel(fake_api),
                                   account="acct")
    ticket = bh.Ticket("runA-ag0-t1-at1-aaaaaa", "msgbatch_1")
    ticket.resolve(bh.Arrival(None, bh.BatchView("msgbatch_1", "ended", 0.0, 1, 1.0)))
    channel._landed.append(ticket)
    cut_pool.cut()
    try:
        with pytest.raises(bh.PoolUnreachable):
            channel._write_landed({})  # nothing watched: the role was lost
        assert list(channel._landed) == [ticket]  # written once the store is back
    finally:
        cut_pool.restore()
        store.close()


def test_a_bug_in_a_pool_thread_settles_every_waiting_send(fake_api, tmp_path):
    """halt() settles only the sends it can take back out of the queue; one already claimed
    by this process's own (now dead) flusher waited for its batch id forever."""
    store = bh.open_store(None, tmp_path)
    (custom_id,) = _queue_one(store)
    store.claim_turns("k", "this-host", limit=1, lease_s=60)  # claimed: not withdrawn
    channel = bh.SharedPoolChannel(store, make_channel(fake_api),
                                   account="acct")
    sending = bh._Sending(custom_id, 0.0, 0.0)
    channel._sending[custom_id] = sending

    def buggy() -> None:
        raise RuntimeError("a bug")

    channel._guarded(buggy)
    try:
        assert sending.done.is_set() and "internal error" in str(sending.error)
    finally:
        store.close()


def _queue_one(store: bh.Store) -> list[str]:
    row = request_row(store.create_session(Path("/w"), bh.DEFAULT_MODEL))
    store.begin_request(row)
    store.queue_turn(row.custom_id, "k", {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
                                          "messages": [{"role": "user", "content": "hi"}]})
    return [row.custom_id]


def test_a_create_that_returns_while_the_pool_closes_is_recorded(fake_api, pg_url):
    """The flusher's create answered after close() had begun: its batch id was never
    written (the write waited only "until closed"), so the turns stayed claimed until the
    lease ran out and another process found the batch by list. It is written at once now."""
    account = bh.pool_account("test-key", fake_api.base_url)
    store = bh.PostgresStore(pg_url)
    channel = bh.SharedPoolChannel(store, make_channel(fake_api), account=account,
                                   window_s=lambda _model: 0.0)
    params = {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
              "messages": [{"role": "user", "content": "hi"}]}
    row = request_row(store.create_session(Path("/w"), bh.DEFAULT_MODEL), max_tokens=100)
    store.begin_request(row)
    fake_api.inject("create", "slow", delay_s=1.0)
    try:
        channel.join()
        threading.Thread(target=lambda: channel.send(row.custom_id, params, exclude=set,
                                                     notify=print), daemon=True).start()
        _until(lambda: (store.queue_entry(row.custom_id) or ("",))[0] == "claimed",
               "the turn is claimed and its create under way")
    finally:
        channel.close()  # while the create is still being answered
    [batch_id] = fake_api.batch_ids()
    state, recorded, _error, _key = store.queue_entry(row.custom_id)
    assert (state, recorded) == ("sent", batch_id)
    store.close()


class _LooksCounted(bh.PostgresStore):
    """The pool's store, counting the flusher's looks at who is waiting: each one is a
    flush decision, so the test knows one was made without sleeping."""

    looks = 0

    def pool_census(self, account: str) -> tuple[int, int]:
        try:
            return super().pool_census(account)
        finally:
            self.looks += 1


def test_a_host_whose_clock_runs_ahead_leaves_live_claims_and_members_alone(fake_api, pg_url,
                                                                              monkeypatch):
    """Regression (review of issue 12): the pool reckoned leases and member rows by each
    host's clock. A host 60 s ahead took over another host's claim mid-create (a second
    create of the same turns: a batch paid twice, then cancelled) and counted that host's
    working agents as gone (a flush before everyone waited). It must leave both alone, and
    flush once the other host's agents really are all waiting."""
    monkeypatch.setattr(bh, "ROLE_RETRY_S", 0.2)  # the flusher role taken sooner
    account = bh.pool_account("test-key", fake_api.base_url)
    params = {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
              "messages": [{"role": "user", "content": "hi"}]}
    key = bh.shared_pool_key(account, params)
    host_a = bh.PostgresStore(pg_url)
    # Host A (this clock): one agent's turn mid-create under a live lease, one still working.
    mine = request_row(host_a.create_session(Path("/w"), bh.DEFAULT_MODEL), max_tokens=100)
    host_a.begin_request(mine)
    host_a.queue_turn(mine.custom_id, key, params)
    claim = host_a.claim_turns(key, "host-a", limit=1, lease_s=30)
    host_a.set_member("host-a", account, 2, 1, 30)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 60)  # the rest of it: host B
    store_b = _LooksCounted(pg_url)
    host_b = bh.SharedPoolChannel(store_b, make_channel(fake_api), account=account,
                                  window_s=lambda _model: 30.0)
    theirs = request_row(store_b.create_session(Path("/w"), bh.DEFAULT_MODEL), max_tokens=100)
    store_b.begin_request(theirs)
    sent: list[str] = []
    sender = threading.Thread(target=lambda: sent.append(host_b.send(
        theirs.custom_id, params, exclude=set, notify=print)), daemon=True)
    try:
        host_b.join()
        sender.start()
        _until(lambda: store_b.looks >= 1, "host B's flusher looks at its queued turn")
        host_a.set_member("host-a", account, 2, 1, 30)  # A's heartbeat: B looks again
        _until(lambda: store_b.looks >= 2 or fake_api.batch_ids(),
               "host B's flusher looks a second time")
        assert fake_api.batch_ids() == [], "flushed while host A's agent was still working"
        intent = host_a._one("SELECT holder, state FROM batch_intents WHERE id=?",
                             (claim.intent_id,))
        assert (intent["holder"], intent["state"]) == ("host-a", "creating")
        host_a.set_member("host-a", account, 1, 1, 30)  # A's other agent now waits too
        sender.join(20)
        assert sent and sent == fake_api.batch_ids(), "everyone waits: B flushes at once"
        assert [r["custom_id"] for r in fake_api._batches[sent[0]].requests] == [
            theirs.custom_id]  # only its own turn: A's is still A's to create
    finally:
        host_b.halt(bh.HarnessError("the test is over"))
        host_b.close()
        store_b.close()
        host_a.close()


def test_a_wall_clock_stepped_back_does_not_stop_a_hosts_heartbeat(fake_api, pg_url,
                                                                    monkeypatch):
    """The pool's threads scheduled their looks by time.time(): a clock stepped back a minute
    (NTP, a VM resumed) put the next member heartbeat a minute away, the member row ran out,
    and every other host stopped counting this host's working agents (flushes before they
    all waited). Local schedules are monotonic: the heartbeat goes on."""
    monkeypatch.setattr(bh, "MEMBER_LEASE_S", 0.6)  # a heartbeat every 0.2 s
    store = bh.PostgresStore(pg_url)
    channel = bh.SharedPoolChannel(store, make_channel(fake_api), account="acct")
    try:
        channel.join()
        _until(lambda: store.pool_census("acct")[0] == 1, "the host's member row is written")
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 60)
        deadline = time.monotonic() + 4 * bh.MEMBER_LEASE_S
        while time.monotonic() < deadline:  # several leases' worth: renewed all along
            assert store.pool_census("acct")[0] == 1, "the member row ran out"
            time.sleep(0.05)
    finally:
        channel.close()
        store.close()
