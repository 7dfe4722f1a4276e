"""The proxy (issue 11): other harnesses' requests through pooled batches, driven by the real
`anthropic` SDK and by raw HTTP against the local stand-in. Held batches and release() make
every wait deterministic; nothing sleeps to let something happen."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import signal
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

import batching_harness as bh
from tests import support
from tests.fake_api import FakeAPI, errored, raw, text, tool_calls
from tests.zygote import ForkedProcess, spawn

ROOT = Path(__file__).resolve().parent.parent
MODEL = "claude-opus-5-5"
TOOLS = [{"name": "bash", "type": "bash_20250124"}]


@dataclasses.dataclass
class Running:
    app: bh.ProxyApp
    out: io.StringIO
    url: str

    def client(self, key: str = "sk-ant-a", **kwargs: Any) -> anthropic.Anthropic:
        kwargs.setdefault("max_retries", 0)
        return anthropic.Anthropic(api_key=key, base_url=self.url, **kwargs)

    def rows(self) -> list[bh.ProxyRow]:
        return self.app.store.proxy_requests()

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def line_with(self, *parts: str) -> str:
        """The first log line holding every part (a line is written once the answer is out,
        so it may trail the client by a moment)."""
        found: list[str] = []
        wait_until(lambda: bool(found.extend(x for x in self.lines()
                                             if all(p in x for p in parts)) or found))
        return found[0]


def start_proxy(tmp_path: Path, upstream: str, **overrides: Any) -> Running:
    settings = {"port": 0, "upstream": upstream, "poll_interval_s": 0.02, "pool_window_s": 0.0,
                "home": tmp_path / "home", **overrides}
    config = bh.ProxyConfig(**settings)
    clock = support.TestClock()
    channels = bh.KeyChannels(upstream, poll_interval_s=config.poll_interval_s, clock=clock,
                              requests_per_minute=1000,
                              retry=bh.RetryPolicy(max_attempts=3, base_delay_s=0.01))
    out = io.StringIO()
    app = bh.open_proxy(config, out, clock=clock, channels=channels)
    threading.Thread(target=app.server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return Running(app, out, app.base_url)


def stop_proxy(running: Running) -> None:
    running.app.server.shutdown()
    running.app.close()


@pytest.fixture(autouse=True)
def _fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls are counted against 28 a minute; a test polls a held batch faster than that."""
    monkeypatch.setattr(bh, "POLLS_PER_MINUTE", 100_000)


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    with FakeAPI(hold=True) as fake:
        yield fake


@pytest.fixture
def proxy(api: FakeAPI, tmp_path: Path) -> Iterator[Running]:
    running = start_proxy(tmp_path, api.base_url)
    yield running
    stop_proxy(running)


def wait_until(ready: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a condition the test cannot block on directly (a journal row, a log line)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def in_one_batch(api: FakeAPI, threads: list[threading.Thread]) -> str:
    """Start the clients, see their entries wait in ONE held batch, end it, let them finish;
    the batch's id."""
    for t in threads:
        t.start()
    [batch_id] = api.wait_for_batches(1)
    assert api.batch(batch_id)["request_counts"]["processing"] == len(threads)
    api.release()
    for t in threads:
        t.join(10)
    return batch_id


def body_of(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4096, "tools": TOOLS,
            "messages": [{"role": "user", "content": prompt}], **extra}


# -- raw HTTP, for byte-identical retries and for reading events one by one ---------------


class RawStream:
    """One POST /v1/messages over http.client; events read as they arrive."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
        all_headers = {"x-api-key": "sk-ant-a", "anthropic-version": "2023-06-01",
                       "content-type": "application/json", **(headers or {})}
        self.conn.request("POST", "/v1/messages?beta=true", body=body, headers=all_headers)
        self.response = self.conn.getresponse()

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        name = None
        while True:
            line = self.response.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                yield name or "", json.loads(line[6:])

    def until(self, wanted: str) -> list[tuple[str, dict[str, Any]]]:
        seen = []
        for name, data in self.events():
            seen.append((name, data))
            if name == wanted:
                return seen
        raise AssertionError(f"no {wanted} event; saw {[n for n, _ in seen]}")

    def json(self) -> Any:
        return json.loads(self.response.read())

    def close(self) -> None:
        self.conn.close()


# -- the official SDK through the proxy -------------------------------------------------------


def test_sdk_create_is_answered_from_a_one_entry_batch(api: FakeAPI, proxy: Running):
    api.script.append(text("Hello from a batch"))
    done: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.update(m=proxy.client().messages.create(
        **body_of("hi"))))
    worker.start()
    [batch_id] = api.wait_for_batches(1)
    assert api.batch(batch_id)["request_counts"]["processing"] == 1
    api.release(batch_id)
    worker.join(10)
    message = done["m"]
    assert message.content[0].text == "Hello from a batch"
    assert message.usage.service_tier == "batch"
    wait_until(lambda: proxy.rows()[0].state == "delivered")  # recorded once it is out
    [row] = proxy.rows()
    assert (row.lane, row.batch_id, row.attaches) == ("batch", batch_id, 1)
    assert row.cost_usd and row.sync_cost_usd == pytest.approx(2 * row.cost_usd)
    proxy.line_with("agent turn", "sdk-python", MODEL, "saved $")


THINKING_STEP = [
    {"type": "thinking", "thinking": "Let me think about ls.", "signature": "sig-abc"},
    {"type": "redacted_thinking", "data": "b64-redacted"},
    {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search",
     "input": {"query": "batch api"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": []},
    {"type": "text", "text": "I will list the files now, in a moment."},
    {"type": "tool_use", "id": "toolu_01", "name": "bash", "input": {"command": "ls -la"}},
]


def _comparable(message: Any) -> dict[str, Any]:
    data = message.model_dump(mode="json", exclude_none=True)
    usage = data.pop("usage")
    data.pop("id")
    return {**data, "tokens": (usage["input_tokens"], usage["output_tokens"])}


def test_sdk_stream_final_message_equals_the_synchronous_answer(api: FakeAPI,
                                                               proxy: Running):
    """Every block kind streams back as the API streams it: text, thinking with its
    signature_delta, redacted thinking, server tool blocks, tool_use with input_json_delta;
    message_delta carries the final stop_reason and usage."""
    params = body_of("list files")
    api.script.append(raw(THINKING_STEP, "tool_use"))
    direct = anthropic.Anthropic(api_key="k", base_url=api.base_url, max_retries=0)
    expected = direct.messages.create(**params)
    api.script.append(raw(THINKING_STEP, "tool_use"))
    kinds: list[str] = []
    with proxy.client().messages.stream(**params) as stream:
        first = next(iter(stream))  # headers and message_start come before the batch ends
        assert first.type == "message_start" and api.batch_ids() and \
            api.batch(api.batch_ids()[0])["processing_status"] == "in_progress"
        api.release()
        for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = stream.get_final_message()
    assert _comparable(final) == _comparable(expected)
    assert final.stop_reason == "tool_use"
    assert {"thinking_delta", "signature_delta", "input_json_delta", "text_delta"} <= set(kinds)


def test_a_tool_use_loop_runs_turn_by_turn_through_batches(api: FakeAPI, proxy: Running):
    api.hold = False
    api.script.extend([tool_calls(("bash", {"command": "echo hi"})), text("all done")])
    client = proxy.client()
    messages: list[Any] = [{"role": "user", "content": "run it"}]
    first = client.messages.create(model=MODEL, max_tokens=1000, tools=TOOLS,
                                   messages=messages)
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    messages += [{"role": "assistant", "content": first.to_param()["content"]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": "hi"}]}]
    with client.messages.stream(model=MODEL, max_tokens=1000, tools=TOOLS,
                                messages=messages) as stream:
        second = stream.get_final_message()
    assert second.content[0].text == "all done"
    assert len(api.batch_ids()) == 2


def test_every_parameter_reaches_the_batch_and_betas_go_into_the_create(api: FakeAPI,
                                                                        proxy: Running):
    api.hold = False
    api.script.append(text("ok"))
    params = {
        "model": MODEL, "max_tokens": 2048, "tools": TOOLS,
        "system": [{"type": "text", "text": "You are terse.",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "go", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "someone"}, "stop_sequences": ["END"],
    }
    extra = {"output_config": {"effort": "medium"},  # fields this SDK does not know yet
             "context_management": {"edits": [{"type": "clear_thinking_20251015"}]}}
    proxy.client().beta.messages.create(**params, extra_body=extra,
                                        betas=["interleaved-thinking-2025-05-14",
                                               "made-up-beta-2099-01-01"])
    [request] = api.model_requests
    assert request.params == {**params, **extra}
    create = next(c for c in api.calls if c.endpoint == "create")
    assert create.headers["anthropic-beta"] == \
        "interleaved-thinking-2025-05-14,made-up-beta-2099-01-01"


# -- pass-through and headers -----------------------------------------------------------------


def test_other_paths_pass_straight_through_with_the_clients_headers(api: FakeAPI,
                                                                    proxy: Running):
    client = proxy.client(default_headers={"x-batching-route": "sync",
                                           "x-custom-thing": "kept"})
    counted = client.beta.messages.count_tokens(model=MODEL, betas=["token-counting-x"],
                                                messages=[{"role": "user", "content": "hi"}],
                                                extra_query={"beta": "true"})
    direct = anthropic.Anthropic(api_key="k", base_url=api.base_url).messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == direct.input_tokens
    call = next(c for c in api.calls if c.endpoint == "count_tokens")
    assert call.path.startswith("/v1/messages/count_tokens") and "beta=true" in call.path
    assert call.headers["authorization"] == "Bearer sk-ant-a"
    assert call.headers["anthropic-beta"].startswith("token-counting-x")
    assert call.headers["anthropic-version"] and call.headers["x-custom-thing"] == "kept"
    assert "x-batching-route" not in call.headers
    with pytest.raises(anthropic.NotFoundError):  # the stand-in has no /v1/models: its 404
        client.models.list()
    assert any(c.path.startswith("/v1/models") for c in api.calls)
    assert api.batch_ids() == []


def test_route_header_and_side_requests_go_sync(api: FakeAPI, proxy: Running):
    api.script.extend([text("sync by header"), text("sync side request")])
    client = proxy.client()
    forced = client.messages.create(**body_of("hi"),
                                    extra_headers={"x-batching-route": "sync"})
    side = client.messages.create(model="claude-haiku-5-5", max_tokens=50,
                                  messages=[{"role": "user", "content": "title?"}])
    assert forced.usage.service_tier == "standard" and side.content[0].text == \
        "sync side request"
    assert api.batch_ids() == []
    wait_until(lambda: len(proxy.rows()) == 2)  # journaled once the answer is out
    assert [r.lane for r in proxy.rows()] == ["sync", "sync"]
    assert proxy.rows()[0].cost_usd and proxy.rows()[0].cost_usd == proxy.rows()[0].sync_cost_usd
    proxy.line_with("asked for (x-batching-route)")
    proxy.line_with("side request: fast cheap model")


def test_a_malformed_request_gets_the_apis_400(proxy: Running):
    for body, problem in ((b"{not json", "parsing the body"),
                          (json.dumps({"max_tokens": 5, "messages": []}).encode(),
                           "model: Field required")):
        stream = RawStream(proxy.url, body)
        assert stream.response.status == 400
        error = stream.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert problem in error["error"]["message"]
        stream.close()
    no_key = RawStream(proxy.url, json.dumps(body_of("x")).encode(), {"x-api-key": ""})
    assert no_key.response.status == 401
    assert no_key.json()["error"]["type"] == "authentication_error"


# -- keys --------------------------------------------------------------------------------------


def test_pools_never_mix_keys_and_each_batch_is_created_with_its_clients_key(
        api: FakeAPI, tmp_path: Path):
    running = start_proxy(tmp_path, api.base_url, pool_window_s=60.0, pool_width=2)
    api.script.extend([lambda p: text("answer to " + p["messages"][0]["content"])] * 4)
    answers: dict[str, str] = {}

    def ask(key: str, prompt: str) -> None:
        message = running.client(key).messages.create(**body_of(prompt))
        answers[prompt] = message.content[0].text

    try:
        threads = [threading.Thread(target=ask, args=args) for args in
                   (("sk-ant-a", "a1"), ("sk-ant-b", "b1"), ("sk-ant-a", "a2"))]
        for t in threads:
            t.start()
        [first] = api.wait_for_batches(1)  # key a reached the width; key b's one waits
        threads.append(threading.Thread(target=ask, args=("sk-ant-b", "b2")))
        threads[-1].start()
        first, second = api.wait_for_batches(2)
        api.release()
        for t in threads:
            t.join(10)
    finally:
        stop_proxy(running)
    assert answers == {p: f"answer to {p}" for p in ("a1", "a2", "b1", "b2")}
    creates = [c for c in api.calls if c.endpoint == "create"]
    assert [c.headers["authorization"] for c in creates] == ["Bearer sk-ant-a",
                                                             "Bearer sk-ant-b"]
    by_batch: dict[str, set[str]] = {}
    for row in bh.SqliteStore(tmp_path / "home" / "journal.db").proxy_requests():
        by_batch.setdefault(row.batch_id or "", set()).add(row.key_fp)
    assert set(by_batch) == {first, second} and all(len(k) == 1 for k in by_batch.values())
    assert api.batch(first)["request_counts"]["succeeded"] == 2


def test_the_journal_and_the_log_never_hold_a_key(api: FakeAPI, tmp_path: Path):
    running = start_proxy(tmp_path, api.base_url, log_path=tmp_path / "proxy.jsonl")
    api.hold = False
    try:
        running.client("sk-ant-secret-123").messages.create(**body_of("hi"))
    finally:
        stop_proxy(running)
    log = tmp_path / "proxy.jsonl"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["batch", "request"]
    journal = tmp_path / "home" / "journal.db"
    for path in (log, journal, *journal.parent.glob("journal.db-*")):
        assert b"sk-ant-secret-123" not in path.read_bytes()
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600


# -- waiting, errors, retries -------------------------------------------------------------------


def test_pings_flow_while_a_held_batch_waits(api: FakeAPI, proxy: Running,
                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(bh, "PROXY_PING_S", 0.05)
    api.script.append(text("finally"))
    stream = RawStream(proxy.url, json.dumps(body_of("hi", stream=True)).encode())
    assert stream.response.status == 200
    assert stream.response.getheader("content-type").startswith("text/event-stream")
    events = stream.until("message_start")
    pings = 0
    for name, _ in stream.events():
        if name == "ping":
            pings += 1
            if pings == 3:
                break
    assert api.batch(api.batch_ids()[0])["processing_status"] == "in_progress"
    api.release()
    events = stream.until("message_stop")
    names = [n for n, _ in events if n != "ping"]
    assert names == ["content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    stream.close()


def test_an_errored_entry_is_an_error_event_once_the_stream_started(api: FakeAPI,
                                                                    proxy: Running):
    api.script.append(errored("overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as caught, \
            proxy.client().messages.stream(**body_of("hi")) as stream:
        assert next(iter(stream)).type == "message_start"
        api.release()
        stream.get_final_message()
    assert "overloaded_error" in str(caught.value)


def test_an_errored_entry_is_the_apis_http_error_before_the_stream_starts(api: FakeAPI,
                                                                          proxy: Running):
    # Non-streaming: the status the synchronous API would have answered.
    api.script.append(errored("invalid_request_error", "messages.0: nonsense"))
    worker_error: list[BaseException] = []

    def ask() -> None:
        try:
            proxy.client().messages.create(**body_of("bad"))
        except anthropic.APIStatusError as exc:
            worker_error.append(exc)

    worker = threading.Thread(target=ask)
    worker.start()
    api.wait_for_batches(1)
    api.release()
    worker.join(10)
    assert isinstance(worker_error[0], anthropic.BadRequestError)
    assert "messages.0: nonsense" in str(worker_error[0])
    # Streaming, re-attached to an entry that already ended errored: a plain HTTP status.
    api.script.append(errored("permission_error", "not allowed"))
    body = json.dumps(body_of("forbidden", stream=True)).encode()
    first = RawStream(proxy.url, body)
    first.until("message_start")
    first.close()  # the client timed out and went away
    api.release()
    wait_until(lambda: any(r.result_type == "errored" and r.state == "ended"
                           for r in proxy.rows()))
    retry = RawStream(proxy.url, body)
    assert retry.response.status == 403
    assert retry.json()["error"] == {"type": "permission_error", "message": "not allowed"}
    assert len(api.batch_ids()) == 2


def test_a_create_the_api_refuses_is_its_http_error_before_any_event(api: FakeAPI,
                                                                      proxy: Running):
    """A streaming client's headers wait for its entry to be in a batch, so a key the API
    refuses is a plain 401 the client knows how to show, not an error event mid-stream."""
    api.inject("create", "401")
    with pytest.raises(anthropic.AuthenticationError), \
            proxy.client().messages.stream(**body_of("hi")) as stream:
        stream.get_final_message()
    assert api.batch_ids() == []
    proxy.line_with("401 authentication_error")
    api.script.append(text("now it works"))  # a failed entry is not re-attached: sent anew
    worker = threading.Thread(target=lambda: proxy.client().messages.create(**body_of("hi")))
    worker.start()
    api.wait_for_batches(1)
    api.release()
    worker.join(10)
    wait_until(lambda: [r.state for r in proxy.rows()] == ["failed", "delivered"])


def test_route_auto_weighs_the_saving_against_the_wait(api: FakeAPI, tmp_path: Path):
    running = start_proxy(tmp_path, api.base_url, route="auto", wait_price_usd_per_min=0.05)
    api.hold = False
    big = "x" * 400_000  # ~100K tokens on Opus: saves about $0.20, worth two minutes
    try:
        running.client().messages.create(**body_of("small"))
        running.client().messages.create(**body_of(big))
    finally:
        stop_proxy(running)
    running.line_with("sync · saves")  # a small turn: the saving is not worth the wait
    running.line_with("batch · saves")
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 2


def test_a_byte_identical_retry_and_the_non_streaming_fallback_pay_once(api: FakeAPI,
                                                                       proxy: Running):
    """Claude Code resends a byte-identical body after its 600 s timeout, and may fall back
    to stream:false with a smaller max_tokens (clients.md): both re-attach to the entry in
    flight instead of paying for a second one."""
    api.script.append(text("the one answer"))
    body = json.dumps(body_of("long turn", stream=True)).encode()
    first = RawStream(proxy.url, body)
    first.until("message_start")
    first.close()  # abandoned after the client's timeout
    retry = RawStream(proxy.url, body)
    retry.until("message_start")
    fallback_body = json.dumps(body_of("long turn", max_tokens=1000, stream=False)).encode()
    fallback: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: fallback.update(
        m=RawStream(proxy.url, fallback_body).json()))
    worker.start()
    wait_until(lambda: proxy.rows()[0].attaches == 3)
    api.release()
    events = retry.until("message_stop")
    worker.join(10)
    streamed = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert streamed == "the one answer" == fallback["m"]["content"][0]["text"]
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 1
    wait_until(lambda: proxy.rows()[0].state == "delivered")
    assert proxy.rows()[0].attaches == 3
    wait_until(lambda: proxy.app.log.summary()["retries_reattached"] == 2)
    assert sum("re-attached to its entry: paid once" in x for x in proxy.lines()) == 2
    # Delivered: the same question asked again is a new turn, paid again.
    api.script.append(text("a second answer"))
    again = RawStream(proxy.url, body)
    again.until("message_start")
    api.release()
    assert "a second answer" in json.dumps(again.until("message_stop"))
    assert len(api.batch_ids()) == 2


def test_the_sdks_own_timeout_and_retry_do_not_create_a_second_entry(api: FakeAPI,
                                                                    proxy: Running):
    """The SDK gives up after its timeout and retries the same body by itself."""
    api.script.append(text("worth the wait"))
    client = proxy.client(timeout=2.0, max_retries=1)
    done: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.update(m=client.messages.create(
        **body_of("slow"))))
    worker.start()
    wait_until(lambda: bool(proxy.rows()) and proxy.rows()[0].attaches == 2)  # the retry
    api.release()
    worker.join(10)
    assert done["m"].content[0].text == "worth the wait"
    assert len(api.batch_ids()) == 1 and len(api.model_requests) == 1


def test_a_turn_is_the_body_but_for_stream_and_max_tokens_and_the_same_key():
    def call(key: str = "k1", betas: tuple[str, ...] = (), **params: Any) -> bh.MessagesCall:
        body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user",
                                                                  "content": "x"}], **params}
        return bh.MessagesCall(body, bh.Credential("x-api-key", key), betas, "c", None)

    base = call().turn_key
    assert call(stream=True, max_tokens=64000).turn_key == base
    assert call(key="k2").turn_key != base
    assert call(betas=("b-1",)).turn_key != base
    assert call(system="other").turn_key != base


def test_requests_of_several_clients_share_one_batch(api: FakeAPI, tmp_path: Path):
    running = start_proxy(tmp_path, api.base_url, pool_window_s=60.0, pool_width=3)
    api.script.extend([lambda p: text("echo " + p["messages"][0]["content"])] * 3)
    answers: dict[str, str] = {}

    def ask(prompt: str) -> None:
        with running.client().messages.stream(**body_of(prompt)) as stream:
            answers[prompt] = stream.get_final_message().content[0].text

    try:
        in_one_batch(api, [threading.Thread(target=ask, args=(p,))
                           for p in ("one", "two", "three")])
    finally:
        stop_proxy(running)
    assert answers == {p: f"echo {p}" for p in ("one", "two", "three")}
    assert running.app.log.summary()["widths"] == [3]


# -- configuration, binding, restart ------------------------------------------------------------


def test_binding_beyond_loopback_needs_a_token(capsys: pytest.CaptureFixture[str]):
    env = {"HOME": "/nonexistent"}
    assert bh.parse_proxy_config([], env).host == "127.0.0.1"
    for host in ("0.0.0.0", "192.168.1.5", "my-laptop.example"):
        with pytest.raises(bh.ConfigError, match="needs --token"):
            bh.parse_proxy_config(["--host", host], env)
    assert bh.parse_proxy_config(["--host", "0.0.0.0", "--token", "t0k"], env).token == "t0k"
    assert bh.parse_proxy_config(["--host", "::1"], env).host == "::1"
    assert bh.parse_proxy_config(["--host", "0.0.0.0"], {**env, bh.TOKEN_ENV: "t"}).token == "t"
    assert bh.main(["proxy", "--host", "0.0.0.0"], env) == 2
    assert "needs --token" in capsys.readouterr().err


def test_a_token_is_required_when_set(api: FakeAPI, tmp_path: Path):
    running = start_proxy(tmp_path, api.base_url, token="s3cret")
    try:
        with pytest.raises(anthropic.AuthenticationError, match="x-batching-token"):
            running.client().messages.count_tokens(model=MODEL, messages=[
                {"role": "user", "content": "hi"}])
        ok = running.client(default_headers={"x-batching-token": "s3cret"})
        assert ok.messages.count_tokens(model=MODEL, messages=[
            {"role": "user", "content": "hi"}]).input_tokens > 0
        assert "x-batching-token" not in api.calls[-1].headers
    finally:
        stop_proxy(running)


def _spawn(home: Path, upstream: str) -> tuple[ForkedProcess, str, Path]:
    """`batching-harness proxy` in a real process (forked from the zygote: the SDK is
    imported already); its JSON log goes to a file, whose first line names its URL."""
    log = home.parent / f"proxy-{time.monotonic_ns()}.log"
    proc = spawn(["proxy", "--port", "0", "--upstream", upstream, "--poll-interval", "0.3",
                  "--pool-window", "0", "--output-format", "json"],
                 env={**os.environ, "BATCHING_HARNESS_HOME": str(home)}, cwd=home.parent,
                 stdout=log)
    wait_until(lambda: log.exists() and log.read_text().endswith("\n"), timeout_s=60)
    started = json.loads(log.read_text().splitlines()[0])
    assert started["event"] == "started"
    return proc, started["base_url"], log


def test_killed_with_a_batch_in_flight_a_restarted_proxy_reattaches_the_retry(
        api: FakeAPI, tmp_path: Path):
    api.script.extend([lambda p: text("answer to " + p["messages"][0]["content"])] * 2)
    home = tmp_path / "home"
    proc, url, _log = _spawn(home, api.base_url)
    body = json.dumps(body_of("in flight", stream=True)).encode()
    first = RawStream(url, body)
    first.until("message_start")
    other = json.dumps(body_of("second turn", stream=False)).encode()
    def abandoned() -> None:
        with contextlib.suppress(http.client.HTTPException, OSError):
            RawStream(url, other).response.read()

    pending = threading.Thread(target=abandoned)
    pending.start()
    api.wait_for_batches(2)
    journal = home / "journal.db"
    # Killed once both batch ids are journaled (a kill between the API's create and that
    # commit is recovered by list(): test_a_create_cut_off_by_a_crash_...).
    wait_until(lambda: sqlite3.connect(journal).execute(
        "SELECT COUNT(*) FROM proxy_requests WHERE state='submitted'").fetchone()[0] == 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    first.close()
    pending.join(10)
    api.release(api.batch_ids()[1])  # this one ends while no proxy is running
    proc, url, log = _spawn(home, api.base_url)
    try:
        retry = RawStream(url, body)
        retry.until("message_start")
        api.release()
        assert "answer to in flight" in json.dumps(retry.until("message_stop"))
        late = RawStream(url, other)
        assert late.json()["content"][0]["text"] == "answer to second turn"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        out = log.read_text()
    assert len(api.batch_ids()) == 2 and len(api.model_requests) == 2
    records = [json.loads(line) for line in out.splitlines()]
    summary = records[-1]
    assert summary["event"] == "summary", [r.get("event") for r in records]
    assert summary["retries_reattached"] == 2
    assert summary["batches"] == 0  # nothing paid again


def test_a_create_cut_off_by_a_crash_is_found_and_adopted_by_the_retry(api: FakeAPI,
                                                                       tmp_path: Path):
    """The one window a journal cannot close: the API made the batch, the proxy died before
    recording its id. The entries, their time and the width were journaled before the
    create, so the retry finds the batch by list() and waits on it instead of paying again."""
    body = body_of("cut off", stream=True)
    call = bh.MessagesCall(body, bh.Credential("x-api-key", "sk-ant-a"), (), "raw", None)
    store = bh.SqliteStore(tmp_path / "home" / "journal.db")
    sent_at = time.time()
    store.begin_proxy_request(bh.ProxyRow(
        "bh_cut_1", call.turn_key, call.credential.fingerprint, "raw", MODEL, "batch",
        "batch · agent turn", 1, "pooled", None, json.dumps(body), "[]", sent_at))
    store.proxy_creating(["bh_cut_1"], "pool_cut", sent_at)
    store.close()
    made = anthropic.Anthropic(api_key="sk-ant-a", base_url=api.base_url).messages.batches \
        .create(requests=[{"custom_id": "bh_cut_1", "params": call.batch_params}])
    api.script.append(text("found it"))
    running = start_proxy(tmp_path, api.base_url)
    try:
        assert running.app.unsent == 0  # 'unknown', not 'unsent': a retry looks for it
        retry = RawStream(running.url, json.dumps(body).encode())
        retry.until("message_start")
        api.release()
        assert "found it" in json.dumps(retry.until("message_stop"))
    finally:
        stop_proxy(running)
    assert api.batch_ids() == [made.id]
    assert [(r.state, r.batch_id) for r in running.rows()] == [("delivered", made.id)]


def test_stats_include_proxy_traffic(api: FakeAPI, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]):
    running = start_proxy(tmp_path, api.base_url)
    api.hold = False
    try:
        running.client().messages.create(**body_of("hi"))
        running.client().messages.create(model="claude-haiku-5-5", max_tokens=20,
                                         messages=[{"role": "user", "content": "hi"}])
    finally:
        stop_proxy(running)
    assert bh.main(["--stats"], {"BATCHING_HARNESS_HOME": str(tmp_path / "home")}) == 0
    out = capsys.readouterr().out
    assert "proxy traffic" in out and "sdk-python" in out
    assert sqlite3.connect(tmp_path / "home" / "journal.db").execute(
        "SELECT COUNT(*) FROM proxy_requests").fetchone()[0] == 2
