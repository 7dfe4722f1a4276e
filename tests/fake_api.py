"""A local stand-in of the Anthropic Messages and Message Batches API, for tests and offline demos.

It is a real HTTP server (stdlib only) on 127.0.0.1 that the real `anthropic` SDK talks to:

    with FakeAPI(latency_s=0.2) as api:
        api.script.append(text("Hello"))
        client = anthropic.Anthropic(api_key="test-key", base_url=api.base_url)
        batch = client.messages.batches.create(requests=[...])

Standalone, for a person trying the harness with no network and no key:

    python -m tests.fake_api --port 8765 --latency 5
    export ANTHROPIC_BASE_URL=http://127.0.0.1:8765
    export ANTHROPIC_API_KEY=any-non-empty

(`--help` lists the rest: per-model latency, streaming pace, inference_geo, null results_url.)

What it does
------------
* Endpoints: POST/GET /v1/messages/batches, GET/DELETE /v1/messages/batches/{id},
  POST /v1/messages/batches/{id}/cancel, GET /v1/messages/batches/{id}/results (the absolute
  `results_url` it hands out; one plain GET, no retrieve needed first), POST /v1/messages
  (synchronous, service_tier "standard"; streamed with `"stream": true`) and
  POST /v1/messages/count_tokens. Endpoint names (for `inject`, `count` and `wait_for`):
  create, retrieve, list, cancel, delete, results, messages, count_tokens; "any" matches
  every request.
* List: newest first, `limit` 1-1000 (default 20), `after_id` / `before_id`, `has_more`,
  `first_id`, `last_id`; deleted batches are left out.
* Auth: a non-empty `x-api-key` header or `Authorization: Bearer <key>` (SDK 2.14 sends the
  API key as a Bearer token); neither -> 401 authentication_error.
* A batch ends `latency_s` real seconds after it is created; `latency_by_model` overrides
  it for the models it names (a dated id falls back to its base id; a batch takes its
  slowest entry's figure). Both are read at create time. Its status is computed lazily from
  the clocks whenever anything looks at it: an entry is answered by the scripted model at
  that moment, in creation order. If the fake clock (`now()`, moved by `advance()`) passes
  `expires_at` (created + 24 h) first, every entry ends `expired`. Results are downloadable
  until created + 29 days on the fake clock, then 404.
* Held batches, for deterministic tests: with `hold` true (`FakeAPI(hold=True)` or the
  attribute; read at create) a batch stays `in_progress` (or `canceling`) until
  `release(batch_id)` (no id: every batch so far); it then ends at the next look, answered
  then. Only expiry on the fake clock ends a held batch otherwise. `wait_for_batches(n)` and
  `wait_for(endpoint, n)` block on a Condition (no polling) until n batches exist / n calls
  were recorded (a call is recorded just before its answer is written, or when dropped),
  and raise TimeoutError after `timeout_s` (default 10).
* `null_results_url=N` (read when a batch ends): an ended batch shows `results_url: null` to
  its next N retrieves or lists (the schema allows it); the results endpoint itself works.
* Cancel: in_progress -> canceling (the cancel response) -> ended after `cancel_latency_s`
  (default 0, i.e. at the next look; a held batch at its release). Entries end `canceled`,
  or `succeeded` when `cancel_succeeds` is true (the work was already under way). Cancelling
  an ended batch is a 400 invalid_request_error (a client must expect that race).
* `sync_latency_s` (default 0) delays each non-streamed /v1/messages answer.
* Streaming (`"stream": true` on /v1/messages) answers with server-sent events in chunked
  encoding, in the API's order (see `stream_events`): message_start (full usage but
  output_tokens 1) and a ping at once; then, per content block, content_block_start,
  deltas, content_block_stop: text in `text_delta` pieces, thinking in `thinking_delta`
  pieces then one `signature_delta`, tool input JSON in `input_json_delta` pieces,
  redacted_thinking (and server tool results) whole in the start event with no delta; then
  message_delta (stop_reason, stop_sequence, stop_details, final usage) and message_stop.
  Text is cut into at least 3 pieces of at most 16 characters. The first content event
  comes `stream_ttft_s` after message_start, with a ping every `stream_ping_s` (5) while
  waiting; each later delta `stream_chunk_delay_s` after the one before. The SDK's
  `messages.stream(...).get_final_message()` equals the non-streamed message of that step
  (ids aside). HTTP errors (faults, errored steps, invalid params) come before any event.
* `inference_geo` (None: omitted): `usage.inference_geo` of every answer, unless the request
  sends `inference_geo` ("us" or "global") or the step's `usage={...}` sets it.
* Params are validated like the real API: shape errors at create are HTTP 400; message-level
  errors come back as an `errored` entry (invalid_request_error) and are HTTP 400 on
  /v1/messages. An invalid entry does not consume a script step. What Claude Code 2.1.332
  sends is accepted: unknown top-level fields and betas are ignored, and a `system`-role
  message of text blocks may stand anywhere after the first (outside the alternation).

The scripted model
------------------
`api.script` is a deque; each model request (batch entry or /v1/messages call) pops one step:
`text(...)`, `tool_calls(...)`, `raw(...)`, `refusal(...)`, `errored(...)`, `expired()`,
`canceled()`, a plain string (same as `text(s)`), or a callable `f(params) -> step` (None ->
the demo model). `text`, `tool_calls`, `raw` and `refusal` take `usage={...}` (merged into the
computed usage, e.g. {"inference_geo": "us"}) and any message field (stop_details=...);
`text("...", stop_reason="model_context_window_exceeded")` is a context-full answer.
`refusal(category, content)` stops with "refusal" and stop_details {"type": "refusal",
"category", "explanation"}; content [] is a refusal before any output, or partial blocks
(a `tool_calls(...)` step's or a list) holding the tool_use a client must not run.
On /v1/messages an `errored` step is the matching HTTP error, `expired` a 504 timeout_error
and `canceled` a 500 api_error.

Faults (`inject(endpoint, kind, count=1, ...)`)
-----------------------------------------------
The next `count` requests to `endpoint` fail (FIFO; the endpoint's own before "any"'s):
"429" (retry-after 1 unless `retry_after=`), "429-spend", "413", "401", "402", "403",
"500", "502", "503", "504", "529": the API's JSON error; with `error_code="contract_spend_limit_reached"` (or
"enforced_spend_limit_reached", "ramp_limit_exceeded", ...) it carries
error.details.error_code, which the SDK turns into its own exception class (no default
retry-after for a spend limit); with `html=True` it is a proxy's text/html page instead.
"drop": the connection is cut unanswered; "drop-after-create": the batch is made, then the
connection cut; "slow": answered after `delay_s` (which any kind takes). Only a streamed
/v1/messages request takes "stream-error" (an `error` event with overloaded_error after
`after_events` (default 3) events, pings included, if the stream is that long; then it ends;
the SDK raises APIStatusError) or "stream-drop" (the connection cut after `after_events`
events; the SDK raises httpx2.RemoteProtocolError mid-iteration); other requests pass them by.

The demo model (empty script)
-----------------------------
Looks at the last message:
* a user message holding tool_result blocks -> end_turn, "**Done.**" (or "**The tool reported
  an error.**") and the first 12 lines of the first tool_result in a fenced block;
* a user text starting with `run: CMD` -> a `bash` tool call with command CMD (up to the
  first blank line: the fleet appends a note naming the work dir);
* a user text starting with `create PATH` -> a `str_replace_based_edit_tool` call that creates
  PATH with a short greeting;
* any other user text -> a `bash` tool call of `pwd && ls -la | head -n 20`;
* a tool the request does not define -> a plain end_turn text saying which tool it wanted;
* a last message from the assistant (prefill, pause_turn) -> end_turn "Continuing: done.".

Tokens and prompt caching
-------------------------
Blocks in prefix order tools -> system -> messages (a string is one text block) count
max(1, ceil(len(canonical JSON without cache_control) / 4)) tokens; output tokens likewise.
Cache entries are keyed by (model, exact prefix up to a block, cache_control ignored) and
written only at breakpoints. The entries of one batch run side by side: none reads what a
sibling in the same batch wrote (N agents sharing a prefix in one batch write it N times).
For each breakpoint the positions from it back to 20 blocks
before it (21 positions) are looked up; the longest unexpired hit is read. Tokens from the
hit (or the start) up to the last writable breakpoint are written, split into the 5m/1h
breakdown by the TTL of the breakpoint covering them; the rest is input_tokens. A prefix
shorter than the model's minimum cacheable length is neither written nor read. An entry lives
for its TTL from the start of the request that wrote or last read it; a batch entry "starts"
when the batch ends. input + cache_creation + cache_read == prompt tokens, always.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import http
import json
import math
import re
import secrets
import signal
import socket
import string
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Call",
    "FakeAPI",
    "ModelRequest",
    "Step",
    "canceled",
    "count_tokens",
    "errored",
    "expired",
    "min_cacheable_tokens",
    "raw",
    "refusal",
    "stream_events",
    "text",
    "tool_calls",
]

##############################################################################
# Constants
##############################################################################

DAY_S = 86_400.0
BATCH_EXPIRY_S = 24 * 3600.0
RESULTS_RETENTION_S = 29 * DAY_S
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
TTL_S = {"5m": 300.0, "1h": 3600.0}
CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_DATED_SUFFIX_RE = re.compile(r"-\d{8}$")

ENDPOINTS = (
    "create",
    "retrieve",
    "list",
    "cancel",
    "delete",
    "results",
    "messages",
    "count_tokens",
    "any",
)
FAULT_KINDS = (
    "429",
    "429-spend",
    "500",
    "502",
    "503",
    "504",
    "529",
    "drop",
    "slow",
    "drop-after-create",
    "413",
    "401",
    "402",
    "403",
    "stream-error",
    "stream-drop",
)
# Faults that only a streamed /v1/messages answer takes (other requests pass them by).
STREAM_FAULT_KINDS = ("stream-error", "stream-drop")
# Faults that are an HTTP error answer (the ones `error_code` and `html` apply to).
_STATUS_FAULT_KINDS = (
    "429", "429-spend", "413", "500", "502", "503", "504", "529", "401", "402", "403"
)
_FAULT_ERRORS = {
    "429": (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    "429-spend": (
        429,
        "rate_limit_error",
        "Your organization has reached its enforced spend limit for this month.",
    ),
    "500": (500, "api_error", "Internal server error"),
    "502": (502, "api_error", "Bad gateway"),
    "503": (503, "api_error", "Service unavailable"),
    "504": (504, "timeout_error", "Request timed out"),
    "529": (529, "overloaded_error", "Overloaded"),
    "413": (413, "request_too_large", "Request exceeds the maximum allowed size."),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "402": (402, "billing_error", "Your credit balance is too low."),
    "403": (403, "permission_error", "Your API key does not have permission to use this."),
}
# error.details.error_code values the SDK (2.14) maps to their own exception classes on a 429;
# the spend limits must not be retried, ramp_limit_exceeded is retried after `retry-after`.
SPEND_LIMIT_CODES = ("enforced_spend_limit_reached", "contract_spend_limit_reached")
_ERROR_CODE_MESSAGES = {
    "enforced_spend_limit_reached": (
        "Your organization has reached its enforced spend limit for this month."
    ),
    "contract_spend_limit_reached": (
        "Your organization has reached the spend limit of its contract."
    ),
    "ramp_limit_exceeded": "This request would exceed your organization's ramp limit.",
}
INFERENCE_GEOS = ("us", "global", "not_available")
STREAM_CHUNK_CHARS = 16  # at most this many characters (or JSON characters) per delta
STREAM_PING_S = 5.0  # a ping every this many seconds while the first token is awaited
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# Minimum cacheable prefix, by base model id (dated suffix stripped); anything else: 1024.
_MIN_CACHEABLE = {
    "claude-opus-5-5": 512,
    "claude-opus-5": 512,
    "claude-haiku-5-5": 512,
    "claude-sonnet-5-5": 512,
    "claude-opus-4-8": 1024,
    "claude-sonnet-5": 1024,
    "claude-sonnet-4-6": 1024,
    "claude-sonnet-4-5": 1024,
    "claude-opus-4-7": 2048,
    "claude-opus-4-6": 4096,
    "claude-opus-4-5": 4096,
    "claude-haiku-4-5": 4096,
}
_MIN_CACHEABLE_FAMILIES = {"claude-fable-5": 512, "claude-mythos-5": 512}
_DEFAULT_MIN_CACHEABLE = 1024

# Anthropic-defined tool types and the name each must carry.
_TYPED_TOOLS = {
    "bash_20250124": "bash",
    "bash_20241022": "bash",
    "text_editor_20250728": "str_replace_based_edit_tool",
    "text_editor_20250429": "str_replace_based_edit_tool",
    "text_editor_20250124": "str_replace_editor",
    "web_search_20250305": "web_search",
    "web_fetch_20250910": "web_fetch",
    "code_execution_20250825": "code_execution",
    "memory_20250818": "memory",
}
_USER_BLOCK_TYPES = frozenset({"text", "image", "document", "tool_result", "search_result"})
_ASSISTANT_BLOCK_TYPES = frozenset(
    {
        "text",
        "tool_use",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "container_upload",
    }
)
_TOOL_RESULT_CONTENT_TYPES = frozenset({"text", "image"})
_UNCACHEABLE_BLOCK_TYPES = frozenset({"thinking", "redacted_thinking"})

_ID_ALPHABET = string.ascii_letters + string.digits
DEMO_DEFAULT_COMMAND = "pwd && ls -la | head -n 20"
DEMO_FILE_TEXT = "Hello from the batching-harness demo model.\n"
DEMO_QUOTE_LINES = 12


def new_id(prefix: str) -> str:
    """An id shaped like the real ones: prefix + '01' + 22 base62 characters."""
    return prefix + "01" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(22))


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    stamp = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def min_cacheable_tokens(model: str) -> int:
    """The shortest prefix (tokens) `model` caches; shorter ones are silently not cached."""
    base = _DATED_SUFFIX_RE.sub("", model)
    if base in _MIN_CACHEABLE:
        return _MIN_CACHEABLE[base]
    for family, tokens in _MIN_CACHEABLE_FAMILIES.items():
        if base == family or base.startswith(family + "-"):
            return tokens
    return _DEFAULT_MIN_CACHEABLE


##############################################################################
# Script steps
##############################################################################


@dataclasses.dataclass
class Step:
    """One scripted model answer. Build it with text(), tool_calls(), raw(), errored(), ..."""

    kind: str  # "message" | "errored" | "expired" | "canceled"
    content: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    error_type: str = "api_error"
    message: str = ""


def text(s: str, stop_reason: str = "end_turn", **extra: Any) -> Step:
    """A text answer. `extra` as for raw(): usage={...} (e.g. {"inference_geo": "us"}) merges
    into the computed usage; other keywords are set on the message."""
    return Step("message", [{"type": "text", "text": s}], stop_reason, dict(extra))


def tool_calls(*calls: tuple[str, dict[str, Any]], text: str | None = None, **extra: Any) -> Step:
    """A tool_use turn; ids (toolu_...) are filled in when the step is answered."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for name, tool_input in calls:
        content.append({"type": "tool_use", "id": None, "name": name, "input": dict(tool_input)})
    return Step("message", content, "tool_use", dict(extra))


def raw(content: list[dict[str, Any]], stop_reason: str, **extra: Any) -> Step:
    """Any content and stop_reason. `usage={...}` overrides computed usage fields (merged);
    other keywords (stop_details=..., stop_sequence=...) are set on the message as given."""
    return Step("message", [dict(b) for b in content], stop_reason, dict(extra))


def refusal(
    category: str | None = "cyber",
    content: Step | Iterable[dict[str, Any]] = (),
    *,
    explanation: str | None = None,
    **extra: Any,
) -> Step:
    """stop_reason "refusal" with stop_details {"type": "refusal", "category", "explanation"}.
    `content` is what the model produced before it stopped: [] (a refusal before any output)
    or partial blocks, e.g. a tool_use or a whole tool_calls(...) step (ids filled in)."""
    blocks = content.content if isinstance(content, Step) else content
    details = {"type": "refusal", "category": category, "explanation": explanation}
    return Step("message", [dict(b) for b in blocks], "refusal", {"stop_details": details, **extra})


def errored(error_type: str = "api_error", message: str = "Internal server error") -> Step:
    return Step("errored", error_type=error_type, message=message)


def expired() -> Step:
    return Step("expired")


def canceled() -> Step:
    return Step("canceled")


##############################################################################
# Records
##############################################################################


@dataclasses.dataclass
class Call:
    """One HTTP request. `path` is the raw request path with its query string; `status` is
    None when the connection was dropped without a response; `headers` as received."""

    method: str
    path: str
    endpoint: str
    t_wall: float
    status: int | None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # lower-case names


@dataclasses.dataclass
class ModelRequest:
    """One request the scripted model answered (a consumed script or demo step)."""

    custom_id: str | None
    params: dict[str, Any]
    batch_id: str | None
    usage: dict[str, Any] | None  # None unless the answer was a message
    result: str = "succeeded"  # succeeded | errored | expired | canceled (from the step)


@dataclasses.dataclass
class _Fault:
    kind: str
    remaining: int
    retry_after: float | None
    delay_s: float
    error_code: str | None = None
    html: bool = False
    after_events: int = 3

    def applies(self, streaming: bool) -> bool:
        return streaming or self.kind not in STREAM_FAULT_KINDS


@dataclasses.dataclass
class _CacheEntry:
    expires_at: float
    ttl_s: float
    batch_id: str | None = None  # the batch whose entry wrote it, until another request reads it


@dataclasses.dataclass
class _Batch:
    id: str
    seq: int
    requests: list[dict[str, Any]]
    created_at: float  # fake clock
    created_wall: float
    end_wall: float
    status: str = "in_progress"
    cancel_initiated_at: float | None = None
    cancel_wall: float | None = None
    ended_at: float | None = None
    ended_wall: float | None = None
    results: list[dict[str, Any]] | None = None
    deleted: bool = False
    held: bool = False  # ends only after release() (or expiry on the fake clock)
    released_wall: float | None = None
    null_url_looks: int = 0  # retrieves/lists left that show results_url null once ended

    @property
    def expires_at(self) -> float:
        return self.created_at + BATCH_EXPIRY_S


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.details = details
        self.headers = headers or {}


class _Invalid(Exception):
    """A request that the API refuses with invalid_request_error."""


def _invalid(message: str) -> _HTTPError:
    return _HTTPError(400, "invalid_request_error", message)


def error_body(error_type: str, message: str, details: dict[str, Any] | None = None) -> dict:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if details:
        error["details"] = details
    return {"type": "error", "error": error, "request_id": new_id("req_")}


##############################################################################
# Validation (the rules the real API applies to one Messages request)
##############################################################################


def validate_params(params: Any) -> None:
    """Raise _Invalid with the API's kind of message if `params` is not a valid request."""
    if not isinstance(params, dict):
        raise _Invalid("params: Input should be a valid dictionary")
    _validate_scalars(params)
    tools = params.get("tools")
    _validate_tools(tools)
    _validate_system(params.get("system"))
    _validate_messages(params["messages"], has_tools=bool(tools))
    _validate_cache_control(params)


def _validate_scalars(params: dict[str, Any]) -> None:
    if "model" not in params:
        raise _Invalid("model: Field required")
    if not isinstance(params["model"], str):
        raise _Invalid("model: Input should be a valid string")
    if not params["model"]:
        raise _Invalid("model: String should have at least 1 character")
    if "max_tokens" not in params:
        raise _Invalid("max_tokens: Field required")
    max_tokens = params["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise _Invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _Invalid("max_tokens: Input should be greater than or equal to 1")
    if "messages" not in params:
        raise _Invalid("messages: Field required")
    if not isinstance(params["messages"], list):
        raise _Invalid("messages: Input should be a valid list")
    if not params["messages"]:
        raise _Invalid("messages: List should have at least 1 item after validation, not 0")


def _validate_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _Invalid("tools: Input should be a valid list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _Invalid(f"tools.{i}: Input should be a valid dictionary")
        name = _validate_tool(i, tool)
        if name in names:
            raise _Invalid("tools: Tool names must be unique.")
        names.add(name)


def _validate_tool(i: int, tool: dict[str, Any]) -> str:
    kind = tool.get("type") or "custom"
    name = tool.get("name")
    if kind in _TYPED_TOOLS:
        if name != _TYPED_TOOLS[kind]:
            raise _Invalid(f"tools.{i}.{kind}.name: Input should be '{_TYPED_TOOLS[kind]}'")
        return name
    if kind != "custom":
        tags = ", ".join(f"'{t}'" for t in ("custom", *_TYPED_TOOLS))
        raise _Invalid(
            f"tools.{i}: Input tag '{kind}' found using 'type' does not match any of the "
            f"expected tags: {tags}"
        )
    if name is None:
        raise _Invalid(f"tools.{i}.custom.name: Field required")
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
        raise _Invalid(
            f"tools.{i}.custom.name: String should match pattern '{TOOL_NAME_RE.pattern}'"
        )
    if "input_schema" not in tool:
        raise _Invalid(f"tools.{i}.custom.input_schema: Field required")
    if not isinstance(tool["input_schema"], dict):
        raise _Invalid(f"tools.{i}.custom.input_schema: Input should be a valid dictionary")
    return name


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _Invalid("system: Input should be a valid string or list")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _Invalid(f"system.{i}.type: Input should be 'text'")
        _validate_text(block, f"system.{i}")


def _validate_text(block: dict[str, Any], loc: str) -> None:
    value = block.get("text")
    if not isinstance(value, str):
        raise _Invalid(f"{loc}.text: Input should be a valid string")
    if not value:
        raise _Invalid(f"{loc}: text content blocks must be non-empty")
    if not value.strip():
        raise _Invalid(f"{loc}: text content blocks must contain non-whitespace text")


def _validate_messages(messages: list[Any], *, has_tools: bool) -> None:
    seen_tool_use_ids: set[str] = set()
    uses_tools = False
    previous_role = None
    for i, message in enumerate(messages):
        blocks = _validate_message_shape(i, message, last=i == len(messages) - 1)
        role = message["role"]
        if i == 0 and role != "user":
            raise _Invalid('messages: first message must use the "user" role')
        if role == "system":  # a mid-conversation instruction (Claude Code 2.1.332 sends one)
            for j, block in enumerate(blocks):
                _validate_block(block, "system", f"messages.{i}.content.{j}")
            continue
        if role == previous_role:
            raise _Invalid(
                'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        previous_role = role
        for j, block in enumerate(blocks):
            _validate_block(block, role, f"messages.{i}.content.{j}")
            if block["type"] == "tool_use":
                if block["id"] in seen_tool_use_ids:
                    raise _Invalid(f"messages.{i}.content.{j}: `tool_use` ids must be unique")
                seen_tool_use_ids.add(block["id"])
            uses_tools = uses_tools or block["type"] in ("tool_use", "tool_result")
    if uses_tools and not has_tools:
        raise _Invalid(
            "Requests which include `tool_use` or `tool_result` blocks must define tools."
        )
    _validate_tool_pairing([m for m in messages if m["role"] != "system"])


def _blocks_of(message: dict[str, Any]) -> list[Any]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _validate_message_shape(i: int, message: Any, *, last: bool) -> list[Any]:
    if not isinstance(message, dict):
        raise _Invalid(f"messages.{i}: Input should be a valid dictionary")
    if message.get("role") not in ("user", "assistant", "system"):
        raise _Invalid(f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'")
    if "content" not in message:
        raise _Invalid(f"messages.{i}.content: Field required")
    content = message["content"]
    if not isinstance(content, (str, list)):
        raise _Invalid(f"messages.{i}.content: Input should be a valid string or list")
    if not content and not (last and message["role"] == "assistant"):
        raise _Invalid(
            f"messages.{i}: all messages must have non-empty content except for the optional "
            "final assistant message"
        )
    if isinstance(content, str):
        if content and not content.strip() and not (last and message["role"] == "assistant"):
            raise _Invalid(f"messages.{i}: text content blocks must contain non-whitespace text")
        return []
    return content


def _validate_block(block: Any, role: str, loc: str) -> None:
    allowed = {"user": _USER_BLOCK_TYPES, "system": {"text"}}.get(role, _ASSISTANT_BLOCK_TYPES)
    if not isinstance(block, dict):
        raise _Invalid(f"{loc}: Input should be a valid dictionary")
    kind = block.get("type")
    if kind not in allowed:
        tags = ", ".join(f"'{t}'" for t in sorted(allowed))
        raise _Invalid(
            f"{loc}.type: Input tag '{kind}' found using 'type' does not match any of the "
            f"expected tags: {tags}"
        )
    if kind == "text":
        _validate_text(block, loc)
    elif kind == "tool_use":
        _validate_tool_use(block, loc)
    elif kind == "tool_result":
        _validate_tool_result(block, loc)


def _validate_tool_use(block: dict[str, Any], loc: str) -> None:
    if not isinstance(block.get("id"), str) or not re.match(r"^[a-zA-Z0-9_-]+$", block["id"]):
        raise _Invalid(f"{loc}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
    if not isinstance(block.get("name"), str) or not block["name"]:
        raise _Invalid(f"{loc}.tool_use.name: Field required")
    if not isinstance(block.get("input"), dict):
        raise _Invalid(f"{loc}.tool_use.input: Input should be a valid dictionary")


def _validate_tool_result(block: dict[str, Any], loc: str) -> None:
    if not isinstance(block.get("tool_use_id"), str):
        raise _Invalid(f"{loc}.tool_result.tool_use_id: Field required")
    content = block.get("content", "")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _Invalid(f"{loc}.tool_result.content: Input should be a valid string or list")
    for k, inner in enumerate(content):
        inner_loc = f"{loc}.tool_result.content.{k}"
        if not isinstance(inner, dict) or inner.get("type") not in _TOOL_RESULT_CONTENT_TYPES:
            kind = inner.get("type") if isinstance(inner, dict) else None
            raise _Invalid(
                f"{inner_loc}.type: Input tag '{kind}' found using 'type' does not match any of "
                "the expected tags: 'image', 'text'"
            )
        if inner["type"] == "text":
            _validate_text(inner, inner_loc)


def _validate_tool_pairing(messages: list[dict[str, Any]]) -> None:
    expected: dict[str, None] = {}  # tool_use ids of the previous assistant message, in order
    expected_from = -1
    for i, message in enumerate(messages):
        blocks = [b for b in _blocks_of(message) if isinstance(b, dict)]
        if message["role"] == "assistant":
            expected = {b["id"]: None for b in blocks if b.get("type") == "tool_use"}
            expected_from = i
            if expected and i == len(messages) - 1:
                _raise_missing(i, list(expected))
            continue
        _check_tool_results(i, blocks, expected, expected_from)
        expected = {}


def _raise_missing(i: int, ids: list[str]) -> None:
    raise _Invalid(
        f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
        f"after: {', '.join(ids)}. Each `tool_use` block must have a corresponding "
        "`tool_result` block in the next message."
    )


def _check_tool_results(
    i: int, blocks: list[dict[str, Any]], expected: dict[str, None], expected_from: int
) -> None:
    answered: set[str] = set()
    other_seen = False
    for j, block in enumerate(blocks):
        if block.get("type") != "tool_result":
            other_seen = True
            continue
        tool_use_id = block["tool_use_id"]
        if tool_use_id not in expected:
            raise _Invalid(
                f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {tool_use_id}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message."
            )
        if tool_use_id in answered:
            raise _Invalid(
                f"messages.{i}.content.{j}: each `tool_use` id must have exactly one "
                f"`tool_result` block, found a second one for {tool_use_id}"
            )
        if other_seen:
            raise _Invalid(
                f"messages.{i}.content.{j}: `tool_result` blocks must come first in the content "
                "of a user message, before any other block"
            )
        answered.add(tool_use_id)
    missing = [tool_use_id for tool_use_id in expected if tool_use_id not in answered]
    if missing:
        _raise_missing(expected_from, missing)


def _iter_cache_controls(params: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any], Any]]:
    """(location, block, cache_control) for every cache_control, in prefix order."""
    for i, tool in enumerate(params.get("tools") or []):
        if "cache_control" in tool:
            yield f"tools.{i}", tool, tool["cache_control"]
    system = params.get("system")
    for i, block in enumerate(system if isinstance(system, list) else []):
        if "cache_control" in block:
            yield f"system.{i}", block, block["cache_control"]
    for i, message in enumerate(params["messages"]):
        for j, block in enumerate(_blocks_of(message)):
            loc = f"messages.{i}.content.{j}"
            if "cache_control" in block:
                yield loc, block, block["cache_control"]
            inner = block.get("content") if block.get("type") == "tool_result" else None
            for k, sub in enumerate(inner if isinstance(inner, list) else []):
                if "cache_control" in sub:
                    yield f"{loc}.content.{k}", sub, sub["cache_control"]


def _validate_cache_control(params: dict[str, Any]) -> None:
    found = 0
    seen_5m = False
    for loc, block, cc in _iter_cache_controls(params):
        if cc is None:
            continue
        if block.get("type") in _UNCACHEABLE_BLOCK_TYPES:
            raise _Invalid(f"{loc}.{block['type']}.cache_control: Extra inputs are not permitted")
        if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
            raise _Invalid(f"{loc}.cache_control.type: Input should be 'ephemeral'")
        ttl = cc.get("ttl", "5m")
        if ttl not in TTL_S:
            raise _Invalid(f"{loc}.cache_control.ttl: Input should be '5m' or '1h'")
        if ttl == "1h" and seen_5m:
            raise _Invalid(
                "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control "
                "block. Note that blocks are processed in the following order: `tools`, "
                "`system`, `messages`."
            )
        seen_5m = seen_5m or ttl == "5m"
        found += 1
    if found > MAX_BREAKPOINTS:
        raise _Invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {found}."
        )


def validate_batch_body(body: Any) -> list[dict[str, Any]]:
    """The checks done synchronously at create (HTTP 400); returns the requests."""
    if not isinstance(body, dict) or "requests" not in body:
        raise _invalid("requests: Field required")
    requests = body["requests"]
    if not isinstance(requests, list):
        raise _invalid("requests: Input should be a valid list")
    if not requests:
        raise _invalid("requests: List should have at least 1 item after validation, not 0")
    if len(requests) > MAX_BATCH_REQUESTS:
        raise _invalid(
            f"requests: List should have at most {MAX_BATCH_REQUESTS} items after validation, "
            f"not {len(requests)}"
        )
    seen: set[str] = set()
    for i, request in enumerate(requests):
        _validate_batch_request(i, request, seen)
    return requests


def _validate_batch_request(i: int, request: Any, seen: set[str]) -> None:
    if not isinstance(request, dict):
        raise _invalid(f"requests.{i}: Input should be a valid dictionary")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        raise _invalid(f"requests.{i}.custom_id: Field required")
    if not CUSTOM_ID_RE.match(custom_id):
        raise _invalid(
            f"requests.{i}.custom_id: String should match pattern '{CUSTOM_ID_RE.pattern}'"
        )
    if custom_id in seen:
        raise _invalid(
            f"requests.{i}.custom_id: custom_id must be unique within a batch; "
            f"'{custom_id}' is used more than once"
        )
    seen.add(custom_id)
    params = request.get("params")
    if not isinstance(params, dict):
        raise _invalid(f"requests.{i}.params: Field required")
    if "stream" in params:
        raise _invalid(f"requests.{i}.params.stream: streaming is not supported in batches")
    if "speed" in params:
        raise _invalid(
            f"requests.{i}.params.speed: fast mode is not supported in the Message Batches API"
        )


##############################################################################
# Tokens and prompt caching
##############################################################################


def _strip_cache_control(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_cache_control(v) for k, v in obj.items() if k != "cache_control"}
    if isinstance(obj, list):
        return [_strip_cache_control(v) for v in obj]
    return obj


def _canonical(block: Any) -> str:
    stripped = _strip_cache_control(block)
    return json.dumps(stripped, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def count_tokens(block: Any) -> int:
    """Tokens of one block: max(1, ceil(len(canonical JSON without cache_control) / 4))."""
    return max(1, math.ceil(len(_canonical(block)) / 4))


@dataclasses.dataclass
class _PromptBlock:
    key: bytes  # hash of the prefix up to and including this block
    tokens: int
    ttl: str | None  # the breakpoint's TTL, None when the block is not a breakpoint


def _block_ttl(block: dict[str, Any]) -> str | None:
    cc = block.get("cache_control")
    if cc is None and block.get("type") == "tool_result" and isinstance(block.get("content"), list):
        nested = [b.get("cache_control") for b in block["content"] if isinstance(b, dict)]
        cc = next((c for c in reversed(nested) if c), None)
    if not isinstance(cc, dict):
        return None
    return cc.get("ttl", "5m")


def prompt_blocks(params: dict[str, Any]) -> list[_PromptBlock]:
    """The prompt as blocks in prefix order tools -> system -> messages."""
    tagged: list[tuple[list[Any], dict[str, Any]]] = []
    for tool in params.get("tools") or []:
        tagged.append((["tools"], tool))
    system = params.get("system")
    if isinstance(system, str) and system:
        system = [{"type": "text", "text": system}]
    for block in system or []:
        tagged.append((["system"], block))
    for i, message in enumerate(params.get("messages") or []):
        for block in _blocks_of(message):
            tagged.append((["messages", i, message.get("role")], block))
    blocks = []
    digest = hashlib.sha256(b"prefix").digest()
    for tag, block in tagged:
        canonical = _canonical(block)
        digest = hashlib.sha256(digest + json.dumps([*tag, canonical]).encode()).digest()
        tokens = max(1, math.ceil(len(canonical) / 4))
        blocks.append(_PromptBlock(digest, tokens, _block_ttl(block)))
    return blocks


@dataclasses.dataclass
class CacheOutcome:
    input_tokens: int
    cache_read_input_tokens: int
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int

    @property
    def cache_creation_input_tokens(self) -> int:
        return self.ephemeral_5m_input_tokens + self.ephemeral_1h_input_tokens


class PromptCache:
    """Entries keyed by (model, prefix hash); written at breakpoints, read with look-back."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bytes], _CacheEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def apply(
        self, model: str, blocks: list[_PromptBlock], now: float, batch_id: str | None = None
    ) -> CacheOutcome:
        """`batch_id`: the entries of one batch run side by side, so none reads what a sibling
        wrote (each pays its own write); a later request reads it as usual."""
        prefix = _prefix_sums(blocks)
        minimum = min_cacheable_tokens(model)
        breakpoints = [i for i, b in enumerate(blocks) if b.ttl is not None]
        hit = self._longest_hit(model, blocks, breakpoints, prefix, minimum, now, batch_id)
        read = prefix[hit] if hit >= 0 else 0
        writable = [i for i in breakpoints if i > hit and prefix[i] >= minimum]
        written = {"5m": 0, "1h": 0}
        if writable:
            last = max(writable)
            previous = hit
            for i in breakpoints:
                if hit < i <= last:
                    written[blocks[i].ttl or "5m"] += prefix[i] - (
                        prefix[previous] if previous >= 0 else 0
                    )
                    previous = i
            for i in writable:
                ttl_s = TTL_S[blocks[i].ttl or "5m"]
                self._entries[(model, blocks[i].key)] = _CacheEntry(now + ttl_s, ttl_s, batch_id)
        total = prefix[-1] if prefix else 0
        return CacheOutcome(
            total - read - written["5m"] - written["1h"], read, written["5m"], written["1h"]
        )

    def _longest_hit(
        self,
        model: str,
        blocks: list[_PromptBlock],
        breakpoints: list[int],
        prefix: list[int],
        minimum: int,
        now: float,
        batch_id: str | None = None,
    ) -> int:
        best = -1
        for bp in reversed(breakpoints):
            for i in range(bp, max(-1, bp - LOOKBACK_BLOCKS - 1), -1):
                if i <= best:
                    break
                entry = self._entries.get((model, blocks[i].key))
                sibling = batch_id is not None and entry is not None and entry.batch_id == batch_id
                if entry is not None and not sibling and entry.expires_at > now and (
                    prefix[i] >= minimum
                ):
                    best = i
                    break
        if best >= 0:
            entry = self._entries[(model, blocks[best].key)]
            entry.expires_at = now + entry.ttl_s  # a read refreshes the entry
            entry.batch_id = None
        return best


def _prefix_sums(blocks: list[_PromptBlock]) -> list[int]:
    sums, running = [], 0
    for block in blocks:
        running += block.tokens
        sums.append(running)
    return sums


##############################################################################
# The demo model
##############################################################################


def demo_step(params: dict[str, Any]) -> Step:
    """The deterministic model used when the script is empty (see the module docstring)."""
    messages = params.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") != "user":
        return text("Continuing: done.")
    blocks = [b for b in _blocks_of(last) if isinstance(b, dict)]
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if results:
        return _demo_answer(results[0], len(results))
    prompt = next((b.get("text", "") for b in reversed(blocks) if b.get("type") == "text"), "")
    return _demo_tool_call(prompt.strip(), params)


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if b.get("type") == "text")


def _demo_answer(result: dict[str, Any], n_results: int) -> Step:
    lines = _tool_result_text(result).splitlines()
    head = "**The tool reported an error.**" if result.get("is_error") else "**Done.**"
    fence = "~~~" if any("```" in line for line in lines) else "```"
    quoted = "\n".join(lines[:DEMO_QUOTE_LINES]) or "(no output)"
    parts = [f"{head} The first lines of the output:", "", f"{fence}text", quoted, fence]
    if len(lines) > DEMO_QUOTE_LINES:
        parts.append(f"({len(lines) - DEMO_QUOTE_LINES} more lines not shown)")
    if n_results > 1:
        parts.append(f"({n_results - 1} more tool results not shown)")
    return text("\n".join(parts))


def _demo_tool_call(prompt: str, params: dict[str, Any]) -> Step:
    tool_names = {t.get("name") for t in params.get("tools") or [] if isinstance(t, dict)}
    create = re.match(r"^create\s+(\S+)", prompt)
    command = prompt[4:].split("\n\n")[0].strip()  # a note after a blank line is not run
    if prompt.startswith("run:") and command:
        name, tool_input, says = "bash", {"command": command}, f"I'll run `{command}`."
    elif create:
        path = create.group(1)
        name = "str_replace_based_edit_tool"
        tool_input = {"command": "create", "path": path, "file_text": DEMO_FILE_TEXT}
        says = f"I'll create `{path}`."
    else:
        name, tool_input = "bash", {"command": DEMO_DEFAULT_COMMAND}
        says = "Let me look around the working directory first."
    if name not in tool_names:
        return text(
            f"(demo model) I would call the `{name}` tool, but this request defines no such tool."
        )
    return tool_calls((name, tool_input), text=says)


##############################################################################
# Streaming (server-sent events of /v1/messages with "stream": true)
##############################################################################


def _chunks(s: str) -> list[str]:
    """s in at least 3 pieces (when it has 3 characters) of at most STREAM_CHUNK_CHARS."""
    size = max(1, min(STREAM_CHUNK_CHARS, math.ceil(len(s) / 3)))
    return [s[i : i + size] for i in range(0, len(s), size)]


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    kind = block.get("type")
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {**block, "text": ""}
        citations = block.get("citations")
        if isinstance(citations, list):
            start["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in citations]
        deltas[:0] = [{"type": "text_delta", "text": c} for c in _chunks(block["text"])]
    elif kind == "thinking":
        start = {**block, "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": c} for c in _chunks(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block.get("signature", "")})
    elif kind in ("tool_use", "server_tool_use"):
        start = {**block, "input": {}}
        partial = _chunks(json.dumps(block.get("input", {})))
        deltas = [{"type": "input_json_delta", "partial_json": c} for c in partial]
    else:  # redacted_thinking, server tool results: the whole block at once, no delta
        start = dict(block)
    events = [
        (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
    ]
    for delta in deltas:
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def stream_events(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) sequence the API streams for `message`: message_start (usage
    with the input and cache figures, output_tokens 1), ping, per block content_block_start /
    content_block_delta... / content_block_stop, message_delta (stop_reason, stop_sequence,
    stop_details, cumulative usage with the final output_tokens), message_stop."""
    usage = message["usage"]
    head = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "stop_details": None,
        "usage": {**usage, "output_tokens": min(1, usage["output_tokens"])},
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": head}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
    keys = (
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
        "server_tool_use",
    )
    delta = {k: message.get(k) for k in ("stop_reason", "stop_sequence", "stop_details")}
    final_usage = {k: usage[k] for k in keys if k in usage}
    events.append(
        ("message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage})
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


@dataclasses.dataclass
class _Stream:
    """A streamed answer, written by the handler outside the lock at the pace asked for."""

    events: list[tuple[str, dict[str, Any]]]
    ttft_s: float
    chunk_delay_s: float
    ping_s: float


##############################################################################
# The fake API
##############################################################################


class FakeAPI:
    """The stand-in server; see the module docstring. Thread-safe; one RLock guards all state."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        log: Callable[[str], None] | None = None,
        hold: bool = False,
        latency_by_model: dict[str, float] | None = None,
        inference_geo: str | None = None,
        null_results_url: int = 0,
        stream_ttft_s: float = 0.0,
        stream_chunk_delay_s: float = 0.0,
    ) -> None:
        self.latency_s = latency_s
        self.cancel_latency_s = 0.0
        self.sync_latency_s = 0.0
        self.cancel_succeeds = False
        # Each of these is also a plain attribute a test may change at any time.
        self.hold = hold  # read at create: a held batch ends only after release()
        self.latency_by_model: dict[str, float] = dict(latency_by_model or {})
        self.inference_geo = inference_geo  # usage.inference_geo unless a step/request says
        self.null_results_url = null_results_url  # read when a batch ends
        self.stream_ttft_s = stream_ttft_s
        self.stream_chunk_delay_s = stream_chunk_delay_s
        self.stream_ping_s = STREAM_PING_S
        self.script: collections.deque[Any] = collections.deque()
        self.calls: list[Call] = []
        self.cache = PromptCache()
        self._model_requests: list[ModelRequest] = []
        self._host = host
        self._port = port
        self._log = log
        self._lock = threading.RLock()
        # Notified on every recorded call and every new batch; waits on it hold no sleep.
        self._changed = threading.Condition(self._lock)
        self._offset_s = 0.0
        self._batches: dict[str, _Batch] = {}
        self._seq = 0
        self._faults: dict[str, list[_Fault]] = {name: [] for name in ENDPOINTS}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FakeAPI:
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), _Handler, self)
        host, port = self._server.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.base_url = f"http://{shown}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name="fake-api",
            daemon=True,
            kwargs={"poll_interval": 0.01},
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- clock -------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._offset_s

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward (cache TTLs, 24 h expiry, 29-day retention)."""
        with self._lock:
            self._tick()  # batches that ended before the jump end at their own time
            self._offset_s += seconds
            self._tick()

    # -- test helpers ------------------------------------------------------

    def inject(
        self,
        endpoint: str,
        kind: str,
        count: int = 1,
        *,
        retry_after: float | None = None,
        delay_s: float = 0.0,
        error_code: str | None = None,
        html: bool = False,
        after_events: int = 3,
    ) -> None:
        """Make the next `count` requests to `endpoint` fail with `kind` (FIFO per endpoint;
        an endpoint's own faults are used before "any" faults). delay_s applies to any kind.

        HTTP error kinds also take `error_code` (sent as error.details.error_code, e.g.
        "contract_spend_limit_reached") and `html` (a proxy's text/html page instead of the
        API's JSON). "stream-error" / "stream-drop" are taken only by streamed /v1/messages
        requests: after `after_events` events (pings included) the stream gets an
        overloaded_error `error` event and ends, or the connection is cut."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {FAULT_KINDS}")
        if kind == "drop-after-create" and endpoint != "create":
            raise ValueError("drop-after-create only applies to the 'create' endpoint")
        if kind in STREAM_FAULT_KINDS and endpoint not in ("messages", "any"):
            raise ValueError(f"{kind} only applies to the 'messages' endpoint")
        if (error_code or html) and kind not in _STATUS_FAULT_KINDS:
            raise ValueError(f"error_code and html apply to HTTP error kinds, not {kind!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        if after_events < 0:
            raise ValueError("after_events must be at least 0")
        fault = _Fault(kind, count, retry_after, delay_s, error_code, html, after_events)
        with self._lock:
            self._faults[endpoint].append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            for faults in self._faults.values():
                faults.clear()

    @property
    def model_requests(self) -> list[ModelRequest]:
        with self._lock:
            self._tick()
            return self._model_requests

    def count(self, endpoint: str) -> int:
        with self._lock:
            if endpoint == "any":
                return len(self.calls)
            return sum(1 for c in self.calls if c.endpoint == endpoint)

    def batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            self._tick()
            return self._batch_json(self._batches[batch_id], self.base_url)

    def batch_ids(self) -> list[str]:
        """Every batch created so far (deleted ones included), oldest first."""
        with self._lock:
            return [b.id for b in sorted(self._batches.values(), key=lambda b: b.seq)]

    def ended_wall_time(self, batch_id: str) -> float | None:
        with self._lock:
            self._tick()
            return self._batches[batch_id].ended_wall

    def release(self, batch_id: str | None = None) -> list[str]:
        """Let a held batch (None: every batch created so far) end at the next look; its
        results are computed then. A held batch that was cancelled ends canceled (or
        succeeded with cancel_succeeds). Returns the ids released."""
        with self._lock:
            if batch_id is not None and batch_id not in self._batches:
                raise KeyError(batch_id)
            chosen = [self._batches[batch_id]] if batch_id else list(self._batches.values())
            wall = time.time()
            released = []
            for b in chosen:
                if b.held and b.status != "ended":
                    b.held = False
                    b.released_wall = wall
                    # A cancelled batch's own work never finishes: the cancel ends it.
                    b.end_wall = math.inf if b.cancel_wall is not None else wall
                    released.append(b.id)
            return released

    def wait_for_batches(self, n: int, timeout_s: float = 10) -> list[str]:
        """Block until at least `n` batches were created; their ids, oldest first."""
        self._wait_until(lambda: len(self._batches) >= n, timeout_s, f"{n} batch(es)")
        return self.batch_ids()

    def wait_for(self, endpoint: str, n: int, timeout_s: float = 10) -> int:
        """Block until count(endpoint) >= n (a call counts once its answer is about to be
        written); returns the count."""
        self._wait_until(lambda: self.count(endpoint) >= n, timeout_s, f"{n} {endpoint} call(s)")
        return self.count(endpoint)

    def _wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(ready, timeout=timeout_s):
                seen = collections.Counter(c.endpoint for c in self.calls)
                raise TimeoutError(
                    f"fake API: no {what} after {timeout_s:g} s "
                    f"(batches: {len(self._batches)}, calls: {dict(seen)})"
                )

    # -- batch life cycle --------------------------------------------------

    def _tick(self) -> None:
        """End every batch whose time has come, in the order they ended."""
        wall = time.time()
        pending = [b for b in self._batches.values() if b.status != "ended"]
        for b in sorted(pending, key=lambda b: (self._due_wall(b), b.seq)):
            due_wall = self._due_wall(b)
            if wall >= due_wall and due_wall + self._offset_s < b.expires_at:
                self._end(b, due_wall, due_wall + self._offset_s)
            elif self.now() >= b.expires_at:
                # In practice only advance() gets here, so "now" is when the clock passed it.
                self._expire(b, wall)

    def _due_wall(self, b: _Batch) -> float:
        if b.held:
            return math.inf
        due = b.end_wall
        if b.cancel_wall is not None:
            due = min(due, b.cancel_wall + self.cancel_latency_s)
        return max(due, b.released_wall or due)

    def _end(self, b: _Batch, ended_wall: float, ended_at: float) -> None:
        # A cancel only bites if it took effect before the batch would have finished anyway.
        cut_short = b.cancel_wall is not None and ended_wall < b.end_wall
        results = []
        for request in b.requests:
            if cut_short and not self.cancel_succeeds:
                result: dict[str, Any] = {"type": "canceled"}
            else:
                result = self._answer(request["params"], request["custom_id"], b.id, ended_at)
            results.append({"custom_id": request["custom_id"], "result": result})
        self._finish(b, results, ended_wall, ended_at)

    def _expire(self, b: _Batch, ended_wall: float) -> None:
        results = [{"custom_id": r["custom_id"], "result": {"type": "expired"}} for r in b.requests]
        self._finish(b, results, ended_wall, b.expires_at)

    def _finish(
        self, b: _Batch, results: list[dict[str, Any]], ended_wall: float, ended_at: float
    ) -> None:
        b.results = results
        b.status = "ended"
        b.ended_wall = ended_wall
        b.ended_at = ended_at
        b.null_url_looks = max(0, int(self.null_results_url))

    def _answer(self, params: Any, custom_id: str | None, batch_id: str | None, now: float) -> dict:
        """One batch entry's result dict: validate, then play one step."""
        try:
            validate_params(params)
        except _Invalid as exc:
            return {
                "type": "errored",
                "error": error_body("invalid_request_error", str(exc)),
            }
        step = self._next_step(params)
        record = ModelRequest(custom_id, params, batch_id, None, _result_type(step))
        self._model_requests.append(record)
        if step.kind == "errored":
            return {"type": "errored", "error": error_body(step.error_type, step.message)}
        if step.kind in ("expired", "canceled"):
            return {"type": step.kind}
        message = self._render(step, params, "batch", now, batch_id)
        record.usage = message["usage"]
        return {"type": "succeeded", "message": message}

    def _next_step(self, params: dict[str, Any]) -> Step:
        step = self.script.popleft() if self.script else None
        if callable(step):
            step = step(params)
        if step is None:
            step = demo_step(params)
        if isinstance(step, str):
            step = text(step)
        if not isinstance(step, Step):
            raise TypeError(f"a script step must be a Step, str, callable or None, not {step!r}")
        return step

    def _render(
        self, step: Step, params: dict[str, Any], tier: str, now: float, batch_id: str | None = None
    ) -> dict[str, Any]:
        content = []
        for block in step.content:
            block = dict(block)
            if block.get("type") == "tool_use" and not block.get("id"):
                block["id"] = new_id("toolu_")
            content.append(block)
        outcome = self.cache.apply(params["model"], prompt_blocks(params), now, batch_id)
        usage: dict[str, Any] = {
            "input_tokens": outcome.input_tokens,
            "output_tokens": sum(count_tokens(b) for b in content) if content else 1,
            "cache_creation_input_tokens": outcome.cache_creation_input_tokens,
            "cache_read_input_tokens": outcome.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": outcome.ephemeral_5m_input_tokens,
                "ephemeral_1h_input_tokens": outcome.ephemeral_1h_input_tokens,
            },
            "service_tier": tier,
        }
        geo = params.get("inference_geo")
        geo = geo if geo in ("us", "global") else self.inference_geo
        if geo is not None:
            usage["inference_geo"] = geo
        extra = dict(step.extra)
        for key, value in (extra.pop("usage", None) or {}).items():
            if key == "cache_creation" and isinstance(value, dict):
                usage["cache_creation"] = {**usage["cache_creation"], **value}
            else:
                usage[key] = value
        message = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": content,
            "stop_reason": step.stop_reason,
            "stop_sequence": None,
            "stop_details": None,
            "usage": usage,
        }
        message.update(extra)
        return message

    def _batch_json(self, b: _Batch, base_url: str, look: bool = False) -> dict[str, Any]:
        """The MessageBatch object; `look` is a retrieve or list showing it to a client."""
        url = f"{base_url}/v1/messages/batches/{b.id}/results" if b.status == "ended" else None
        if url and b.null_url_looks > 0:
            url = None  # the schema allows null on an ended batch; clients must cope
            if look:
                b.null_url_looks -= 1
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if b.status == "ended":
            for line in b.results or []:
                counts[line["result"]["type"]] += 1
        else:
            counts["processing"] = len(b.requests)
        archived = b.created_at + RESULTS_RETENTION_S
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": b.status,
            "request_counts": counts,
            "created_at": rfc3339(b.created_at),
            "expires_at": rfc3339(b.expires_at),
            "ended_at": rfc3339(b.ended_at),
            "cancel_initiated_at": rfc3339(b.cancel_initiated_at),
            "archived_at": rfc3339(archived) if self.now() >= archived else None,
            "results_url": url,
        }

    # -- endpoint handlers (called with the lock held; raise _HTTPError) -----

    def handle(self, req: _Request) -> _Response:
        with self._lock:
            self._tick()
            handler = getattr(self, f"_ep_{req.endpoint}", None)
            if handler is None:
                raise _HTTPError(404, "not_found_error", f"Not found: {req.method} {req.path}")
            return handler(req)

    def _ep_create(self, req: _Request) -> _Response:
        requests = validate_batch_body(req.json())
        self._seq += 1
        wall, now = time.time(), self.now()
        b = _Batch(
            id=new_id("msgbatch_"),
            seq=self._seq,
            requests=[{"custom_id": r["custom_id"], "params": r["params"]} for r in requests],
            created_at=now,
            created_wall=wall,
            end_wall=wall + max(0.0, self._latency_of(requests)),
            held=bool(self.hold),
        )
        self._batches[b.id] = b
        self._changed.notify_all()
        return _Response.of_json(self._batch_json(b, req.base_url))

    def _latency_of(self, requests: list[dict[str, Any]]) -> float:
        """The slowest entry sets the batch's latency: latency_by_model[model] (a dated id
        falls back to its base id), else latency_s."""

        def one(params: dict[str, Any]) -> float:
            model = params.get("model")
            if isinstance(model, str):
                for key in (model, _DATED_SUFFIX_RE.sub("", model)):
                    if key in self.latency_by_model:
                        return float(self.latency_by_model[key])
            return float(self.latency_s)

        return max(one(r["params"]) for r in requests)

    def _get_batch(self, batch_id: str) -> _Batch:
        b = self._batches.get(batch_id)
        if b is None or b.deleted:
            raise _HTTPError(404, "not_found_error", f"Message batch {batch_id} not found.")
        return b

    def _ep_retrieve(self, req: _Request) -> _Response:
        b = self._get_batch(req.batch_id)
        return _Response.of_json(self._batch_json(b, req.base_url, look=True))

    def _ep_list(self, req: _Request) -> _Response:
        after_id, before_id = req.query.get("after_id"), req.query.get("before_id")
        if after_id and before_id:
            raise _invalid("after_id and before_id cannot be used together")
        limit = _parse_limit(req.query.get("limit"))
        ordered = sorted(self._batches.values(), key=lambda b: -b.seq)
        cursor = after_id or before_id
        if cursor:
            index = next((i for i, b in enumerate(ordered) if b.id == cursor), None)
            if index is None:
                raise _HTTPError(404, "not_found_error", f"Message batch {cursor} not found.")
            rest = ordered[index + 1 :] if after_id else ordered[:index]
        else:
            rest = ordered
        rest = [b for b in rest if not b.deleted]
        page = rest[-limit:] if before_id else rest[:limit]
        data = [self._batch_json(b, req.base_url, look=True) for b in page]
        return _Response.of_json(
            {
                "data": data,
                "has_more": len(rest) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def _ep_cancel(self, req: _Request) -> _Response:
        b = self._get_batch(req.batch_id)
        if b.status == "ended":
            raise _invalid(f"Message batch {b.id} has already ended and cannot be canceled.")
        if b.status == "in_progress":
            b.status = "canceling"
            b.cancel_wall = time.time()
            b.cancel_initiated_at = self.now()
        return _Response.of_json(self._batch_json(b, req.base_url))

    def _ep_delete(self, req: _Request) -> _Response:
        b = self._get_batch(req.batch_id)
        if b.status != "ended":
            raise _invalid(
                f"Message batch {b.id} cannot be deleted while it is {b.status}; "
                "cancel it and wait for it to end first."
            )
        b.deleted = True
        return _Response.of_json({"id": b.id, "type": "message_batch_deleted"})

    def _ep_results(self, req: _Request) -> _Response:
        b = self._get_batch(req.batch_id)
        if b.status != "ended":
            raise _invalid(f"Message batch {b.id} has not finished processing; no results yet.")
        if self.now() >= b.created_at + RESULTS_RETENTION_S:
            raise _HTTPError(
                404,
                "not_found_error",
                f"Results of message batch {b.id} are no longer available "
                "(they are kept 29 days after creation).",
            )
        body = "".join(json.dumps(line) + "\n" for line in b.results or [])
        return _Response(200, body.encode(), "application/binary")

    def _ep_messages(self, req: _Request) -> _Response:
        params = req.json()
        streaming = isinstance(params, dict) and params.get("stream") is True
        if isinstance(params, dict) and params.get("stream") not in (None, True, False):
            raise _invalid("stream: Input should be a valid boolean")
        try:
            validate_params(params)
        except _Invalid as exc:
            raise _invalid(str(exc)) from None
        step = self._next_step(params)
        record = ModelRequest(None, params, None, None, _result_type(step))
        self._model_requests.append(record)
        if step.kind == "errored":
            raise _HTTPError(ERROR_STATUS.get(step.error_type, 500), step.error_type, step.message)
        if step.kind == "expired":
            raise _HTTPError(504, "timeout_error", "Request timed out (scripted expired step)")
        if step.kind == "canceled":
            raise _HTTPError(500, "api_error", "Request was canceled (scripted canceled step)")
        message = self._render(step, params, "standard", self.now())
        record.usage = message["usage"]
        if not streaming:
            return _Response.of_json(message)
        pace = (self.stream_ttft_s, self.stream_chunk_delay_s, self.stream_ping_s)
        return _Response(
            200,
            b"",
            "text/event-stream; charset=utf-8",
            stream=_Stream(stream_events(message), *pace),
        )

    def _ep_count_tokens(self, req: _Request) -> _Response:
        params = req.json()
        try:
            validate_params({"max_tokens": 1, **params} if isinstance(params, dict) else params)
        except _Invalid as exc:
            raise _invalid(str(exc)) from None
        return _Response.of_json({"input_tokens": sum(b.tokens for b in prompt_blocks(params))})

    # -- faults ------------------------------------------------------------

    def take_fault(self, endpoint: str, streaming: bool = False) -> _Fault | None:
        """The first queued fault this request takes (stream faults wait for a stream)."""
        with self._lock:
            for name in (endpoint, "any"):
                queue = self._faults.get(name) or []
                fault = next((f for f in queue if f.applies(streaming)), None)
                if fault is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        queue.remove(fault)
                    return fault
            return None

    def record(self, call: Call) -> None:
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()
        if self._log is not None:
            status = "dropped" if call.status is None else str(call.status)
            self._log(f"{time.strftime('%H:%M:%S')} {call.method} {call.path} -> {status}")


def _result_type(step: Step) -> str:
    return "succeeded" if step.kind == "message" else step.kind


def _parse_limit(value: str | None) -> int:
    if value is None:
        return 20
    try:
        limit = int(value)
    except ValueError:
        raise _invalid("limit: Input should be a valid integer") from None
    if limit < 1:
        raise _invalid("limit: Input should be greater than or equal to 1")
    if limit > 1000:
        raise _invalid("limit: Input should be less than or equal to 1000")
    return limit


##############################################################################
# HTTP plumbing
##############################################################################

_BATCH_PATH_RE = re.compile(r"^/v1/messages/batches/([^/]+)(/cancel|/results)?$")


def route(method: str, path: str) -> tuple[str, str | None]:
    """(endpoint name, batch id) of a request; ("unknown", None) when nothing matches."""
    if path == "/v1/messages/batches":
        return {"POST": "create", "GET": "list"}.get(method, "unknown"), None
    if path == "/v1/messages":
        return ("messages" if method == "POST" else "unknown"), None
    if path == "/v1/messages/count_tokens":
        return ("count_tokens" if method == "POST" else "unknown"), None
    match = _BATCH_PATH_RE.match(path)
    if not match:
        return "unknown", None
    batch_id, tail = urllib.parse.unquote(match.group(1)), match.group(2)
    table = {
        (None, "GET"): "retrieve",
        (None, "DELETE"): "delete",
        ("/cancel", "POST"): "cancel",
        ("/results", "GET"): "results",
    }
    return table.get((tail, method), "unknown"), batch_id


@dataclasses.dataclass
class _Request:
    method: str
    path: str
    endpoint: str
    batch_id: str
    query: dict[str, str]
    body: bytes
    base_url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise _invalid("There was an error parsing the body of your request as JSON.") from None


@dataclasses.dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    stream: _Stream | None = None  # server-sent events instead of `body`

    @classmethod
    def of_json(
        cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> _Response:
        return cls(status, json.dumps(payload).encode(), "application/json", headers or {})

    @classmethod
    def of_error(cls, err: _HTTPError) -> _Response:
        body = error_body(err.error_type, err.message, err.details)
        return cls.of_json(body, err.status, err.headers)


def _asks_to_stream(body: bytes) -> bool:
    try:
        params = json.loads(body or b"null")
    except ValueError:
        return False
    return isinstance(params, dict) and params.get("stream") is True


def _fault_response(fault: _Fault) -> _Response:
    status, error_type, message = _FAULT_ERRORS[fault.kind]
    code = fault.error_code
    if code is None and fault.kind == "429-spend":
        code = "enforced_spend_limit_reached"
    details = {"error_code": code} if code else None
    message = _ERROR_CODE_MESSAGES.get(code or "", message)
    headers = {}
    retry_after = fault.retry_after
    if retry_after is None and fault.kind == "429" and code not in SPEND_LIMIT_CODES:
        retry_after = 1
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    if fault.html:
        return _Response(status, _html_error_page(status), "text/html", headers)
    return _Response.of_error(
        _HTTPError(status, error_type, message, details=details, headers=headers)
    )


def _html_error_page(status: int) -> bytes:
    """The page a proxy in front of the API (here nginx) answers with, e.g. for a 413."""
    try:
        title = f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        title = f"{status} Error"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, api: FakeAPI) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut kept-alive client connections, so a stopped server answers nothing more."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, each answer waits ~40 ms for an ACK.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # FakeAPI.record logs, when asked to

    def _serve(self) -> None:
        api = self.server.api
        t_wall = time.time()
        parts = urllib.parse.urlsplit(self.path)
        endpoint, batch_id = route(self.command, parts.path)
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BATCH_BYTES:
            self.close_connection = True
            message = f"Request exceeds the maximum allowed size of {MAX_BATCH_BYTES} bytes."
            response = _Response.of_error(_HTTPError(413, "request_too_large", message))
            return self._finish(api, t_wall, endpoint, response)
        body = self.rfile.read(length) if length else b""
        req = _Request(
            method=self.command,
            path=self.path,
            endpoint=endpoint,
            batch_id=batch_id or "",
            query={k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()},
            body=body,
            base_url=f"http://{self.headers.get('host') or api.base_url.split('://', 1)[1]}",
        )
        if not self._authenticated():
            error = _HTTPError(401, "authentication_error", "x-api-key header is required")
            return self._finish(api, t_wall, endpoint, _Response.of_error(error))
        streaming = endpoint == "messages" and _asks_to_stream(body)
        fault = api.take_fault(endpoint, streaming)
        if fault is not None and fault.delay_s > 0:
            time.sleep(fault.delay_s)
        if fault is not None and fault.kind == "drop":
            return self._drop(api, t_wall, endpoint)
        if fault is not None and fault.kind in _STATUS_FAULT_KINDS:
            return self._finish(api, t_wall, endpoint, _fault_response(fault))
        if endpoint == "messages" and not streaming and api.sync_latency_s > 0:
            time.sleep(api.sync_latency_s)
        response = self._dispatch(api, req)
        if fault is not None and fault.kind == "drop-after-create":
            return self._drop(api, t_wall, endpoint)
        if response.stream is not None:
            return self._write_stream(api, t_wall, endpoint, response.stream, fault)
        self._finish(api, t_wall, endpoint, response)

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _authenticated(self) -> bool:
        if (self.headers.get("x-api-key") or "").strip():
            return True
        auth = self.headers.get("authorization") or ""
        return auth.lower().startswith("bearer ") and bool(auth[7:].strip())

    @staticmethod
    def _dispatch(api: FakeAPI, req: _Request) -> _Response:
        try:
            return api.handle(req)
        except _HTTPError as err:
            return _Response.of_error(err)
        except Exception as exc:  # a bug in the fake: say so loudly, still answer
            import traceback

            traceback.print_exc()
            return _Response.of_error(_HTTPError(500, "api_error", f"fake API bug: {exc!r}"))

    def _drop(self, api: FakeAPI, t_wall: float, endpoint: str) -> None:
        api.record(Call(self.command, self.path, endpoint, t_wall, None, self._headers()))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _finish(self, api: FakeAPI, t_wall: float, endpoint: str, response: _Response) -> None:
        # Recorded before the answer is written, so a client that has its answer sees the call.
        call = Call(self.command, self.path, endpoint, t_wall, response.status, self._headers())
        api.record(call)
        self.send_response(response.status)
        self.send_header("content-type", response.content_type)
        self.send_header("content-length", str(len(response.body)))
        self.send_header("request-id", new_id("req_"))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(response.body)

    def _write_stream(
        self, api: FakeAPI, t_wall: float, endpoint: str, stream: _Stream, fault: _Fault | None
    ) -> None:
        """Server-sent events in chunked encoding: message_start at once, the first content
        event after ttft_s (pinging meanwhile), then a delta every chunk_delay_s."""
        if fault is not None and fault.kind not in STREAM_FAULT_KINDS:
            fault = None  # e.g. "slow": already served
        api.record(Call(self.command, self.path, endpoint, t_wall, 200, self._headers()))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", new_id("req_"))
        self.end_headers()
        sent = 0
        cut = fault.after_events if fault is not None else math.inf
        first_content = next(
            (
                i
                for i, (name, _) in enumerate(stream.events)
                if name not in ("message_start", "ping")
            ),
            len(stream.events),
        )
        for i, (name, data) in enumerate(stream.events):
            pause_s = stream.ttft_s if i == first_content else 0.0
            if i > first_content and name == "content_block_delta":
                pause_s = stream.chunk_delay_s
            deadline = time.monotonic() + pause_s
            while sent < cut and (left_s := deadline - time.monotonic()) > 0:
                if left_s > stream.ping_s > 0:
                    time.sleep(stream.ping_s)
                    sent += self._event("ping", {"type": "ping"})
                else:
                    time.sleep(left_s)
            if sent >= cut:
                break
            sent += self._event(name, data)
        if sent < cut or fault is None:
            return self._end_chunks()
        if fault.kind == "stream-drop":
            return self._drop_stream()
        error = {"type": "overloaded_error", "message": "Overloaded"}
        self._event("error", {"type": "error", "error": error, "request_id": new_id("req_")})
        self._end_chunks()

    def _event(self, name: str, data: dict[str, Any]) -> int:
        payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()
        return 1

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop_stream(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


##############################################################################
# Standalone server
##############################################################################


def _model_latency(value: str) -> tuple[str, float]:
    model, sep, seconds = value.partition("=")
    try:
        if not (sep and model):
            raise ValueError
        return model, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL=SECONDS, not {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_api",
        description="Offline stand-in of the Anthropic Messages and Message Batches API "
        "(demo model; see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8765, help="port (0 = any free one; default %(default)s)"
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds each batch takes (default %(default)s)",
    )
    parser.add_argument(
        "--latency-by-model",
        action="append",
        default=[],
        metavar="MODEL=S",
        type=_model_latency,
        help="seconds a batch with this model takes, instead of --latency (repeatable; "
        "a batch takes its slowest entry's figure)",
    )
    parser.add_argument(
        "--sync-latency",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds before each non-streamed /v1/messages answer (default %(default)s)",
    )
    parser.add_argument(
        "--stream-ttft",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds from message_start to the first streamed content, so a person sees "
        "the wait (default %(default)s)",
    )
    parser.add_argument(
        "--stream-chunk-delay",
        type=float,
        default=0.02,
        metavar="S",
        help="seconds between streamed deltas (default %(default)s)",
    )
    parser.add_argument(
        "--inference-geo",
        choices=INFERENCE_GEOS,
        help="usage.inference_geo of every answer (default: omitted); 'us' bills 1.1x",
    )
    parser.add_argument(
        "--null-results-url",
        type=int,
        default=0,
        metavar="N",
        help="an ended batch shows results_url null to its next N retrieves/lists",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    api = FakeAPI(
        latency_s=args.latency,
        host=args.host,
        port=args.port,
        log=None if args.quiet else log,
        latency_by_model=dict(args.latency_by_model),
        inference_geo=args.inference_geo,
        null_results_url=args.null_results_url,
        stream_ttft_s=args.stream_ttft,
        stream_chunk_delay_s=args.stream_chunk_delay,
    )
    api.sync_latency_s = args.sync_latency
    try:
        api.start()
    except OSError as exc:
        print(
            f"fake API: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C stops it even when started by a process that ignores SIGINT (a pytest-xdist
    # worker, a background job): an ignored signal is inherited across exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # a signal may arrive while the banner is printed: stop cleanly then too
        takes = f"{args.latency:g} s" + "".join(
            f", {model} {seconds:g} s" for model, seconds in args.latency_by_model
        )
        print(f"Fake Anthropic API on {api.base_url} (batches take {takes}; demo model)")
        print("To try the harness against it:")
        print(f"  export ANTHROPIC_BASE_URL={api.base_url}")
        print("  export ANTHROPIC_API_KEY=any-non-empty")
        print("Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopped.", flush=True)
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
