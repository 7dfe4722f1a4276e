"""batching-harness: an interactive coding agent whose every model turn is a Message Batch.

Batches cost half the synchronous price but take a minute or more per turn, so
this harness is for work nobody is watching in real time: evals, audits,
background research. Each model turn is submitted as a one-entry batch, polled
until it ends, and its tool calls (bash inside sandbox-runtime, a file editor
confined to the work directory) are run before the next turn is submitted.

Run:        python batching_harness.py [--model ID] [--workdir DIR] [-p PROMPT]
Doctor:     python batching_harness.py --doctor
Proxy:      python batching_harness.py proxy [--port 8787] [--route batch|sync|auto]
            (other harnesses set ANTHROPIC_BASE_URL to it; their turns are batched)
Environment:
    ANTHROPIC_API_KEY      the API key (required to submit turns)
    ANTHROPIC_BASE_URL     another API endpoint, e.g. the offline stand-in
    BATCHING_HARNESS_HOME  where state lives (default ~/.batching-harness):
                           journal.db (SQLite: every session, request and tool
                           call), history (the prompt's), locks/ (one process
                           per session; one command per work directory)
    BATCHING_HARNESS_POOL  (or --pool URL) the journal in a PostgreSQL pool that
                           processes on many hosts share instead of journal.db
                           (pip install 'batching-harness[postgres]')

Sections, in dependency order (grep '^#####' for this table):
    constants and prices, errors, config, value types, accounting, journal,
    transport, sandbox, tools, doctor, agent loop, UI, REPL, main
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import errno
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import select
import shlex
import signal
import socket
import sqlite3
import stat
import sys
import termios
import threading
import time
import tty
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, cast

__version__ = "0.1.0"

T = TypeVar("T")  # what a retried step gives back


def _load_sandbox_module() -> Any:
    """The security boundary lives in sandbox/ beside the srt pin, reviewable on its own.
    The copy beside this file wins (a clone, a worktree: the two always match); an install
    without it uses the package `batching_harness_sandbox`. Either way no generic top-level
    `sandbox` name ever lands on the user's import path."""
    import importlib.util

    here = Path(__file__).resolve().parent / "sandbox" / "__init__.py"
    loaded = sys.modules.get("batching_harness_sandbox")
    if loaded is not None and Path(loaded.__file__ or "").resolve() == here:
        return loaded
    if not here.exists():
        import batching_harness_sandbox

        return batching_harness_sandbox
    spec = importlib.util.spec_from_file_location("batching_harness_sandbox", here)
    if spec is None or spec.loader is None:
        raise ImportError(f"batching-harness: {here} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules["batching_harness_sandbox"] = module
    spec.loader.exec_module(module)
    return module


_load_sandbox_module()
from batching_harness_sandbox import (  # noqa: E402  (loaded just above)
    BashTool,
    DoctorCheck,
    EditorTool,
    SandboxError,
    SandboxPolicy,
    SandboxUnavailable,
    Toolbox,
    ToolResult,
    check_workdir,
    describe_tool_call,
    doctor_checks,
    probe_sandbox,
    secure_state_dir,
    stop_leftovers,
    terminal_safe,
)

##############################################################################
# Constants and prices (data only)
##############################################################################

DEFAULT_MODEL = "claude-opus-5-5"
DEFAULT_MAX_TOKENS = 16_000
CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Source of truth: reference/pricing.md (compiled 2026-11). Change a figure there first.


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens at standard (non-batch) rates, one figure per billed category."""

    input: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float


_OPUS_4 = ModelPrice(5, 6.25, 10, 0.50, 25)
_SONNET_4 = ModelPrice(3, 3.75, 6, 0.30, 15)
PRICES: dict[str, ModelPrice] = {
    # Fable/Mythos 5.2: cache figures rest on secondary sources (unverified in pricing.md).
    "claude-fable-5-2": ModelPrice(8, 10, 16, 0.20, 40),
    "claude-mythos-5-2": ModelPrice(8, 10, 16, 0.20, 40),
    "claude-fable-5-1": ModelPrice(10, 12.50, 20, 0.25, 50),
    "claude-mythos-5-1": ModelPrice(10, 12.50, 20, 0.25, 50),
    "claude-fable-5": ModelPrice(10, 12.50, 20, 1.00, 50),
    "claude-mythos-5": ModelPrice(10, 12.50, 20, 1.00, 50),
    "claude-opus-5-5": ModelPrice(4, 5, 8, 0.20, 20),
    "claude-opus-5": ModelPrice(5, 6.25, 10, 0.50, 25),
    "claude-opus-4-8": _OPUS_4,
    "claude-opus-4-7": _OPUS_4,
    "claude-opus-4-6": _OPUS_4,
    "claude-opus-4-5": _OPUS_4,
    # Retired on the Claude API; kept so old journals still price.
    "claude-opus-4-1": ModelPrice(15, 18.75, 30, 1.50, 75),
    "claude-sonnet-5-5": ModelPrice(2, 2.50, 4, 0.10, 10),
    "claude-sonnet-5": ModelPrice(2, 2.50, 4, 0.20, 10),
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    # Haiku 5.5 for a prompt of at most HAIKU_55_LONG_PROMPT_TOKENS; see LONG_PROMPT_TIERS.
    "claude-haiku-5-5": ModelPrice(0.10, 0.125, 0.20, 0.01, 0.50),
    "claude-haiku-4-5": ModelPrice(1, 1.25, 2, 0.10, 5),
}

# The most max_tokens one request may ask for, per model: "Max output" on each model's page of
# platform.claude.com/docs (models overview, compiled 2026-11). Sonnet 4.6 is taken at 64K (the
# sources disagree; a turn over it gets the batch beta below, which covers it either way).
MAX_OUTPUT_TOKENS: dict[str, int] = {
    **dict.fromkeys(("claude-fable-5-2", "claude-mythos-5-2", "claude-fable-5-1",
                     "claude-mythos-5-1", "claude-fable-5", "claude-mythos-5"), 128_000),
    **dict.fromkeys(("claude-opus-5-5", "claude-opus-5", "claude-opus-4-8", "claude-opus-4-7",
                     "claude-opus-4-6", "claude-sonnet-5-5", "claude-sonnet-5",
                     "claude-haiku-5-5"), 128_000),
    "claude-opus-4-5": 64_000,
    "claude-opus-4-1": 32_000,
    **dict.fromkeys(("claude-sonnet-4-6", "claude-sonnet-4-5", "claude-haiku-4-5"), 64_000),
}
# The Batch API alone takes up to 300K output tokens on these models when the create carries
# this beta header ("Max output (Batch API, beta)" on the same pages; not Fable, not Haiku).
OUTPUT_300K_BETA = "output-300k-2026-03-24"
OUTPUT_300K_TOKENS = 300_000
OUTPUT_300K_MODELS = frozenset({
    "claude-opus-5-5", "claude-opus-5", "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6",
    "claude-sonnet-5-5", "claude-sonnet-5", "claude-sonnet-4-6"})

# A prompt (input + cache read + cache write of one request) OVER this many tokens pays the
# long-prompt row for every category, output included. Only Haiku 5.5 has such a tier.
HAIKU_55_LONG_PROMPT_TOKENS = 100_000
LONG_PROMPT_TIERS: dict[str, tuple[int, ModelPrice]] = {
    "claude-haiku-5-5": (HAIKU_55_LONG_PROMPT_TOKENS, ModelPrice(0.50, 0.625, 1.00, 0.05, 2.50)),
}

# The Batch API bills every category at half the standard price; it stacks with cache prices.
BATCH_DISCOUNT = 0.5

# usage.inference_geo of a response -> multiplier on everything it bills (pricing.md: "us" is
# 1.1x). Read from each response, never from the request: a workspace default can set it.
INFERENCE_GEO_RATES = {"us": 1.1}

##############################################################################
# Errors and control-flow signals
##############################################################################


class HarnessError(Exception):
    """Root of every expected failure: the REPL reports it in one line."""


class ConfigError(HarnessError):
    """Bad flags or environment: exit status 2."""


class JournalError(HarnessError):
    """The journal cannot be used as it is (locked, newer schema, damaged)."""


class PoolUnreachable(JournalError):
    """The pool's server cannot be reached right now (down, network cut); the store
    reconnects on its next call, so a caller may wait and try again."""


class TransportError(HarnessError):
    """The Batches API could not be reached or refused us; the journal keeps the turn.
    `status` and `error_type` say how the API refused, when it did (the proxy hands them on
    to its client)."""

    def __init__(self, message: str, *, status: int | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type


class NotSent(TransportError):
    """The request certainly created nothing (refused, or never left this machine): not
    billed, and nothing to resume."""


class Unreachable(NotSent):
    """Connection refused or an unknown host: nothing was sent; the URL is probably wrong."""


class BatchNotFound(TransportError):
    """The API does not know the batch (or no longer keeps its results): a 404."""


class RetriesExhausted(TransportError):
    """Transient API faults outlasted the retry budget; the turn can be resumed."""


class SpendLimitReached(TransportError):
    """A 429 that says the organisation's spend limit is reached: never retried."""


class Withdrawn(NotSent):
    """A turn waited on in a shared pool's queue was taken back out by the process that
    queued it (it stopped before the turn was claimed): nothing was sent; queue it anew."""


class Halted(TransportError):
    """The lane takes no more requests until someone acts (a fleet stopping, a key the API
    refuses). Nothing was created for this request: its row stays 'submitting', so a resume
    reconciles it and sends it then, instead of recording a turn that never ran as failed."""


class AccountRefused(Halted):
    """401 / 402 / 403: the key, its billing or its permissions. No other request of this
    key can succeed either, so a fleet stops whole (and resumably) rather than fail N agents."""


class BudgetExceeded(HarnessError):
    """Submitting the next turn would cross --max-budget-usd or --max-turns."""


class TurnFailed(HarnessError):
    """The turn ended without an answer (errored, canceled, over a limit, ...). It carries
    what to record: the agent loop marks `custom_id` failed with `record` in ONE place."""

    def __init__(self, message: str, *, custom_id: str | None = None,
                 record: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id
        self.record = record


class _Hurry(Exception):
    """Inside the agent: stop waiting for this batch and send the turn synchronously."""


class SessionTaken(HarnessError):
    """While the pool was unreachable its server let go of this process's session lock, and
    another process took the session: this one must not drive it any further."""


class BatchShared(HarnessError):
    """A cancel refused: the batch also carries other runs' turns (a shared pool), and a
    batch is cancelled whole. The asking turn is detached from it instead."""


class Detached(HarnessError):
    """The user left a batch running; it can be re-attached with --resume."""

    def __init__(self, session_id: str, batch_id: str | None) -> None:
        super().__init__(f"detached from {batch_id or 'the session'}")
        self.session_id = session_id
        self.batch_id = batch_id


##############################################################################
# Config (one definition per option: the parser, the resume command and the agent's
# settings are all built from the fields below)
##############################################################################

CACHE_TTLS = {"1h": "1h", "5m": "5m", "off": None}
OUTPUT_FORMATS = ("text", "json")
ROUTES = ("batch", "sync", "auto")
# What a minute of waiting is worth, for --route auto. At the prompt a person watches: a
# saving under 5 cents a minute (a small turn that would save $0.004 for ~1:30) is not worth
# their wait, while a large prompt on a dear model (saving 10 cents or more) still is.
# Headless, nobody watches; a CI job's minute still has a small price, so a turn that saves
# a fraction of a cent is not made to wait minutes for it.
INTERACTIVE_WAIT_PRICE = 0.05
HEADLESS_WAIT_PRICE = 0.005
DEFAULT_POLL_INTERVAL_S = 2.5
"""At 2.5 s, polls plus the create and the results download stay under 30 requests a minute."""
DEFAULT_TOOL_TIMEOUT_S = 120.0
DEFAULT_CACHE_TTL = "1h"
"""One batch turn plus its tool run outlasts 5 minutes; see add_cache_breakpoints."""


def option(*flags: str, help: str, metavar: str | None = None, carried: bool = False,
           action: str | None = None, choices: Sequence[str] | None = None,
           parse: Callable[[Any], Any] | None = None,
           show: Callable[[Any], str] | None = None) -> dict[str, Any]:
    """Field metadata that makes a Config field a command-line option.

    carried: the printed resume command repeats it when it differs from the default (the
    journal keeps the conversation, not the flags). parse turns what argparse gives into
    the field's value; show turns the value back into what the flag takes."""
    return {"option": {"flags": flags, "help": help, "metavar": metavar, "carried": carried,
                       "action": action, "choices": choices, "parse": parse, "show": show}}


def _ttl_shown(ttl: str | None) -> str:
    return ttl or "off"


def _pool_shown(url: str | None) -> str:
    """A pool URL as printed (banner, errors, the resume command): never its password,
    which belongs in PGPASSWORD or ~/.pgpass."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.password is None:
        return url or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    user = urllib.parse.quote(parts.username or "", safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


@dataclass(frozen=True)
class Config:
    """Everything the user can set, resolved once from argv and the environment."""

    model: str = field(default=DEFAULT_MODEL, metadata=option(
        "--model", metavar="ID", help=f"model id (default {DEFAULT_MODEL}; a resumed session "
        "keeps its own unless this is given)"))
    workdir: Path = field(default=Path("."), metadata=option(
        "--workdir", metavar="DIR", help="directory the tools work in (default: .)",
        parse=lambda v: Path(v).expanduser().resolve()))
    poll_interval_s: float = field(default=DEFAULT_POLL_INTERVAL_S, metadata=option(
        "--poll-interval", metavar="S", carried=True, parse=float,
        help=f"first poll interval in seconds (default {DEFAULT_POLL_INTERVAL_S})"))
    max_turns: int | None = field(default=None, metadata=option(
        "--max-turns", metavar="N", carried=True, parse=int,
        help="model turns allowed per prompt"))
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata=option(
        "--max-tokens", metavar="N", carried=True, parse=int,
        help=f"max_tokens per model turn (default {DEFAULT_MAX_TOKENS})"))
    tool_timeout_s: float = field(default=DEFAULT_TOOL_TIMEOUT_S, metadata=option(
        "--tool-timeout", metavar="S", carried=True, parse=float,
        help=f"seconds one tool call may run (default {DEFAULT_TOOL_TIMEOUT_S:g})"))
    allow_domains: tuple[str, ...] = field(default=(), metadata=option(
        "--allow-domain", metavar="DOMAIN", carried=True, action="append", parse=tuple,
        help="let sandboxed bash reach this domain (repeatable)"))
    sandbox: bool = field(default=True, metadata=option(
        "--no-sandbox", action="store_false", carried=True,
        help="run bash WITHOUT the sandbox"))
    allow_dangerous_workdir: bool = field(default=False, metadata=option(
        "--dangerously-allow-workdir", action="store_true", carried=True,
        help="let tools work in a directory that is refused by default (/, your home, a "
        "system directory, one holding the harness or its state): code planted there can "
        "run on the host later"))
    cache_ttl: str | None = field(default=DEFAULT_CACHE_TTL, metadata=option(
        "--cache-ttl", choices=sorted(CACHE_TTLS), carried=True, parse=CACHE_TTLS.__getitem__,
        show=_ttl_shown, help=f"prompt-cache TTL (default {DEFAULT_CACHE_TTL})"))
    route: str = field(default="batch", metadata=option(
        "--route", choices=ROUTES, carried=True,
        help="which lane carries each turn: batch (default: half price, a minute or more), "
        "sync (streamed, full price, at once) or auto (per turn, from measured turnaround "
        "and --wait-price)"))
    wait_price_usd_per_min: float | None = field(default=None, metadata=option(
        "--wait-price", metavar="USD_PER_MIN", carried=True, parse=float,
        help=f"what a minute of waiting is worth to you, for --route auto (default "
        f"{INTERACTIVE_WAIT_PRICE:g} at the prompt, {HEADLESS_WAIT_PRICE:g} headless)"))
    max_wait_s: float | None = field(default=None, metadata=option(
        "--max-wait", metavar="S", carried=True, parse=float,
        help="past S seconds a batch turn is cancelled and sent synchronously (auto: the "
        "model's measured p90 turnaround)"))
    max_budget_usd: float | None = field(default=None, metadata=option(
        "--max-budget-usd", metavar="USD", carried=True, parse=float,
        help="refuse to submit a turn that would take the session past this spend"))
    prompt: str | None = field(default=None, metadata=option(
        "-p", "--print", metavar="PROMPT",
        help="run headless: answer PROMPT ('-' reads stdin) and exit"))
    output_format: str = field(default="text", metadata=option(
        "--output-format", choices=OUTPUT_FORMATS, help="headless output: text or one JSON object"))
    continue_last: bool = field(default=False, metadata=option(
        "-c", "--continue", action="store_true",
        help="reopen the most recent session in this work directory"))
    resume_id: str | None = field(default=None, metadata=option(
        "--resume", metavar="ID", help="reopen session ID"))
    stats: bool = field(default=False, metadata=option(
        "--stats", action="store_true", help="print spend and batch turnaround history"))
    doctor: bool = field(default=False, metadata=option(
        "--doctor", action="store_true", help="check that the sandbox (and the --pool) can "
        "run here"))
    pool: str | None = field(default=None, metadata=option(
        "--pool", metavar="URL", carried=True, show=_pool_shown,
        help="keep sessions, turns and the ledger in a pool that processes on many hosts "
        "share: postgresql://user@host/db[?schema=NAME] (default: the SQLite journal in "
        "BATCHING_HARNESS_HOME; also BATCHING_HARNESS_POOL)"))
    model_given: bool = False
    """--model was on the command line: it then overrides a resumed session's model."""
    home: Path = Path("~/.batching-harness")
    """Where the journal, history and temp files live (BATCHING_HARNESS_HOME)."""
    api_key: str | None = None
    base_url: str | None = None

    @property
    def action(self) -> str:
        """run | stats | doctor"""
        return "stats" if self.stats else "doctor" if self.doctor else "run"


def _options(cls: type[Any] | None = None) -> Iterator[tuple[dataclasses.Field[Any],
                                                             dict[str, Any]]]:
    for f in dataclasses.fields(cls or Config):
        if "option" in f.metadata:
            yield f, f.metadata["option"]


def _add_options(p: argparse.ArgumentParser, cls: type[Any],
                 only: Sequence[str] | None = None) -> None:
    """Every option field of `cls` (or just those named in `only`) as an argument."""
    for f, opt in _options(cls):
        if only is not None and f.name not in only:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": opt["help"]}
        if opt["action"] in ("store_true", "store_false"):
            kwargs.update(action=opt["action"], default=f.default)
        else:
            kwargs.update(action=opt["action"] or "store", default=None, metavar=opt["metavar"],
                          choices=opt["choices"])
        p.add_argument(*opt["flags"], **kwargs)


def _parsed_values(ns: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    """The option fields of `cls` that were given, each through its own parse."""
    values: dict[str, Any] = {}
    for f, opt in _options(cls):
        raw = getattr(ns, f.name)
        if raw is None:  # not given: the field's default
            continue
        try:
            values[f.name] = opt["parse"](raw) if opt["parse"] else raw
        except (TypeError, ValueError):
            raise ConfigError(f"{opt['flags'][-1]}: {raw!r} is not a valid value") from None
    return values


def _build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batching-harness",
        description="A coding agent whose every model turn is a Message Batch (50% cheaper, "
        "slower). `batching-harness fleet --help`: many agents, their turns pooled.",
    )
    _add_options(p, Config)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Pure: argv and environment in, a validated Config out (ConfigError on nonsense)."""
    try:
        ns = _build_arg_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed usage or --help/--version
        raise _ArgparseExit(int(exc.code or 0)) from None
    values = _parsed_values(ns, Config)
    home = Path(environ.get("BATCHING_HARNESS_HOME") or Path.home() / ".batching-harness")
    if "pool" not in values and environ.get("BATCHING_HARNESS_POOL"):
        values["pool"] = environ["BATCHING_HARNESS_POOL"]
    config = Config(**values, model_given=ns.model is not None,
                    home=home.expanduser().resolve(),
                    api_key=environ.get("ANTHROPIC_API_KEY") or None,
                    base_url=environ.get("ANTHROPIC_BASE_URL") or None)
    if "workdir" not in values:
        config = dataclasses.replace(config, workdir=Path(".").resolve())
    _check_values(config, ns)
    return config


class _ArgparseExit(Exception):
    """argparse wanted to exit (help, version, usage error) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _check_values(c: Config, ns: argparse.Namespace) -> None:
    if c.poll_interval_s <= 0:
        raise ConfigError("--poll-interval must be a positive number of seconds")
    if c.max_turns is not None and c.max_turns < 1:
        raise ConfigError("--max-turns must be at least 1")
    if c.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    if c.tool_timeout_s <= 0:
        raise ConfigError("--tool-timeout must be a positive number of seconds")
    if c.max_budget_usd is not None and c.max_budget_usd <= 0:
        raise ConfigError("--max-budget-usd must be a positive amount")
    if c.wait_price_usd_per_min is not None and c.wait_price_usd_per_min < 0:
        raise ConfigError("--wait-price must be zero or more dollars a minute")
    if c.max_wait_s is not None and c.max_wait_s <= 0:
        raise ConfigError("--max-wait must be a positive number of seconds")
    if c.continue_last and c.resume_id:
        raise ConfigError("use --continue or --resume ID, not both")
    if ns.output_format is not None and c.prompt is None:
        raise ConfigError("--output-format is for headless runs: add -p PROMPT")
    if ns.workdir and not c.workdir.is_dir():
        raise ConfigError(f"--workdir {ns.workdir}: no such directory")


def carried_flags(config: Config) -> list[str]:
    """The flags a printed resume command repeats: every carried option not at its default."""
    flags: list[str] = []
    for f, opt in _options():
        value, flag = getattr(config, f.name), opt["flags"][-1]
        if not opt["carried"] or value == f.default:
            continue
        if opt["action"] in ("store_true", "store_false"):
            flags.append(flag)
        elif opt["action"] == "append":
            flags += [part for item in value for part in (flag, str(item))]
        else:
            shown = opt["show"](value) if opt["show"] else (
                f"{value:g}" if isinstance(value, float) else str(value))
            flags += [flag, shown]
    return flags


def settings_from(config: Config, cls: type[Any], **overrides: Any) -> Any:
    """Build a settings dataclass (e.g. AgentSettings) from the Config fields it shares by
    name, so a new option reaches the agent without a hand-written copy."""
    names = {f.name for f in dataclasses.fields(cls)}
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)
              if f.name in names}
    return cls(**{**shared, **overrides})


##############################################################################
# Value types
##############################################################################


@dataclass(frozen=True)
class Usage:
    """Token counts of one response, exactly as the API's `usage` reports them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # Breakdown of cache_creation_input_tokens by TTL; None when the API omitted it.
    ephemeral_5m_input_tokens: int | None = None
    ephemeral_1h_input_tokens: int | None = None
    # Where the API ran the request ("us" bills 1.1x; "global", "not_available"); None when
    # the response did not say. A workspace default can set it without the request asking.
    inference_geo: str | None = None

    @property
    def prompt_tokens(self) -> int:
        """Whole prompt size: the three input figures added."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def __add__(self, other: Usage) -> Usage:
        def add(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
            add(self.ephemeral_5m_input_tokens, other.ephemeral_5m_input_tokens),
            add(self.ephemeral_1h_input_tokens, other.ephemeral_1h_input_tokens),
            self.inference_geo if self.inference_geo == other.inference_geo else None,
        )

    @classmethod
    def from_api(cls, usage: Mapping[str, Any] | None) -> Usage:
        """Build from the API's usage dict (missing fields count as zero)."""
        u = dict(usage or {})
        breakdown = u.get("cache_creation") or {}
        return cls(
            int(u.get("input_tokens") or 0),
            int(u.get("output_tokens") or 0),
            int(u.get("cache_creation_input_tokens") or 0),
            int(u.get("cache_read_input_tokens") or 0),
            breakdown.get("ephemeral_5m_input_tokens") if breakdown else None,
            breakdown.get("ephemeral_1h_input_tokens") if breakdown else None,
            u.get("inference_geo") or None,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


##############################################################################
# Accounting
##############################################################################

# The TTLs the API accepts in cache_control (the config maps "off" to None).
_BREAKPOINT_TTLS = ("5m", "1h")
# Output tokens reserved for a submitted batch until its real usage is known.
ESTIMATE_OUTPUT_TOKENS = 1_000
_DATED_SUFFIX_RE = re.compile(r"-\d{8}$")
_TOKENS_PER_MTOK = 1_000_000
_UNCACHEABLE_BLOCK_TYPES = frozenset({"thinking", "redacted_thinking"})


def base_model_id(model: str) -> str:
    """Strip a dated suffix: claude-opus-4-5-20251101 -> claude-opus-4-5 (priced alike)."""
    return _DATED_SUFFIX_RE.sub("", model)


def price_for(model: str, prompt_tokens: int = 0) -> ModelPrice | None:
    """Standard price of `model` for one request of `prompt_tokens`; None when unknown.

    Never a default price: a guessed figure would make budgets and /stats quietly wrong.
    """
    base = base_model_id(model)
    tier = LONG_PROMPT_TIERS.get(base)
    if tier is not None and prompt_tokens > tier[0]:
        return tier[1]
    return PRICES.get(base)


def check_max_tokens(model: str, max_tokens: int) -> None:
    """Refuse a max_tokens the model cannot give BEFORE a batch is paid for: the API says so
    only when the batch ends, a minute or an hour later. Unknown models are the API's call."""
    base = base_model_id(model)
    limit = OUTPUT_300K_TOKENS if base in OUTPUT_300K_MODELS else MAX_OUTPUT_TOKENS.get(base)
    if limit is not None and max_tokens > limit:
        beta = " with the Batch API's 300K beta" if base in OUTPUT_300K_MODELS else ""
        raise ConfigError(f"--max-tokens {max_tokens:,} is over what {model} can write in one "
                          f"turn{beta} ({limit:,} tokens); use --max-tokens {limit} or less")


def _check_ttl(ttl: str | None) -> None:
    if ttl is not None and ttl not in _BREAKPOINT_TTLS:
        raise ValueError(f"cache TTL must be one of {_BREAKPOINT_TTLS} or None, not {ttl!r}")


# What each lane bills, as a share of the standard price.
LANE_RATES = {"batch": BATCH_DISCOUNT, "sync": 1.0}


def _rate(lane: str) -> float:
    return LANE_RATES[lane]


def _geo_rate(usage: Usage) -> float:
    return INFERENCE_GEO_RATES.get(usage.inference_geo or "", 1.0)


def _cache_writes(usage: Usage, requested_ttl: str | None) -> tuple[int, int]:
    """(5-minute, 1-hour) cache-write tokens of `usage`.

    Tokens the API's breakdown does not account for (no breakdown at all, or a Usage summed
    from responses with and without one) went to the TTL the request asked for; a request
    that asked for none (None) gets the API's default TTL, 5 minutes.
    """
    _check_ttl(requested_ttl)
    five_m = usage.ephemeral_5m_input_tokens or 0
    one_h = usage.ephemeral_1h_input_tokens or 0
    unattributed = max(0, usage.cache_creation_input_tokens - five_m - one_h)
    if requested_ttl == "1h":
        return five_m, one_h + unattributed
    return five_m + unattributed, one_h


def _dollars(price: ModelPrice, usage: Usage, writes: tuple[int, int], rate: float) -> float:
    five_m, one_h = writes
    per_mtok = (
        usage.input_tokens * price.input
        + five_m * price.cache_write_5m
        + one_h * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
        + usage.output_tokens * price.output
    )
    return per_mtok / _TOKENS_PER_MTOK * rate


def cost_usd(
    model: str, usage: Usage, *, lane: str, requested_ttl: str | None = "1h"
) -> float | None:
    """Dollars ONE response cost (pricing.md, "Cost of one response"); None when unknown.

    Price each response on its own and add the dollars: Haiku 5.5's tier depends on each
    request's prompt size, so a summed Usage would put a whole session on the long-prompt row.
    `usage.inference_geo` "us" bills everything at 1.1x.
    """
    price = price_for(model, usage.prompt_tokens)
    if price is None:
        return None
    return _dollars(price, usage, _cache_writes(usage, requested_ttl),
                    _rate(lane) * _geo_rate(usage))


def _estimate_prompt_tokens(params: Mapping[str, Any]) -> int:
    keys = ("tools", "system", "messages")
    chars = sum(len(json.dumps(params[key], default=str)) for key in keys if key in params)
    return math.ceil(chars / 4)


def estimate_cost_usd(model: str, params: Mapping[str, Any], *, lane: str = "batch",
                      geo_rate: float = 1.0) -> float | None:
    """Spend committed when a batch is SUBMITTED, before its usage is known; None when unknown.

    Counting it keeps a spend ceiling honest while batches are in flight; replace it with
    cost_usd once the result arrives. It is an upper bound on the prompt, so a budget is never
    crossed by surprise: the prompt is sum(len(json.dumps(x))) over tools, system and
    messages, divided by 4 and rounded up, in tokens, all priced at the dearest rate it can be
    billed at — the cache-write rate of the request's longest TTL (2x input for 1 hour) when
    it asks for caching, else input (cache reads make the real figure far lower); plus
    min(max_tokens, ESTIMATE_OUTPUT_TOKENS) at the output price (a turn may use up to
    max_tokens; most use far fewer); all of it times `geo_rate` (1.1 once the session's
    responses say inference_geo "us": a workspace default puts every request there).
    """
    prompt_tokens = _estimate_prompt_tokens(params)
    price = price_for(model, prompt_tokens)
    if price is None:
        return None
    ttls = {ttl for _, ttl in _cache_markers(params)}
    writes = (0, prompt_tokens) if "1h" in ttls else (prompt_tokens, 0) if ttls else (0, 0)
    max_tokens = int(params.get("max_tokens", DEFAULT_MAX_TOKENS))
    usage = Usage(input_tokens=0 if ttls else prompt_tokens,
                  cache_creation_input_tokens=prompt_tokens if ttls else 0,
                  output_tokens=min(max_tokens, ESTIMATE_OUTPUT_TOKENS))
    return _dollars(price, usage, writes, _rate(lane) * geo_rate)


def _cache_markers(params: Mapping[str, Any]) -> Iterator[tuple[Any, str]]:
    """(block, ttl) for every cache_control marker in tools, system and messages."""
    blocks: list[Any] = list(params.get("tools") or [])
    system = params.get("system")
    blocks += system if isinstance(system, list) else []
    for message in params.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        blocks += content if isinstance(content, list) else []
    for block in blocks:
        marker = block.get("cache_control") if isinstance(block, Mapping) else None
        if isinstance(marker, Mapping):
            yield block, str(marker.get("ttl") or "5m")


def fmt_elapsed(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def fmt_usd(amount: float | None) -> str:
    if amount is None:
        return "price unknown"
    return f"${amount:.4f}" if amount < 10 else f"${amount:,.2f}"


@dataclass(frozen=True)
class CostBreakdown:
    """One response's dollars three ways; all None when the model's price is unknown."""

    # What was billed: batch rates on the batch path.
    paid_usd: float | None
    # The same usage at standard rates. ASSUMES the synchronous path would have hit and missed
    # the cache exactly as this request did; in truth the two paths share no entries reliably.
    sync_usd: float | None
    # Cache-read and cache-write tokens priced as plain input, minus what they did cost, at the
    # rate paid. Negative when writes have not yet been repaid by reads.
    cache_saved_usd: float | None


def cost_breakdown(
    model: str, usage: Usage, *, lane: str, requested_ttl: str | None
) -> CostBreakdown:
    """Paid, synchronous-equivalent and cache-saved dollars of one response."""
    price = price_for(model, usage.prompt_tokens)
    if price is None:
        return CostBreakdown(None, None, None)
    geo = _geo_rate(usage)  # the synchronous path would run (and bill) in the same geo
    writes, rate = _cache_writes(usage, requested_ttl), _rate(lane) * geo
    cached = Usage(cache_read_input_tokens=usage.cache_read_input_tokens)
    as_plain = Usage(input_tokens=usage.cache_read_input_tokens + sum(writes))
    saved = _dollars(price, as_plain, (0, 0), rate) - _dollars(price, cached, writes, rate)
    return CostBreakdown(
        paid_usd=_dollars(price, usage, writes, rate),
        sync_usd=_dollars(price, usage, writes, geo),
        cache_saved_usd=saved,
    )


def cache_hit_ratio(usage: Usage) -> float | None:
    """Share of the prompt read from the cache; None for an empty prompt."""
    if usage.prompt_tokens == 0:
        return None
    return usage.cache_read_input_tokens / usage.prompt_tokens


def add_cache_breakpoints(
    params: Mapping[str, Any], ttl: str | None, *, previous_end: int | None = None
) -> dict[str, Any]:
    """Return NEW params carrying prompt-cache breakpoints for `ttl` ("1h", "5m"; None = off).

    Every existing cache_control goes first (breakpoints replayed from earlier turns would pile
    up past the API's limit of 4 and fail the request), then at most four are placed:

    1. the last tool definition and 2. the last system block: tools + system are the same every
       turn and every session, so their own entry is still read at 0.1x input (0.05x on
       Opus/Sonnet 5.5) when the transcript after them changes (a new session, an edit);
    3. the last block of the last message: writes the whole transcript, so the next turn reads
       it instead of paying full input for it again;
    4. the last block of message `previous_end` (the last message of the previous request),
       where the previous request wrote its entry. A read looks back only 20 blocks from a
       breakpoint, so a turn that appended more (parallel tool results) would miss that entry
       and pay to write the whole transcript again; marking it makes the read exact.

    Thinking blocks and empty text blocks cannot carry a breakpoint: the mark walks back to the
    previous eligible block of that message, or is skipped. A string system prompt or message
    content becomes one text block so it can carry the mark.

    Why 1h is the default: one batch turn plus its tool run easily outlasts 5 minutes, so a
    5-minute entry expires unread: every turn pays 1.25x input to write and never reads, which
    costs MORE than the synchronous path. A 1-hour write costs 2x input and is repaid by the
    second read. One TTL everywhere also keeps the API's rule that 1-hour entries precede
    5-minute ones. The input is never mutated; changed parts are deep-copied.
    """
    _check_ttl(ttl)
    out = _without_cache_control(params)
    if ttl is None:
        return out
    marker = {"type": "ephemeral", "ttl": ttl}
    for key in ("tools", "system"):
        if out.get(key):
            out[key] = _mark_last_eligible(_as_blocks(out[key]), marker) or out[key]
    messages = out.get("messages") or []
    ends = {len(messages) - 1}
    if previous_end is not None and 0 <= previous_end < len(messages):
        ends.add(previous_end)
    for index in sorted(i for i in ends if i >= 0):
        messages[index] = _mark_message(messages[index], marker)
    return out


def _deep_copy(value: Any) -> Any:
    # Local import: the imports block belongs to the lead; hoisting it there is welcome.

    return copy.deepcopy(value)


def _without_cache_control(params: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow copy of params with every cache_control removed (changed blocks deep-copied)."""
    out = dict(params)
    # Request-level automatic caching would add a breakpoint of its own.
    out.pop("cache_control", None)
    for key in ("tools", "system"):
        if isinstance(out.get(key), list):
            out[key] = _strip_blocks(out[key])
    if out.get("messages") is not None:
        out["messages"] = [_strip_message(message) for message in out["messages"]]
    return out


def _strip_message(message: Any) -> Any:
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        return message
    stripped = _strip_blocks(content)
    return message if stripped is content else {**message, "content": stripped}


def _strip_blocks(blocks: list[Any]) -> list[Any]:
    """`blocks` itself when no block carries cache_control, else a new list."""
    stripped = [_strip_block(block) for block in blocks]
    return blocks if all(s is b for s, b in zip(stripped, blocks, strict=True)) else stripped


def _strip_block(block: Any) -> Any:
    if not isinstance(block, Mapping):
        return block
    content = block.get("content")
    inner = content
    if block.get("type") == "tool_result" and isinstance(content, list):
        inner = _strip_blocks(content)
    if "cache_control" not in block and inner is content:
        return block
    new = {key: value for key, value in block.items() if key != "cache_control"}
    if inner is not content:
        new["content"] = inner
    return _deep_copy(new)


def _as_blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _is_cacheable(block: Any) -> bool:
    if not isinstance(block, Mapping) or block.get("type") in _UNCACHEABLE_BLOCK_TYPES:
        return False
    return block.get("type") != "text" or bool(str(block.get("text") or "").strip())


def _mark_last_eligible(blocks: list[Any], marker: Mapping[str, str]) -> list[Any] | None:
    """New list with `marker` on the last cacheable block; None when no block is cacheable."""
    for index in range(len(blocks) - 1, -1, -1):
        if _is_cacheable(blocks[index]):
            marked = list(blocks)
            marked[index] = {**_deep_copy(blocks[index]), "cache_control": dict(marker)}
            return marked
    return None


def _mark_message(message: Any, marker: Mapping[str, str]) -> Any:
    if not isinstance(message, Mapping):
        return message
    marked = _mark_last_eligible(_as_blocks(message.get("content")), marker)
    return message if marked is None else {**message, "content": marked}


##############################################################################
# Store (the journal: the only code that writes SQL; many threads share one store; SQLite
# for one host, PostgreSQL for a pool many hosts share, chosen from STORES by URL)
##############################################################################

IN_FLIGHT_STATES = ("submitting", "submitted", "ended")
LANES = ("batch", "sync")


@dataclass(frozen=True)
class SessionRow:
    id: str
    created_at: float
    updated_at: float
    workdir: str
    model: str
    conversation: int
    title: str


@dataclass(frozen=True)
class RequestRow:
    """One model request: what was sent (by hash), on which lane, what came back."""

    custom_id: str
    session_id: str
    conversation: int
    n_messages: int
    model: str
    cache_ttl: str | None
    max_tokens: int
    request_hash: str
    attempt: int
    state: str
    batch_id: str | None
    submitted_at: float
    ended_at: float | None = None
    result_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    stop_reason: str | None = None
    message: str | None = None
    usage: str | None = None
    estimate_usd: float | None = None
    cost_usd: float | None = None
    sync_cost_usd: float | None = None
    cache_saved_usd: float | None = None
    wait_s: float | None = None
    lane: str = "batch"
    """batch | sync: which channel carried it, and so at which rates it was priced."""
    route: str | None = None
    """Why it took that lane (the router's one line), when the router chose."""

    @property
    def usage_value(self) -> Usage:
        return Usage(**json.loads(self.usage)) if self.usage else Usage()

    @property
    def committed_usd(self) -> float:
        """Spend this request commits: the actual cost once known, else the estimate."""
        if self.state in IN_FLIGHT_STATES and self.cost_usd is None:
            return self.estimate_usd or 0.0
        return self.cost_usd or 0.0


@dataclass(frozen=True)
class ProxyRow:
    """One request the proxy carried for another harness. Its body and answer are kept
    (the journal is the user's alone: 0600 in a 0700 directory); the key never is."""

    custom_id: str
    turn_key: str
    """Hash of the request without stream/max_tokens, plus betas and the key's fingerprint."""
    key_fp: str
    client: str
    model: str
    lane: str
    why: str | None
    stream: int
    state: str
    """batch: pooled | submitted | ended | delivered, or unsent | unknown (cut off by a crash
    before / during its create) | failed; sync: ended"""
    batch_id: str | None
    params: str | None
    betas: str | None
    received_at: float
    ended_at: float | None = None
    delivered_at: float | None = None
    result_type: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    message: str | None = None
    usage: str | None = None
    cost_usd: float | None = None
    sync_cost_usd: float | None = None
    wait_s: float | None = None
    attaches: int = 1
    """Client requests this row answered: more than 1 means retries re-attached for free."""
    pool_id: str | None = None
    """The create this entry went into, journaled with sent_at and width BEFORE the call:
    a crash before its batch id was recorded can then find the batch by time and width."""
    sent_at: float | None = None
    width: int | None = None


@dataclass(frozen=True)
class Outcome:
    """How a request ended, as the store records it."""

    result_type: str
    ended_at: float
    wait_s: float
    message: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    usage: Usage | None = None
    cost: CostBreakdown | None = None


def new_session_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def new_custom_id() -> str:
    """Unique per request, within the API's 64-char [a-zA-Z0-9_-] rule."""
    return f"bh_{int(time.time())}_{secrets.token_hex(8)}"


def request_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FleetRunRow:
    id: str
    token: str  # 8 hex digits: the run's mark in every custom_id it sends
    created_at: float
    updated_at: float
    state: str  # running | done | detached | stopped | canceled
    tasks_path: str
    options: str  # JSON: what `fleet --continue` needs to rebuild the run

    @property
    def options_value(self) -> dict[str, Any]:
        return json.loads(self.options)


@dataclass(frozen=True)
class FleetAgentRow:
    run_id: str
    idx: int
    agent_id: str
    session_id: str
    prompt: str
    workdir: str
    model: str
    max_turns: int | None
    state: str  # queued | running | done | failed | detached | stopped
    error: str | None = None


@dataclass(frozen=True)
class PoolBatchRow:
    id: int
    run_id: str
    model: str
    reason: str
    sent_at: float
    width: int
    custom_ids: str
    delays: str
    batch_id: str | None
    state: str  # creating | created | not_created

    @property
    def custom_id_list(self) -> list[str]:
        return json.loads(self.custom_ids)


REQUEST_COLUMNS = ", ".join(f.name for f in dataclasses.fields(RequestRow))
"""Named, never `*`: a back-end may keep columns of its own (PostgreSQL's arrival order)."""


@dataclass(frozen=True)
class Claim:
    """Queued turns one process took for one batch. The intent row is committed with the
    claim, BEFORE the create call, and holds a lease: if the process dies, another takes the
    intent over when the lease runs out, reconciles the create by list, and either records
    the batch it finds or puts the turns back in the queue."""

    intent_id: int
    pool_key: str
    holder: str
    created_at: float
    """When the claim was made, by the store's clock: a reconcile by list looks for batches
    created after it (the API's clock; CLOCK_SKEW_S covers two servers' difference)."""
    age_s: float
    """How old the claim was when this process read it, by the store's clock: a host never
    subtracts the store's times from its own clock, which may run minutes off."""
    turns: tuple[tuple[str, dict[str, Any]], ...]
    """(custom_id, request params) per turn, oldest first."""

    @property
    def custom_ids(self) -> list[str]:
        return [custom_id for custom_id, _params in self.turns]


class Role(Protocol):
    """A role one process holds for the whole pool (the poller of a pool key, a session):
    it ends with the process, so nobody has to clean up after a crash."""

    def alive(self) -> bool: ...
    def release(self) -> None: ...


class Listener(Protocol):
    """Wake-ups from the store: (channel, payload) pairs published after a commit."""

    def wait(self, timeout_s: float) -> list[tuple[str, str]]: ...
    def close(self) -> None: ...


class Store(Protocol):
    """What the agent and the front-ends need from a journal: SqliteStore (one host, the
    default) and PostgresStore (a pool many hosts share), chosen from STORES by URL."""

    location: str
    """Where it lives, as shown to the user (a path, or a URL without its password)."""
    dialect: str
    """sqlite (one host) | postgresql (shared by many): picks migrations and the fleet's pool."""

    @property
    def schema_version(self) -> int: ...
    def session_lock(self, home: Path) -> SessionLock: ...
    def create_session(self, workdir: Path, model: str) -> SessionRow: ...
    def session(self, session_id: str) -> SessionRow | None: ...
    def find_session(self, prefix: str) -> SessionRow | None: ...
    def latest_session(self, workdir: Path | None = None) -> SessionRow | None: ...
    def recent_sessions(self, limit: int = 10) -> list[SessionRow]: ...
    def update_session(self, session_id: str, **fields: Any) -> None: ...
    def messages(self, session_id: str, conversation: int) -> list[dict[str, Any]]: ...
    def last_stop_reason(self, session_id: str, conversation: int) -> str | None: ...
    def add_user_content(self, session_id: str, conversation: int,
                         blocks: list[dict[str, Any]]) -> None: ...
    def add_tool_results(self, session_id: str, conversation: int,
                         blocks: list[dict[str, Any]]) -> None: ...
    def begin_request(self, row: RequestRow) -> None: ...
    def set_batch(self, custom_id: str, batch_id: str) -> None: ...
    def record_outcome(self, custom_id: str, outcome: Outcome, state: str = "ended") -> None: ...
    def hurry_request(self, custom_id: str) -> None: ...
    def apply_request(self, request: RequestRow, content: list[dict[str, Any]] | None) -> None: ...
    def fail_request(self, custom_id: str, reason: str | None = None) -> None: ...
    def request(self, custom_id: str) -> RequestRow: ...
    def requests(self, session_id: str | None = None) -> list[RequestRow]: ...
    def pending_request(self, session_id: str) -> RequestRow | None: ...
    def latest_request(self, session_id: str, conversation: int) -> RequestRow | None: ...
    def last_applied(self, session_id: str, conversation: int) -> RequestRow | None: ...
    def recent_requests(self, session_id: str, limit: int) -> list[RequestRow]: ...
    def was_sent(self, session_id: str, conversation: int, n_messages: int) -> bool: ...
    def count_requests(self, session_id: str) -> int: ...
    def committed_usd(self, session_id: str) -> float: ...
    def turnaround_samples(self, model: str, limit: int = 50) -> list[float]: ...
    def known_batch_ids(self) -> set[str]: ...
    def batches_tried(self, custom_id: str) -> int: ...
    def start_tool(self, custom_id: str, tool_use_id: str, name: str,
                   tool_input: object) -> None: ...
    def record_tool(self, custom_id: str, tool_use_id: str, result: ToolResult) -> None: ...
    def tool_results(self, custom_id: str) -> dict[str, ToolResult | None]: ...
    # -- the shared pool: a queue of turns, claims with leases, roles, wake-ups --
    # Its leases and expiries are the store's clock's, kept and compared inside the store;
    # a host gets ages (queue_head, Claim.age_s), never a time to hold against its own clock.
    def queue_turn(self, custom_id: str, pool_key: str, params: Mapping[str, Any],
                   window_s: float | None = None) -> None: ...
    def claim_turns(self, pool_key: str, holder: str, *, limit: int,
                    lease_s: float, reason: str = "") -> Claim | None: ...
    def renew_claim(self, claim: Claim, lease_s: float) -> bool: ...
    def record_claim_batch(self, intent_id: int, batch_id: str) -> bool: ...
    def release_claim(self, intent_id: int) -> int: ...
    def take_over_expired_claims(self, holder: str, lease_s: float,
                                 pool_key: str | None = None) -> list[Claim]: ...
    def finish_turn(self, custom_id: str, outcome: Outcome) -> bool: ...
    def finish_turns(self, outcomes: Mapping[str, Outcome]) -> list[str]: ...
    def queued_turns(self, pool_key: str) -> int: ...
    def queue_head(self, pool_key: str) -> tuple[int, float | None]: ...
    def queue_entry(self, custom_id: str) -> tuple[str, str | None, str | None, str] | None: ...
    def turn_states(self, custom_ids: Sequence[str]) -> dict[str, tuple[RequestRow,
                                                                       str | None]]: ...
    def fail_claim(self, intent_id: int, reason: str) -> list[str]: ...
    def withdraw_turns(self, custom_ids: Sequence[str]) -> list[str]: ...
    def batch_width(self, batch_id: str) -> int | None: ...
    def intent_batch(self, intent_id: int) -> str | None: ...
    def batches_in_flight(self, account: str) -> list[tuple[str, float, list[str]]]: ...
    def shared_batches(self, custom_id_prefix: str) -> list[PoolBatchRow]: ...
    def set_member(self, member: str, account: str, active: int, waiting: int,
                   lease_s: float) -> None: ...
    def drop_member(self, member: str) -> None: ...
    def pool_census(self, account: str) -> tuple[int, int]: ...
    def hold_role(self, role: str, name: str = "") -> Role | None: ...
    def listen(self, *channels: str) -> Listener: ...
    # -- fleet runs --
    def create_run(self, tasks_path: str, options: Mapping[str, Any]) -> FleetRunRow: ...
    def fleet_run(self, prefix: str) -> FleetRunRow | None: ...
    def latest_fleet_run(self, origin: str | None = None) -> FleetRunRow | None: ...
    def set_run_state(self, run_id: str, state: str) -> None: ...
    def add_agent(self, row: FleetAgentRow) -> None: ...
    def fleet_agents(self, run_id: str) -> list[FleetAgentRow]: ...
    def set_agent_state(self, run_id: str, idx: int, state: str,
                        error: str | None = None) -> None: ...
    def begin_pool_batch(self, run_id: str, model: str, reason: str, sent_at: float,
                         custom_ids: Sequence[str], delays: Sequence[float]) -> int: ...
    def set_pool_batch(self, pool_id: int, batch_id: str | None) -> None: ...
    def pool_batches(self, run_id: str, state: str | None = None) -> list[PoolBatchRow]: ...
    def close(self) -> None: ...


# -- numbered migrations -----------------------------------------------------------
# One sequence for every back-end: step N takes any store's schema from N-1 to N, inside
# the transaction that also records N, so a journal is never left half-upgraded; an old
# journal upgrades in place the first time a newer harness opens it. A step is SQL with
# the few words the dialects spell differently left as {placeholders}; a step that truly
# differs gives each dialect its own text.
DIALECT_WORDS: dict[str, dict[str, str]] = {
    "sqlite": {"real": "REAL", "id_pk": "INTEGER PRIMARY KEY", "id_ref": "INTEGER",
               "arrival": ""},
    # REAL is 4 bytes in PostgreSQL (a timestamp would lose its seconds); SQLite's rowid
    # order of arrival becomes a column of its own.
    "postgresql": {"real": "DOUBLE PRECISION",
                   "id_pk": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                   "id_ref": "BIGINT", "arrival": ", seq BIGINT GENERATED ALWAYS AS IDENTITY"},
}


@dataclass(frozen=True)
class Migration:
    version: int
    doc: str
    sql: Mapping[str, str]
    """dialect -> statements separated by ';'"""

    def statements(self, dialect: str) -> list[str]:
        return [s for s in self.sql[dialect].split(";") if s.strip()]


MIGRATIONS: dict[int, Migration] = {}


def migration(version: int, doc: str, template: str | None = None, **by_dialect: str) -> None:
    """Register step `version`: one template for every dialect, or one text per dialect."""
    assert version not in MIGRATIONS, f"two migrations numbered {version}"
    sql = {d: by_dialect.get(d) or (template or "").format(**words)
           for d, words in DIALECT_WORDS.items()}
    assert all(sql.values()), f"migration {version} has no SQL for some back-end"
    MIGRATIONS[version] = Migration(version, doc, sql)


def pending_migrations(version: int) -> list[Migration]:
    return [MIGRATIONS[v] for v in sorted(MIGRATIONS) if v > version]


migration(1, "The schema of batching-harness 0.1 (one agent, the batch lane only).", """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, created_at {real} NOT NULL, updated_at {real} NOT NULL,
    workdir TEXT NOT NULL, model TEXT NOT NULL, conversation INTEGER NOT NULL DEFAULT 0,
    title TEXT NOT NULL DEFAULT '');
CREATE TABLE messages (
    id {id_pk}, session_id TEXT NOT NULL REFERENCES sessions(id),
    conversation INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    stop_reason TEXT, created_at {real} NOT NULL);
CREATE INDEX messages_by_session ON messages(session_id, conversation, id);
CREATE TABLE requests (
    custom_id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
    conversation INTEGER NOT NULL, n_messages INTEGER NOT NULL, model TEXT NOT NULL,
    cache_ttl TEXT, max_tokens INTEGER NOT NULL, request_hash TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1, state TEXT NOT NULL, batch_id TEXT,
    submitted_at {real} NOT NULL, ended_at {real}, result_type TEXT, error_type TEXT,
    error_message TEXT, stop_reason TEXT, message TEXT, usage TEXT,
    estimate_usd {real}, cost_usd {real}, sync_cost_usd {real}, cache_saved_usd {real},
    wait_s {real}{arrival});
CREATE INDEX requests_by_session ON requests(session_id, submitted_at);
CREATE INDEX requests_by_batch ON requests(batch_id);
CREATE TABLE tool_calls (
    id {id_pk}, custom_id TEXT NOT NULL REFERENCES requests(custom_id),
    tool_use_id TEXT NOT NULL, name TEXT NOT NULL, input TEXT NOT NULL, output TEXT NOT NULL,
    is_error INTEGER NOT NULL, exit_code INTEGER, started_at {real}, ended_at {real},
    UNIQUE (custom_id, tool_use_id));
CREATE TABLE batches_tried (
    custom_id TEXT NOT NULL REFERENCES requests(custom_id), batch_id TEXT NOT NULL,
    PRIMARY KEY (custom_id, batch_id))
""")

migration(2, "A lane on every request (a synchronous turn is priced at full rates), and "
          "indexes so that a turn's queries do not grow with the journal (turnaround by "
          "model, work in flight).", """
ALTER TABLE requests ADD COLUMN lane TEXT NOT NULL DEFAULT 'batch';
CREATE INDEX requests_by_model ON requests(model, lane, submitted_at);
CREATE INDEX requests_by_state ON requests(session_id, state);
CREATE INDEX requests_by_transcript ON requests(session_id, conversation, n_messages)
""")

migration(3, "Why each turn took its lane (auto's numbers), kept beside the turn.",
          "ALTER TABLE requests ADD COLUMN route TEXT")

migration(4, "A fleet run and its agents (each one session), and every pooled create: its "
          "custom_ids are journaled BEFORE the create, so after a crash `fleet --continue` "
          "finds the N-entry batch it made (by time and width) instead of creating it twice.", """
CREATE TABLE fleet_runs (id TEXT PRIMARY KEY, token TEXT NOT NULL,
    created_at {real} NOT NULL, updated_at {real} NOT NULL, state TEXT NOT NULL,
    tasks_path TEXT NOT NULL, options TEXT NOT NULL);
CREATE TABLE fleet_agents (run_id TEXT NOT NULL REFERENCES fleet_runs(id),
    idx INTEGER NOT NULL, agent_id TEXT NOT NULL, session_id TEXT NOT NULL
    REFERENCES sessions(id), prompt TEXT NOT NULL, workdir TEXT NOT NULL,
    model TEXT NOT NULL, max_turns INTEGER, state TEXT NOT NULL, error TEXT,
    PRIMARY KEY (run_id, idx));
CREATE TABLE pool_batches (id {id_pk}, run_id TEXT NOT NULL,
    model TEXT NOT NULL, reason TEXT NOT NULL, sent_at {real} NOT NULL,
    width INTEGER NOT NULL, custom_ids TEXT NOT NULL, delays TEXT NOT NULL,
    batch_id TEXT, state TEXT NOT NULL DEFAULT 'creating');
CREATE INDEX pool_batches_by_run ON pool_batches(run_id, state)
""")

migration(5, "The shared pool: turns queued for whichever process flushes their pool key, "
          "and each batch's intent (its turns, its holder's lease, then its batch id), "
          "committed before the create call.", """
CREATE TABLE batch_intents (
    id {id_pk}, pool_key TEXT NOT NULL, holder TEXT NOT NULL,
    lease_until {real} NOT NULL, created_at {real} NOT NULL, width INTEGER NOT NULL,
    batch_id TEXT, state TEXT NOT NULL DEFAULT 'creating');
CREATE INDEX batch_intents_by_lease ON batch_intents(state, lease_until);
CREATE TABLE turn_queue (
    custom_id TEXT PRIMARY KEY REFERENCES requests(custom_id), pool_key TEXT NOT NULL,
    params TEXT NOT NULL, queued_at {real} NOT NULL, state TEXT NOT NULL DEFAULT 'queued',
    intent_id {id_ref} REFERENCES batch_intents(id));
CREATE INDEX turn_queue_by_key ON turn_queue(pool_key, state, queued_at);
CREATE INDEX turn_queue_by_intent ON turn_queue(intent_id)
""")

migration(6, "What the proxy carried for other harnesses: one row per batch entry or "
          "synchronous call, keyed for re-attaching a client's retry (the key's fingerprint, "
          "never the key).", """
CREATE TABLE proxy_requests (
    custom_id TEXT PRIMARY KEY, turn_key TEXT NOT NULL, key_fp TEXT NOT NULL,
    client TEXT NOT NULL, model TEXT NOT NULL, lane TEXT NOT NULL, why TEXT,
    stream INTEGER NOT NULL, state TEXT NOT NULL, batch_id TEXT, params TEXT,
    betas TEXT, received_at {real} NOT NULL, ended_at {real}, delivered_at {real},
    result_type TEXT, error_type TEXT, error_message TEXT, message TEXT, usage TEXT,
    cost_usd {real}, sync_cost_usd {real}, wait_s {real},
    attaches INTEGER NOT NULL DEFAULT 1, pool_id TEXT, sent_at {real}, width INTEGER);
CREATE INDEX proxy_by_pool ON proxy_requests(pool_id);
CREATE INDEX proxy_by_turn ON proxy_requests(key_fp, turn_key, received_at);
CREATE INDEX proxy_by_model ON proxy_requests(model, lane, received_at)
""")

migration(7, "Who shares a pool: each process's active and waiting agents (so a flusher "
          "knows when every agent of the account waits and nobody else can arrive), and why "
          "each shared batch was flushed.", """
CREATE TABLE pool_members (
    member TEXT PRIMARY KEY, account TEXT NOT NULL, active INTEGER NOT NULL,
    waiting INTEGER NOT NULL, seen_until {real} NOT NULL);
CREATE INDEX pool_members_by_account ON pool_members(account, seen_until);
ALTER TABLE batch_intents ADD COLUMN reason TEXT;
CREATE INDEX batch_intents_by_state ON batch_intents(state, pool_key);
CREATE INDEX turn_queue_by_state ON turn_queue(state, pool_key)
""")

migration(8, "Each queued turn's own flush deadline: processes sharing a pool key may pool "
          "on different windows (a proxy's, a fleet's), and a turn is never held past its "
          "own, whoever holds the flusher role.",
          "ALTER TABLE turn_queue ADD COLUMN due_at {real}")

SCHEMA_VERSION = max(MIGRATIONS)
# The session a shared pool's proxied entries are journaled under (their request rows are
# the queue's and the ledger's; the proxy's own rows say which client sent them).
PROXY_SESSION = "proxy"


class SessionLock:
    """One process per session: two would both poll, and might both apply one answer.
    A file lock in the state dir (SQLite: one host); a pool's store hands out its own."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._fd: int | None = None
        self._held: str | None = None

    def acquire(self, session_id: str) -> None:
        """Hold `session_id`'s lock (JournalError if another process has it) and let go of
        the one held before."""
        if session_id == self._held:
            return
        path = self.home / "locks" / f"{session_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"session {session_id} is open in another batching-harness "
                               "process") from None
        self.release()
        self._fd, self._held = fd, session_id

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._held = None, None

    def confirm(self) -> None:
        """Still ours before the next step (a file lock lasts as long as the process)."""


class _RoleSessionLock(SessionLock):
    """The session lock as a role of the store: in a pool, another host must see it too."""

    def __init__(self, store: _SqlStore) -> None:
        super().__init__(Path())
        self.store = store
        self._role: Role | None = None

    def acquire(self, session_id: str) -> None:
        if session_id == self._held:
            return
        role = self.store.hold_role("session", session_id)
        if role is None:
            raise JournalError(f"session {session_id} is open in another batching-harness "
                               f"process (on this host or another sharing {self.store.location})")
        self.release()
        self._role, self._held = role, session_id

    def release(self) -> None:
        if self._role is not None:
            self._role.release()
            self._role, self._held = None, None

    def confirm(self) -> None:
        """The lock is an advisory lock of a connection: a cut connection (a restarted
        server, the network) loses it without a word. Take it back before the next step;
        SessionTaken if another process got it meanwhile (PoolUnreachable while the server
        is still away)."""
        if self._held is None or (self._role is not None and self._role.alive()):
            return
        role = self.store.hold_role("session", self._held)
        if role is None:
            held, self._role, self._held = self._held, None, None
            raise SessionTaken(
                f"{held.replace('fleet-', 'fleet run ')} was taken over by another "
                "batching-harness process while the pool was unreachable; this process stops "
                "driving it (what it sent is collected by the other)")
        self._role = role


class _ThreadConnection:
    """One thread's connection to the store, closed when that thread ends (its thread-local
    goes, and with it this): a proxy serves each client connection on a thread of its own,
    and each one kept a connection (a PostgreSQL server slot, a SQLite file handle) for as
    long as the proxy ran."""

    __slots__ = ("__weakref__", "db")

    def __init__(self, db: Any) -> None:
        self.db = db

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closed already, or its server gone
            self.db.close()

    def __del__(self) -> None:
        self.close()


class _SqlStore:
    """The journal's logic in the SQL both back-ends speak: `?` placeholders, rows read by
    column name, upserts as ON CONFLICT. A back-end supplies its connections (one per
    thread), its transactions, and the few primitives that differ: how a new row's id comes
    back, how claims lock rows, how roles are held and wake-ups delivered."""

    dialect: ClassVar[str]
    _ARRIVAL: ClassVar[str]
    """The column that orders requests submitted in the same instant."""
    _CLAIM_LOCK: ClassVar[str] = ""
    """Appended to the claim's SELECT: how other claimers are kept off the same rows."""
    _NOW: ClassVar[str]
    """The store's clock (epoch seconds) as SQL. Every time another process reads (a lease,
    a member row, a queued turn's age) is written and compared by it, inside the statement:
    hosts' clocks differ, and one running ahead would take over live claims (a second
    create, paid twice) and count live members as gone."""
    location: str

    def __init__(self) -> None:
        self._local = threading.local()
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._transcripts: dict[tuple[str, int], list[dict[str, Any]]] = {}

    # -- what a back-end supplies -------------------------------------------
    @classmethod
    def open(cls, url: str | None, home: Path) -> _SqlStore:
        raise NotImplementedError

    @classmethod
    def doctor(cls, url: str | None) -> list[DoctorCheck]:
        raise NotImplementedError

    def _connect(self) -> Any:
        raise NotImplementedError

    def _tx(self, durable: bool = False) -> Any:
        """A write transaction. `durable`: on disk when it commits, even against a power
        loss (a back-end that can tell its commits apart; the others always are)."""
        raise NotImplementedError

    def _insert_id(self, db: Any, sql: str, args: Sequence[Any]) -> int:
        raise NotImplementedError

    def _publish(self, channel: str, payloads: Sequence[str]) -> None:
        raise NotImplementedError

    def session_lock(self, home: Path) -> SessionLock:
        raise NotImplementedError

    def hold_role(self, role: str, name: str = "") -> Role | None:
        raise NotImplementedError

    def listen(self, *channels: str) -> Listener:
        raise NotImplementedError

    # -- connections ---------------------------------------------------------
    @property
    def _db(self) -> Any:
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _ThreadConnection(self._connect())
            with self._lock:
                self._connections.add(held)
        return held.db

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, args).fetchone()

    def _apply_migrations(self, db: Any, version: int) -> None:
        for step in pending_migrations(version):
            for statement in step.statements(self.dialect):
                db.execute(statement)

    def release_connection(self) -> None:
        """Close this thread's connection before a long wait (the next call opens another):
        a proxy's clients wait minutes on their batches, each on a thread of its own."""
        held = getattr(self._local, "held", None)
        if held is not None:
            self._local.held = None
            with self._lock:
                self._connections.discard(held)
            held.close()

    def close(self) -> None:
        with self._lock:
            held, self._connections = list(self._connections), weakref.WeakSet()
        for connection in held:
            connection.close()
        self._local = threading.local()

    # -- sessions ----------------------------------------------------------
    def create_session(self, workdir: Path, model: str) -> SessionRow:
        now = time.time()
        row = SessionRow(new_session_id(), now, now, str(workdir), model, 0, "")
        with self._tx() as db:
            db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?)", dataclasses.astuple(row))
        return row

    def session(self, session_id: str) -> SessionRow | None:
        row = self._one("SELECT * FROM sessions WHERE id=?", (session_id,))
        return SessionRow(**dict(row)) if row else None

    def find_session(self, prefix: str) -> SessionRow | None:
        rows = self._db.execute("SELECT * FROM sessions WHERE lower(id) LIKE lower(?) "
                                "ORDER BY updated_at DESC", (prefix + "%",)).fetchall()
        if len(rows) > 1:
            raise JournalError(f"session id {prefix!r} is ambiguous ({len(rows)} sessions)")
        return SessionRow(**dict(rows[0])) if rows else None

    def latest_session(self, workdir: Path | None = None) -> SessionRow | None:
        sql, args = "SELECT * FROM sessions", ()
        if workdir is not None:
            sql, args = sql + " WHERE workdir=?", (str(workdir),)
        row = self._one(sql + " ORDER BY updated_at DESC LIMIT 1", args)
        return SessionRow(**dict(row)) if row else None

    def recent_sessions(self, limit: int = 10) -> list[SessionRow]:
        rows = self._db.execute("SELECT * FROM sessions ORDER BY updated_at DESC LIMIT ?",
                                (limit,)).fetchall()
        return [SessionRow(**dict(r)) for r in rows]

    def update_session(self, session_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE sessions SET {cols} WHERE id=?", (*fields.values(), session_id))

    # -- messages ----------------------------------------------------------
    def messages(self, session_id: str, conversation: int) -> list[dict[str, Any]]:
        """The transcript, parsed once and then kept: only this process writes a session
        (the session lock), and every write below drops the copy."""
        key = (session_id, conversation)
        with self._lock:
            cached = self._transcripts.get(key)
        if cached is None:
            rows = self._db.execute(
                "SELECT id, role, content FROM messages WHERE session_id=? AND conversation=? "
                "ORDER BY id", key).fetchall()
            cached = [{"role": r["role"], "content": self._load_json(r["content"], r["id"])}
                      for r in rows]
            with self._lock:
                self._transcripts[key] = cached
        return copy.deepcopy(cached)

    def _forget_transcript(self, session_id: str, conversation: int) -> None:
        with self._lock:
            self._transcripts.pop((session_id, conversation), None)

    def last_stop_reason(self, session_id: str, conversation: int) -> str | None:
        row = self._one("SELECT stop_reason FROM messages WHERE session_id=? AND conversation=? "
                        "ORDER BY id DESC LIMIT 1", (session_id, conversation))
        return row["stop_reason"] if row else None

    def add_user_content(self, session_id: str, conversation: int,
                         blocks: list[dict[str, Any]]) -> None:
        """Append user blocks; merged into the last message when it is a user one, so the
        conversation keeps alternating roles even after a turn that ended without an answer."""
        self._forget_transcript(session_id, conversation)
        with self._tx() as db:
            last = db.execute(
                "SELECT id, role, content FROM messages WHERE session_id=? AND conversation=? "
                "ORDER BY id DESC LIMIT 1", (session_id, conversation)).fetchone()
            if last is not None and last["role"] == "user":
                merged = _as_blocks(self._load_json(last["content"], last["id"])) + blocks
                db.execute("UPDATE messages SET content=? WHERE id=?",
                           (json.dumps(merged), last["id"]))
            else:
                self._insert_message(db, session_id, conversation, "user", blocks, None)
            self._touch(db, session_id)

    def add_tool_results(self, session_id: str, conversation: int,
                         blocks: list[dict[str, Any]]) -> None:
        """The user message answering every tool_use of the last assistant message."""
        self._forget_transcript(session_id, conversation)
        with self._tx() as db:
            self._insert_message(db, session_id, conversation, "user", blocks, None)
            self._touch(db, session_id)

    def _insert_message(self, db: Any, session_id: str, conversation: int,
                        role: str, content: list[dict[str, Any]], stop_reason: str | None) -> None:
        db.execute("INSERT INTO messages (session_id, conversation, role, content, stop_reason, "
                   "created_at) VALUES (?,?,?,?,?,?)",
                   (session_id, conversation, role, json.dumps(content), stop_reason, time.time()))

    def _touch(self, db: Any, session_id: str) -> None:
        db.execute("UPDATE sessions SET updated_at=? WHERE id=?", (time.time(), session_id))

    def _load_json(self, text: str, row_id: int) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise JournalError(f"{self.location}: message {row_id} is damaged (not JSON); "
                               "start a new session or /clear") from None

    # -- requests ----------------------------------------------------------
    def begin_request(self, row: RequestRow) -> None:
        """Committed BEFORE the request is sent, so a crash mid-send can be reconciled."""
        with self._tx(durable=True) as db:
            self._insert_request(db, row)

    def _insert_request(self, db: Any, row: RequestRow) -> None:
        db.execute(f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES "
                   f"({', '.join('?' * len(dataclasses.fields(row)))})", dataclasses.astuple(row))
        self._touch(db, row.session_id)

    def set_batch(self, custom_id: str, batch_id: str) -> None:
        """Committed BEFORE waiting starts: from here on the paid turn can always be found."""
        with self._tx() as db:
            # A shared pool's poller may have ended the turn in this very batch before its
            # agent got here: that end stays (it is the answer, not a new submission).
            db.execute("UPDATE requests SET batch_id=?, state='submitted' WHERE custom_id=? "
                       "AND NOT (state='ended' AND batch_id IS NOT NULL AND batch_id=?)",
                       (batch_id, custom_id, batch_id))
            db.execute("INSERT INTO batches_tried VALUES (?,?) ON CONFLICT DO NOTHING",
                       (custom_id, batch_id))

    def record_outcome(self, custom_id: str, outcome: Outcome, state: str = "ended") -> None:
        """How it ended; `state` 'wasted' for a batch hurried past (counted, never applied).
        Never reopens a turn: an applied or wasted answer stays so (a second process that
        collects the same end must not apply it again), and a hurried one can only become
        waste (or stay hurried)."""
        closed = "('applied', 'wasted')" if state in ("hurried", "wasted") else \
            "('applied', 'wasted', 'hurried')"
        with self._tx() as db:
            self._write_outcome(db, custom_id, outcome, state, f" AND state NOT IN {closed}")

    def _write_outcome(self, db: Any, custom_id: str, outcome: Outcome, state: str,
                       only_if: str = "") -> int:
        cost = outcome.cost
        return db.execute(
            f"UPDATE requests SET state='{state}', ended_at=?, wait_s=?, result_type=?, "
            "error_type=?, error_message=?, stop_reason=?, message=?, usage=?, cost_usd=?, "
            f"sync_cost_usd=?, cache_saved_usd=? WHERE custom_id=?{only_if}",
            (outcome.ended_at, outcome.wait_s, outcome.result_type, outcome.error_type,
             outcome.error_message, (outcome.message or {}).get("stop_reason"),
             json.dumps(outcome.message) if outcome.message else None,
             json.dumps(outcome.usage.to_json()) if outcome.usage else None,
             cost.paid_usd if cost else None, cost.sync_usd if cost else None,
             cost.cache_saved_usd if cost else None, custom_id)).rowcount

    def apply_request(self, request: RequestRow, content: list[dict[str, Any]] | None) -> None:
        """Append the assistant message (if any) and close the request in ONE transaction,
        so a crash can never add the same paid answer twice."""
        self._forget_transcript(request.session_id, request.conversation)
        with self._tx() as db:
            changed = db.execute("UPDATE requests SET state='applied' WHERE custom_id=? AND "
                                 "state='ended'", (request.custom_id,)).rowcount
            if changed and content:
                self._insert_message(db, request.session_id, request.conversation, "assistant",
                                     content, request.stop_reason)
            self._touch(db, request.session_id)

    def hurry_request(self, custom_id: str) -> None:
        """The batch was cancelled and its turn sent synchronously: no longer in flight for
        this session; if it still ends with an answer, that answer is waste, not applied."""
        with self._tx() as db:
            db.execute("UPDATE requests SET state='hurried' WHERE custom_id=? AND "
                       "state='submitted'", (custom_id,))

    def fail_request(self, custom_id: str, reason: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE requests SET state='failed', error_message=COALESCE(?, "
                       "error_message) WHERE custom_id=?", (reason, custom_id))

    def request(self, custom_id: str) -> RequestRow:
        row = self._one(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE custom_id=?", (custom_id,))
        if row is None:
            raise JournalError(f"{self.location}: request {custom_id} is missing")
        return RequestRow(**dict(row))

    def requests(self, session_id: str | None = None) -> list[RequestRow]:
        """Every request (of one session): for /stats and --stats, never per turn."""
        sql, args = f"SELECT {REQUEST_COLUMNS} FROM requests", ()
        if session_id is not None:
            sql, args = sql + " WHERE session_id=?", (session_id,)
        return [RequestRow(**dict(r)) for r in self._db.execute(
            sql + f" ORDER BY submitted_at, {self._ARRIVAL}", args).fetchall()]

    def pending_request(self, session_id: str) -> RequestRow | None:
        row = self._one(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id=? AND state IN (?,?,?) "
            "ORDER BY submitted_at DESC LIMIT 1", (session_id, *IN_FLIGHT_STATES))
        return RequestRow(**dict(row)) if row else None

    def latest_request(self, session_id: str, conversation: int) -> RequestRow | None:
        row = self._one(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id=? AND "
                        f"conversation=? ORDER BY submitted_at DESC, {self._ARRIVAL} DESC "
                        "LIMIT 1", (session_id, conversation))
        return RequestRow(**dict(row)) if row else None

    def last_applied(self, session_id: str, conversation: int) -> RequestRow | None:
        row = self._one(
            f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id=? AND conversation=? "
            "AND state='applied' ORDER BY submitted_at DESC LIMIT 1", (session_id, conversation))
        return RequestRow(**dict(row)) if row else None

    def recent_requests(self, session_id: str, limit: int) -> list[RequestRow]:
        """The session's newest requests, newest first."""
        rows = self._db.execute(f"SELECT {REQUEST_COLUMNS} FROM requests WHERE session_id=? "
                                f"ORDER BY submitted_at DESC, {self._ARRIVAL} DESC LIMIT ?",
                                (session_id, limit))
        return [RequestRow(**dict(r)) for r in rows]

    def count_requests(self, session_id: str) -> int:
        """How many requests the session has made: the number /stats gives the newest."""
        row = self._one("SELECT COUNT(*) AS n FROM requests WHERE session_id=?", (session_id,))
        return int(row["n"]) if row else 0

    def was_sent(self, session_id: str, conversation: int, n_messages: int) -> bool:
        return self._one("SELECT 1 AS sent FROM requests WHERE session_id=? AND conversation=? "
                         "AND n_messages=? LIMIT 1",
                         (session_id, conversation, n_messages)) is not None

    def committed_usd(self, session_id: str) -> float:
        """The session's spend so far: actual costs, and estimates for turns in flight."""
        row = self._one(
            "SELECT SUM(CASE WHEN state IN (?,?,?) AND cost_usd IS NULL THEN "
            "COALESCE(estimate_usd, 0) ELSE COALESCE(cost_usd, 0) END) AS usd FROM requests "
            "WHERE session_id=?", (*IN_FLIGHT_STATES, session_id))
        return float(row["usd"] or 0.0) if row else 0.0

    def turnaround_samples(self, model: str, limit: int = 50) -> list[float]:
        """The newest batch turnarounds of `model` that ended with an answer, oldest first."""
        rows = self._db.execute(
            "SELECT wait_s FROM requests WHERE model=? AND lane='batch' AND "
            "result_type='succeeded' AND wait_s IS NOT NULL ORDER BY submitted_at DESC LIMIT ?",
            (model, limit)).fetchall()
        return [r["wait_s"] for r in reversed(rows)]

    def known_batch_ids(self) -> set[str]:
        """Every batch this journal has held, adopted ones that proved foreign included, so
        a reconcile never adopts the same batch twice."""
        rows = self._db.execute("SELECT batch_id FROM requests WHERE batch_id IS NOT NULL "
                                "UNION SELECT batch_id FROM batches_tried")
        return {r["batch_id"] for r in rows}

    def batches_tried(self, custom_id: str) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM batches_tried WHERE custom_id=?",
                        (custom_id,))
        return int(row["n"]) if row else 0

    # -- tools -------------------------------------------------------------
    def start_tool(self, custom_id: str, tool_use_id: str, name: str,
                   tool_input: object) -> None:
        """Committed BEFORE the tool runs: a crash mid-command is then known on resume, and
        the command is reported as interrupted instead of silently run a second time (on
        disk before the command runs: a power loss must not make it look never started)."""
        with self._tx(durable=True) as db:
            db.execute("INSERT INTO tool_calls (custom_id, tool_use_id, name, input, output, "
                       "is_error, started_at) VALUES (?,?,?,?,'',1,?) "
                       "ON CONFLICT (custom_id, tool_use_id) DO UPDATE SET name=excluded.name, "
                       "input=excluded.input, output='', is_error=1, exit_code=NULL, "
                       "started_at=excluded.started_at, ended_at=NULL",
                       (custom_id, tool_use_id, name, json.dumps(tool_input), time.time()))

    def record_tool(self, custom_id: str, tool_use_id: str, result: ToolResult) -> None:
        with self._tx() as db:
            db.execute("UPDATE tool_calls SET output=?, is_error=?, exit_code=?, ended_at=? "
                       "WHERE custom_id=? AND tool_use_id=?",
                       (result.output, int(result.is_error), result.exit_code, time.time(),
                        custom_id, tool_use_id))

    def tool_results(self, custom_id: str) -> dict[str, ToolResult | None]:
        """Finished calls with their results; calls started but never finished map to None."""
        rows = self._db.execute("SELECT * FROM tool_calls WHERE custom_id=?", (custom_id,))
        return {r["tool_use_id"]: None if r["ended_at"] is None else
                ToolResult(r["output"], bool(r["is_error"]), r["exit_code"]) for r in rows}

    # -- the shared pool -----------------------------------------------------
    # A turn is queued with its request row; a flusher claims a batch's worth of queued
    # turns together with the batch's intent row in ONE transaction committed before the
    # create call; the batch id is committed right after it. Claims carry leases, so a dead
    # holder's intent is taken over, reconciled by list, then recorded or put back.
    def queue_turn(self, custom_id: str, pool_key: str, params: Mapping[str, Any],
                   window_s: float | None = None) -> None:
        """Queue a turn already journaled (begin_request) for whoever flushes `pool_key`;
        due to be sent `window_s` from now at the latest (None: at the flusher's window)."""
        with self._tx() as db:
            # A retry after a commit whose reply was lost finds its row there: queued once.
            db.execute("INSERT INTO turn_queue (custom_id, pool_key, params, queued_at, "
                       f"due_at) VALUES (?,?,?,{self._NOW},{self._NOW} + ?) ON CONFLICT "
                       "(custom_id) DO NOTHING", (custom_id, pool_key, json.dumps(params),
                                                  window_s))
        self._publish("queue", [pool_key])

    def claim_turns(self, pool_key: str, holder: str, *, limit: int,
                    lease_s: float, reason: str = "") -> Claim | None:
        """Up to `limit` of the oldest queued turns of `pool_key`, and the intent of the batch
        that will carry them; None when nothing is queued (or others hold it all)."""
        with self._tx(durable=True) as db:
            rows = db.execute("SELECT custom_id, params FROM turn_queue WHERE pool_key=? AND "
                              "state='queued' ORDER BY queued_at LIMIT ?" + self._CLAIM_LOCK,
                              (pool_key, limit)).fetchall()
            if not rows:
                return None
            intent_id = self._insert_id(
                db, "INSERT INTO batch_intents (pool_key, holder, lease_until, created_at, "
                f"width, reason) VALUES (?,?,{self._NOW} + ?,{self._NOW},?,?)",
                (pool_key, holder, lease_s, len(rows), reason or None))
            ids = [r["custom_id"] for r in rows]
            db.execute(f"UPDATE turn_queue SET state='claimed', intent_id=? WHERE custom_id IN "
                       f"({', '.join('?' * len(ids))})", (intent_id, *ids))
            created_at = db.execute("SELECT created_at FROM batch_intents WHERE id=?",
                                    (intent_id,)).fetchone()["created_at"]
        return Claim(intent_id, pool_key, holder, created_at, 0.0,
                     tuple((r["custom_id"], json.loads(r["params"])) for r in rows))

    def renew_claim(self, claim: Claim, lease_s: float) -> bool:
        """Extend the lease while the create is still being tried; False if it was lost."""
        with self._tx() as db:
            return db.execute(f"UPDATE batch_intents SET lease_until={self._NOW} + ? WHERE "
                              "id=? AND holder=? AND state='creating'",
                              (lease_s, claim.intent_id, claim.holder)).rowcount == 1

    def record_claim_batch(self, intent_id: int, batch_id: str) -> bool:
        """The create made `batch_id`: every turn of the intent is now in flight in it, in
        one transaction. False when the intent is no longer being created (its lease ran
        out and it was settled elsewhere): the caller's batch is then a duplicate to cancel."""
        with self._tx() as db:
            if not db.execute("UPDATE batch_intents SET batch_id=?, state='created' WHERE id=? "
                              "AND state='creating'", (batch_id, intent_id)).rowcount:
                return False
            ids = [r["custom_id"] for r in db.execute(
                "SELECT custom_id FROM turn_queue WHERE intent_id=? AND state='claimed'",
                (intent_id,)).fetchall()]
            # The request body (the whole transcript) is in the batch now: not kept twice.
            db.execute("UPDATE turn_queue SET state='sent', params='{}' WHERE intent_id=? AND "
                       "state='claimed'", (intent_id,))
            for custom_id in ids:
                db.execute("UPDATE requests SET batch_id=?, state='submitted' WHERE "
                           "custom_id=? AND state='submitting'", (batch_id, custom_id))
                db.execute("INSERT INTO batches_tried VALUES (?,?) ON CONFLICT DO NOTHING",
                           (custom_id, batch_id))
        self._publish("turns", ids)
        return True

    def release_claim(self, intent_id: int) -> int:
        """The create certainly made nothing: its turns go back to the queue (how many)."""
        with self._tx() as db:
            row = db.execute("SELECT pool_key FROM batch_intents WHERE id=? AND "
                             "state='creating'", (intent_id,)).fetchone()
            if row is None:
                return 0
            db.execute("UPDATE batch_intents SET state='released' WHERE id=?", (intent_id,))
            back = db.execute("UPDATE turn_queue SET state='queued', intent_id=NULL WHERE "
                              "intent_id=? AND state='claimed'", (intent_id,)).rowcount
        self._publish("queue", [row["pool_key"]])
        return back

    def take_over_expired_claims(self, holder: str, lease_s: float,
                                 pool_key: str | None = None) -> list[Claim]:
        """Intents whose holder stopped renewing (a dead host): now `holder`'s, with a fresh
        lease. Their create may or may not have happened: reconcile by list, then
        record_claim_batch or release_claim. `pool_key` keeps to one pool (a batch made
        with another API key cannot be found by this one's list)."""
        where, args = ("", ()) if pool_key is None else (" AND pool_key=?", (pool_key,))
        with self._tx() as db:
            rows = db.execute(f"SELECT id, pool_key, created_at, {self._NOW} - created_at AS "
                              f"age_s FROM batch_intents WHERE state='creating' AND "
                              f"lease_until < {self._NOW}{where} ORDER BY id" + self._CLAIM_LOCK,
                              args).fetchall()
            claims = []
            for r in rows:
                db.execute(f"UPDATE batch_intents SET holder=?, lease_until={self._NOW} + ? "
                           "WHERE id=?", (holder, lease_s, r["id"]))
                turns = db.execute("SELECT custom_id, params FROM turn_queue WHERE intent_id=? "
                                   "ORDER BY queued_at", (r["id"],)).fetchall()
                claims.append(Claim(r["id"], r["pool_key"], holder, r["created_at"],
                                    r["age_s"], tuple(
                    (t["custom_id"], json.loads(t["params"])) for t in turns)))
        return claims

    def finish_turn(self, custom_id: str, outcome: Outcome) -> bool:
        """Record a pooled turn's result, cost (the ledger) and turnaround in the transaction
        that marks it done. Only the first caller records it: two hosts that both see the
        batch end never apply one answer twice (False for the second)."""
        return bool(self.finish_turns({custom_id: outcome}))

    def finish_turns(self, outcomes: Mapping[str, Outcome]) -> list[str]:
        """finish_turn for every entry of one batch in ONE transaction (the ones this call
        recorded): the whole batch leaves the queue at once, so "every agent is waiting"
        never counts a turn already answered."""
        with self._tx() as db:
            written = []
            for custom_id, outcome in sorted(outcomes.items()):  # one lock order: no deadlock
                # Off the queue whoever wrote it (a hurried turn keeps its own record).
                db.execute("UPDATE turn_queue SET state='done' WHERE custom_id=?", (custom_id,))
                if self._write_outcome(db, custom_id, outcome, "ended",
                                       " AND state IN ('submitting', 'submitted')"):
                    written.append(custom_id)
        self._publish("turns", written)
        return written

    def queued_turns(self, pool_key: str) -> int:
        return self.queue_head(pool_key)[0]

    def queue_head(self, pool_key: str, window_s: float = 0.0) -> tuple[int, float | None]:
        """How many turns of `pool_key` wait to be claimed, and in how many seconds the first
        of them is due (each by its own deadline, else `window_s` after it was queued; by the
        store's clock, the same on every host)."""
        row = self._one(f"SELECT COUNT(*) AS n, MIN(COALESCE(due_at, queued_at + ?)) - "
                        f"{self._NOW} AS due_in_s FROM turn_queue WHERE pool_key=? AND "
                        "state='queued'", (window_s, pool_key))
        return int(row["n"]), row["due_in_s"]

    def queue_entry(self, custom_id: str) -> tuple[str, str | None, str | None, str] | None:
        """(queue state, batch id, why it failed, pool key) of a queued turn; None if it was
        never queued."""
        row = self._one("SELECT q.state AS state, r.batch_id AS batch_id, r.error_message AS "
                        "error, q.pool_key AS pool_key FROM turn_queue q JOIN requests r ON "
                        "r.custom_id=q.custom_id WHERE q.custom_id=?", (custom_id,))
        return (row["state"], row["batch_id"], row["error"], row["pool_key"]) if row else None

    def turn_states(self, custom_ids: Sequence[str]) -> dict[str, tuple[RequestRow,
                                                                       str | None]]:
        """Each turn's request row and its queue state (None: never queued), in ONE query:
        a batch that ends wakes many agents of a process at once."""
        if not custom_ids:
            return {}
        columns = ", ".join(f"r.{c.strip()}" for c in REQUEST_COLUMNS.split(","))
        rows = self._db.execute(
            f"SELECT {columns}, q.state AS queue_state FROM requests r LEFT JOIN turn_queue q "
            f"ON q.custom_id=r.custom_id WHERE r.custom_id IN "
            f"({', '.join('?' * len(custom_ids))})", tuple(custom_ids)).fetchall()
        return {r["custom_id"]: (RequestRow(**{k: v for k, v in dict(r).items()
                                               if k != "queue_state"}), r["queue_state"])
                for r in rows}

    def fail_claim(self, intent_id: int, reason: str) -> list[str]:
        """The create was refused, nothing made: its turns leave the queue with `reason`
        (each agent, on whatever host, hears it and fails or resends its turn)."""
        with self._tx() as db:
            db.execute("UPDATE batch_intents SET state='failed' WHERE id=? AND "
                       "state='creating'", (intent_id,))
            ids = [r["custom_id"] for r in db.execute(
                "SELECT custom_id FROM turn_queue WHERE intent_id=? AND state='claimed'",
                (intent_id,)).fetchall()]
            for custom_id in ids:
                db.execute("UPDATE turn_queue SET state='failed' WHERE custom_id=?", (custom_id,))
                db.execute("UPDATE requests SET error_message=? WHERE custom_id=?",
                           (reason, custom_id))
        self._publish("turns", ids)
        return ids

    def withdraw_turns(self, custom_ids: Sequence[str]) -> list[str]:
        """Take turns nobody has claimed yet back off the queue (their host is stopping)."""
        if not custom_ids:
            return []
        marks = ", ".join("?" * len(custom_ids))
        with self._tx() as db:
            ids = [r["custom_id"] for r in db.execute(
                f"SELECT custom_id FROM turn_queue WHERE state='queued' AND custom_id IN "
                f"({marks})" + self._CLAIM_LOCK, tuple(custom_ids)).fetchall()]
            for custom_id in ids:
                db.execute("DELETE FROM turn_queue WHERE custom_id=?", (custom_id,))
        self._publish("turns", ids)  # another process may be waiting on one (a retry)
        return ids

    def batch_width(self, batch_id: str) -> int | None:
        """How many turns a shared batch carries (None: not a shared pool's batch)."""
        row = self._one("SELECT width FROM batch_intents WHERE batch_id=?", (batch_id,))
        return int(row["width"]) if row else None

    def intent_batch(self, intent_id: int) -> str | None:
        row = self._one("SELECT batch_id FROM batch_intents WHERE id=?", (intent_id,))
        return row["batch_id"] if row else None

    def batches_in_flight(self, account: str) -> list[tuple[str, float, list[str]]]:
        """(batch id, created at, custom_ids not yet finished) of every shared batch of the
        account (pool keys `account/...`) still in flight, whichever host created it."""
        rows = self._db.execute(
            "SELECT i.batch_id AS batch_id, i.created_at AS created_at, q.custom_id AS "
            "custom_id FROM batch_intents i JOIN turn_queue q ON q.intent_id=i.id WHERE "
            "i.state='created' AND q.state='sent' AND i.pool_key LIKE ? ORDER BY i.id",
            (account + "/%",)).fetchall()
        found: dict[str, tuple[str, float, list[str]]] = {}
        for r in rows:
            found.setdefault(r["batch_id"], (r["batch_id"], r["created_at"], []))[2].append(
                r["custom_id"])
        return list(found.values())

    def shared_batches(self, custom_id_prefix: str) -> list[PoolBatchRow]:
        """The shared batches that carried turns named `custom_id_prefix…` (a fleet run's),
        as the summary reads pooled creates: the whole batch's width, this run's entries."""
        rows = self._db.execute(
            "SELECT i.id AS id, i.pool_key AS pool_key, i.reason AS reason, i.created_at AS "
            "created_at, i.width AS width, i.batch_id AS batch_id, q.custom_id AS custom_id, "
            "q.queued_at AS queued_at FROM batch_intents i JOIN turn_queue q ON "
            "q.intent_id=i.id WHERE i.state='created' AND q.custom_id LIKE ? ORDER BY i.id, "
            "q.queued_at", (custom_id_prefix.replace("%", "") + "%",)).fetchall()
        by_intent: dict[int, list[Any]] = {}
        for r in rows:
            by_intent.setdefault(r["id"], []).append(r)
        return [PoolBatchRow(
            rs[0]["id"], custom_id_prefix, rs[0]["pool_key"].split("/")[1],
            rs[0]["reason"] or "window", rs[0]["created_at"], rs[0]["width"],
            json.dumps([r["custom_id"] for r in rs]),
            json.dumps([round(max(0.0, rs[0]["created_at"] - r["queued_at"]), 3) for r in rs]),
            rs[0]["batch_id"], "created") for rs in by_intent.values()]

    # -- who shares the pool: each process's agents, for "everyone is waiting" -------------
    def set_member(self, member: str, account: str, active: int, waiting: int,
                   lease_s: float) -> None:
        with self._tx() as db:
            db.execute(f"INSERT INTO pool_members VALUES (?,?,?,?,{self._NOW} + ?) ON "
                       "CONFLICT (member) DO UPDATE SET active=excluded.active, "
                       "waiting=excluded.waiting, seen_until=excluded.seen_until",
                       (member, account, active, waiting, lease_s))
        self._publish("queue", [account])

    def drop_member(self, member: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pool_members WHERE member=?", (member,))

    def pool_census(self, account: str) -> tuple[int, int]:
        """(agents active on the account's live members, turns of the account waiting on the
        model). The waiting count is the queue's own (queued, claimed or in a batch), so a
        turn that ends stops counting in the transaction that ends it, on every host."""
        active = self._one("SELECT COALESCE(SUM(active), 0) AS n FROM pool_members WHERE "
                           f"account=? AND seen_until > {self._NOW}", (account,))
        waiting = self._one("SELECT COUNT(*) AS n FROM turn_queue WHERE state IN ('queued', "
                            "'claimed', 'sent') AND pool_key LIKE ?", (account + "/%",))
        return int(active["n"]), int(waiting["n"])

    # -- fleet runs: a run, its agents, and every pooled create ------------------
    def create_run(self, tasks_path: str, options: Mapping[str, Any]) -> FleetRunRow:
        now, token = time.time(), secrets.token_hex(4)
        run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + token
        with self._tx() as db:
            db.execute("INSERT INTO fleet_runs VALUES (?,?,?,?,?,?,?)",
                       (run_id, token, now, now, "running", tasks_path, json.dumps(options)))
        return self.fleet_run(run_id)  # type: ignore[return-value]

    def fleet_run(self, prefix: str) -> FleetRunRow | None:
        row = self._one("SELECT * FROM fleet_runs WHERE id LIKE ? ORDER BY created_at DESC "
                        "LIMIT 1", (prefix.replace("%", "") + "%",))
        return FleetRunRow(**dict(row)) if row else None

    def latest_fleet_run(self, origin: str | None = None) -> FleetRunRow | None:
        """The newest run; with `origin`, the newest started there (a pool holds every
        host's runs, and a run's work dirs are on the host that started it)."""
        rows = self._db.execute("SELECT * FROM fleet_runs ORDER BY created_at DESC LIMIT ?",
                                (1 if origin is None else FLEET_RUNS_SCANNED,)).fetchall()
        runs = [FleetRunRow(**dict(row)) for row in rows]
        return next((r for r in runs if origin is None
                     or r.options_value.get("origin", origin) == origin), None)

    def set_run_state(self, run_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE fleet_runs SET state=?, updated_at=? WHERE id=?",
                       (state, time.time(), run_id))

    def add_agent(self, row: FleetAgentRow) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO fleet_agents VALUES (?,?,?,?,?,?,?,?,?,?)",
                       dataclasses.astuple(row))

    def fleet_agents(self, run_id: str) -> list[FleetAgentRow]:
        rows = self._db.execute("SELECT * FROM fleet_agents WHERE run_id=? ORDER BY idx",
                                (run_id,))
        return [FleetAgentRow(**dict(r)) for r in rows]

    def set_agent_state(self, run_id: str, idx: int, state: str,
                        error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE fleet_agents SET state=?, error=? WHERE run_id=? AND idx=?",
                       (state, error, run_id, idx))

    def begin_pool_batch(self, run_id: str, model: str, reason: str, sent_at: float,
                         custom_ids: Sequence[str], delays: Sequence[float]) -> int:
        """Committed BEFORE the create: which requests one pooled batch will carry."""
        with self._tx(durable=True) as db:
            return self._insert_id(
                db, "INSERT INTO pool_batches (run_id, model, reason, sent_at, width, "
                "custom_ids, delays) VALUES (?,?,?,?,?,?,?)",
                (run_id, model, reason, sent_at, len(custom_ids), json.dumps(list(custom_ids)),
                 json.dumps(list(delays))))

    def set_pool_batch(self, pool_id: int, batch_id: str | None) -> None:
        """The create's outcome, and (when it made a batch) every entry's batch id in the SAME
        transaction: from here on each agent's paid turn can be found."""
        with self._tx() as db:
            state = "created" if batch_id else "not_created"
            db.execute("UPDATE pool_batches SET batch_id=?, state=? WHERE id=?",
                       (batch_id, state, pool_id))
            if batch_id is None:
                return
            row = db.execute("SELECT custom_ids FROM pool_batches WHERE id=?",
                             (pool_id,)).fetchone()
            for custom_id in json.loads(row["custom_ids"]):
                db.execute("UPDATE requests SET batch_id=?, state='submitted' WHERE "
                           "custom_id=? AND state='submitting'", (batch_id, custom_id))
                db.execute("INSERT INTO batches_tried VALUES (?,?) ON CONFLICT DO NOTHING",
                           (custom_id, batch_id))

    def pool_batches(self, run_id: str, state: str | None = None) -> list[PoolBatchRow]:
        sql, args = "SELECT * FROM pool_batches WHERE run_id=?", (run_id,)
        if state is not None:
            sql, args = sql + " AND state=?", (run_id, state)
        return [PoolBatchRow(**dict(r)) for r in self._db.execute(sql + " ORDER BY id", args)]

    # -- proxy -------------------------------------------------------------
    def begin_proxy_request(self, row: ProxyRow) -> None:
        """Committed BEFORE the entry is pooled: a crash mid-create leaves a trace."""
        cols = [f.name for f in dataclasses.fields(ProxyRow)]
        with self._tx() as db:
            db.execute(f"INSERT INTO proxy_requests ({', '.join(cols)}) VALUES "
                       f"({', '.join('?' * len(cols))})", dataclasses.astuple(row))

    def begin_proxy_entry(self, row: RequestRow) -> None:
        """A proxied entry's request row, for a shared pool's queue and ledger (a fleet turn's
        has its agent's session; these share one, PROXY_SESSION). Once: a retry of an entry
        whose process died may journal it again."""
        with self._tx() as db:
            now = time.time()
            db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                       (PROXY_SESSION, now, now, "(proxy)", row.model, 0,
                        "other harnesses' batch entries, through a proxy"))
            db.execute(f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES "
                       f"({', '.join('?' * len(dataclasses.fields(row)))}) "
                       "ON CONFLICT (custom_id) DO NOTHING", dataclasses.astuple(row))

    def update_proxy_request(self, custom_id: str, unless_state: str | None = None,
                             **fields: Any) -> None:
        """`unless_state`: leave a row in that state alone (one delivered by another proxy
        that carried the same entry stays delivered)."""
        cols = ", ".join(f"{k}=?" for k in fields)
        guard, args = (" AND state<>?", (unless_state,)) if unless_state else ("", ())
        with self._tx() as db:
            db.execute(f"UPDATE proxy_requests SET {cols} WHERE custom_id=?{guard}",
                       (*fields.values(), custom_id, *args))

    def proxy_attached(self, custom_id: str) -> None:
        """One more client request served by this entry (a retry that paid nothing)."""
        with self._tx() as db:
            db.execute("UPDATE proxy_requests SET attaches=attaches+1 WHERE custom_id=?",
                       (custom_id,))

    def proxy_reattachable(self, key_fp: str, turn_key: str, since: float,
                           states: Sequence[str] = ("submitted", "ended", "unknown")
                           ) -> ProxyRow | None:
        """The newest entry of this key and turn that is paid for (or, in a shared pool, may
        yet be: `states`) and not yet delivered."""
        row = self._one("SELECT * FROM proxy_requests WHERE key_fp=? AND turn_key=? AND "
                        f"lane='batch' AND state IN ({', '.join('?' * len(states))}) AND "
                        "received_at>=? ORDER BY received_at DESC LIMIT 1",
                        (key_fp, turn_key, *states, since))
        return ProxyRow(**dict(row)) if row else None

    def proxy_requests(self) -> list[ProxyRow]:
        """Every proxy row: for --stats, never per request."""
        return [ProxyRow(**dict(r)) for r in self._db.execute(
            "SELECT * FROM proxy_requests ORDER BY received_at, custom_id").fetchall()]

    def proxy_unsent(self) -> int:
        """Rows a crash left before a known batch: never sent ('unsent': a retry sends it
        again), or cut off during the create ('unknown': a retry looks for the batch)."""
        with self._tx() as db:
            db.execute("UPDATE proxy_requests SET state='unknown' WHERE state='pooled' AND "
                       "sent_at IS NOT NULL")
            return db.execute("UPDATE proxy_requests SET state='unsent' WHERE "
                              "state='pooled'").rowcount

    def proxy_creating(self, custom_ids: Sequence[str], pool_id: str, sent_at: float) -> None:
        """Committed BEFORE the create call: which entries go into it, when, how many."""
        with self._tx(durable=True) as db:
            for custom_id in custom_ids:
                db.execute("UPDATE proxy_requests SET pool_id=?, sent_at=?, width=? WHERE "
                           "custom_id=?", (pool_id, sent_at, len(custom_ids), custom_id))

    def proxy_adopt(self, pool_id: str, batch_id: str | None) -> None:
        """A create cut off by a crash, reconciled: every entry of it gets its batch (or, when
        it made none, goes back to be pooled afresh)."""
        with self._tx() as db:
            if batch_id is None:
                db.execute("UPDATE proxy_requests SET state='unsent' WHERE pool_id=? AND "
                           "state='unknown'", (pool_id,))
            else:
                db.execute("UPDATE proxy_requests SET state='submitted', batch_id=? WHERE "
                           "pool_id=? AND state='unknown'", (batch_id, pool_id))

    def proxy_turnarounds(self, model: str, limit: int = 50) -> list[float]:
        rows = self._db.execute(
            "SELECT wait_s FROM proxy_requests WHERE model=? AND lane='batch' AND "
            "result_type='succeeded' AND wait_s IS NOT NULL ORDER BY received_at DESC LIMIT ?",
            (model, limit)).fetchall()
        return [r[0] for r in reversed(rows)]

    def proxy_batch_ids(self) -> set[str]:
        rows = self._db.execute("SELECT DISTINCT batch_id FROM proxy_requests WHERE "
                                "batch_id IS NOT NULL")
        return {r[0] for r in rows}


class SqliteStore(_SqlStore):
    """The journal in one SQLite file (WAL). Each thread gets its own connection, and each
    public write is one BEGIN IMMEDIATE transaction on it, so many agents' threads can share
    one store; a crash between two writes loses neither. One host: roles are file locks
    and wake-ups stay in the process."""

    dialect = "sqlite"
    _ARRIVAL = "rowid"
    # One host, one clock: the process's own, to the microsecond (julianday('now') keeps only
    # milliseconds, and turns queued within one would tie in the queue's order).
    _NOW = "store_now()"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.location = str(path)
        self._wakeups = _LocalWakeups()
        try:
            _private_dir(path.parent)
            self._migrate()
            _private_files(path)
        except sqlite3.DatabaseError as exc:
            raise JournalError(_explain_db_error(path, exc)) from None
        except OSError as exc:
            raise JournalError(f"the journal {path} cannot be opened: {exc.strerror or exc}; "
                               "set BATCHING_HARNESS_HOME to a writable directory") from None

    @classmethod
    def open(cls, url: str | None, home: Path) -> SqliteStore:
        """No URL: journal.db in the state dir; sqlite:///path: that file."""
        return cls(Path(url.removeprefix("sqlite://")).expanduser() if url
                   else home / "journal.db")

    @classmethod
    def doctor(cls, url: str | None) -> list[DoctorCheck]:
        return []  # the journal reports its own problems, with the fix, when it opens

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        # Power loss: a commit at NORMAL (the write-ahead log, not yet synced) may be lost;
        # a killed process loses nothing. What must survive it is what comes before money is
        # spent or a command runs (a request journaled before it is sent, a pooled create's
        # intent, a tool call's start): those commit durably (_tx(durable=True)), and their
        # fsync carries everything before them. The rest can be lost safely: a batch id is
        # found again by list(), an answer fetched again, a tool's end is then an
        # interruption. Two fsyncs a turn instead of one per write (a fleet's 20 agents'
        # writes queue behind each other's: ~0.7 s a round at 5 ms an fsync).
        db.execute("PRAGMA synchronous=NORMAL")
        db.create_function("store_now", 0, time.time)
        return db

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version)
        self._db.execute("PRAGMA journal_mode=WAL")
        if version == SCHEMA_VERSION:
            return
        with self._tx() as db:  # under the write lock: a second process waits, then sees it done
            version = db.execute("PRAGMA user_version").fetchone()[0]
            self._apply_migrations(db, version)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path} was written by a newer batching-harness (schema {version}, this "
                f"one knows {SCHEMA_VERSION}); upgrade, or set BATCHING_HARNESS_HOME elsewhere")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _tx(self, durable: bool = False) -> _Transaction:
        return _Transaction(self._db, self.path, durable)

    def _insert_id(self, db: sqlite3.Connection, sql: str, args: Sequence[Any]) -> int:
        return int(db.execute(sql, args).lastrowid or 0)

    def session_lock(self, home: Path) -> SessionLock:
        return SessionLock(home)

    def hold_role(self, role: str, name: str = "") -> Role | None:
        """A file lock beside the journal: it ends with the process that holds it."""
        digest = hashlib.sha256(f"{role}/{name}".encode()).hexdigest()[:16]
        path = self.path.parent / "locks" / f"role-{role}-{digest}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _FileRole(fd)

    def listen(self, *channels: str) -> Listener:
        return self._wakeups.listen(channels)

    def _publish(self, channel: str, payloads: Sequence[str]) -> None:
        self._wakeups.publish(channel, payloads)


def _private_dir(path: Path) -> None:
    """The state dir holds tool output (a user's command may print secrets): 0700."""
    if path.exists() and not path.is_dir():
        raise OSError(errno.ENOTDIR, f"{path} is not a directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o700)


def _private_files(db_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        candidate = db_path.with_name(db_path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(candidate.stat().st_mode) & 0o077:
                candidate.chmod(0o600)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, with SQLite's lock errors turned into a clear message.
    A durable one commits with synchronous=FULL: its fsync of the write-ahead log also
    carries every commit before it to disk."""

    def __init__(self, db: sqlite3.Connection, path: Path, durable: bool = False) -> None:
        self.db, self.path, self.durable = db, path, durable

    def __enter__(self) -> sqlite3.Connection:
        try:
            if self.durable:
                self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise JournalError(_explain_db_error(self.path, exc)) from None
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            if self.durable:
                self.db.execute("PRAGMA synchronous=NORMAL")


def _explain_db_error(path: Path, exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"the journal {path} is locked by another process; close it or wait"
    if "not a database" in text or "malformed" in text:
        return (f"the journal {path} is damaged ({text}); move it aside to start afresh "
                "(sqlite3 .recover can often rescue its sessions)")
    return f"the journal {path} cannot be used: {text}"


class _FileRole:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def alive(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _LocalWakeups:
    """SQLite's LISTEN/NOTIFY: a SQLite pool lives in one process, so its wake-ups do too."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._listeners: list[_LocalListener] = []

    def listen(self, channels: Sequence[str]) -> _LocalListener:
        listener = _LocalListener(self, set(channels))
        with self._changed:
            self._listeners.append(listener)
        return listener

    def publish(self, channel: str, payloads: Sequence[str]) -> None:
        with self._changed:
            for listener in self._listeners:
                if channel in listener.channels:
                    listener.heard.extend((channel, p) for p in payloads)
            self._changed.notify_all()


class _LocalListener:
    def __init__(self, hub: _LocalWakeups, channels: set[str]) -> None:
        self.hub, self.channels = hub, channels
        self.heard: collections.deque[tuple[str, str]] = collections.deque()

    def wait(self, timeout_s: float) -> list[tuple[str, str]]:
        with self.hub._changed:
            self.hub._changed.wait_for(lambda: self.heard, timeout_s)
            heard = list(self.heard)
            self.heard.clear()
        return heard

    def close(self) -> None:
        with self.hub._changed:
            if self in self.hub._listeners:
                self.hub._listeners.remove(self)


# -- PostgreSQL: one pool that many processes on many hosts share ----------------------
PG_DEFAULT_SCHEMA = "batching_harness"
PG_MIN_SERVER = 120000
"""12: SKIP LOCKED, advisory locks, identity columns, notifies, all well past their first release."""
PG_INSTALL_HINT = "pip install 'batching-harness[postgres]'"
# Server-side keepalives per session: a host that vanishes without closing its connection
# (power, network) is dropped in about 10 + 3 x 5 s, and with it every role it held.
_PG_SESSION_OPTIONS = ("-c synchronous_commit=on -c tcp_keepalives_idle=10 "
                       "-c tcp_keepalives_interval=5 -c tcp_keepalives_count=3")


def _import_psycopg() -> Any:
    """psycopg 3, imported only when a pool asks for it: SQLite users never need it."""
    try:
        import psycopg
        import psycopg.rows  # dict_row
    except ImportError:
        raise ConfigError(f"--pool postgresql://… needs the PostgreSQL driver: "
                          f"{PG_INSTALL_HINT}") from None
    return psycopg


def _split_pool_url(url: str) -> tuple[str, str]:
    """(the URL libpq gets, the schema the pool lives in): ?schema=NAME keeps several pools
    in one database; libpq itself would refuse the parameter."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else PG_DEFAULT_SCHEMA
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ConfigError(f"--pool: schema {schema!r} must be lower-case letters, digits and _")
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schema


# Each agent thread holds a connection: the server runs out before the host does.
_PG_FULL_FIX = ("the server has no connection slot left: raise its max_connections, lower "
                "--concurrency on the hosts, or put a session-mode pooler (PgBouncer "
                "pool_mode=session) in front of it")


def _pg_fix(text: str) -> str:
    """The fix for a connection failure, from libpq's words."""
    if "password" in text or "authentication failed" in text:
        return ("check the user and password: put the password in PGPASSWORD or ~/.pgpass, "
                "and allow this host in the server's pg_hba.conf")
    if "no pg_hba.conf entry" in text:
        return "allow this host and user in the server's pg_hba.conf, then reload the server"
    if "database" in text and "does not exist" in text:
        return "create it (createdb NAME), or name an existing database in --pool"
    if "role" in text and "does not exist" in text:
        return "create the role (createuser NAME), or name an existing user in --pool"
    if "too many connections" in text or "remaining connection slots" in text:
        return _PG_FULL_FIX
    return ("start the server, or fix the host and port in --pool (pg_isready -h HOST -p PORT "
            "tells whether it accepts connections)")


def pg_lock_key(schema: str, purpose: str, name: str = "") -> int:
    """A 64-bit advisory-lock key per (pool, purpose, name): two pools in one database never
    block each other."""
    digest = hashlib.blake2b(f"batching-harness/{schema}/{purpose}/{name}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _pg_error(location: str, exc: Exception) -> JournalError:
    """One line with the fix; PoolUnreachable when waiting may cure it (not a refusal)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    fix = _pg_fix(str(exc))
    # a server that is down or full can come back: waiting may cure it, unlike a refusal
    kind = PoolUnreachable if fix.startswith("start the server") or fix == _PG_FULL_FIX \
        else JournalError
    return kind(f"the pool {location} cannot be used ({text}); {fix}")


class PostgresStore(_SqlStore):
    """The journal in a PostgreSQL schema that any number of processes on any number of
    hosts share (--pool postgresql://user@host/db[?schema=NAME]). A connection per thread,
    each write one transaction; the schema upgrades under an advisory lock (the first
    process upgrades, the others wait); roles are advisory locks on a connection of their
    own, so they end with the session that held them; wake-ups are LISTEN/NOTIFY."""

    dialect = "postgresql"
    _ARRIVAL = "seq"
    _CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"
    # The server's clock, one for every host; fixed within a statement, so a row's lease and
    # creation time agree, but fresh for each statement of a transaction.
    _NOW = "extract(epoch from statement_timestamp())::float8"

    def __init__(self, url: str) -> None:
        super().__init__()
        self._pg = _import_psycopg()
        self.url, self.schema = _split_pool_url(url)
        self.location = _pool_shown(url)
        self._roles_lock = threading.Lock()
        self._roles_db: Any = None
        self._held: set[int] = set()
        self._migrate()

    @classmethod
    def open(cls, url: str | None, home: Path) -> PostgresStore:
        return cls(url or "")

    # -- connections -----------------------------------------------------------
    def _raw_connection(self) -> Any:
        try:
            return self._pg.connect(
                self.url, autocommit=True, row_factory=self._pg.rows.dict_row,
                # the pid: a DBA (or a test) sees which process holds which lock
                connect_timeout=10, application_name=f"batching-harness {os.getpid()}",
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                options=f"-c search_path={self.schema} {_PG_SESSION_OPTIONS}")
        except self._pg.Error as exc:
            raise _pg_error(self.location, exc) from None

    def _connect(self) -> _PgConnection:
        return _PgConnection(self, self._raw_connection())

    def _drop(self, db: _PgConnection) -> None:
        """A broken connection is closed and forgotten; the thread's next call reconnects."""
        held = getattr(self._local, "held", None)
        if held is not None and held.db is db:
            self.release_connection()
        else:
            db.close()

    def _tx(self, durable: bool = False) -> _PgTransaction:
        return _PgTransaction(self._db)  # every commit waits for the server's WAL flush

    def _insert_id(self, db: _PgConnection, sql: str, args: Sequence[Any]) -> int:
        return int(db.execute(sql + " RETURNING id", args).fetchone()["id"])

    def _lock_key(self, purpose: str, name: str = "") -> int:
        return pg_lock_key(self.schema, purpose, name)

    def close(self) -> None:
        with self._roles_lock:
            if self._roles_db is not None:
                self._roles_db.close()
                self._roles_db = None
            self._held.clear()
        super().close()

    # -- schema ----------------------------------------------------------------
    def _migrate(self) -> None:
        version = self._stored_version(self._db)
        self._check_version(version)
        if version == SCHEMA_VERSION:
            return
        # The first process to get the lock upgrades; the others wait here. The lock is
        # taken BEFORE the transaction begins, so that one sees what a process that held it
        # meanwhile committed (a transaction begun before the wait can miss a new schema).
        key = self._lock_key("migrate")
        self._db.execute("SELECT pg_advisory_lock(?)", (key,))
        try:
            self._upgrade()
        finally:
            with contextlib.suppress(JournalError):  # a lost session has let go already
                self._db.execute("SELECT pg_advisory_unlock(?)", (key,))

    def _upgrade(self) -> None:
        with self._tx() as db:  # DDL is transactional: the pool is never half-upgraded
            version = self._stored_version(db)  # another process may have done it meanwhile
            self._check_version(version)
            if version == 0:
                if db.execute("SELECT 1 AS found FROM pg_namespace WHERE nspname=?",
                              (self.schema,)).fetchone() is None:
                    db.execute(f"CREATE SCHEMA {self.schema}")
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version VALUES (0)")
            self._apply_migrations(db, version)
            db.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))

    def _stored_version(self, db: _PgConnection) -> int:
        if db.execute("SELECT to_regclass('schema_version') AS t").fetchone()["t"] is None:
            return 0
        return int(db.execute("SELECT version FROM schema_version").fetchone()["version"])

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"the pool {self.location} was written by a newer batching-harness (schema "
                f"{version}, this one knows {SCHEMA_VERSION}); upgrade batching-harness on "
                "this host (pip install -U batching-harness)")

    @property
    def schema_version(self) -> int:
        return self._stored_version(self._db)

    # -- roles: advisory locks that end with their session ------------------------
    def session_lock(self, home: Path) -> SessionLock:
        return _RoleSessionLock(self)

    def hold_role(self, role: str, name: str = "") -> Role | None:
        """Take `role` (for `name`) for this process, or None while another process holds
        it. Every role of a store sits on one connection of its own: a process that dies
        loses them all at once, and the server hands them on."""
        key = self._lock_key(role, name)
        with self._roles_lock:
            if key in self._held:  # advisory locks nest within a session: refuse it here
                return None
            if self._roles_db is None:
                self._roles_db = self._raw_connection()
            try:
                got = self._roles_db.execute("SELECT pg_try_advisory_lock(%s) AS ok",
                                             (key,)).fetchone()["ok"]
            except self._pg.Error as exc:
                self._lose_roles()
                raise _pg_error(self.location, exc) from None
            if not got:
                return None
            self._held.add(key)
            return _AdvisoryRole(self, self._roles_db, key)

    def _role_alive(self, conn: Any, key: int) -> bool:
        with self._roles_lock:
            if conn is not self._roles_db or key not in self._held:
                return False
            try:
                conn.execute("SELECT 1")
                return True
            except self._pg.Error:
                self._lose_roles()
                return False

    def _release_role(self, conn: Any, key: int) -> None:
        with self._roles_lock:
            if conn is self._roles_db and key in self._held:
                self._held.discard(key)
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                except self._pg.Error:
                    self._lose_roles()

    def _lose_roles(self) -> None:
        """The roles connection broke: the server has let go of every role on it."""
        if self._roles_db is not None:
            with contextlib.suppress(Exception):
                self._roles_db.close()
        self._roles_db = None
        self._held.clear()

    # -- wake-ups ------------------------------------------------------------------
    def _channel(self, name: str) -> str:
        return f"{self.schema}:{name}"

    def listen(self, *channels: str) -> Listener:
        raw = self._raw_connection()
        for name in channels:
            raw.execute(f'LISTEN "{self._channel(name)}"')
        return _PgListener(raw, len(self.schema) + 1, self._pg, self.location)

    def _publish(self, channel: str, payloads: Sequence[str]) -> None:
        """After the commit that made the change: a listener that wakes finds it there."""
        if payloads:
            self._db.execute("SELECT pg_notify(?, p) FROM unnest(?::text[]) AS p",
                             (self._channel(channel), list(payloads)))

    # -- doctor ----------------------------------------------------------------------
    @classmethod
    def doctor(cls, url: str | None) -> list[DoctorCheck]:
        """The connection, the schema version and the server's settings, each with its fix."""
        try:
            pg = _import_psycopg()
        except ConfigError:
            return [DoctorCheck("pool driver", False, "psycopg 3 is not installed",
                                PG_INSTALL_HINT)]
        checks = [DoctorCheck("pool driver", True, f"psycopg {pg.__version__}")]
        try:
            target, schema = _split_pool_url(url or "")
            db = pg.connect(target, autocommit=True, row_factory=pg.rows.dict_row,
                            connect_timeout=5)
        except (pg.Error, ConfigError) as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return [*checks, DoctorCheck("pool connection", False,
                                         f"{_pool_shown(url)}: {text}", _pg_fix(str(exc)))]
        with db:
            return [*checks, *_pg_server_checks(db, _pool_shown(url), schema)]


def _pg_server_checks(db: Any, shown: str, schema: str) -> list[DoctorCheck]:
    def setting(name: str) -> str | None:
        row = db.execute("SELECT setting FROM pg_settings WHERE name=%s", (name,)).fetchone()
        return row["setting"] if row else None

    info = db.execute("SELECT current_user AS who, current_database() AS dbname, "
                      "current_setting('server_version_num')::int AS num, "
                      "current_setting('server_version') AS version").fetchone()
    checks = [DoctorCheck("pool connection", True,
                          f"{shown} (user {info['who']}, database {info['dbname']})")]
    checks.append(DoctorCheck(
        "pool server", info["num"] >= PG_MIN_SERVER, f"PostgreSQL {info['version']}",
        "upgrade the server to PostgreSQL 12 or newer"))
    checks.append(_pg_schema_check(db, schema, info["dbname"]))
    fsync = setting("fsync")
    checks.append(DoctorCheck(
        "pool durability", fsync == "on", f"fsync = {fsync}",
        "set fsync = on in postgresql.conf and reload: with it off, a server crash can lose "
        "a committed batch id, and its turns are then paid for twice"))
    idle = int(setting("idle_session_timeout") or 0)
    checks.append(DoctorCheck(
        "pool idle timeout", idle == 0, f"idle_session_timeout = {idle} ms",
        f"ALTER ROLE {info['who']} SET idle_session_timeout = 0: a role (poller, session "
        "lock) sits on an idle connection, and a timeout would hand it to another process"))
    room = db.execute("SELECT current_setting('max_connections')::int - "
                      "current_setting('superuser_reserved_connections')::int - "
                      "(SELECT count(*) FROM pg_stat_activity) AS free, (SELECT count(*) FROM "
                      "pg_stat_activity WHERE application_name LIKE 'batching-harness%') AS ours"
                      ).fetchone()
    checks.append(DoctorCheck(
        "pool connections", room["free"] >= 20,
        f"{room['free']} free ({room['ours']} in use by batching-harness)",
        "raise max_connections: each process takes one per thread that writes, plus one for "
        "its roles and one per listener (PgBouncer only in session mode: advisory locks and "
        "LISTEN need a session)"))
    return checks


def _pg_schema_check(db: Any, schema: str, dbname: str) -> DoctorCheck:
    found = db.execute("SELECT to_regclass(%s) AS t", (f"{schema}.schema_version",)).fetchone()
    if found["t"] is None:
        exists = db.execute("SELECT 1 AS found FROM pg_namespace WHERE nspname=%s",
                            (schema,)).fetchone()
        may = db.execute("SELECT has_schema_privilege(%s, 'CREATE') AS ok" if exists else
                         "SELECT has_database_privilege(current_database(), 'CREATE') AS ok",
                         (schema,) if exists else None).fetchone()["ok"]
        return DoctorCheck("pool schema", bool(may), f"{schema}: empty; the first process to "
                           f"connect creates schema {SCHEMA_VERSION}",
                           f"GRANT CREATE ON DATABASE {dbname} TO the pool's user (or create "
                           f"schema {schema} for it)")
    version = db.execute(f"SELECT version FROM {schema}.schema_version").fetchone()["version"]
    if version > SCHEMA_VERSION:
        return DoctorCheck("pool schema", False, f"{schema}: schema {version}, written by a "
                           f"newer batching-harness (this one knows {SCHEMA_VERSION})",
                           "pip install -U batching-harness on this host")
    detail = (f"{schema}: schema {version} (current)" if version == SCHEMA_VERSION else
              f"{schema}: schema {version}; the first process to connect upgrades it to "
              f"{SCHEMA_VERSION} (the others wait)")
    return DoctorCheck("pool schema", True, detail)


class _PgConnection:
    """A psycopg connection that speaks the store's SQL (`?` placeholders) and turns a lost
    server into one clear JournalError; the next call reconnects."""

    def __init__(self, store: PostgresStore, raw: Any) -> None:
        self.store, self.raw = store, raw

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        try:
            return self.raw.execute(sql.replace("?", "%s"), tuple(args) or None)
        except self.store._pg.OperationalError as exc:
            self.store._drop(self)
            raise _pg_error(self.store.location, exc) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


class _PgTransaction:
    """BEGIN ... COMMIT on the thread's connection (READ COMMITTED: claims lock their rows)."""

    def __init__(self, db: _PgConnection) -> None:
        self.db = db

    def __enter__(self) -> _PgConnection:
        self.db.execute("BEGIN")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif not self.db.raw.closed:
            with contextlib.suppress(Exception):
                self.db.raw.execute("ROLLBACK")


class _AdvisoryRole:
    def __init__(self, store: PostgresStore, conn: Any, key: int) -> None:
        self.store, self.conn, self.key = store, conn, key

    def alive(self) -> bool:
        return self.store._role_alive(self.conn, self.key)

    def release(self) -> None:
        self.store._release_role(self.conn, self.key)


class _PgListener:
    def __init__(self, raw: Any, prefix_len: int, pg: Any, location: str) -> None:
        self.raw, self.prefix_len, self._pg, self.location = raw, prefix_len, pg, location

    def wait(self, timeout_s: float) -> list[tuple[str, str]]:
        """What was published since the last call, waiting up to `timeout_s` for the first."""
        try:
            heard = [(n.channel[self.prefix_len:], n.payload)
                     for n in self.raw.notifies(timeout=max(timeout_s, 0.0), stop_after=1)]
            heard += [(n.channel[self.prefix_len:], n.payload)
                      for n in self.raw.notifies(timeout=0.0)]
        except self._pg.Error as exc:  # the server went away: listen again once it is back
            raise _pg_error(f"{self.location} (its wake-ups)", exc) from None
        return heard

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


# Back-ends by URL scheme: a new store is a class plus one entry here.
STORES: dict[str, type[_SqlStore]] = {"sqlite": SqliteStore, "postgresql": PostgresStore,
                                      "postgres": PostgresStore}
Journal = FleetStore = SqliteStore  # the names the 0.1 code, the fleet and their tests know


def open_store(url: str | None, home: Path) -> Store:
    """The store --pool names (no --pool: the SQLite journal in the state dir)."""
    scheme = urllib.parse.urlsplit(url).scheme if url else "sqlite"
    if scheme not in STORES:
        raise ConfigError(f"--pool {_pool_shown(url)}: unknown kind of pool {scheme!r} (use "
                          "postgresql://user@host/db, or sqlite:///path/journal.db)")
    return STORES[scheme].open(url, home)


def store_checks(url: str | None) -> list[DoctorCheck]:
    """What --doctor says about the pool --pool names."""
    scheme = urllib.parse.urlsplit(url).scheme if url else "sqlite"
    if scheme not in STORES:
        return [DoctorCheck("pool", False, f"unknown kind of pool {scheme!r}",
                            "use postgresql://user@host/db")]
    return STORES[scheme].doctor(url)


##############################################################################
# Channels (how a request reaches the model and its answer comes back: a channel owns
# every create, poll, budget and download; the agent only sends and waits)
##############################################################################

# Slack for comparing our clock with the API's created_at when reconciling a create: a
# batch made more than this BEFORE our request was sent cannot be the one it made.
CLOCK_SKEW_S = 5.0
# 429s that no retry can help: the organisation or workspace is out of money.
SPEND_LIMIT_MARK = "spend_limit"
# After a create whose outcome is unknown, wait this long before looking for its batch.
UNKNOWN_CREATE_WAIT_S = 5.0
# Slowest steady poll rate without history: 24 a minute, leaving room for the create and
# the results download within 30 a minute.
STEADY_POLL_S = 2.5
# Poll ticks allowed in any minute, however many batches are in flight: one tick is one
# list call covering all of them, so the budget no longer grows with the number of agents.
POLLS_PER_MINUTE = 28
# Every batch-endpoint request of one API key shares this budget (create, list, retrieve,
# cancel, results). The API's own limit is 1,000 a minute at the Start tier: half of it
# leaves room for other clients of the key. (At 50, the oldest tier's limit, twenty agents'
# creates and downloads queued behind it for 20 s a round.) On a lower tier, the API's 429
# and its retry-after still pace us.
BATCH_REQUESTS_PER_MINUTE = 500
# A batch missing from this many list ticks in a row is asked for by id.
MISSING_TICKS_BEFORE_RETRIEVE = 2
# An ended batch whose results_url is still null is asked for again this many times.
NULL_RESULTS_URL_TRIES = 5
# Results files fetched side by side when several batches end in one tick.
RESULTS_DOWNLOADS = 8
# Connection refused / unknown host: the request never left this machine, so trying again
# for minutes helps nobody; a few quick tries ride out a blip.
UNREACHABLE_ATTEMPTS = 3


class Clock:
    """Real time. Tests inject another: `now`, `sleep`, and `wait` on an event (where a
    Ctrl-C lands while the agent waits for a channel)."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(max(0.0, timeout_s))


@dataclass(frozen=True)
class BatchView:
    id: str
    status: str  # in_progress | canceling | ended
    created_at: float | None
    size: int
    ended_at: float | None = None
    results_url: str | None = None

    @property
    def turnaround_s(self) -> float | None:
        """How long the batch took, by the API's own clock (not when we noticed)."""
        if self.created_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.created_at)


@dataclass(frozen=True)
class EntryResult:
    """One request's result, matched by custom_id; `message` exactly as the API sent it."""

    custom_id: str
    type: str  # succeeded | errored | canceled | expired
    message: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Arrival:
    """What came back for one request: its entry (None when the batch held none for it)
    and the view of the batch that carried it (its own clock gives the turnaround)."""

    entry: EntryResult | None
    view: BatchView


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient faults (429, 5xx, 529, dropped connections) are waited out."""

    max_attempts: int = 8
    """Attempts per API call; 8 with the delays below is about 2.5 minutes of faults."""
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay_s(self, attempt: int, retry_after_s: float | None, jitter: float) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), 600.0)
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1) * (0.5 + jitter))


def next_poll_delay_s(elapsed_s: float, base_s: float, expected_s: float | None) -> float:
    """Seconds until a batch `elapsed_s` old should be looked at again.

    When past turnarounds give an expected wait, look sparsely until close to it and then
    every second, so a result is seen within about half a second of the batch ending;
    otherwise every `base_s` (2.5 s by default; a faster --poll-interval holds for the first
    10 s only), slowing down for batches that run long (most end within minutes, some take
    hours).
    """
    if elapsed_s > 3600:
        return 60.0
    if elapsed_s > 600:
        return 15.0
    if expected_s is not None and elapsed_s < 1.5 * expected_s + 5:
        lead_in_end = 0.85 * expected_s - 1.0
        if elapsed_s < lead_in_end:
            return max(base_s, min(5.0, lead_in_end - elapsed_s))
        return min(1.0, base_s)
    return base_s if elapsed_s < 10 else max(base_s, STEADY_POLL_S)


class RequestBudget:
    """A sliding minute of requests for ONE API key, shared by every thread that uses it."""

    def __init__(self, per_minute: int = BATCH_REQUESTS_PER_MINUTE,
                 clock: Clock | None = None) -> None:
        self.per_minute = per_minute
        self.clock = clock or Clock()
        self._sent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.taken = 0  # every request ever counted: a fleet reports requests per minute

    def take(self) -> None:
        """Block until one more request fits in the minute, then count it."""
        while True:
            with self._lock:
                now = self.clock.now()
                self._forget(now)
                if len(self._sent) < self.per_minute:
                    self._sent.append(now)
                    self.taken += 1
                    return
                wait_s = self._sent[0] + 60.0 - now
            self.clock.sleep(wait_s)

    def in_last_minute(self) -> int:
        with self._lock:
            self._forget(self.clock.now())
            return len(self._sent)

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - 60.0:
            self._sent.popleft()


class Ticket:
    """One request in flight on a channel: the channel resolves it, the agent waits on it."""

    def __init__(self, custom_id: str, handle: str) -> None:
        self.custom_id, self.handle = custom_id, handle
        self.event = threading.Event()
        self.status = "in_progress"
        self._arrival: Arrival | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Ticket], None]] = []
        self._lock = threading.Lock()

    def resolve(self, arrival: Arrival) -> None:
        self._arrival = arrival
        self._done()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done()

    def add_done_callback(self, callback: Callable[[Ticket], None]) -> None:
        """Run `callback(ticket)` when it is resolved (at once if it already is): how a
        batch nobody waits for any more (hurried past) still gets its cost recorded."""
        with self._lock:
            if not self.event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def _done(self) -> None:
        with self._lock:
            self.event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def result(self) -> Arrival:
        if self._error is not None:
            raise self._error
        assert self._arrival is not None, "result() before the ticket was resolved"
        return self._arrival


Notify = Callable[[str], None]
StreamListener = Callable[[str, str], None]
"""(kind, text) as an answer streams in: kind is "text" or "thinking"."""


class Channel(Protocol):
    """One lane to the model. `send` returns a handle (a batch id) that the caller journals
    before waiting; `watch` gives the ticket to wait on; `reconcile` finds what a send whose
    outcome is unknown left behind; `cancel` stops it. A new lane is a class and one entry
    in CHANNELS."""

    lane: str
    stops_on_ctrl_c: bool
    """True: Ctrl-C stops the request at once (a stream); False: the user is asked."""

    def send(self, custom_id: str, params: dict[str, Any], *, exclude: Callable[[], set[str]],
             notify: Notify) -> str: ...
    def reconcile(self, sent_at: float, *, exclude: set[str], notify: Notify,
                  custom_id: str = "") -> str | None: ...
    def watch(self, custom_id: str, handle: str, *, sent_at: float, expected_s: float | None,
              on_status: Callable[[str], None], notify: Notify,
              on_stream: StreamListener | None = None) -> Ticket: ...
    def cancel(self, handle: str, notify: Notify) -> None: ...
    def forget(self, ticket: Ticket) -> None: ...


def batch_betas(requests: Sequence[Mapping[str, Any]]) -> list[str]:
    """The anthropic-beta values a create needs: the 300K output beta for an entry that asks
    for more than its model's standard limit."""
    def over(params: Mapping[str, Any]) -> bool:
        base = base_model_id(str(params.get("model", "")))
        return base in OUTPUT_300K_MODELS and int(params.get("max_tokens", 0)) > \
            MAX_OUTPUT_TOKENS.get(base, OUTPUT_300K_TOKENS)

    return [OUTPUT_300K_BETA] if any(over(r.get("params") or {}) for r in requests) else []


class BatchAPI:
    """The Message Batches endpoints over the real `anthropic` SDK, one call each. Retries
    are ours (the SDK's are off) so the UI can say what is happening, so a create is never
    blindly re-sent, and so every request is counted against the key's budget."""

    def __init__(self, client_factory: Callable[[], Any], *, budget: RequestBudget | None = None,
                 retry: RetryPolicy = RetryPolicy(), clock: Clock | None = None,
                 jitter: Callable[[], float] | None = None) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._client_error: BaseException | None = None
        self._client_ready = threading.Event()
        self._builder: threading.Thread | None = None
        self._builder_lock = threading.Lock()
        self.budget = budget or RequestBudget(clock=clock)
        self.retry = retry
        self.clock = clock or Clock()
        self._jitter = jitter or secrets.SystemRandom().random

    def warm_up(self) -> None:
        """Start building the SDK client (importing `anthropic` takes seconds) in a thread
        of its own: a Ctrl-C can then never cut the import or the client in half."""
        with self._builder_lock:
            if self._builder is None:
                self._builder = threading.Thread(target=self._build_client, daemon=True,
                                                 name="sdk-client")
                self._builder.start()

    def _build_client(self) -> None:
        try:
            self._client = self._client_factory()
        except BaseException as exc:  # handed to the caller of .client
            self._client_error = exc
        finally:
            self._client_ready.set()

    @property
    def ready(self) -> bool:
        """The client is built: a create would go out now, not after `import anthropic`."""
        return self._client_ready.is_set() and self._client_error is None

    @property
    def client(self) -> Any:
        if self._client is None:
            self.warm_up()
            while not self._client_ready.wait(0.1):  # a short wait stays interruptible
                pass
            if self._client_error is not None:
                raise self._client_error
        return self._client

    # -- the calls ---------------------------------------------------------------
    def create(self, requests: list[dict[str, Any]], *, exclude: Callable[[], set[str]],
               notify: Notify, betas: Sequence[str] = ()) -> str:
        """Create one batch. When the outcome of a create is unknown (timeout, dropped
        connection, 5xx) list() is checked before trying again: never two paid batches.
        `betas` go into the create call (the anthropic-beta header), as a client that asked
        for them would have sent them with its own request."""
        sent_at, unknown, unreachable = self.clock.now(), False, 0
        for attempt in range(1, self.retry.max_attempts + 1):
            # After an unknown outcome, look before creating again (after the back-off, so a
            # create still being processed has had time to appear in the list).
            found = unknown and self.find(not_before=sent_at, size=len(requests),
                                          exclude=exclude(), notify=notify)
            if found:
                notify(f"a create call failed but made its batch: {found}; using it")
                return found
            try:
                self.budget.take()
                wanted = list(dict.fromkeys([*betas, *batch_betas(requests)]))
                headers = {"anthropic-beta": ",".join(wanted)} if wanted else None
                return self.client.messages.batches.create(requests=requests,
                                                           extra_headers=headers).id
            except Exception as exc:
                fault = self._classify(exc, "submitting the batch")
                unreachable = unreachable + 1 if fault.unreachable else 0
                if unreachable >= UNREACHABLE_ATTEMPTS:
                    raise Unreachable(self._unreachable_text(exc)) from None
                unknown = unknown or fault.outcome_unknown
                if fault.outcome_unknown:  # a create the API is still processing must show
                    self.clock.sleep(UNKNOWN_CREATE_WAIT_S)  # up in list() before we look
                self._back_off(attempt, fault, "submitting", notify)
        if not unknown:
            raise NotSent("the batch could not be submitted: API faults outlasted "
                          f"{self.retry.max_attempts} attempts; nothing was created")
        raise RetriesExhausted("the batch could not be submitted: API faults outlasted "
                               f"{self.retry.max_attempts} attempts")

    def find(self, *, not_before: float, size: int, exclude: set[str],
             notify: Notify) -> str | None:
        """The batch a create made, if it made one: list() shows no custom_ids, so match on
        creation time and size among batches this journal does not know (results later
        confirm the custom_id). A batch created before the request was sent is never it."""
        def recent() -> list[Any]:  # newest first: stop paging once past the window
            batches = []
            for b in self.client.messages.batches.list(limit=100):
                if b.created_at.timestamp() < not_before - CLOCK_SKEW_S:
                    break
                batches.append(b)
            return batches

        found = [b for b in self._call(recent, "listing batches", notify)
                 if b.id not in exclude and _batch_size(b) == size]
        return min(found, key=lambda b: abs(b.created_at.timestamp() - not_before)).id \
            if found else None

    def list_views(self, *, oldest: float, notify: Notify) -> dict[str, BatchView]:
        """Every batch created since `oldest`, in as few list calls as paging allows (one,
        for anything but a key shared with many other clients)."""
        def page_through() -> dict[str, BatchView]:
            views: dict[str, BatchView] = {}
            for b in self.client.messages.batches.list(limit=100):
                views[b.id] = _view(b)
                if b.created_at.timestamp() < oldest - CLOCK_SKEW_S:
                    break
            return views

        return self._call(page_through, "polling", notify)

    def retrieve(self, batch_id: str, notify: Notify) -> BatchView:
        return _view(self._call(lambda: self.client.messages.batches.retrieve(batch_id),
                                "polling", notify))

    def results(self, results_url: str, notify: Notify) -> dict[str, EntryResult]:
        """The results file in ONE request (the SDK's results() spends a retrieve first),
        parsed as plain JSON so every block is kept exactly as the API sent it."""
        def fetch() -> dict[str, EntryResult]:
            text = self.client.get(results_url, cast_to=str,
                                   options={"headers": {"Accept": "application/binary"}})
            entries = (json.loads(line) for line in text.splitlines() if line.strip())
            return {e["custom_id"]: _entry_result(e) for e in entries}

        return self._call(fetch, "fetching results", notify)

    def cancel(self, batch_id: str, notify: Notify) -> None:
        self._call(lambda: self.client.messages.batches.cancel(batch_id), "canceling", notify)

    # -- faults -------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any], doing: str, notify: Notify) -> Any:
        unreachable = 0
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                self.budget.take()
                return fn()
            except Exception as exc:
                fault = self._classify(exc, doing)
                unreachable = unreachable + 1 if fault.unreachable else 0
                if unreachable >= UNREACHABLE_ATTEMPTS:
                    raise Unreachable(self._unreachable_text(exc)) from None
                self._back_off(attempt, fault, doing, notify)
        raise RetriesExhausted(f"{doing}: API faults outlasted {self.retry.max_attempts} attempts")

    def _back_off(self, attempt: int, fault: _Fault, doing: str, notify: Notify) -> None:
        if attempt >= self.retry.max_attempts:
            return
        delay = self.retry.delay_s(attempt, fault.retry_after_s, self._jitter())
        # The truth: an unreachable host gets fewer tries, and a short delay is not "0s".
        tries = (UNREACHABLE_ATTEMPTS if fault.unreachable else self.retry.max_attempts) - 1
        shown = f"{delay:.1f}s" if delay < 10 else f"{delay:.0f}s"
        notify(f"{fault.label} while {doing}; retry {min(attempt, tries)}/{tries} in {shown}")
        self.clock.sleep(delay)

    def _unreachable_text(self, exc: Exception) -> str:
        url = str(getattr(self.client, "base_url", "")) or "the API"
        cause = exc.__cause__ or exc.__context__ or exc
        return f"cannot reach {url}: {cause}; nothing was sent (check ANTHROPIC_BASE_URL)"

    def _classify(self, exc: Exception, doing: str) -> _Fault:
        """Transient faults come back as a _Fault; anything else is raised as a clear error."""
        import anthropic

        if isinstance(exc, anthropic.APIConnectionError):
            if _never_connected(exc):
                return _Fault("connection refused", None, outcome_unknown=False, unreachable=True)
            kind = "timeout" if isinstance(exc, anthropic.APITimeoutError) else "connection lost"
            return _Fault(kind, None, outcome_unknown=True)
        if _is_transport_failure(exc):  # e.g. the results stream cut off mid-download
            return _Fault("connection lost", None, outcome_unknown=True)
        if not isinstance(exc, anthropic.APIStatusError):
            raise exc
        status, message = exc.status_code, _api_error_message(exc)
        if status == 429:
            if SPEND_LIMIT_MARK in _error_code(exc):
                raise SpendLimitReached(f"spend limit reached while {doing}: {message}") from None
            return _Fault("rate limited (429)", _retry_after_s(exc), outcome_unknown=False)
        if status >= 500 or status in (408, 409):
            return _Fault(f"API error {status}", _retry_after_s(exc), outcome_unknown=True)
        if status == 404:
            raise BatchNotFound(f"{doing}: the API does not know it (404): {message}") from None
        refused = AccountRefused if status in (401, 402, 403) else TransportError
        raise refused(f"the API refused {doing} ({status}): {message}", status=status,
                      error_type=_error_body(exc).get("type")) from None


@dataclass(frozen=True)
class _Fault:
    label: str
    retry_after_s: float | None
    outcome_unknown: bool
    unreachable: bool = False


def _never_connected(exc: Exception) -> bool:
    """Connection refused or an unknown host: the request never left this machine."""
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ in ("ConnectError", "ConnectionRefusedError", "gaierror")


def _is_transport_failure(exc: Exception) -> bool:
    """Errors the HTTP stack raises outside the SDK's wrapping (while a body streams)."""
    module = type(exc).__module__.split(".")[0]
    return module.startswith(("httpx", "httpcore")) or isinstance(exc, ConnectionError)


def _batch_size(batch: Any) -> int:
    c = batch.request_counts
    return c.processing + c.succeeded + c.errored + c.canceled + c.expired


def _view(b: Any) -> BatchView:
    ended = b.ended_at.timestamp() if b.ended_at else None
    return BatchView(b.id, b.processing_status, b.created_at.timestamp(), _batch_size(b),
                     ended, getattr(b, "results_url", None))


def _retry_after_s(exc: Any) -> float | None:
    try:
        return float(exc.response.headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


def _error_body(exc: Any) -> dict[str, Any]:
    body = getattr(exc, "body", None)
    if not isinstance(body, dict):
        return {}
    return body.get("error") if isinstance(body.get("error"), dict) else body


def _error_code(exc: Any) -> str:
    details = _error_body(exc).get("details")
    return str(details.get("error_code") or "") if isinstance(details, dict) else ""


def _api_error_message(exc: Any) -> str:
    err = _error_body(exc)
    if err:
        return f"{err.get('type', 'error')}: {err.get('message', '')}".strip()
    text = str(getattr(exc, "message", "") or exc)
    if "<html" in text.lower() or "<!doctype" in text.lower():  # a proxy's error page
        title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        return (title.group(1).strip() if title else "an HTML error page") + \
            f" (HTTP {getattr(exc, 'status_code', '?')}, from something in front of the API)"
    return text.splitlines()[0] if text else type(exc).__name__


def _entry_result(line: Mapping[str, Any]) -> EntryResult:
    result = line.get("result") or {}
    kind = str(result.get("type"))
    if kind == "succeeded":
        return EntryResult(line["custom_id"], "succeeded", dict(result.get("message") or {}))
    if kind == "errored":
        err = (result.get("error") or {}).get("error") or {}
        return EntryResult(line["custom_id"], "errored", None, err.get("type"),
                           err.get("message"))
    return EntryResult(line["custom_id"], kind)


def make_client_factory(api_key: str | None, base_url: str | None,
                        timeout_s: float = 60.0) -> Callable[[], Any]:
    """The SDK is imported here, not at start-up: `import anthropic` takes seconds."""

    def factory() -> Any:
        import anthropic

        return anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0,
                                   timeout=timeout_s)

    return factory


@dataclass
class _Watch:
    """One batch in flight and everyone waiting on it."""

    batch_id: str
    started_at: float
    expected_s: float | None
    due_at: float
    tickets: dict[str, Ticket] = field(default_factory=dict)
    listeners: list[tuple[Callable[[str], None], Notify]] = field(default_factory=list)
    missing_ticks: int = 0
    null_url_tries: int = 0


class BatchChannel:
    """The batch lane. ONE poller thread per process watches every batch in flight with one
    list call per tick (retrieve only for a batch the list did not show twice running),
    downloads each ended batch's results in one request and resolves its tickets. Modelled on
    rich's Progress: many tasks in a dict under a lock, one refresh thread."""

    lane = "batch"
    stops_on_ctrl_c = False

    def __init__(self, api: BatchAPI, *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 clock: Clock | None = None) -> None:
        self.api = api
        self.poll_interval_s = poll_interval_s
        self.clock = clock or Clock()
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._poller: threading.Thread | None = None
        self._ticks: collections.deque[float] = collections.deque()

    # -- the Channel protocol ----------------------------------------------------------
    def send(self, custom_id: str, params: dict[str, Any], *, exclude: Callable[[], set[str]],
             notify: Notify) -> str:
        return self.api.create([{"custom_id": custom_id, "params": params}], exclude=exclude,
                               notify=notify)

    @classmethod
    def from_config(cls, api: BatchAPI, config: Config) -> BatchChannel:
        return cls(api, poll_interval_s=config.poll_interval_s)

    def reconcile(self, sent_at: float, *, exclude: set[str], notify: Notify,
                  custom_id: str = "") -> str | None:
        wait_s = sent_at + UNKNOWN_CREATE_WAIT_S - self.clock.now()
        if wait_s > 0:  # a create cut off moments ago may not be listed yet
            self.clock.sleep(wait_s)
        return self.api.find(not_before=sent_at, size=1, exclude=exclude, notify=notify)

    def watch(self, custom_id: str, handle: str, *, sent_at: float, expected_s: float | None,
              on_status: Callable[[str], None], notify: Notify,
              on_stream: StreamListener | None = None) -> Ticket:
        ticket = Ticket(custom_id, handle)
        now = self.clock.now()
        # A batch just created cannot have ended: the first look waits one interval; a
        # re-attached one is looked at at once.
        first_s = next_poll_delay_s(0.0, self.poll_interval_s, expected_s) \
            if now - sent_at < self.poll_interval_s else 0.0
        with self._lock:
            watch = self._watches.get(handle)
            if watch is None:
                watch = self._watches[handle] = _Watch(handle, sent_at, expected_s, now + first_s)
            watch.tickets[custom_id] = ticket
            watch.listeners.append((on_status, notify))
            self._start_poller()
        self._wake.set()
        return ticket

    def cancel(self, handle: str, notify: Notify) -> None:
        self.api.cancel(handle, notify)
        with self._lock:
            if handle in self._watches:
                self._watches[handle].due_at = self.clock.now()  # see 'canceling' at once
        self._wake.set()

    def forget(self, ticket: Ticket) -> None:
        """Stop watching for this ticket (its waiter went away: detached)."""
        with self._lock:
            watch = self._watches.get(ticket.handle)
            if watch is not None:
                watch.tickets.pop(ticket.custom_id, None)
                if not watch.tickets:
                    del self._watches[ticket.handle]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._watches)

    def in_flight_ids(self) -> set[str]:
        with self._lock:
            return set(self._watches)

    # -- the poller ---------------------------------------------------------------------
    def _start_poller(self) -> None:
        if self._poller is None or not self._poller.is_alive():
            self._poller = threading.Thread(target=self._poll_forever, daemon=True,
                                            name="batch-poller")
            self._poller.start()

    def _poll_forever(self) -> None:
        while True:
            with self._lock:
                if not self._watches:
                    self._poller = None
                    return
                due_at = min(w.due_at for w in self._watches.values())
            delay_s = max(due_at - self.clock.now(), self._tick_budget_wait_s())
            if delay_s > 0:
                self._wake.clear()
                self.clock.wait(self._wake, delay_s)  # a new watch or a cancel wakes us
                continue
            try:
                self._tick()
            except BaseException as exc:  # a bug: every waiter hears it, none hangs
                self._fail_all(exc)

    def _tick_budget_wait_s(self) -> float:
        """Seconds until another tick fits in POLLS_PER_MINUTE (spread, not bunched)."""
        now = self.clock.now()
        while self._ticks and self._ticks[0] <= now - 60.0:
            self._ticks.popleft()
        n = len(self._ticks)
        if n >= POLLS_PER_MINUTE:
            return self._ticks[0] + 60.0 - now
        if n < POLLS_PER_MINUTE // 2:
            return 0.0
        # Past half the budget, share what is left over the time until the oldest tick leaves
        # the minute: polling never stalls, and is slowed only as much as the budget needs.
        room_s = self._ticks[0] + 60.0 - self._ticks[-1]
        return max(0.0, self._ticks[-1] + room_s / (POLLS_PER_MINUTE - n + 1) - now)

    def _tick(self) -> None:
        """One look at every batch in flight: one list call, then act on what it shows."""
        self._ticks.append(self.clock.now())
        with self._lock:
            watches = list(self._watches.values())
        oldest = min(w.started_at for w in watches)
        try:
            views = self.api.list_views(oldest=oldest, notify=self._notify_all)
        except HarnessError as exc:
            self._fail_all(exc)
            return
        ended = [(w, v) for w in watches if (v := self._look(w, views.get(w.batch_id)))]
        if len(ended) > 1:  # many batches ending at once: fetch their results side by side
            with concurrent.futures.ThreadPoolExecutor(RESULTS_DOWNLOADS) as pool:
                list(pool.map(lambda wv: self._collect(*wv), ended))
        elif ended:
            self._collect(*ended[0])

    def _look(self, watch: _Watch, view: BatchView | None) -> BatchView | None:
        """Act on what a tick showed of one batch; the view when it has ended."""
        if view is None:
            watch.missing_ticks += 1
            if watch.missing_ticks < MISSING_TICKS_BEFORE_RETRIEVE:
                watch.due_at = self.clock.now()
                return None
            try:
                view = self.api.retrieve(watch.batch_id, self._notifier(watch))
            except HarnessError as exc:
                self._finish(watch, error=exc)
                return None
        watch.missing_ticks = 0
        for on_status, _ in list(watch.listeners):
            on_status(view.status)
        if view.status == "ended":
            return view
        elapsed = self.clock.now() - watch.started_at
        watch.due_at = self.clock.now() + next_poll_delay_s(elapsed, self.poll_interval_s,
                                                            watch.expected_s)
        return None

    def _collect(self, watch: _Watch, view: BatchView) -> None:
        if not view.results_url:  # allowed by the schema; the file shows up a little later
            watch.null_url_tries += 1
            if watch.null_url_tries > NULL_RESULTS_URL_TRIES:
                self._finish(watch, error=TransportError(
                    f"batch {watch.batch_id} ended but the API gives no results_url; resume "
                    "later to fetch its results"))
                return
            self._notifier(watch)(f"batch {watch.batch_id} ended without a results_url yet; "
                                  "asking again")
            watch.due_at = self.clock.now() + min(30.0, 2.0 ** watch.null_url_tries)
            return
        try:
            results = self.api.results(view.results_url, self._notifier(watch))
            if any(cid not in results for cid in watch.tickets):  # a cut download: once more
                results = {**self.api.results(view.results_url, self._notifier(watch)),
                           **results}
        except HarnessError as exc:
            self._finish(watch, error=exc)
            return
        self._finish(watch, view=view, results=results)

    def _finish(self, watch: _Watch, *, view: BatchView | None = None,
                results: Mapping[str, EntryResult] | None = None,
                error: BaseException | None = None) -> None:
        with self._lock:
            self._watches.pop(watch.batch_id, None)
        for custom_id, ticket in watch.tickets.items():
            if error is not None or view is None:
                ticket.fail(error or AssertionError("finished without a view"))
            else:
                ticket.resolve(Arrival((results or {}).get(custom_id), view))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            self._finish(watch, error=exc)

    def _notifier(self, watch: _Watch) -> Notify:
        def notify(text: str) -> None:
            for _, listener in list(watch.listeners):
                listener(text)

        return notify

    def _notify_all(self, text: str) -> None:
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            self._notifier(watch)(text)


# -- the pooler: many agents' turns in one batch ---------------------------------------
# A batch is priced per entry, not per batch, and returns nothing until its slowest entry
# ends, so pooling saves requests and rate budget, never money: pool narrow and flush fast.
DEFAULT_MAX_WIDTH = 32
# The longest a ready turn waits for company when some agent is still busy with tools.
MAX_POOL_WINDOW_S = 5.0
POOL_WINDOW_SHARE = 0.05  # ...or 5 % of the model's median turnaround, when that is shorter
# max_tokens bounds: a turn allowed a huge answer runs long and would hold small ones back.
SIZE_CLASSES = (8_192, 32_768)


def size_class(params: Mapping[str, Any]) -> int:
    max_tokens = int(params.get("max_tokens") or 0)
    return sum(1 for bound in SIZE_CLASSES if max_tokens > bound)


@dataclass
class _Queued:
    """One agent's turn waiting in the pool for its batch."""

    custom_id: str
    params: dict[str, Any]
    ready_at: float
    due_at: float
    exclude: Callable[[], set[str]]
    notify: Notify
    done: threading.Event = field(default_factory=threading.Event)
    batch_id: str | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class PoolFlush:
    """One pooled create, for the pool line and the summary."""

    batch_id: str | None
    model: str
    width: int
    reason: str  # all waiting | window | width cap
    sent_at: float
    delays_s: tuple[float, ...]  # ready -> sent, per entry


class PoolJournal(Protocol):
    """Where a pooled create is written down BEFORE it is made (the store's fleet runs)."""

    def begin_pool_batch(self, model: str, reason: str, sent_at: float,
                         custom_ids: Sequence[str], delays: Sequence[float]) -> int: ...
    def set_pool_batch(self, pool_id: int, batch_id: str | None) -> None: ...


def first_time(seen: set[str], key: str, lock: threading.RLock | threading.Lock) -> bool:
    """Add `key` to `seen` under `lock`; True only for the first caller (a batch shared by
    many agents is cancelled, or reported, once however many of them ask)."""
    with lock:
        if key in seen:
            return False
        seen.add(key)
        return True


class PooledBatchChannel:
    """The batch lane for a fleet: agents `send` as they would on BatchChannel, and their
    turns are pooled into ONE create when every active agent is waiting on the model (no
    one else can arrive), when a window passes, or at the width cap; grouped by model and
    by size. Waiting is the BatchChannel's: one poller, one list call per tick for every
    batch in flight, results by custom_id. `join`/`leave` tell it how many agents are
    active, so it knows when nobody else is coming."""

    lane = "batch"
    stops_on_ctrl_c = False  # a paid batch in flight: the user (or the fleet) decides
    cancel_scope = "cancel every batch in flight"  # every one carries only this run's turns

    def __init__(self, batch: BatchChannel, *, journal: PoolJournal | None = None,
                 max_width: int = DEFAULT_MAX_WIDTH,
                 window_s: Callable[[str], float] = lambda _model: MAX_POOL_WINDOW_S,
                 clock: Clock | None = None) -> None:
        self.batch, self.api = batch, batch.api
        self.journal, self.max_width, self.window_s = journal, max_width, window_s
        self.clock = clock or Clock()
        self.flushes: list[PoolFlush] = []
        self._groups: dict[tuple[str, int], list[_Queued]] = {}
        self._waiting: dict[str, Ticket | None] = {}  # custom_id -> its ticket once watched
        self._active = 0
        self._halted: BaseException | None = None
        self._canceled: set[str] = set()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    # -- who is active -------------------------------------------------------------------
    def join(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
        self._wake.set()  # one fewer to wait for: the rest may all be waiting now

    def halt(self, error: BaseException) -> None:
        """Take no more requests (a fleet stopping, a key refused); queued turns get `error`
        and stay unsent, so a resume sends them."""
        with self._lock:
            self._halted = error
            queued = [q for group in self._groups.values() for q in group]
            self._groups.clear()
        for q in queued:
            self._settle(q, error=error)

    # -- the Channel protocol ----------------------------------------------------------
    def send(self, custom_id: str, params: dict[str, Any], *, exclude: Callable[[], set[str]],
             notify: Notify) -> str:
        """Queue the turn and block until the batch carrying it is created; its id then."""
        now = self.clock.now()
        queued = _Queued(custom_id, params, now, now + self.window_s(str(params.get("model"))),
                         exclude, notify)
        with self._lock:
            if self._halted is not None:
                raise self._halted
            key = (str(params.get("model")), size_class(params))
            self._groups.setdefault(key, []).append(queued)
            self._waiting[custom_id] = None
            self._start_flusher()
        self._wake.set()
        while not queued.done.wait(0.5):  # resolved by the flusher, or by halt()
            pass
        if queued.error is not None:
            raise queued.error
        assert queued.batch_id is not None
        return queued.batch_id

    def reconcile(self, sent_at: float, *, exclude: set[str], notify: Notify,
                  custom_id: str = "") -> str | None:
        """A pooled create is found by `recover` (it knows the batch's width); a row still
        unsent after that was never in a create."""
        return None

    def watch(self, custom_id: str, handle: str, *, sent_at: float, expected_s: float | None,
              on_status: Callable[[str], None], notify: Notify,
              on_stream: StreamListener | None = None) -> Ticket:
        ticket = self.batch.watch(custom_id, handle, sent_at=sent_at, expected_s=expected_s,
                                  on_status=on_status, notify=notify, on_stream=on_stream)
        with self._lock:
            self._waiting[custom_id] = ticket
        self._wake.set()  # a re-attached agent waits too: maybe everyone does now
        return ticket

    def cancel(self, handle: str, notify: Notify) -> None:
        """A pooled batch can only be cancelled whole: once, however many agents ask."""
        if first_time(self._canceled, handle, self._lock):
            self.batch.cancel(handle, notify)

    def forget(self, ticket: Ticket) -> None:
        self.batch.forget(ticket)
        with self._lock:
            self._waiting.pop(ticket.custom_id, None)

    # -- recovery after a crash -----------------------------------------------------------
    def recover(self, journal: Store, run_id: str, notify: Notify) -> list[str]:
        """Creates that were under way when the fleet died: look each up ONCE by time and
        width (list() shows no custom_ids) and give its entries the batch id, so no turn is
        paid twice; a create that made nothing leaves its rows to be sent afresh."""
        return recover_pooled_creates(self.api, self.clock, journal, run_id, notify)

    def close(self) -> None:
        """Nothing to let go of: the flusher and the poller end with their work."""

    # -- what the pool line shows ---------------------------------------------------------
    def widths_in_flight(self) -> list[int]:
        flying = self.batch.in_flight_ids()
        with self._lock:
            return [f.width for f in self.flushes if f.batch_id in flying]

    def queued(self) -> int:
        with self._lock:
            return sum(len(g) for g in self._groups.values())

    def next_flush(self) -> tuple[float, str] | None:
        """(seconds until the next flush, why), or None when nothing is queued."""
        with self._lock:
            if not self._groups:
                return None
            due = min(g[0].due_at for g in self._groups.values())
            return max(0.0, due - self.clock.now()), "window"

    # -- the flusher ------------------------------------------------------------------------
    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_forever, daemon=True,
                                             name="pool-flusher")
            self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            with self._lock:
                if not self._groups:
                    self._flusher = None
                    return
                due, wait_s = self._take_due(self.clock.now())
            for key, entries, reason in due:
                self._create(key[0], entries, reason)
            if not due:
                self._wake.clear()
                self.clock.wait(self._wake, wait_s)  # a new turn or a leaver wakes us

    def _take_due(self, now: float) -> tuple[list[tuple[tuple[str, int], list[_Queued], str]],
                                                 float]:
        """The groups to send now (taken off the queue), and how long until the next is due."""
        everyone = self._all_waiting()
        due = []
        for key, group in list(self._groups.items()):
            reason = ("width cap" if len(group) >= self.max_width else "all waiting"
                      if everyone else "window" if group[0].due_at <= now else None)
            if reason is None:
                continue
            due.append((key, group[:self.max_width], reason))
            rest = group[self.max_width:]
            if rest:
                self._groups[key] = rest
            else:
                del self._groups[key]
        pending = [g[0].due_at - now for g in self._groups.values()]
        return due, max(0.0, min(pending, default=1.0))

    def _all_waiting(self) -> bool:
        """Every active agent is waiting on the model: no turn can join a batch made later."""
        for custom_id, ticket in list(self._waiting.items()):
            if ticket is not None and ticket.done:
                del self._waiting[custom_id]
        return len(self._waiting) >= self._active

    def _create(self, model: str, entries: list[_Queued], reason: str) -> None:
        """One create for the group (retries off, reconciled by list, as for one agent)."""
        sent_at = self.clock.now()
        ids = [q.custom_id for q in entries]
        delays = tuple(round(sent_at - q.ready_at, 3) for q in entries)
        pool_id = self.journal.begin_pool_batch(model, reason, sent_at, ids, delays) \
            if self.journal else None
        try:
            batch_id = self.api.create(
                [{"custom_id": q.custom_id, "params": q.params} for q in entries],
                exclude=entries[0].exclude, notify=self._fan_out(entries))
        except HarnessError as exc:
            if isinstance(exc, NotSent) and pool_id is not None and self.journal:
                self.journal.set_pool_batch(pool_id, None)
            if isinstance(exc, (AccountRefused, SpendLimitReached)):
                self.halt(exc)  # no request of this key can go: stop them all, resumably
            for q in entries:
                self._settle(q, error=exc)
            return
        if pool_id is not None and self.journal:
            self.journal.set_pool_batch(pool_id, batch_id)
        with self._lock:
            self.flushes.append(PoolFlush(batch_id, model, len(entries), reason, sent_at, delays))
        for q in entries:
            self._settle(q, batch_id=batch_id)

    def _settle(self, q: _Queued, *, batch_id: str | None = None,
                error: BaseException | None = None) -> None:
        if error is not None:
            with self._lock:
                self._waiting.pop(q.custom_id, None)
        q.batch_id, q.error = batch_id, error
        q.done.set()

    @staticmethod
    def _fan_out(entries: list[_Queued]) -> Notify:
        def notify(text: str) -> None:
            for q in entries:
                q.notify(text)

        return notify


def recover_pooled_creates(api: BatchAPI, clock: Clock, journal: Store, run_id: str,
                           notify: Notify) -> list[str]:
    """A fleet run's pooled creates cut by a crash, each looked up ONCE by time and width."""
    found = []
    for pooled in journal.pool_batches(run_id, state="creating"):
        wait_s = pooled.sent_at + UNKNOWN_CREATE_WAIT_S - clock.now()
        if wait_s > 0:  # a create cut off moments ago may not be listed yet
            clock.sleep(wait_s)
        batch_id = api.find(not_before=pooled.sent_at, size=pooled.width,
                            exclude=journal.known_batch_ids(), notify=notify)
        journal.set_pool_batch(pooled.id, batch_id)
        if batch_id:
            found.append(batch_id)
    return found


# The handle a synchronous request is journaled under until its stream ends.
SYNC_HANDLE_PREFIX = "sync_"


@dataclass
class _Stream:
    custom_id: str
    params: dict[str, Any]
    ticket: Ticket
    stop: threading.Event = field(default_factory=threading.Event)


class SyncChannel:
    """The synchronous lane: the Messages API with streaming, at full price and at once.
    `send` accepts the request (the caller journals its handle); `watch` starts the stream
    in a thread of its own, passes text and thinking to `on_stream` as it arrives, and
    resolves the ticket with the final message. A stream cut by a crash cannot be re-joined:
    its handle is unknown to a new process, and the ticket says so (the turn is sent again,
    and paid again)."""

    lane = "sync"
    stops_on_ctrl_c = True

    def __init__(self, api: BatchAPI, *, clock: Clock | None = None) -> None:
        self.api = api
        self.clock = clock or Clock()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, api: BatchAPI, config: Config) -> SyncChannel:
        return cls(api)

    def send(self, custom_id: str, params: dict[str, Any], *, exclude: Callable[[], set[str]],
             notify: Notify) -> str:
        handle = SYNC_HANDLE_PREFIX + custom_id
        with self._lock:
            self._streams[handle] = _Stream(custom_id, params, Ticket(custom_id, handle))
        return handle

    def reconcile(self, sent_at: float, *, exclude: set[str], notify: Notify,
                  custom_id: str = "") -> str | None:
        return None  # nothing outlives a stream: the caller sends it again

    def watch(self, custom_id: str, handle: str, *, sent_at: float, expected_s: float | None,
              on_status: Callable[[str], None], notify: Notify,
              on_stream: StreamListener | None = None) -> Ticket:
        with self._lock:
            stream = self._streams.get(handle)
        if stream is None:  # sent by a process that is gone: the answer went with it
            ticket = Ticket(custom_id, handle)
            ticket.resolve(Arrival(EntryResult(
                custom_id, "errored", None, "stream_lost", "the synchronous answer was cut "
                "off when the harness stopped; it is sent again (and paid again)"),
                BatchView(handle, "ended", sent_at, 1, self.clock.now())))
            return ticket
        threading.Thread(target=self._run, args=(stream, on_status, on_stream or _ignore),
                         daemon=True, name=f"stream-{custom_id}").start()
        return stream.ticket

    def cancel(self, handle: str, notify: Notify) -> None:
        with self._lock:
            stream = self._streams.get(handle)
        if stream is not None:
            stream.stop.set()

    def forget(self, ticket: Ticket) -> None:
        self.cancel(ticket.handle, _ignore)

    def _run(self, stream: _Stream, on_status: Callable[[str], None],
             on_stream: StreamListener) -> None:
        started = self.clock.now()
        try:
            entry = self._stream(stream, on_status, on_stream)
        except BaseException as exc:  # a bug: the waiter hears it instead of hanging
            stream.ticket.fail(exc)
            return
        finally:
            with self._lock:
                self._streams.pop(stream.ticket.handle, None)
        stream.ticket.resolve(Arrival(entry, BatchView(stream.ticket.handle, "ended", started,
                                                       1, self.clock.now())))

    def _stream(self, stream: _Stream, on_status: Callable[[str], None],
                on_stream: StreamListener) -> EntryResult:
        import anthropic

        cid = stream.custom_id
        try:
            with self.api.client.messages.stream(**stream.params) as events:
                on_status("streaming")
                for event in events:
                    if stream.stop.is_set():  # Ctrl-C: what came so far is not applied
                        snapshot = events.current_message_snapshot
                        return EntryResult(cid, "canceled", _sync_message(snapshot))
                    if event.type in ("text", "thinking"):
                        on_stream(event.type, getattr(event, event.type))
                return EntryResult(cid, "succeeded", _sync_message(events.get_final_message()))
        except anthropic.APIStatusError as exc:
            body = _error_body(exc)
            return EntryResult(cid, "errored", None, str(body.get("type") or "api_error"),
                               _api_error_message(exc))
        except Exception as exc:
            if not (isinstance(exc, anthropic.APIConnectionError) or _is_transport_failure(exc)):
                raise
            return EntryResult(cid, "errored", None, "stream_lost",
                               f"the stream was cut off ({type(exc).__name__}); nothing of "
                               "it is applied")


def _sync_message(message: Any) -> dict[str, Any]:
    """A streamed Message as plain data, in the shape a batch result carries."""
    return message.model_dump(mode="json", exclude_none=True)


def _ignore(*_args: Any) -> None:
    return None


# Lanes by name: a new lane is a class plus one entry here. (PooledBatchChannel is not a lane
# of its own: it is the batch lane of a fleet, built by the fleet around one BatchChannel.)
CHANNELS: dict[str, type[Any]] = {"batch": BatchChannel, "sync": SyncChannel}


##############################################################################
# Agent loop (never prints: it emits events and asks the UI through callbacks)
##############################################################################

SYSTEM_PROMPT = """\
You are a careful software engineer working in the directory {workdir} through two tools: \
bash (each command runs in a sandbox: the working directory carries over between calls, \
network is off unless the user allowed some domains, nothing outside the work directory is \
writable; files such as .bashrc, .gitconfig, .mcp.json and a .claude/ directory may show up \
in listings as empty character devices: they are the sandbox's write-blocking placeholders, \
not part of the project, so ignore them) and str_replace_based_edit_tool (view, create, \
str_replace, insert). Every turn of \
yours is processed as a Message Batch and takes a minute or more, so make each turn count: \
issue independent tool calls together in one turn, and read enough at once. When the task is \
done, reply with a short summary of what you did and what you found."""
# A batch entry cancelled by a run this turn's process never asked (a shared batch): the
# turn goes into a later batch, bounded as an expired one is. Stored as its error_type.
CANCELED_ELSEWHERE = "canceled_elsewhere"
RESUBMITTABLE = ("expired", "api_error", "overloaded_error", "timeout_error", "rate_limit_error",
                 "stream_lost", CANCELED_ELSEWHERE)
# What a canceled request means to the user, by lane.
CANCELED_WHY = {
    "batch": "the batch was canceled before the model answered; nothing was billed",
    "sync": "the stream was stopped; its partial answer is not applied (the tokens it had "
            "produced are billed)",
}
RESULTS_RETENTION_S = 29 * 86400
# Batches adopted for one turn after an unknown create before giving up: list() shows no
# custom_ids, so a match by time and size is confirmed only by the results.
MAX_ADOPTIONS = 3
# How often a waiting agent wakes to check its ticket; Ctrl-C lands at once regardless.
WAIT_SLICE_S = 0.25


@dataclass(frozen=True)
class AgentSettings:
    """What one agent needs of the Config (built from it by name, see settings_from)."""

    model: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    cache_ttl: str | None = DEFAULT_CACHE_TTL
    max_turns: int | None = None
    max_budget_usd: float | None = None
    max_resubmits: int = 3
    """Times an expired or transiently errored request is sent again before the turn fails."""
    max_wait_s: float | None = None
    """Past this, a batch turn is hurried onto the sync lane (None: auto uses the p90)."""
    system: str | None = None
    """The system prompt; None: SYSTEM_PROMPT for the session's work dir. A fleet gives all
    its agents one text (no per-agent path in it) so they share one cached prefix."""


# Events: what the loop tells the UI. Each is a small frozen record that carries its
# session id (stamped by the agent), so one UI can show many agents.
@dataclass(frozen=True)
class TurnSent:
    handle: str
    custom_id: str
    model: str
    turn: int
    sent_at: float
    estimate_usd: float | None
    expected_s: float | None
    lane: str = "batch"
    session_id: str = ""


@dataclass(frozen=True)
class TurnWaiting:
    handle: str
    status: str
    session_id: str = ""
    sent_at: float | None = None
    """When the request was sent: a batch re-attached after a restart shows its true age."""
    expected_s: float | None = None
    turn: int = 0
    """The request's number in its session, as TurnSent gave it (0: unknown)."""


@dataclass(frozen=True)
class TurnEnded:
    handle: str
    result_type: str
    wait_s: float
    usage: Usage | None
    cost: CostBreakdown | None
    lane: str = "batch"
    session_id: str = ""


@dataclass(frozen=True)
class StreamDelta:
    """Part of an answer as it streams in (sync lane): kind is "text" or "thinking"."""

    kind: str
    text: str
    session_id: str = ""


@dataclass(frozen=True)
class AssistantText:
    text: str
    session_id: str = ""


@dataclass(frozen=True)
class ToolStarted:
    label: str
    session_id: str = ""


@dataclass(frozen=True)
class ToolFinished:
    label: str
    result: ToolResult
    session_id: str = ""


@dataclass(frozen=True)
class Notice:
    text: str
    level: str = "info"  # info | warn | error
    session_id: str = ""


Event = (TurnSent | TurnWaiting | TurnEnded | StreamDelta | AssistantText | ToolStarted
         | ToolFinished | Notice)


@dataclass(frozen=True)
class RunResult:
    """What one run of the loop produced (headless mode prints it)."""

    text: str
    stop_reason: str | None


@dataclass(frozen=True)
class RunReport:
    """What a front-end may show about a run: the requests it touched, the model, the answer."""

    session_id: str
    model: str
    requests: tuple[RequestRow, ...]
    answer: str
    in_flight: RequestRow | None
    turn_numbers: tuple[int, ...] = ()
    """Each request's number in its session (the live line's `turn N`, /stats' row N);
    empty: 1, 2, ... (a run that made every request of its session)."""


def build_params(settings: AgentSettings, workdir: Path, tools: list[dict[str, Any]],
                 messages: list[dict[str, Any]], previous_end: int | None) -> dict[str, Any]:
    """The Messages body for one turn. The system prompt never changes within a session, so
    the cached prefix (tools, system, transcript) stays valid from turn to turn."""
    params = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "system": [{"type": "text",
                    "text": settings.system or SYSTEM_PROMPT.format(workdir=workdir)}],
        "tools": tools,
        "messages": messages,
    }
    return add_cache_breakpoints(params, settings.cache_ttl, previous_end=previous_end)


def unanswered_tool_uses(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    if message.get("role") != "assistant" or not isinstance(message.get("content"), list):
        return []
    return [b for b in message["content"] if isinstance(b, dict) and b.get("type") == "tool_use"]


def tool_result_block(tool_use_id: str, result: ToolResult) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id,
                             "content": result.output or "(no output)"}
    if result.is_error:
        block["is_error"] = True
    return block


def final_text(content: Any) -> str:
    blocks = _as_blocks(content) if content else []
    return "\n\n".join(b.get("text", "") for b in blocks if b.get("type") == "text").strip()


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Verdict:
    """What to do with an ended request: apply | resubmit | look_again | fail (why)."""

    action: str
    reason: str = ""


def classify(request: RequestRow, max_resubmits: int) -> Verdict:
    """Pure: the journal's record of an ended request in, what the loop does next out."""
    kind = request.result_type
    if kind == "succeeded":
        return Verdict("apply")
    if kind == "missing":  # an adopted batch that was not ours, or a cut download
        return Verdict("look_again")
    if kind == "expired" or (kind == "errored" and request.error_type in RESUBMITTABLE):
        return retry_verdict(request, max_resubmits)
    if kind == "errored":
        return Verdict("fail", f"the API refused this turn ({request.error_type}: "
                               f"{request.error_message}); nothing was billed")
    if kind == "canceled" and request.error_type == CANCELED_ELSEWHERE:
        return retry_verdict(request, max_resubmits)
    if kind == "canceled":
        return Verdict("fail", CANCELED_WHY[request.lane])
    raise AssertionError(f"unknown result type {kind!r}")


def retry_verdict(request: RequestRow, max_resubmits: int) -> Verdict:
    reason = (f"{request.error_type}: {request.error_message}"
              if request.result_type == "errored" else str(request.result_type))
    if request.attempt >= max_resubmits:
        return Verdict("fail", f"the turn failed {request.attempt} times ({reason}); "
                               "send the prompt again to retry")
    return Verdict("resubmit", f"batch entry {reason}; resubmitting (attempt "
                               f"{request.attempt + 1} of {max_resubmits})")


def answer_content(message: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The content that joins the transcript, exactly as the API sent it, or None: a refused
    turn's partial output is discarded (never acted on, never resent)."""
    if message.get("stop_reason") == "refusal":
        return None
    # Empty text blocks are the one thing dropped: the API refuses them as input ("text
    # content blocks must be non-empty"). Everything else goes back byte for byte.
    content = [b for b in message.get("content") or [] if not _is_empty_text(b)]
    return content or None


def outcome_of(request: RequestRow, arrival: Arrival, now: float) -> Outcome:
    """Pure: how a request ended, priced for its lane, as the journal records it."""
    view, entry = arrival.view, arrival.entry
    wait_s = view.turnaround_s if view.turnaround_s is not None else now - request.submitted_at
    if entry is None:
        return Outcome("missing", now, wait_s, error_message="result not in the batch")
    if entry.type != "succeeded" or entry.message is None:
        usage = Usage.from_api(entry.message.get("usage")) if entry.message else None
        cost = usage and cost_breakdown(request.model, usage, lane=request.lane,
                                        requested_ttl=request.cache_ttl)
        return Outcome(entry.type, now, wait_s, error_type=entry.error_type,
                       error_message=entry.error_message, usage=usage, cost=cost or None)
    usage = Usage.from_api(entry.message.get("usage"))
    cost = cost_breakdown(request.model, usage, lane=request.lane,
                          requested_ttl=request.cache_ttl)
    if entry.message.get("stop_reason") == "refusal" and not entry.message.get("content"):
        cost = CostBreakdown(0.0, 0.0, 0.0)  # a refusal before any output is not charged
    return Outcome("succeeded", now, wait_s, entry.message, usage=usage, cost=cost)


# -- routing: which lane carries a turn ---------------------------------------------
# Until a model has this many measured batch turnarounds, auto assumes TURNAROUND_PRIOR_S:
# reports of one-entry batches range from about 90 s to over 30 minutes; 2 minutes is the
# middle of what this project has seen, and the estimate switches to measured data quickly.
ROUTE_SAMPLES = 5
TURNAROUND_PRIOR_S = 120.0
# auto hurries a batch that has taken this many times the model's p90 turnaround: by then
# it is stuck in the queue, not merely slow (at 1x, one turn in ten would pay twice).
AUTO_MAX_WAIT_P90_FACTOR = 2.0
# Turns over which auto spreads the cost of writing the prefix into a lane's cache anew.
SWITCH_HORIZON_TURNS = 4
# Output tokens auto expects when the conversation has no earlier turn to go by.
EXPECTED_OUTPUT_TOKENS = 500


@dataclass(frozen=True)
class RouteDecision:
    lane: str
    why: str | None = None
    """auto's reasoning in one line with its numbers; None for a fixed route."""


def lane_price_usd(model: str, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                   *, lane: str, ttl: str | None) -> float | None:
    """What a request would cost on `lane`: `cached_tokens` of its prompt read from that
    lane's cache, the rest written (or plain input without caching), plus the output."""
    price = price_for(model, prompt_tokens)
    if price is None:
        return None
    fresh = max(0, prompt_tokens - cached_tokens)
    usage = Usage(input_tokens=0 if ttl else fresh, output_tokens=output_tokens,
                  cache_creation_input_tokens=fresh if ttl else 0,
                  cache_read_input_tokens=cached_tokens)
    writes = (0, fresh) if ttl == "1h" else (fresh, 0) if ttl else (0, 0)
    return _dollars(price, usage, writes, _rate(lane))


class Router:
    """Chooses each turn's lane. `batch` and `sync` are fixed; `auto` goes batch only when
    the saving per minute waited is at least the user's price of waiting. Batch and sync do
    not reliably share cache entries, so a lane's estimate counts a cache hit only when the
    previous turn ran on that same lane."""

    def __init__(self, channels: Mapping[str, Channel], route: str = "batch",
                 wait_price_usd_per_min: float = INTERACTIVE_WAIT_PRICE) -> None:
        self.channels = dict(channels)
        self.route = route
        self.wait_price_usd_per_min = wait_price_usd_per_min

    def channel(self, lane: str) -> Channel:
        return self.channels[lane]

    def can_hurry(self) -> bool:
        return "sync" in self.channels and "batch" in self.channels

    def choose(self, params: Mapping[str, Any], *, previous: RequestRow | None,
               waits: Sequence[float], force: str | None = None) -> RouteDecision:
        if force is not None:
            return RouteDecision(force, f"{force} · hurried")
        if self.route != "auto":
            return RouteDecision(self.route)
        return self._auto(params, previous, waits)

    def _auto(self, params: Mapping[str, Any], previous: RequestRow | None,
              waits: Sequence[float]) -> RouteDecision:
        model, ttl = str(params.get("model")), _request_ttl(params)
        prompt = _estimate_prompt_tokens(params)
        output = previous.usage_value.output_tokens if previous and previous.usage else (
            EXPECTED_OUTPUT_TOKENS)
        output = min(output, int(params.get("max_tokens") or output))

        def cost(lane: str) -> float | None:
            # Staying on a lane, its cache holds the prefix the previous turn sent; a lane
            # the previous turn did not use has no entry for it (the lanes share none), so
            # moving there pays to write the prefix again, spread over SWITCH_HORIZON_TURNS
            # (a lane is rarely left after one turn; charging it all now locks a session in).
            prefix = previous.usage_value.prompt_tokens if previous and ttl else 0
            prefix = min(prefix, prompt)
            stay = lane_price_usd(model, prompt, prefix, output, lane=lane, ttl=ttl)
            if stay is None or previous is None or previous.lane == lane or not prefix:
                return stay
            cold = lane_price_usd(model, prompt, 0, output, lane=lane, ttl=ttl)
            return None if cold is None else stay + (cold - stay) / SWITCH_HORIZON_TURNS

        sync_usd, batch_usd = cost("sync"), cost("batch")
        if sync_usd is None or batch_usd is None:
            return RouteDecision("batch", f"batch · price unknown for {model}")
        measured = len(waits) >= ROUTE_SAMPLES
        wait_s = (median(waits) or TURNAROUND_PRIOR_S) if measured else TURNAROUND_PRIOR_S
        saving = sync_usd - batch_usd
        per_min = saving / max(wait_s / 60, 1e-9)
        lane = "batch" if per_min >= self.wait_price_usd_per_min else "sync"
        sign = "≥" if lane == "batch" else "<"
        source = "" if measured else " (prior)"
        return RouteDecision(lane, f"{lane} · saves {fmt_usd(saving)} for ~{fmt_elapsed(wait_s)}"
                                   f"{source} → {fmt_usd(per_min)}/min {sign} "
                                   f"{fmt_usd(self.wait_price_usd_per_min)}/min")


def _request_ttl(params: Mapping[str, Any]) -> str | None:
    ttls = {ttl for _, ttl in _cache_markers(params)}
    return "1h" if "1h" in ttls else "5m" if ttls else None



def check_limits(settings: AgentSettings, turns: int, estimate_usd: float | None,
                 committed_usd: float) -> None:
    """Pure: BudgetExceeded when sending one more turn would break --max-turns or
    --max-budget-usd (the estimate is an upper bound, so the budget is never crossed on
    the prompt side)."""
    if settings.max_turns is not None and turns >= settings.max_turns:
        raise BudgetExceeded(f"--max-turns {settings.max_turns} reached for this prompt; "
                             "send another prompt to let it go on")
    if settings.max_budget_usd is None:
        return
    if estimate_usd is None:
        raise BudgetExceeded(f"price unknown for {settings.model}: cannot keep --max-budget-usd")
    if committed_usd + estimate_usd > settings.max_budget_usd:
        raise BudgetExceeded(
            f"not submitted: {fmt_usd(committed_usd)} committed + up to {fmt_usd(estimate_usd)} "
            f"for this turn would pass --max-budget-usd {settings.max_budget_usd:g}")


def attempt_number(recent: Sequence[RequestRow], conversation: int, n_messages: int) -> int:
    """Pure: consecutive resubmissions of the same transcript (newest requests first)."""
    attempt = 1
    for r in recent:
        if r.conversation != conversation or r.n_messages != n_messages:
            break
        if r.state == "failed" and (r.result_type in ("expired", "missing")
                                    or r.error_type in RESUBMITTABLE):
            attempt = max(attempt, r.attempt + 1)
    return attempt


class ToolRunner:
    """Runs the tool calls of one assistant message and journals each: a call is recorded
    as started BEFORE it runs, so a crash mid-command is reported, never silently re-run."""

    def __init__(self, store: Store, toolbox: Toolbox, emit: Callable[[Event], None]) -> None:
        self.store, self.toolbox, self.emit = store, toolbox, emit

    def answer(self, session: SessionRow, assistant: dict[str, Any]) -> None:
        """Answer every tool_use of the last assistant message in ONE user message.
        Calls finished before a crash are not run again: their results are in the journal."""
        request = self.store.last_applied(session.id, session.conversation)
        custom_id = request.custom_id if request else "unknown"
        done = self.store.tool_results(custom_id)
        calls = unanswered_tool_uses(assistant)
        cut_off = request is not None and request.stop_reason in (
            "max_tokens", "model_context_window_exceeded")
        blocks = []
        for i, call in enumerate(calls):
            if call.get("id") in done:
                result = done[call["id"]] or self._interrupted(custom_id, call)
            elif cut_off and i == len(calls) - 1:
                result = ToolResult("not run: this tool call was cut off by max_tokens, so its "
                                    "input is incomplete; send it again, shorter", True)
            else:
                result = self._run_tool(custom_id, call)
            blocks.append(tool_result_block(str(call.get("id")), result))
        self.store.add_tool_results(session.id, session.conversation, blocks)

    def _run_tool(self, custom_id: str, call: dict[str, Any]) -> ToolResult:
        name, tool_input, tool_use_id = str(call.get("name")), call.get("input"), str(call.get("id"))
        label = describe_tool_call(name, tool_input)
        self.emit(ToolStarted(label))
        self.store.start_tool(custom_id, tool_use_id, name, tool_input)
        result = self.toolbox.run(name, tool_input)
        self.store.record_tool(custom_id, tool_use_id, result)
        self.emit(ToolFinished(label, result))
        for warning in result.warnings:
            self.emit(Notice(warning, "warn"))
        return result

    def _interrupted(self, custom_id: str, call: dict[str, Any]) -> ToolResult:
        """A call the harness was killed in the middle of: not run again blindly, since it
        may have half-happened (an append, a migration); the model decides."""
        result = ToolResult("interrupted: the harness stopped while this call ran, so it may "
                            "have partly taken effect. Check its effects before running it "
                            "again.", True)
        self.store.record_tool(custom_id, str(call.get("id")), result)
        self.emit(Notice(f"{describe_tool_call(str(call.get('name')), call.get('input'))} was "
                         "interrupted by the earlier stop; the model is told, not re-run", "warn"))
        return result


class Collector:
    """Waits for one request on its lane and records how it ended. Ctrl-C (cancel, detach,
    hurry), --max-wait and the waste of a hurried batch live here, so the agent's loop only
    says "collect it"."""

    def __init__(self, store: Store, router: Router, clock: Clock,
                 emit: Callable[[Event], None], ask_interrupt: Callable[[str], str],
                 max_wait_s: Callable[[], float | None]) -> None:
        self.store, self.router, self.clock = store, router, clock
        self.emit, self.ask_interrupt, self.max_wait_s = emit, ask_interrupt, max_wait_s

    def _warn(self, text: str) -> None:
        self.emit(Notice(text, "warn"))

    def collect(self, request: RequestRow) -> bool:
        """Wait for the request and record how it ended; False when it was hurried."""
        assert request.batch_id is not None
        if self.clock.now() - request.submitted_at > RESULTS_RETENTION_S:
            raise TurnFailed(f"batch {request.batch_id} is older than 29 days: the API no "
                             "longer keeps its results. Nothing more can be recovered.",
                             custom_id=request.custom_id, record="results expired from the API")
        channel = self.router.channel(request.lane)
        waiting = threading.Event()
        waiting.set()
        turn = next((i for i, r in enumerate(self.store.requests(request.session_id), 1)
                     if r.custom_id == request.custom_id), 0)  # for a re-attached live line

        def on_status(status: str) -> None:
            # A hurried batch is still polled (its answer would be waste) while the sync
            # turn runs and the prompt comes back: its status is nobody's spinner.
            if waiting.is_set():
                self.emit(TurnWaiting(request.batch_id or "", status,
                                      sent_at=request.submitted_at,
                                      expected_s=expected_wait_s(self.store, request.model),
                                      turn=turn))

        ticket = channel.watch(
            request.custom_id, request.batch_id, sent_at=request.submitted_at,
            expected_s=expected_wait_s(self.store, request.model), notify=self._warn,
            on_status=on_status, on_stream=lambda kind, text: self.emit(StreamDelta(kind, text)))
        try:
            arrival = self._await(ticket, channel, request)
        except _Hurry:
            waiting.clear()
            self._hurry(request, ticket, channel)
            return False
        except BatchNotFound as exc:
            raise TurnFailed(f"batch {request.batch_id} or its results are no longer at the "
                             f"API ({exc}); send the prompt again", custom_id=request.custom_id,
                             record="batch unknown to the API") from None
        finally:
            waiting.clear()
        outcome = outcome_of(request, arrival, self.clock.now())
        self.store.record_outcome(request.custom_id, outcome)
        self.emit(TurnEnded(request.batch_id, outcome.result_type, outcome.wait_s,
                            outcome.usage, outcome.cost, request.lane))
        return True

    def _await(self, ticket: Ticket, channel: Channel, request: RequestRow) -> Arrival:
        """Block until the channel resolves the ticket; Ctrl-C asks the user what to do
        (a stream just stops), while the channel keeps polling; past --max-wait a batch
        turn is hurried."""
        deadline = self._hurry_deadline(request, channel)
        while True:
            try:
                while not self.clock.wait(ticket.event, WAIT_SLICE_S):
                    if deadline is not None and self.clock.now() >= deadline:
                        self._warn(f"past --max-wait ({fmt_elapsed(deadline - request.submitted_at)})"
                                   f": hurrying {ticket.handle}")
                        raise _Hurry
                return ticket.result()
            except KeyboardInterrupt:
                self._on_interrupt(ticket, channel, request)

    def _hurry_deadline(self, request: RequestRow, channel: Channel) -> float | None:
        if channel.stops_on_ctrl_c or not self.router.can_hurry():
            return None
        max_wait = self.max_wait_s()
        if max_wait is None and self.router.route == "auto":
            waits = self.store.turnaround_samples(request.model)
            p90 = percentile(waits, 0.9) if len(waits) >= ROUTE_SAMPLES else None
            max_wait = None if p90 is None else AUTO_MAX_WAIT_P90_FACTOR * p90
        return None if max_wait is None else request.submitted_at + max_wait

    def _on_interrupt(self, ticket: Ticket, channel: Channel, request: RequestRow) -> None:
        if channel.stops_on_ctrl_c:  # a stream: stop it; nothing of it is applied
            channel.cancel(ticket.handle, self._warn)
            self._warn("stopped: the partial answer is not added to the conversation")
            return
        choice = self.ask_interrupt(ticket.handle)
        if choice == "hurry" and self.router.can_hurry():
            raise _Hurry
        if choice == "detach":
            channel.forget(ticket)
            raise Detached(request.session_id, ticket.handle)
        if choice == "cancel":
            try:
                channel.cancel(ticket.handle, self._warn)
            except BatchShared as exc:  # other runs' turns ride in it: it goes on for them
                self._warn(str(exc))
                channel.forget(ticket)
                raise Detached(request.session_id, ticket.handle) from None
            except TransportError as exc:  # most often: it ended while the user decided
                self.emit(Notice(f"cancel refused ({exc}); collecting the batch", "warn"))
                return
            self.emit(Notice(f"cancel requested for {ticket.handle}; waiting for it to end "
                             "(work already under way may still finish, and is then used)",
                             "warn"))

    def _hurry(self, request: RequestRow, ticket: Ticket, channel: Channel) -> None:
        """Cancel the batch and send the same transcript synchronously. Exactly one answer
        is applied: the batch's row leaves the session's work in flight, and if it still
        ends with an answer that answer is recorded as waste."""
        try:
            channel.cancel(ticket.handle, self._warn)
        except TransportError as exc:
            self._warn(f"cancel refused ({exc}); its answer, if any, is counted as waste")
        self.store.hurry_request(request.custom_id)
        ticket.add_done_callback(lambda t: self._record_waste(request, t))
        self._warn(f"sending turn synchronously now; {ticket.handle} is cancelled (if it still "
                   "ends with an answer, its cost is shown as waste)")

    def _record_waste(self, request: RequestRow, ticket: Ticket) -> None:
        try:
            arrival = ticket.result()
        except BaseException:  # nothing came back: nothing was billed
            return
        outcome = outcome_of(request, arrival, self.clock.now())
        self.store.record_outcome(request.custom_id, outcome, state="hurried")
        if outcome.cost is not None and outcome.cost.paid_usd:
            self._warn(f"{ticket.handle} ended {outcome.result_type} after the hurry: "
                       f"{fmt_usd(outcome.cost.paid_usd)} paid for an answer not used (waste)")


def expected_wait_s(store: Store, model: str) -> float | None:
    """Median turnaround of this model's recent batches, once there are two."""
    waits = store.turnaround_samples(model, 50)
    return median(waits) if len(waits) >= 2 else None


class Agent:
    """Advances one session turn by turn. Every step is decided from the journal, so a
    fresh prompt and a session resumed after a crash run through the same code."""

    def __init__(self, store: Store, lanes: Channel | Router, toolbox: Toolbox,
                 settings: AgentSettings, session: SessionRow, *,
                 emit: Callable[[Event], None], ask_interrupt: Callable[[str], str],
                 clock: Clock | None = None,
                 name_request: Callable[[int, int], str] | None = None) -> None:
        self.store, self.toolbox = store, toolbox
        self.tools = ToolRunner(store, toolbox, self.emit)
        self.router = lanes if isinstance(lanes, Router) else Router({lanes.lane: lanes},
                                                                    route=lanes.lane)
        self.settings, self.session = settings, session
        self._emit_to, self.ask_interrupt = emit, ask_interrupt
        self.clock = clock or Clock()
        # (n_messages, attempt) -> custom_id; a fleet encodes run, agent, turn and attempt.
        self.name_request = name_request or (lambda _n, _attempt: new_custom_id())
        self._turns = 0
        self._touched: list[str] = []
        self._force_lane: str | None = None  # the next turn's lane after a hurry
        self.collector = Collector(store, self.router, self.clock, self.emit, ask_interrupt,
                                   lambda: self.settings.max_wait_s)
        self._collected: list[str] = []  # answers of turns left in flight, finished first
        self.unsent_prompt: str | None = None
        """A prompt given to prompt() and not journaled (yet): the front-end keeps it."""

    # -- what front-ends may call ---------------------------------------------------
    def prompt(self, text: str) -> RunResult:
        """Finish anything left in flight first, so the new prompt is never folded into a
        message that a paid request already carried."""
        self.unsent_prompt = text
        try:
            if self._in_flight() and (earlier := self.run(new_prompt=False).text):
                self._collected.append(earlier)
        except (TurnFailed, BudgetExceeded) as exc:  # that turn is over; the new prompt goes
            self.emit(Notice(str(exc), "warn"))
        except (TransportError, Detached, KeyboardInterrupt):
            self.emit(Notice("your new prompt was NOT sent: an earlier turn is still in "
                             "flight; send it again once that turn is collected", "warn"))
            raise
        self.store.add_user_content(self.session.id, self.session.conversation,
                                    [{"type": "text", "text": text}])
        self.unsent_prompt = None
        return self.run(new_prompt=True)

    def resume(self) -> RunResult | None:
        """Finish whatever the session left in flight; None when nothing was."""
        return self.run(new_prompt=False) if self._has_unfinished_work() else None

    def run(self, *, new_prompt: bool) -> RunResult:
        """Take steps until the model ends its turn. A failure is recorded here, once."""
        self._turns = 0
        while (step := self._next_step(new_prompt)) is not None:
            new_prompt = False
            try:
                step()
            except TurnFailed as failure:
                if failure.custom_id is not None:
                    self.store.fail_request(failure.custom_id, failure.record)
                raise
        return RunResult(self.last_answer(), self._last_stop_reason())

    def switch_model(self, model: str) -> None:
        self.settings = dataclasses.replace(self.settings, model=model)
        self.store.update_session(self.session.id, model=model)

    def switch_session(self, session: SessionRow) -> None:
        self.session = session
        self.switch_model(session.model)

    @property
    def router(self) -> Router:
        return self._router

    @router.setter
    def router(self, router: Router) -> None:
        self._router = router
        if hasattr(self, "collector"):
            self.collector.router = router

    def set_route(self, route: str) -> None:
        """batch | sync | auto from the next turn on (a lane this agent lacks is refused)."""
        needed = {"auto": ("batch", "sync")}.get(route, (route,))
        if any(lane not in self.router.channels for lane in needed):
            raise ConfigError(f"route {route!r} needs the lanes {', '.join(needed)}")
        self.router.route = route

    def clear(self) -> None:
        """A new conversation in the same session: the session's spend stays counted."""
        conversation = self.session.conversation + 1
        self.store.update_session(self.session.id, conversation=conversation)
        self.session = dataclasses.replace(self.session, conversation=conversation)

    def pending(self) -> RequestRow | None:
        return self.store.pending_request(self.session.id)

    def last_answer(self) -> str:
        """The text of the conversation's last message when the model wrote it, else ''."""
        messages = self._messages()
        last = messages[-1] if messages else {}
        return final_text(last.get("content")) if last.get("role") == "assistant" else ""

    def report(self) -> RunReport:
        """The answer includes those of turns that were in flight when the prompt came (a
        headless `--resume ID -p ...` collects them first): each was paid for."""
        answer = "\n\n".join([*self._collected, self.last_answer()]).strip()
        numbers = {r.custom_id: i for i, r in enumerate(self.store.requests(self.session.id), 1)}
        return RunReport(self.session.id, self.settings.model,
                         tuple(self.store.request(c) for c in self._touched),
                         answer, self.pending(), tuple(numbers[c] for c in self._touched))

    def expected_wait_s(self, model: str) -> float | None:
        return expected_wait_s(self.store, model)

    # -- one turn, as a story ---------------------------------------------------------
    def _send_turn(self) -> None:
        # Build the request from the transcript, with the prompt-cache breakpoints.
        row, params = self._prepare()
        # Check the limits before anything is paid.
        self._check_limits(row.estimate_usd)
        # Journal it BEFORE sending: a crash mid-send is reconciled, never sent twice.
        self.store.begin_request(row)
        self._touch(row.custom_id)
        handle = self._send(row, params)
        self._turns += 1
        expected = self.expected_wait_s(row.model) if row.lane == "batch" else None
        number = self.store.count_requests(self.session.id)  # the row /stats gives it
        self.emit(TurnSent(handle, row.custom_id, row.model, number, self.clock.now(),
                           row.estimate_usd, expected, row.lane))
        # Wait (the channel owns the waiting), then apply what came back.
        self._settle(self.store.request(row.custom_id))

    def _settle(self, request: RequestRow) -> None:
        """Wait for a request in flight and apply its outcome."""
        self._touch(request.custom_id)
        if request.state == "submitting" and not self._reattach(request):
            self.store.fail_request(request.custom_id, "never reached the API")
            return  # the transcript is unanswered: the next step sends it afresh
        request = self.store.request(request.custom_id)
        if request.state == "submitted" and not self.collector.collect(request):
            self._force_lane = "sync"  # hurried: the same transcript goes again, streamed
            return
        self._apply(self.store.request(request.custom_id))

    def _apply(self, request: RequestRow) -> None:
        verdict = classify(request, self.settings.max_resubmits)
        if verdict.action == "look_again":
            self.emit(Notice(f"batch {request.batch_id} held no result for this turn; looking "
                             "for the batch the interrupted create made", "warn"))
            if self._reattach(request):
                return
            verdict = retry_verdict(request, self.settings.max_resubmits)
        if verdict.action == "fail":
            raise TurnFailed(verdict.reason, custom_id=request.custom_id)
        if verdict.action == "resubmit":
            self.store.fail_request(request.custom_id)
            self.emit(Notice(verdict.reason, "warn"))
            return
        self._apply_message(request)

    # -- deciding the next step ---------------------------------------------------------
    def _next_step(self, new_prompt: bool) -> Callable[[], None] | None:
        pending = self.pending()
        if pending is not None:
            return lambda: self._settle(pending)
        messages = self._messages()
        if not messages:
            return None
        last = messages[-1]
        if last["role"] == "assistant":
            if unanswered_tool_uses(last):
                return lambda: self.tools.answer(self.session, last)
            return self._send_turn if self._last_stop_reason() == "pause_turn" else None
        if new_prompt or not self._answered(len(messages)):
            return self._send_turn
        return None  # answered with nothing: an empty reply ends the turn

    def _has_unfinished_work(self) -> bool:
        if self._in_flight():
            return True
        messages = self._messages()
        if not messages:
            return False
        if messages[-1]["role"] == "assistant":
            return self._last_stop_reason() == "pause_turn"
        # A prompt or tool results journaled but never sent (killed in between) are
        # unfinished; ones whose turn already failed (canceled, refused, over a limit) wait for
        # the user instead of being sent, and paid for, again unchanged.
        return not self.store.was_sent(self.session.id, self.session.conversation,
                                       len(messages))

    def _in_flight(self) -> bool:
        """A request out, or tool calls still to run: work a new prompt must not jump over."""
        if self.pending() is not None:
            return True
        messages = self._messages()
        return bool(messages) and bool(unanswered_tool_uses(messages[-1]))

    def _answered(self, n_messages: int) -> bool:
        """The newest request of this conversation carried these messages and was applied
        (an empty answer adds no message, so the transcript alone cannot tell)."""
        latest = self.store.latest_request(self.session.id, self.session.conversation)
        return latest is not None and latest.state == "applied" and (
            latest.n_messages == n_messages)

    def _messages(self) -> list[dict[str, Any]]:
        return self.store.messages(self.session.id, self.session.conversation)

    def _last_stop_reason(self) -> str | None:
        return self.store.last_stop_reason(self.session.id, self.session.conversation)

    # -- sending ------------------------------------------------------------------
    def _prepare(self) -> tuple[RequestRow, dict[str, Any]]:
        messages = self._messages()
        previous = self.store.last_applied(self.session.id, self.session.conversation)
        previous_end = previous.n_messages - 1 if previous else None
        params = build_params(self.settings, Path(self.session.workdir),
                              self.toolbox.definitions(), messages, previous_end)
        attempt = self._attempt_number(len(messages))
        decision = self.router.choose(params, previous=previous, force=self._force_lane,
                                      waits=self.store.turnaround_samples(self.settings.model))
        self._force_lane, lane = None, decision.lane
        if decision.why:
            self.emit(Notice(decision.why))
        row = RequestRow(
            custom_id=self.name_request(len(messages), attempt), session_id=self.session.id,
            conversation=self.session.conversation, n_messages=len(messages),
            model=self.settings.model, cache_ttl=self.settings.cache_ttl,
            max_tokens=self.settings.max_tokens, request_hash=request_hash(params),
            attempt=attempt, state="submitting", batch_id=None,
            submitted_at=self.clock.now(), lane=lane, route=decision.why,
            estimate_usd=estimate_cost_usd(self.settings.model, params, lane=lane,
                                           geo_rate=_geo_rate(previous.usage_value)
                                           if previous else 1.0))
        return row, params

    def _send(self, row: RequestRow, params: dict[str, Any]) -> str:
        try:
            handle = self.router.channel(row.lane).send(
                row.custom_id, params, exclude=self.store.known_batch_ids, notify=self._warn)
        except NotSent as exc:  # nothing was created: not billed, nothing to resume
            raise TurnFailed(str(exc), custom_id=row.custom_id, record="never sent") from None
        except TransportError as exc:
            if isinstance(exc, (SpendLimitReached, RetriesExhausted, Halted)):
                raise  # outcome may be unknown: the row stays 'submitting'; resume reconciles
            raise TurnFailed(str(exc), custom_id=row.custom_id,
                             record="refused at submission") from None
        self.store.set_batch(row.custom_id, handle)  # BEFORE waiting: the paid turn is found
        return handle

    def _check_limits(self, estimate_usd: float | None) -> None:
        committed = self.store.committed_usd(self.session.id) if (
            self.settings.max_budget_usd is not None) else 0.0
        check_limits(self.settings, self._turns, estimate_usd, committed)

    def _attempt_number(self, n_messages: int) -> int:
        recent = self.store.recent_requests(self.session.id, self.settings.max_resubmits + 2)
        return attempt_number(recent, self.session.conversation, n_messages)

    # -- waiting -------------------------------------------------------------------
    def _reattach(self, request: RequestRow) -> bool:
        """A crash or fault left a send whose outcome we never saw: adopt what it made
        (True), or say there is none (False), and the caller decides what next."""
        if self.store.batches_tried(request.custom_id) >= MAX_ADOPTIONS:
            raise TurnFailed(f"{MAX_ADOPTIONS} batches that looked like this turn's were not "
                             "(another client shares the key?); send the prompt again",
                             custom_id=request.custom_id, record="no batch of ours found")
        handle = self.router.channel(request.lane).reconcile(
            request.submitted_at, exclude=self.store.known_batch_ids(), notify=self._warn,
            custom_id=request.custom_id)
        if handle:
            self.store.set_batch(request.custom_id, handle)
            self._warn(f"re-attached to {handle}, created before the interruption")
        return handle is not None

    # -- applying an answer ----------------------------------------------------------
    def _apply_message(self, request: RequestRow) -> None:
        message = json.loads(request.message or "{}")
        content = answer_content(message)
        self.store.apply_request(request, content)
        stop = message.get("stop_reason")
        if stop == "refusal":
            category = (message.get("stop_details") or {}).get("category") or "unspecified"
            billed = "it was not billed" if not message.get("content") else (
                "its partial output was billed and discarded")
            raise TurnFailed(f"the model declined to go on (refusal, category {category}); "
                             f"{billed}")
        text = final_text(content)
        if text:
            self.emit(AssistantText(text))
        elif not content:
            self.emit(Notice(f"the model returned an empty answer (stop_reason {stop}); the "
                             "turn ends here", "warn"))
        self._report_stop(request, message)

    def _report_stop(self, request: RequestRow, message: dict[str, Any]) -> None:
        stop = message.get("stop_reason")
        if stop == "max_tokens" and not unanswered_tool_uses(message | {"role": "assistant"}):
            self.emit(Notice(f"the answer was cut off at max_tokens ({request.max_tokens}); "
                             "ask it to continue, or raise --max-tokens", "warn"))
        elif stop == "model_context_window_exceeded":
            self.emit(Notice("the conversation now fills the model's context window: this "
                             "answer was cut there. /clear starts a new conversation (or "
                             "start a new session)", "warn"))
        elif stop == "pause_turn":
            self.emit(Notice("the model paused a long turn; sending it back to continue"))

    # -- small things ------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self._emit_to(dataclasses.replace(event, session_id=self.session.id))

    def _warn(self, text: str) -> None:
        self.emit(Notice(text, "warn"))

    def _touch(self, custom_id: str) -> None:
        if custom_id not in self._touched:
            self._touched.append(custom_id)


def turnarounds(requests: Sequence[RequestRow], model: str | None = None) -> list[float]:
    """Seconds from submission to result for batches that ended with an answer."""
    return [r.wait_s for r in requests
            if r.wait_s is not None and r.result_type == "succeeded" and r.lane == "batch"
            and (model is None or r.model == model)]


def _is_empty_text(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and not block.get("text")


##############################################################################
# UI (rich render functions; the console and clock come in as arguments)
##############################################################################

# Plain text: the wait line shows it under the spinner, in bold yellow.
INTERRUPT_MENU = ("Ctrl-C while waiting for {batch}: c cancel the batch · d detach "
                  "(it keeps running; resume later) · s send now, synchronously (full price) · "
                  "Enter keep waiting")
INTERRUPT_KEYS = {"c": "cancel", "d": "detach", "\x03": "detach", "s": "hurry"}


def fmt_tokens(n: int) -> str:
    return f"{n:,}"


def plural(n: int, word: str) -> str:
    """'1 turn', '2 turns', '1 batch', '3 batches', '2 entries'."""
    if n == 1:
        return f"{n:,} {word}"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return f"{n:,} {word[:-1]}ies"
    return f"{n:,} {word + ('es' if word.endswith('ch') else 's')}"


def shorten(text: str, max_lines: int = 3, width: int = 160) -> str:
    lines = [ln[:width] + ("…" if len(ln) > width else "") for ln in text.strip().splitlines()]
    more = len(lines) - max_lines
    return "\n".join(lines[:max_lines] + ([f"… {more} more lines"] if more > 0 else []))


@dataclass
class WaitState:
    """What the spinner line shows; the elapsed counter is computed at every refresh."""

    batch_id: str
    turn: int
    started_at: float
    expected_s: float | None
    status: str = "in_progress"
    polls: int = 0
    note: str = ""
    menu: str = ""
    """The Ctrl-C menu, shown under the line while the counter goes on."""


class WaitLine:
    """A rich renderable: spinner, elapsed m:ss, batch id, status, expected wait; then the
    Ctrl-C menu and what was typed meanwhile, if any. The spinner line never wraps (a wrapped
    live line leaves stacked copies behind on a resize)."""

    def __init__(self, state: WaitState, clock: Callable[[], float],
                 typed: Callable[[], str] = str) -> None:
        from rich.spinner import Spinner

        self.state, self.clock, self.typed = state, clock, typed
        self.spinner = Spinner("dots", style="cyan")

    def text(self) -> str:
        s = self.state
        elapsed_s = self.clock() - s.started_at
        parts = [f"waiting {fmt_elapsed(elapsed_s)}", f"turn {s.turn}" if s.turn else "",
                 s.batch_id, s.status.replace("_", " ")]
        if s.expected_s is not None:
            parts.append(f"usually ~{fmt_elapsed(s.expected_s)}, taking longer" if
                         elapsed_s > s.expected_s else f"expected ~{fmt_elapsed(s.expected_s)}")
        if s.note:
            parts.append(s.note)
        return " · ".join(p for p in parts if p) + ("" if s.menu else "  (Ctrl-C: options)")

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        lines: list[Any] = [_one_line(self.spinner, self.text())]
        if self.state.menu:
            lines.append(Text(self.state.menu, style="bold yellow"))
        lines += typed_lines(self.typed())
        return Group(*lines)


def typed_lines(typed: str) -> list[Any]:
    """What was typed during a wait, shown as one input (it becomes the next prompt)."""
    from rich.text import Text

    if not typed:
        return []
    lines = typed.split("\n")
    shown = lines[-1][-70:] if len(lines) == 1 else f"({len(lines)} lines) …{lines[-1][-50:]}"
    return [Text(f"typed, for the next prompt: {shown}", style="dim", no_wrap=True,
                 overflow="ellipsis")]


class ToolLine:
    """The spinner while a tool runs: its label and how long it has run."""

    def __init__(self, label: str, clock: Callable[[], float],
                 typed: Callable[[], str] = str) -> None:
        from rich.spinner import Spinner

        self.label, self.clock, self.typed = label, clock, typed
        self.started_at = clock()
        self.spinner = Spinner("dots", style="cyan")

    def __rich__(self) -> Any:
        from rich.console import Group

        text = f"running {fmt_elapsed(self.clock() - self.started_at)} · {self.label}"
        return Group(_one_line(self.spinner, text), *typed_lines(self.typed()))


def _one_line(spinner: Any, text: str) -> Any:
    """The spinner's frame and text, cut with an ellipsis rather than wrapped."""
    from rich.text import Text

    spinner.update(text=Text(text))
    line = spinner.render(time.monotonic())
    line.no_wrap, line.overflow = True, "ellipsis"
    return line


class AnchoredLive:
    """The live lines (spinner, Ctrl-C menu, type-ahead) under the output, redrawn a few
    times a second, with the cursor resting at their START. rich's Live rests at their end
    and moves up as many rows as it drew; a terminal that reflows on a resize (tmux, most
    emulators) has by then re-wrapped a narrowed line onto two rows, so a row stayed behind
    on every resize: stacked spinner lines. From the start, "erase to the end of the screen"
    clears whatever the lines became, on terminals that reflow and on those that cut; the
    next redraw fits the new width. Output printed meanwhile goes above the lines, as
    rich's Live does it (a render hook)."""

    _ERASE = "\r\x1b[J"  # to the line's start, then erase to the end of the screen

    def __init__(self, renderable: Any, console: Any, refresh_per_second: float = 4) -> None:
        self.renderable, self.console = renderable, console
        self._interval_s = 1 / refresh_per_second
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.console.show_cursor(False)
        self.console.push_render_hook(self)
        # The first frame comes from the thread, a moment later (as rich's Live does it): a
        # Ctrl-C prompted by it then finds the agent already waiting, where the menu is.
        self._thread = threading.Thread(target=self._refresh_forever, daemon=True,
                                        name="live-line")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.console.pop_render_hook()
            if self.console.is_interactive:
                self.console.file.write(self._ERASE)
                self.console.file.flush()
            self.console.show_cursor(True)

    def _refresh_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.refresh()

    def refresh(self) -> None:
        from rich.control import Control

        with self._lock:
            self.console.print(Control())  # the hook below adds the erase and the lines

    def process_renderables(self, renderables: list[Any]) -> list[Any]:
        """rich's render hook: what is printed goes where the lines were, the lines under it."""
        from rich.segment import ControlType, Segment, Segments

        if not self.console.is_interactive:
            return renderables
        erase = Segment(self._ERASE, None, [(ControlType.CARRIAGE_RETURN,)])  # zero width
        with self._lock:
            return [Segments([erase]), *renderables, _LiveLines(self)]


class _LiveLines:
    """The live lines, then the cursor back to where they start."""

    def __init__(self, live: AnchoredLive) -> None:
        self.live = live

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        from rich.control import Control
        from rich.segment import ControlType, Segment

        lines = console.render_lines(self.live.renderable, options, pad=False)
        lines = lines[:max(1, options.size.height - 1)]  # the cursor must get back up to them
        for i, line in enumerate(lines):
            yield from line
            if i < len(lines) - 1:
                yield Segment.line()
        if len(lines) > 1:
            yield Control((ControlType.CURSOR_UP, len(lines) - 1))
        yield Control(ControlType.CARRIAGE_RETURN)


class TypeAhead:
    """Keys typed while the agent works (a batch runs, a tool runs): kept in ONE buffer that
    becomes the next prompt's starting text. Enter adds a line there and never sends, and a
    bracketed paste arrives whole, so one input is never split into several paid prompts.
    `feed` is pure (tests drive it); `start` puts the terminal in cbreak without echo (Ctrl-C
    still interrupts) and reads it in a thread. While the Ctrl-C menu waits for a key, the
    next key goes to the menu instead."""

    _PASTE_ON, _PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"

    def __init__(self, on_clear: Callable[[], None] = lambda: None) -> None:
        self.buffer = ""
        self.on_clear = on_clear
        self._pending = ""
        self._keys: collections.deque[str] = collections.deque()
        self._menu_wants_key = False
        self._lock = threading.Lock()
        self._got_key = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved: Any = None
        self._start_lock = threading.Lock()

    def text(self) -> str:
        with self._lock:
            return self.buffer

    def feed(self, data: str) -> None:
        with self._lock:
            data, self._pending = self._pending + data, ""
            i = 0
            while i < len(data):
                i = self._take(data, i)

    def _take(self, data: str, i: int) -> int:
        """Consume one key (or escape sequence) at data[i]; return where the next starts."""
        ch = data[i]
        if self._menu_wants_key and ch != "\x1b":
            self._menu_wants_key = False
            self._keys.append(ch)
            self._got_key.set()
            return i + 1
        if ch == "\x1b":
            return self._escape(data, i)
        if ch in "\r\n":
            self.buffer += "\n"
        elif ch in "\x7f\x08":
            self.buffer = self.buffer[:-1]
        elif ch == "\x15":  # Ctrl-U: start the input over
            self.buffer = ""
        elif ch == "\x0c":  # Ctrl-L
            self.on_clear()
        elif ch == "\t" or ch >= " ":
            self.buffer += ch
        return i + 1

    def _escape(self, data: str, i: int) -> int:
        rest = data[i + 1:]
        if not rest or (rest[0] == "[" and not re.search(r"[@-~]", rest[1:])):
            self._pending = data[i:]  # the sequence continues in the next read
            return len(data)
        if rest[0] in "\r\n":  # Alt-Enter: a new line, as at the prompt
            self.buffer += "\n"
            return i + 2
        if rest[0] == "[":
            end = i + 2 + re.search(r"[@-~]", rest[1:]).start()  # type: ignore[union-attr]
            if data[i:end + 1] == "\x1b[200~":  # a paste: taken whole, newlines and all
                close = data.find("\x1b[201~", end + 1)
                if close < 0:
                    self._pending = data[i:]
                    return len(data)
                self.buffer += data[end + 1:close].replace("\r\n", "\n").replace("\r", "\n")
                return close + 6
            return end + 1  # arrows and the like: not text
        return i + 2

    # -- the terminal ------------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:  # the poller's thread may start a spinner too
            if self._thread is None and sys.stdin.isatty():
                self._start(sys.stdin.fileno())

    def _start(self, fd: int) -> None:
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd, termios.TCSANOW)
        sys.stdout.write(self._PASTE_ON)
        sys.stdout.flush()
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, args=(fd,), daemon=True,
                                        name="type-ahead")
        self._thread.start()

    def _read(self, fd: int) -> None:
        import select

        while not self._stop.is_set():
            if select.select([fd], [], [], 0.1)[0]:
                data = os.read(fd, 4096)
                if not data:
                    return
                self.feed(data.decode(errors="replace"))

    def stop(self) -> str:
        """Give the terminal back; return what was typed (and forget it)."""
        with self._start_lock:
            self._stop_reading()
        with self._lock:
            typed, self.buffer, self._pending = self.buffer, "", ""
            self._menu_wants_key = False
            self._keys.clear()
        return typed

    def _stop_reading(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._saved)
            sys.stdout.write(self._PASTE_OFF)
            sys.stdout.flush()

    @property
    def active(self) -> bool:
        return self._thread is not None

    def read_key(self, timeout_s: float) -> str | None:
        """The next key for the Ctrl-C menu, or None after timeout_s."""
        with self._lock:
            if not self._keys:
                self._menu_wants_key = True
                self._got_key.clear()
        self._got_key.wait(timeout_s)
        with self._lock:
            if self._keys:
                return self._keys.popleft()
            return None


class PromptLine:
    """The line the user is editing is theirs. Output that comes while a prompt is up (the
    poller's thread reports a retry, a hurried batch's waste; the sandbox probe ends) is
    handed to prompt_toolkit, which erases its prompt, prints it and draws the prompt again
    with the typed text intact; what the prompt cannot take (it is ending, or it is a plain
    input()) is held and printed as soon as it returns. The early prompt, drawn before
    prompt_toolkit has loaded, is erased before anything else goes on its line."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._held: list[str] | None = None  # None: no prompt is up
        self._app: Any = None
        self._early = False

    def drawn_early(self) -> None:
        with self._lock:
            self._early = True

    def take_early(self) -> bool:
        """True once if the early prompt is still on its line (the real one draws over it)."""
        with self._lock:
            early, self._early = self._early, False
        return early

    def erase_early(self) -> None:
        """Output is coming while the early prompt is drawn: it goes (the real prompt comes
        after the output, on a line of its own)."""
        if self.take_early():
            self._write("\r\x1b[K")

    @property
    def up(self) -> bool:
        return self._held is not None

    @contextlib.contextmanager
    def prompting(self, app: Any = None) -> Iterator[None]:
        """While the prompt (a prompt_toolkit app, or None for a plain input()) is up."""
        with self._lock:
            self._held, self._app = [], app
        try:
            yield
        finally:
            with self._lock:
                held, self._held, self._app = self._held or [], None, None
            for text in held:
                self._write(text)

    def offer(self, text: str) -> bool:
        """Take text printed while a prompt is up; False when none is (print it yourself)."""
        with self._lock:
            if self._held is None:
                return False
            self._held.append(text)
            loop = getattr(self._app, "loop", None)
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop just closed: held for return
                loop.call_soon_threadsafe(self.print_held)
        return True

    def print_held(self) -> None:
        """On the prompt's event loop: print what is held above the prompt."""
        from prompt_toolkit.application import run_in_terminal

        if not self._held:
            return

        def write_held() -> None:
            with self._lock:
                held = self._held or []
                if self._held is not None:
                    self._held = []
            for text in held:
                self._write(text)

        run_in_terminal(write_held)


class ConsoleUI:
    """Turns agent events into terminal output. Only this class and the render functions
    below print; `interactive` decides between a live spinner and plain progress lines."""

    def __init__(self, console: Any, *, clock: Callable[[], float] = time.time,
                 interactive: bool = True,
                 read_key: Callable[[float], str | None] | None = None,
                 answers: bool = True, typeahead: TypeAhead | None = None,
                 prompt_line: PromptLine | None = None) -> None:
        self.console = console
        self.prompt_line = prompt_line or PromptLine(self._write)
        self.clock = clock
        self.interactive = interactive
        self.answers = answers
        self.typeahead = typeahead or TypeAhead(on_clear=console.clear)
        self.read_key = read_key or self._read_key
        self._live: Any = None
        self._wait: WaitState | None = None
        self._streamed = ""
        self._thinking_chars = 0

    def _print(self, *objects: Any, **kwargs: Any) -> None:
        """Everything this UI prints goes through here: while a prompt is up it goes above
        the prompt, never into the middle of what the user is typing."""
        if self.prompt_line.up:
            with self.console.capture() as captured:
                self.console.print(*objects, **kwargs)
            if self.prompt_line.offer(captured.get()):
                return
        self.prompt_line.erase_early()
        self.console.print(*objects, **kwargs)

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    # -- typing while the agent works -------------------------------------------------------
    def start_typing(self) -> None:
        """Keys typed from now (a batch or a tool is under way) until stop_typing are one
        input for the next prompt. Keys typed before that stay in the terminal for the
        prompt itself, as they always did."""
        if self.interactive:
            self.typeahead.start()

    def stop_typing(self) -> str:
        """The terminal back to the prompt, and what was typed (an Enter at its end was
        meant as "send": the prompt gets it back without it)."""
        return self.typeahead.stop().rstrip("\n")

    def _read_key(self, timeout_s: float) -> str | None:
        if self.typeahead.active:
            return self.typeahead.read_key(timeout_s)
        return read_key_from_tty(timeout_s)

    def handle(self, event: Event) -> None:
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            handler(event)

    def _on_TurnSent(self, e: TurnSent) -> None:
        self._wait = WaitState(e.handle, e.turn, e.sent_at, e.expected_s)
        self._streamed = ""
        # The estimate is an upper bound (the whole prompt at the cache-write rate): say so.
        estimate = f" · up to {fmt_usd(e.estimate_usd)}" if e.estimate_usd is not None else ""
        what = f"batch {e.handle} submitted" if e.lane == "batch" else "streaming (sync)"
        self._print(f"[dim]turn {e.turn} · {e.model} · {what}{estimate}[/]")
        self._start_live()

    def _on_StreamDelta(self, e: StreamDelta) -> None:
        """Text appears as it streams; thinking only as a dim count on the spinner line."""
        if e.kind == "thinking":
            self._thinking_chars += len(e.text)
            if self._wait is not None:
                self._wait.note = f"thinking · ~{fmt_tokens(self._thinking_chars // 4)} tokens"
            return
        if not self.answers:  # headless: the answer goes to stdout only, whole
            return
        self.stop_live()
        self._streamed += e.text
        self._print(terminal_safe(e.text), end="", markup=False, highlight=False)

    def _on_TurnWaiting(self, e: TurnWaiting) -> None:
        if self.prompt_line.up:  # not the turn being waited on: the prompt is
            return
        if self._wait is None:  # re-attached after a restart: the batch's true age
            sent_at = e.sent_at if e.sent_at is not None else self.clock()
            self._wait = WaitState(e.handle, e.turn, sent_at, e.expected_s)
            turn = f"turn {e.turn}, " if e.turn else ""
            self._print(f"[dim]re-attached to {turn}batch {e.handle}, submitted "
                        f"{fmt_elapsed(self.clock() - sent_at)} ago[/]")
            self._start_live()
        self._wait.status, self._wait.note = e.status, ""
        self._wait.polls += 1

    def _on_TurnEnded(self, e: TurnEnded) -> None:
        self.stop_live()
        self._wait = None
        if self._streamed:
            self._print()  # end the streamed text's last line
        what = f"batch {e.handle}" if e.lane == "batch" else "stream"
        line = f"{what} {e.result_type} after {fmt_elapsed(e.wait_s)}"
        if e.cost is not None and e.usage is not None and e.cost.paid_usd is not None:
            other = (f"sync {fmt_usd(e.cost.sync_usd)}" if e.lane == "batch" else
                     f"batch would be {fmt_usd(e.cost.paid_usd * BATCH_DISCOUNT)}")
            u = e.usage  # "in" is the whole prompt; /stats splits it the same way
            line += (f" · {fmt_tokens(u.prompt_tokens)} in ({fmt_tokens(u.input_tokens)} "
                     f"uncached) / {fmt_tokens(u.output_tokens)} out · paid "
                     f"{fmt_usd(e.cost.paid_usd)} ({other})")
        self._print(f"[dim]{line}[/]")

    def _on_AssistantText(self, e: AssistantText) -> None:
        self.stop_live()
        if self._streamed:  # already on screen as it arrived
            self._streamed = ""
            return
        if self.answers:
            self._print(render_answer(terminal_safe(e.text)))

    def _on_ToolStarted(self, e: ToolStarted) -> None:
        if not self.interactive:
            self._print(f"[dim]running {_escape(e.label)}[/]")
            return
        self._show_live(ToolLine(e.label, self.clock, self.typeahead.text))

    def _on_ToolFinished(self, e: ToolFinished) -> None:
        self.stop_live()
        r = e.result
        mark = "[red]✗[/]" if r.is_error else "[green]✓[/]"
        status = f"exit {r.exit_code}" if r.exit_code is not None else (
            "error" if r.is_error else "ok")
        self._print(f"{mark} {_escape(e.label)} [dim]· {status}[/]")
        if r.output.strip():
            self._print(_indent(_escape(shorten(r.output))), style="dim")

    def _on_Notice(self, e: Notice) -> None:
        style = {"warn": "yellow", "error": "bold red"}.get(e.level, "dim")
        if self._wait is not None and e.level == "warn":
            self._wait.note = e.text
        self._print(f"[{style}]{_escape(e.text)}[/]")

    def _start_live(self) -> None:
        if not self.interactive or self._wait is None:
            return
        self._show_live(WaitLine(self._wait, self.clock, self.typeahead.text))

    def _show_live(self, line: Any) -> None:
        """The live line under everything printed, and keys typed go to the type-ahead. Never
        while a prompt is up: the prompt owns the terminal then."""
        if self.prompt_line.up:
            return
        self.stop_live()
        self.prompt_line.erase_early()
        self.start_typing()
        self._live = AnchoredLive(line, self.console)
        self._live.start()

    def stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def ask_interrupt(self, batch_id: str) -> str:
        """One key: c cancels, d detaches, Enter keeps waiting; another Ctrl-C detaches.
        The world goes on meanwhile: the channel keeps polling, the counter keeps counting
        under the menu, and a batch that ends before the key is pressed is announced and
        collected."""
        if not self.interactive:
            self.stop_live()
            return "detach"
        wait = self._wait or WaitState(batch_id, 0, self.clock(), None)
        self._wait = wait
        wait.menu = INTERRUPT_MENU.format(batch=batch_id)
        if self._live is None:
            self._start_live()
        try:
            key = None
            while key is None:
                if wait.status == "ended":
                    self._print(f"[dim]batch {batch_id} ended while the menu was "
                                       "open; collecting it[/]")
                    return "wait"
                key = self.read_key(WAIT_SLICE_S)
        except (KeyboardInterrupt, EOFError):
            key = "d"
        finally:
            wait.menu = ""
        return INTERRUPT_KEYS.get(key.lower(), "wait")

    def error(self, text: str) -> None:
        self.stop_live()
        self._print(f"[bold red]error:[/] {_escape(text)}")

    def info(self, text: str) -> None:
        self._print(text)

    def say(self, text: str) -> None:
        """Plain text (no markup), from any thread."""
        self._print(text, markup=False, highlight=False)


def read_key_from_tty(timeout_s: float) -> str | None:
    """One key without waiting for Enter, or None after timeout_s; Ctrl-C still raises
    KeyboardInterrupt."""
    import select

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        if not select.select([fd], [], [], timeout_s)[0]:
            return None
        data = os.read(fd, 1)
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
    if not data:
        raise EOFError
    return data.decode(errors="replace")


def _escape(text: str) -> str:
    """Outside text made inert for the terminal (no escape sequences), then for rich markup."""
    from rich.markup import escape

    return escape(terminal_safe(text))


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# What makes model text Markdown: a heading, a fence, a list, emphasis, a link, a table rule.
_MARKDOWN_RE = re.compile(r"^#{1,6} |^\s*(```|~~~)|^\s*([-*+]|\d+[.)]) |\*\*\S|`[^`\n]+`|"
                          r"\]\(\S+\)|^\s*\|?\s*:?-{3,}", re.MULTILINE)


def render_answer(text: str) -> Any:
    """Model text as Markdown only when it is Markdown, and with its single line breaks kept
    either way (a listing of files is lines, not a paragraph to reflow)."""
    from rich.markdown import Markdown
    from rich.text import Text

    if not _MARKDOWN_RE.search(text):
        return Text(text)
    lines, fenced = text.split("\n"), False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.strip() and i + 1 < len(lines) and lines[i + 1].strip():
            lines[i] = line.rstrip() + "  "  # a Markdown hard break: the line stays a line
    return Markdown("\n".join(lines))


STATS_EXPLAINED = (
    "How these figures are computed: each turn's own `usage` is priced at the model's rates "
    "— uncached input; cache writes at 1.25× input (5-minute TTL) or 2× input (1-hour TTL); "
    "cache reads at the model's read rate; output (thinking included) — and the batch path "
    "pays 50 % of all of it. 'Sync' is the SAME usage at standard rates: it assumes the "
    "synchronous endpoint would have had the same cache hits, which the two paths do not "
    "reliably share, so read it as a like-for-like price, not a forecast. 'Cache saved' is "
    "what the cached tokens would have cost as plain input minus what they did cost. A turn "
    "still in flight counts at its estimate until its result replaces it; errored, expired "
    "and canceled entries are not billed. Synchronous (sync-lane) turns pay full price; for "
    "them the other lane is the same usage at batch rates. The two lanes keep separate "
    "prompt caches, so a switch of lane pays to write the prefix again. 'Waste' is what a "
    "batch cost that still answered after its turn was hurried onto the sync lane.")


@dataclass(frozen=True)
class StatsTotals:
    """Sums over ended requests; turns still in flight are kept apart at their estimate, so
    a saving is never computed from an estimate on one side and nothing on the other."""

    paid_usd: float
    in_flight_usd: float
    sync_usd: float
    cache_saved_usd: float
    waited_s: float
    usage: Usage
    unknown_prices: int
    waste_usd: float = 0.0
    """Paid for answers never used: batches that still ended after a hurry."""

    @property
    def batch_saved_usd(self) -> float:
        return self.sync_usd - self.paid_usd

    @property
    def saved_pct(self) -> float | None:
        return 100 * self.batch_saved_usd / self.sync_usd if self.sync_usd else None

    @property
    def saved_per_min(self) -> float | None:
        return self.batch_saved_usd / (self.waited_s / 60) if self.waited_s >= 1 else None


def stats_totals(requests: Sequence[RequestRow]) -> StatsTotals:
    ended = [r for r in requests if r.result_type is not None]
    return StatsTotals(
        paid_usd=sum(r.cost_usd or 0.0 for r in ended),
        in_flight_usd=sum(r.committed_usd for r in requests if r.result_type is None),
        sync_usd=sum(r.sync_cost_usd or 0.0 for r in ended),
        cache_saved_usd=sum(r.cache_saved_usd or 0.0 for r in ended),
        waited_s=sum(r.wait_s or 0.0 for r in ended),
        usage=sum((r.usage_value for r in ended), Usage()),
        waste_usd=sum(r.cost_usd or 0.0 for r in ended if r.state == "hurried"),
        unknown_prices=sum(1 for r in requests if (r.result_type == "succeeded"
                                                   and r.cost_usd is None) or (
            r.result_type is None and r.batch_id and r.state == "failed")),
    )


def render_stats(console: Any, requests: Sequence[RequestRow], model: str,
                 history: Sequence[RequestRow]) -> None:
    """The /stats panel: a row per model turn, totals, turnaround, and how it is computed."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    totals = stats_totals(requests)
    body = Group(_turn_table(requests, console.width - 4), Text(""), lanes_table(requests),
                 Text(""), Text(_totals_line(totals)),
                 Text(_turnaround_line(history, model)), Text(""),
                 Text(STATS_EXPLAINED, style="dim"))
    console.print(Panel(body, title="session cost: batch path vs synchronous", expand=False))


_TURN_COLUMNS = ("turn", "lane", "model", "waited", "uncached", "output", "cache write",
                 "cache read", "hit", "paid", "at sync rates")


def _turn_table(requests: Sequence[RequestRow], width: int = 200) -> Any:
    """A row per turn; on a terminal too narrow for the table, one folded line per turn
    instead: a figure is never cut (a truncated '$0…' is worse than no column)."""
    from rich.table import Table
    from rich.text import Text

    rows = []
    for i, r in enumerate(requests, 1):
        cells = _turn_cells(i, r)
        if r.state == "hurried":
            cells[-2] += " waste" if r.cost_usd else " (hurried)"
        rows.append([cells[0], r.lane, *cells[1:]])
    widths = [max(len(c) for c in col) for col in zip(_TURN_COLUMNS, *rows, strict=True)]
    if sum(widths) + 2 * (len(widths) - 1) > width:
        return Text("\n".join(" · ".join(_folded(name, cell)
                                          for name, cell in zip(_TURN_COLUMNS, row, strict=True)
                                          if cell) for row in rows))
    table = Table(box=None, pad_edge=False)
    for col in _TURN_COLUMNS:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _folded(name: str, cell: str) -> str:
    """One cell of a folded row, named; a turn that did not succeed carries its outcome in
    the waited or uncached column ('canceled', 'in flight'), which is shown bare: 'uncached
    canceled' read as a figure."""
    if name in ("waited", "uncached") and not any(c.isdigit() for c in cell):
        return cell
    return f"{name} {cell}"


def lanes_table(requests: Sequence[RequestRow]) -> Any:
    """Per lane: turns, what they cost, what the other lane would have cost, minutes waited."""
    from rich.table import Table

    table = Table(title="by lane", box=None, pad_edge=False)
    for col in ("lane", "answers used", "paid", "other lane would be", "waited"):
        table.add_column(col, justify="left" if col == "lane" else "right")
    for lane in LANES:
        rows = [r for r in requests if r.lane == lane]
        if not rows:
            continue
        t = stats_totals(rows)
        other = t.sync_usd if lane == "batch" else t.sync_usd * BATCH_DISCOUNT
        table.add_row(lane, str(sum(1 for r in rows if r.state == "applied")),
                      fmt_usd(t.paid_usd), fmt_usd(other), f"{t.waited_s / 60:.1f} min")
    return table


def _turn_cells(i: int, r: RequestRow) -> list[str]:
    u = r.usage_value
    if r.result_type is None and r.state in IN_FLIGHT_STATES:
        return [str(i), r.model, "in flight", "", "", "", "", "",
                f"≤ {fmt_usd(r.estimate_usd)}", ""]
    if r.result_type is None and r.batch_id is None:  # never reached the API: not billed
        return [str(i), r.model, r.error_message or r.state, "", "", "", "", "", "$0", ""]
    if r.result_type is None:  # a batch ran, its result could not be had: billed, unknown
        return [str(i), r.model, r.error_message or r.state, "", "", "", "", "",
                "usage unknown", ""]
    if r.result_type != "succeeded":
        return [str(i), r.model, fmt_elapsed(r.wait_s or 0), r.result_type, "", "", "", "",
                "$0 (not billed)", ""]
    ratio = cache_hit_ratio(u)
    model = r.model + (f" ({u.inference_geo} ×{_geo_rate(u):g})" if _geo_rate(u) != 1 else "")
    return [str(i), model, fmt_elapsed(r.wait_s or 0), fmt_tokens(u.input_tokens),
            fmt_tokens(u.output_tokens), fmt_tokens(u.cache_creation_input_tokens),
            fmt_tokens(u.cache_read_input_tokens),
            f"{100 * ratio:.0f}%" if ratio is not None else "-",
            fmt_usd(r.cost_usd), fmt_usd(r.sync_cost_usd)]


def _totals_line(t: StatsTotals) -> str:
    u = t.usage
    ratio = cache_hit_ratio(u)
    pct = f" ({t.saved_pct:.0f} %)" if t.saved_pct is not None else ""
    per_min = (f"the batch path saved {fmt_usd(t.saved_per_min)} per minute spent waiting"
               if t.saved_per_min else "-")
    unknown = (f" · {plural(t.unknown_prices, 'turn')} with price unknown"
               if t.unknown_prices else "")
    unknown += f" · in flight ≤ {fmt_usd(t.in_flight_usd)} (upper bound)" if t.in_flight_usd else ""
    unknown += f" · waste {fmt_usd(t.waste_usd)}" if t.waste_usd else ""
    # Negative until 1-hour cache writes are repaid by reads: say it as the extra it is.
    cache = (f"cache saved {fmt_usd(t.cache_saved_usd)}" if t.cache_saved_usd >= 0 else
             f"cache cost {fmt_usd(-t.cache_saved_usd)} extra so far (writes not yet repaid by "
             "reads)")
    return (f"total: paid {fmt_usd(t.paid_usd)} · sync would be {fmt_usd(t.sync_usd)} · "
            f"batch saved {fmt_usd(t.batch_saved_usd)}{pct} · {cache} · cache hit "
            f"{f'{100 * ratio:.0f}%' if ratio is not None else '-'} · waited "
            f"{t.waited_s / 60:.1f} min · {per_min}{unknown}")


def _turnaround_line(history: Sequence[RequestRow], model: str) -> str:
    waits = turnarounds(history, model)
    if not waits:
        return f"batch turnaround for {model}: no finished batches yet"
    return (f"batch turnaround for {model}: {plural(len(waits), 'batch')} · median "
            f"{fmt_elapsed(median(waits) or 0)} · p90 {fmt_elapsed(percentile(waits, 0.9) or 0)}")


# Batch widths as --stats and the fleet summary group them: does a wide batch come back later?
WIDTH_BUCKETS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, None))


def width_label(low: int, high: int | None) -> str:
    return str(low) if low == high else f"{low}+" if high is None else f"{low}-{high}"


def _in_bucket(width: int, low: int, high: int | None) -> bool:
    return low <= width and (high is None or width <= high)


def turnaround_by_width(requests: Sequence[RequestRow], known: Mapping[str, int] | None = None
                        ) -> list[tuple[str, str, list[float]]]:
    """(model, width bucket, one turnaround per batch) for answered batch-lane turns. A
    batch's width is `known[batch_id]` when the caller knows it (a pooled create's), else
    how many of these requests it carried; its turnaround the longest wait among them (one
    batch ends once)."""
    widths = collections.Counter(r.batch_id for r in requests
                                 if r.lane == "batch" and r.batch_id)
    widths.update({batch_id: width - widths[batch_id] for batch_id, width in (known or {}).items()
                   if width > widths[batch_id]})
    per_batch: dict[tuple[str, str], float] = {}
    for r in requests:
        if r.batch_id and r.wait_s is not None and r.result_type == "succeeded" \
                and r.lane == "batch":
            key = (r.model, r.batch_id)
            per_batch[key] = max(per_batch.get(key, 0.0), r.wait_s)
    out = []
    for model in sorted({model for model, _ in per_batch}):
        for low, high in WIDTH_BUCKETS:
            waits = [wait for (m, batch_id), wait in per_batch.items()
                     if m == model and _in_bucket(widths[batch_id], low, high)]
            if waits:
                out.append((model, width_label(low, high), waits))
    return out


def render_history(console: Any, requests: Sequence[RequestRow]) -> None:
    """--stats: spend per model and per day, measured turnaround per model and per batch
    width (so a user learns from their own data whether wide batches come back later)."""
    from rich.table import Table

    by_model = Table(title="spend per model", box=None)
    for col in ("model", "turns", "paid", "sync", "saved", "turnaround median", "p90"):
        by_model.add_column(col, justify="left" if col == "model" else "right")
    for model in sorted({r.model for r in requests}):
        rows = [r for r in requests if r.model == model]
        t, waits = stats_totals(rows), turnarounds(rows)
        known = t.unknown_prices == 0
        by_model.add_row(model, str(len(waits)), _known_usd(t.paid_usd, known),
                         _known_usd(t.sync_usd, known), _known_usd(t.batch_saved_usd, known),
                         fmt_elapsed(median(waits) or 0),
                         fmt_elapsed(percentile(waits, 0.9) or 0))
    by_day = Table(title="spend per day (UTC)", box=None)
    for col in ("day", "turns", "paid", "sync", "waited"):
        by_day.add_column(col, justify="left" if col == "day" else "right")
    for day in sorted({_day(r.submitted_at) for r in requests}):
        rows = [r for r in requests if _day(r.submitted_at) == day]
        t = stats_totals(rows)
        unknown = (f" + {plural(t.unknown_prices, 'turn')} price unknown"
                   if t.unknown_prices else "")
        by_day.add_row(day, str(len(turnarounds(rows))), fmt_usd(t.paid_usd) + unknown,
                       fmt_usd(t.sync_usd), f"{t.waited_s / 60:.1f} min")
    by_width = Table(title="batch turnaround by width (entries per batch)", box=None)
    for col in ("model", "width", "batches", "median", "p90"):
        by_width.add_column(col, justify="left" if col == "model" else "right")
    for model, label, waits in turnaround_by_width(requests):
        by_width.add_row(model, label, str(len(waits)), fmt_elapsed(median(waits) or 0),
                         fmt_elapsed(percentile(waits, 0.9) or 0))
    console.print(by_model)
    console.print(by_width)
    console.print(lanes_table(requests))
    console.print(by_day)
    console.print(STATS_EXPLAINED, style="dim")


def _known_usd(amount: float, known: bool) -> str:
    return fmt_usd(amount if known else None)


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def first_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in messages:
        texts = [b.get("text", "") for b in _as_blocks(m.get("content"))
                 if isinstance(b, dict) and b.get("type") == "text"]
        if m.get("role") == "user" and any(texts):
            return " ".join(texts)
    return ""


def fmt_ago(seconds: float) -> str:
    minutes = int(max(0.0, seconds) // 60)
    if minutes < 1:
        return "just now"
    if minutes < 60:
        return f"{minutes} min ago"
    hours = minutes // 60
    return f"{hours} h ago" if hours < 48 else f"{hours // 24} days ago"


def render_recap(console: Any, messages: Sequence[Mapping[str, Any]],
                 requests: Sequence[RequestRow], last: int = 4) -> None:
    """Where a resumed session stands: its last prompts and answers, shortened."""
    lines: list[str] = []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "assistant":
            text = final_text(content)
            tools = [describe_tool_call(str(b.get("name")), b.get("input"))
                     for b in unanswered_tool_uses(m)]
            lines += [f"  {shorten(text, 2, 100)}"] if text else []
            lines += [f"  [tool] {label}" for label in tools]
        else:
            texts = [b.get("text", "") for b in _as_blocks(content)
                     if isinstance(b, dict) and b.get("type") == "text"]
            lines += [f"› {shorten(' '.join(texts), 2, 100)}"] if any(texts) else []
    if not lines:
        return
    console.print(f"[dim]earlier in this session ({plural(len(requests), 'turn')}, paid "
                  f"{fmt_usd(stats_totals(requests).paid_usd)}):[/]")
    for line in lines[-2 * last:]:
        console.print(_indent(_escape(line), "  "), style="dim")


ROUTE_TAGLINES = {
    "batch": "every turn is a Message Batch (50 % off, a minute or more per turn)",
    "sync": "every turn streams from the Messages API (full price, at once)",
    "auto": "each turn goes batch (50 % off, slow) or sync (full price, at once), whichever "
            "is worth your wait",
}


def render_banner(console: Any, config: Config, session: SessionRow, sandbox_line: str) -> None:
    console.print(f"[bold]batching-harness {__version__}[/] · {ROUTE_TAGLINES[config.route]}")
    console.print(f"  model    {session.model}   cache {config.cache_ttl or 'off'}")
    console.print(f"  workdir  {session.workdir}")
    console.print(f"  sandbox  {sandbox_line}")
    console.print(f"  session  {session.id}   state {config.home}")
    if config.pool:
        console.print(f"  pool     {_escape(_pool_shown(config.pool))}")
    console.print("  [dim]/help for commands · Alt-Enter for a new line · Ctrl-D exits[/]")


##############################################################################
# REPL and slash commands
##############################################################################

PROMPT = "› "


class Repl:
    """Reads prompts and slash commands; every turn runs inside one error boundary."""

    # name -> (method, help). A command returns an exit status to leave, or None to stay.
    COMMANDS: ClassVar[dict[str, tuple[str, str]]] = {
        "/help": ("cmd_help", "this list"),
        "/stats": ("cmd_stats", "cost per turn: batch path vs synchronous"),
        "/model": ("cmd_model", "show or switch the model: /model ID"),
        "/route": ("cmd_route", "show or set the lane: /route batch|sync|auto"),
        "/clear": ("cmd_clear", "start a new conversation (session totals stay)"),
        "/resume": ("cmd_resume", "pick a recent session to continue"),
        "/exit": ("cmd_exit", "leave (Ctrl-D too)"),
        "/quit": ("cmd_exit", "leave"),
    }

    def __init__(self, agent: Agent, journal: Store, ui: ConsoleUI,
                 read_line: Callable[[], str], resume_command: Callable[[str], str],
                 log_bug: Callable[[BaseException], Path], lock: SessionLock,
                 read_answer: Callable[[str], str] | None = None) -> None:
        self.agent = agent
        self.read_answer = read_answer
        """A question's answer (the /resume picker's); None: a plain input()."""
        self.log_bug = log_bug
        self.lock = lock
        self.journal = journal
        self.ui = ui
        self.read_line = read_line
        self.resume_command = resume_command
        self.prefill = ""
        """The next prompt's starting text: what was typed during a wait, or a prompt that
        could not be sent. Nothing typed is ever dropped silently."""
        self.commands: dict[str, tuple[Callable[[str], int | None], str]] = {
            name: (getattr(self, method), help_text)
            for name, (method, help_text) in self.COMMANDS.items()}

    def run(self) -> int:
        status = self.working(self.agent.resume)
        while status is None:
            try:
                line = self._read()
            except EOFError:
                return self.leave()
            except KeyboardInterrupt:
                continue
            status = self.handle(line)
        return status

    def handle(self, line: str) -> int | None:
        text = line.strip()
        if not text:
            return None
        if text.startswith("/"):
            return self.guarded(lambda: self.dispatch(text))
        try:
            self.lock.confirm()  # a pool's lock can be lost in an outage: still ours?
        except HarnessError as exc:  # taken, or the pool still away: the line stays typed
            self.ui.error(str(exc))
            self.prefill = line
            return None
        return self.working(lambda: self.agent.prompt(line))

    def _read(self) -> str:
        prefill, self.prefill = self.prefill, ""
        return self.read_line(prefill) if prefill else self.read_line()  # type: ignore[call-arg]

    def working(self, step: Callable[[], object]) -> int | None:
        """Agent work inside the boundary. Keys typed meanwhile are one input, handed to the
        next prompt as its text; so is a prompt the agent could not send (it says why)."""
        try:
            status = self.guarded(step)
        finally:
            typed = self.ui.stop_typing()  # the terminal goes back whatever happened
        unsent = self.agent.unsent_prompt
        self.prefill = "\n".join(t for t in (unsent, typed) if t)
        if self.prefill and status is None:
            what = "your prompt (not sent)" if unsent else "what you typed meanwhile"
            self.ui.info(f"[dim]{what} is back at the prompt: Enter sends it[/]")
        elif self.prefill:  # leaving (a detach): no prompt to hand it to, so it is shown
            self.ui.info("[yellow]not sent, typed during the wait:[/]\n"
                         f"{_indent(_escape(self.prefill), '  ')}")
        return status

    def guarded(self, step: Callable[[], object]) -> int | None:
        """The one boundary: expected failures are one line; the journal keeps the state.
        Returns an exit status when the REPL should end."""
        try:
            status = step()
            return status if type(status) is int else None
        except Detached as d:
            self.ui.stop_live()
            self.ui.info(f"detached: batch {d.batch_id} keeps running (and is billed). "
                         f"Resume with:\n  {self.resume_command(d.session_id)}")
            return 0
        except HarnessError as exc:
            self.ui.error(str(exc))
            self._hint_if_in_flight()
        except KeyboardInterrupt:
            self.ui.error("interrupted")
            self._hint_if_in_flight()
        except Exception as exc:  # a bug: logged in full, reported in one line, REPL lives on
            self.ui.error(f"internal error ({type(exc).__name__}: {exc}); the traceback is in "
                          f"{self.log_bug(exc)}. The journal kept the session.")
            self._hint_if_in_flight()
        finally:
            self.ui.stop_live()
        return None

    def dispatch(self, text: str) -> int | None:
        name, _, arg = text.partition(" ")
        entry = self.commands.get(name.lower())
        if entry is None:
            import difflib

            close = difflib.get_close_matches(name, list(self.commands), n=1)
            hint = f" — did you mean {close[0]}?" if close else ""
            self.ui.error(f"unknown command {name}{hint} (/help lists them)")
            return None
        return entry[0](arg.strip())

    def leave(self) -> int:
        self._hint_if_in_flight()
        return 0

    def _hint_if_in_flight(self) -> None:
        pending = self.journal.pending_request(self.agent.session.id)
        if pending is not None:
            self.ui.info(f"[yellow]a turn is still in flight ({pending.batch_id or 'submitting'})"
                         f"; resume it with:[/]\n  {self.resume_command(self.agent.session.id)}")

    # -- commands -------------------------------------------------------------------
    def cmd_help(self, _arg: str) -> None:
        for name, (_, text) in self.commands.items():
            self.ui.info(f"  [bold]{name:<8}[/] {text}")
        self.ui.info("  [dim]Enter sends · Alt-Enter (or Esc then Enter) inserts a new line · "
                     "pasted text keeps its lines · Ctrl-C while waiting: cancel or detach · "
                     "Ctrl-D exits[/]")

    def cmd_stats(self, _arg: str) -> None:
        requests = self.journal.requests(self.agent.session.id)
        render_stats(self.ui.console, requests, self.agent.settings.model,
                     self.journal.requests())

    def cmd_model(self, arg: str) -> None:
        if not arg:
            known = ", ".join(sorted(PRICES))
            self.ui.info(f"model: [bold]{self.agent.settings.model}[/]\nknown prices: {known}")
            return
        check_max_tokens(arg, self.agent.settings.max_tokens)
        self.agent.switch_model(arg)
        price = "" if price_for(arg) else " [yellow](price unknown: cost shows as unknown)[/]"
        self.ui.info(f"model is now [bold]{arg}[/]{price}; the prompt cache starts over "
                     "(cache entries belong to one model)")

    def cmd_route(self, arg: str) -> None:
        router = self.agent.router
        if not arg:
            self.ui.info(f"route: [bold]{router.route}[/] (wait price "
                         f"{fmt_usd(router.wait_price_usd_per_min)}/min for auto)")
            return
        if arg not in ROUTES:
            self.ui.error(f"unknown route {arg!r}: batch, sync or auto")
            return
        self.agent.set_route(arg)
        self.ui.info(f"route is now [bold]{arg}[/] from the next turn")

    def cmd_clear(self, _arg: str) -> None:
        pending = self.journal.pending_request(self.agent.session.id)
        if pending is not None:
            self.ui.error(f"a turn is still in flight ({pending.batch_id or 'submitting'}); send "
                          "a prompt to collect it first, then /clear")
            return
        self.agent.clear()
        self.ui.info("new conversation; the session's spend so far still counts in /stats")

    def cmd_resume(self, arg: str) -> int | None:
        sessions = [s for s in self.journal.recent_sessions(30)
                    if self.journal.messages(s.id, s.conversation)][:10]  # empty ones: no
        if not arg:
            for i, s in enumerate(sessions, 1):
                self.ui.info(f"  {i:>2}. {_escape(self._describe(s))}")
            try:
                arg = self.read_line_with("session number or id (Enter: stay here): ")
            except (EOFError, KeyboardInterrupt):
                arg = ""
            if not arg.strip():
                self.ui.info("[dim]staying in this session[/]")
                return None
        chosen = _pick_session(sessions, arg.strip(), self.journal)
        if chosen is None:
            self.ui.error(f"no session {arg!r}")
            return None
        if chosen.workdir != self.agent.session.workdir:
            self.ui.error(f"session {chosen.id} works in {chosen.workdir}; resume it with:\n  "
                          f"{self.resume_command(chosen.id)}")
            return None
        self.lock.acquire(chosen.id)  # one process per session, as on the command line
        self.agent.switch_session(chosen)
        self.ui.info(f"resumed session {chosen.id}")
        render_recap(self.ui.console, self.journal.messages(chosen.id, chosen.conversation),
                     self.journal.requests(chosen.id))
        return self.working(self.agent.resume)

    def _describe(self, s: SessionRow) -> str:
        """What tells sessions apart: the first prompt, turns, cost, last activity."""
        messages = self.journal.messages(s.id, s.conversation)
        requests = self.journal.requests(s.id)
        title = " ".join(first_prompt(messages).split())
        title = title[:48] + "…" if len(title) > 48 else title
        paid = stats_totals(requests).paid_usd
        return (f"{title or '(no prompt)'} · {plural(len(requests), 'turn')} · {fmt_usd(paid)} · "
                f"{fmt_ago(time.time() - s.updated_at)} · {s.id}")

    def read_line_with(self, prompt: str) -> str:
        if self.read_answer is not None:
            return self.read_answer(prompt)
        with self.ui.prompt_line.prompting():  # a plain input(): output waits for Enter
            return input(prompt)

    def cmd_exit(self, _arg: str) -> int:
        return self.leave()


def _pick_session(sessions: Sequence[SessionRow], arg: str,
                  journal: Store) -> SessionRow | None:
    if arg.isdigit() and 1 <= int(arg) <= len(sessions):
        return sessions[int(arg) - 1]
    return journal.find_session(arg) if arg else None


def make_prompt_readers(home: Path, commands: Sequence[str], prompt_line: PromptLine,
                        end_early_prompt: Callable[[], None] = lambda: None
                        ) -> tuple[Callable[[], str], Callable[[str], str]]:
    """The prompt (prompt_toolkit: history across runs, slash-command completion, Alt-Enter
    for a new line, Enter sends) and a plain question's (the /resume picker's: no history).
    Both read through prompt_toolkit, so keys typed ahead reach the one that is up (a plain
    input() never saw what prompt_toolkit had read ahead); output that comes while either is
    up goes above it."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    session: Any = PromptSession(
        history=FileHistory(str(home / "history")),
        completer=WordCompleter(list(commands), sentence=True),
        complete_while_typing=True, key_bindings=bindings, multiline=False,
        prompt_continuation="… ")
    def read_line(default: str = "") -> str:
        with prompt_line.prompting(session.app):
            if prompt_line.take_early():
                sys.stdout.write("\r")  # draw over the early prompt, on the same line
            # The terminal as it was (echo on) before prompt_toolkit saves it: else every
            # input between prompts (the /resume picker's) is read without being shown.
            end_early_prompt()
            # pre_run: output held in the instant before the prompt's loop ran goes up now
            return session.prompt(PROMPT, default=default, pre_run=prompt_line.print_held)

    question: Any = PromptSession()

    def read_answer(message: str) -> str:
        with prompt_line.prompting(question.app):
            end_early_prompt()
            return question.prompt(message, pre_run=prompt_line.print_held)

    return read_line, read_answer


def show_prompt_early(prompt_line: PromptLine) -> Callable[[], None]:
    """Draw the prompt before prompt_toolkit has loaded (~0.2 s) and return what restores
    the terminal. Keys typed meanwhile wait, unechoed and unprocessed (Ctrl-D included), in
    the terminal's buffer until the real prompt takes over this line and reads them."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return lambda: None
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)  # TCSANOW: never flush what was already typed
    sys.stdout.write(PROMPT)
    sys.stdout.flush()
    prompt_line.drawn_early()
    restored: list[bool] = []

    def restore() -> None:  # once: when the real prompt takes over, or when the REPL ends
        if not restored:
            restored.append(True)
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    return restore


##############################################################################
# Fleet (many agents, one pool: `batching-harness fleet TASKS.jsonl`; the agents never
# see the pooling, the pooler never sees a transcript)
##############################################################################

FLEET_SYSTEM_PROMPT = """\
You are a careful software engineer working in your own directory (your shell starts there; \
the first message names it) through two tools: bash (each command runs in a sandbox: the \
working directory carries over between calls, network is off unless the user allowed some \
domains, nothing outside the work directory is writable) and str_replace_based_edit_tool \
(view, create, str_replace, insert). You are one of several agents working in parallel on \
separate tasks; every turn is processed as a Message Batch and takes a minute or more, so \
make each turn count: issue independent tool calls together in one turn. When the task is \
done, reply with a short summary of what you did and what you found."""
"""One text for every agent (no per-agent path in it), so tools + system are one cached
prefix that the primer writes once and every other agent reads."""
TASK_KEYS = {"id", "prompt", "workdir", "model", "max_turns"}
DEFAULT_CONCURRENCY = 64
# Shortest prefix each model caches (tokens); a fleet primes only when the shared prefix is
# at least this long, else the primer's extra round buys nothing.
MIN_CACHEABLE_TOKENS = {"claude-opus-5-5": 512, "claude-opus-5": 512, "claude-haiku-5-5": 512,
                        "claude-fable-5-1": 512, "claude-opus-4-8": 1024,
                        "claude-sonnet-5": 1024, "claude-sonnet-4-6": 1024,
                        "claude-sonnet-4-5": 1024, "claude-opus-4-7": 2048}
UNKNOWN_MIN_CACHEABLE = 4096  # unknown model: assume the largest minimum
PRIME_MIN_AGENTS = 3
# billing / permission / authentication: no entry of this key will succeed; stop the fleet.
FLEET_FATAL_ERRORS = ("authentication_error", "permission_error", "billing_error")
FLEET_CUSTOM_ID_RE = re.compile(r"^([0-9a-f]{8})-ag(\d+)-t(\d+)-at(\d+)-[0-9a-f]{6}$")


@dataclass(frozen=True)
class FleetTask:
    """One line of the task file: one agent."""

    id: str
    prompt: str
    line: int
    workdir: Path | None = None
    model: str | None = None
    max_turns: int | None = None


def parse_tasks(text: str) -> list[FleetTask]:
    """Every line checked before anything is sent: a file with a bad line costs nothing.
    A line is a JSON object or plain text (a prompt); blank lines and '#' comments skip."""
    tasks: list[FleetTask] = []
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            tasks.append(_parse_task(line, number, len(tasks) + 1))
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
    seen: dict[str, int] = {}
    for task in tasks:
        if task.id in seen:
            errors.append(f"line {task.line}: id {task.id!r} is used on line {seen[task.id]} too")
        seen.setdefault(task.id, task.line)
    if errors:
        raise ConfigError("the task file has errors; nothing was sent:\n  " + "\n  ".join(errors))
    if not tasks:
        raise ConfigError("the task file holds no tasks")
    return tasks


def _parse_task(line: str, number: int, ordinal: int) -> FleetTask:
    if not line.lstrip().startswith("{"):
        return FleetTask(f"task-{ordinal}", line.strip(), number)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("a JSON line must be an object")
    unknown = sorted(set(obj) - TASK_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TASK_KEYS))}")
    prompt, task_id = obj.get("prompt"), obj.get("id", f"task-{ordinal}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('"prompt" must be a non-empty string')
    if not isinstance(task_id, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", task_id):
        raise ValueError('"id" must be 1-64 letters, digits, ".", "_" or "-"')
    max_turns = obj.get("max_turns")
    if max_turns is not None and (type(max_turns) is not int or max_turns < 1):
        raise ValueError('"max_turns" must be a positive integer')
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError('"model" must be a model id')
    workdir = obj.get("workdir")
    if workdir is not None:
        if not isinstance(workdir, str) or not Path(workdir).expanduser().is_dir():
            raise ValueError(f'"workdir" {workdir!r} is not a directory')
        workdir = Path(workdir).expanduser().resolve()
    return FleetTask(task_id, prompt, number, workdir, model, max_turns)


def fleet_custom_id(token: str, agent: int, n_messages: int, attempt: int) -> str:
    """run, agent, turn (transcript length) and attempt, plus 6 random hex digits so a
    resend of the same attempt never collides: 64 chars of [a-zA-Z0-9_-] at most."""
    return f"{token}-ag{agent}-t{n_messages}-at{attempt}-{secrets.token_hex(3)}"


def parse_custom_id(custom_id: str | None) -> tuple[str, int, int, int] | None:
    """(run token, agent, turn, attempt) of one of our custom_ids; None for anything else
    (a foreign or damaged id is reported, never crashes the fleet)."""
    match = FLEET_CUSTOM_ID_RE.match(custom_id or "")
    if match is None:
        return None
    token, agent, turn, attempt = match.groups()
    return token, int(agent), int(turn), int(attempt)


def pool_window_s(turnarounds_s: Sequence[float]) -> float:
    """How long a ready turn waits for others: min(5 s, 5 % of the median turnaround)."""
    typical = median(turnarounds_s) if len(turnarounds_s) >= 2 else None
    return MAX_POOL_WINDOW_S if typical is None else min(MAX_POOL_WINDOW_S,
                                                         POOL_WINDOW_SHARE * typical)


def shares_cacheable_prefix(models: Sequence[str], system: str) -> bool:
    """Worth a primer: 3+ agents of the first agent's model whose shared prefix (the system
    text; the tool definitions add little) is long enough for that model to cache."""
    if not models:
        return False
    model = models[0]
    minimum = MIN_CACHEABLE_TOKENS.get(base_model_id(model), UNKNOWN_MIN_CACHEABLE)
    return models.count(model) >= PRIME_MIN_AGENTS and len(system) // 4 >= minimum


@dataclass(frozen=True)
class FleetConfig:
    """The fleet's own options; the agents' options come from `base` (one Config)."""

    tasks: Path | None = None
    template: Path | None = field(default=None, metadata=option(
        "--template", metavar="DIR", help="each agent works in a fresh copy of DIR",
        parse=lambda v: Path(v).expanduser().resolve()))
    concurrency: int = field(default=DEFAULT_CONCURRENCY, metadata=option(
        "--concurrency", metavar="N", parse=int,
        help=f"agents running at once (default {DEFAULT_CONCURRENCY})"))
    max_width: int = field(default=DEFAULT_MAX_WIDTH, metadata=option(
        "--max-width", metavar="W", parse=int,
        help=f"most turns in one batch (default {DEFAULT_MAX_WIDTH})"))
    window_s: float | None = field(default=None, metadata=option(
        "--window", metavar="S", parse=float,
        help="longest a ready turn waits for others (default min(5 s, 5%% of the median "
             "turnaround))"))
    prime: bool = field(default=True, metadata=option(
        "--no-prime", action="store_false",
        help="send every first turn at once (no primer writing the shared prefix first)"))
    preamble: Path | None = field(default=None, metadata=option(
        "--preamble", metavar="FILE", help="text every agent shares, after the system prompt",
        parse=lambda v: Path(v).expanduser().resolve()))
    runs_dir: Path = field(default=Path("fleet-runs"), metadata=option(
        "--runs-dir", metavar="DIR", help="where agents' fresh work dirs go (default ./fleet-runs)",
        parse=lambda v: Path(v).expanduser().resolve()))
    continue_last: bool = field(default=False, metadata=option(
        "--continue", action="store_true", help="pick up the most recent fleet run"))
    resume_run: str | None = field(default=None, metadata=option(
        "--resume", metavar="RUN", help="pick up fleet run RUN"))
    base: Config = field(default_factory=Config)


FLEET_SHARED_OPTIONS = ("model", "poll_interval_s", "max_turns", "max_tokens", "tool_timeout_s",
                        "allow_domains", "sandbox", "cache_ttl", "max_budget_usd",
                        "output_format", "pool")
"""Config options a fleet passes to its agents (or, for output_format, to its summary)."""


def parse_fleet_config(argv: Sequence[str], environ: Mapping[str, str]) -> FleetConfig:
    p = argparse.ArgumentParser(prog="batching-harness fleet", description=(
        "Run many agents, one per line of TASKS.jsonl, their turns pooled into shared batches."))
    p.add_argument("tasks", nargs="?", metavar="TASKS.jsonl", help="one task per line")
    _add_options(p, FleetConfig)
    _add_options(p, Config, FLEET_SHARED_OPTIONS)
    try:
        ns = p.parse_args(list(argv))
    except SystemExit as exc:
        raise _ArgparseExit(int(exc.code or 0)) from None
    base = parse_config(_shared_argv(ns), environ)
    if ns.output_format is not None:  # the fleet's summary format; no -p applies here
        base = dataclasses.replace(base, output_format=ns.output_format)
    fleet = FleetConfig(tasks=Path(ns.tasks).expanduser().resolve() if ns.tasks else None,
                        base=base, **_parsed_values(ns, FleetConfig))
    _check_fleet(fleet)
    return fleet


def _shared_argv(ns: argparse.Namespace) -> list[str]:
    """The shared options back as flags, so Config's own parser checks them once."""
    argv: list[str] = []
    for f, opt in _options(Config):
        value = getattr(ns, f.name, None)
        if f.name not in FLEET_SHARED_OPTIONS or f.name == "output_format" or value is None or (
                value == f.default and (
                opt["action"] in ("store_true", "store_false"))):
            continue
        flag = opt["flags"][-1]
        if opt["action"] in ("store_true", "store_false"):
            argv.append(flag)
        elif opt["action"] == "append":
            argv += [part for item in value for part in (flag, str(item))]
        else:
            argv += [flag, str(value)]
    return argv


def _check_fleet(c: FleetConfig) -> None:
    if c.continue_last and c.resume_run:
        raise ConfigError("use --continue or --resume RUN, not both")
    if not (c.continue_last or c.resume_run) and c.tasks is None:
        raise ConfigError("fleet needs TASKS.jsonl (or --continue / --resume RUN)")
    if c.tasks is not None and not c.tasks.is_file():
        raise ConfigError(f"{c.tasks}: no such file")
    if c.template is not None and not c.template.is_dir():
        raise ConfigError(f"--template {c.template}: no such directory")
    if c.preamble is not None and not c.preamble.is_file():
        raise ConfigError(f"--preamble {c.preamble}: no such file")
    if c.concurrency < 1 or not 1 <= c.max_width <= 100_000:
        raise ConfigError("--concurrency must be at least 1, --max-width 1 to 100000")
    if c.window_s is not None and c.window_s < 0:
        raise ConfigError("--window must be 0 or more seconds")


# -- each agent's collaborators ------------------------------------------------------------
class FleetClock(Clock):
    """The agents' clock. When the fleet stops, each agent's next wait raises
    KeyboardInterrupt ONCE, and the agent's own Ctrl-C path (detach or cancel) runs: no new
    code path for a stop, and a paid batch is never dropped silently."""

    def __init__(self, stopping: threading.Event) -> None:
        self.stopping = stopping
        self._told = threading.local()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        if self.stopping.is_set() and not getattr(self._told, "done", False):
            self._told.done = True
            raise KeyboardInterrupt
        # 100 agents waking every quarter second is CPU for nothing: a stop lands within 1 s.
        return event.wait(max(0.0, min(max(timeout_s, 1.0), 1.0)))


class BoundedToolbox:
    """A Toolbox whose runs share a bound on the machine: many agents' tools run at once, but
    never more than `slots` (each sandboxed bash call is a Node start-up, ~0.4 s of CPU)."""

    def __init__(self, toolbox: Toolbox, slots: threading.BoundedSemaphore) -> None:
        self.inner, self.slots, self.bash = toolbox, slots, toolbox.bash

    def definitions(self) -> list[dict[str, Any]]:
        return self.inner.definitions()

    def run(self, name: str, tool_input: object) -> ToolResult:
        with self.slots:
            return self.inner.run(name, tool_input)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class RunPoolJournal:
    """The pool's journal, bound to one fleet run."""

    store: Store
    run_id: str

    def begin_pool_batch(self, model: str, reason: str, sent_at: float,
                         custom_ids: Sequence[str], delays: Sequence[float]) -> int:
        return self.store.begin_pool_batch(self.run_id, model, reason, sent_at, custom_ids,
                                           delays)

    def set_pool_batch(self, pool_id: int, batch_id: str | None) -> None:
        self.store.set_pool_batch(pool_id, batch_id)


# -- the shared pool: the turns of many processes (many hosts) batched through the store ----
# Every process of a fleet sharing one PostgreSQL pool queues its agents' turns in the store;
# per pool key ONE process (the flusher, an advisory-lock role) claims a batch's worth and
# creates it, and per account ONE process (the poller) polls every batch in flight with one
# list call per tick and writes each turn's end. Agents everywhere are woken by NOTIFY.
# Hosts' clocks differ: every lease, member row and window is reckoned by the store's clock
# inside its statements; a process's own threads schedule their looks on time.monotonic().
# A claim's lease: how long a create may go unrenewed before another process reconciles its
# batch by list (renewed every third of it while the create is tried).
POOL_LEASE_S = 10.0
# A process that does not hold a role tries to take it this often: a SIGKILLed holder's
# session ends at once, so its role moves within about this long.
ROLE_RETRY_S = 1.0
# A holder checks its roles are still its own this often (two holders for a moment cost
# nothing but a narrower batch: claims skip each other's rows, the first write of an end wins),
# and looks for intents whose lease ran out.
ROLE_CHECK_S = 5.0
# A member row (a process's active agents) counts this long after its last renewal: a
# process that vanished stops holding "everyone is waiting" back after it.
MEMBER_LEASE_S = 15.0
# While the store cannot be reached, every thread of the pool tries again this often.
POOL_RETRY_S = 2.0
# A store failure this soon after the store came back is the same outage (a connection it
# broke, failing on first use): it is not announced again.
OUTAGE_QUIET_S = 10.0
# The poller reads the batches in flight when told (NOTIFY), and at least this often.
IN_FLIGHT_REFRESH_S = 10.0
# The failure kinds a create can end in, carried to the agents of every host by name.
SHARED_CREATE_ERRORS: dict[str, type[TransportError]] = {
    "AccountRefused": AccountRefused, "SpendLimitReached": SpendLimitReached,
    "Unreachable": Unreachable, "NotSent": NotSent}


def pool_account(api_key: str | None, base_url: str | None) -> str:
    """Whose turns may share a batch: one API key at one endpoint (a batch made with one key
    cannot be listed, polled or fetched with another). A digest: the key is never stored."""
    endpoint = (base_url or "https://api.anthropic.com").rstrip("/")  # the SDK's default
    digest = hashlib.sha256(f"{endpoint}\n{api_key or ''}".encode())
    return "k" + digest.hexdigest()[:16]


def shared_pool_key(account: str, params: Mapping[str, Any], betas: Sequence[str] = ()) -> str:
    """account/model/size class[/betas]: turns that can go into one batch (betas go into the
    create call, so only entries that asked for the same ones share it)."""
    model = urllib.parse.quote(str(params.get("model")), safe="")  # a gateway's "a/b" too
    key = f"{account}/{model}/{size_class(params)}"
    return key + "/" + ",".join(sorted(betas)) if betas else key


def pool_key_model(key: str) -> str:
    """The model a pool key's turns ask for."""
    return urllib.parse.unquote(key.split("/")[1])


def pool_key_betas(key: str) -> list[str]:
    """The betas a pool key's batches are created with."""
    parts = key.split("/")
    return parts[3].split(",") if len(parts) > 3 and parts[3] else []


class PoolOutage:
    """One message per outage of a shared pool's store, however many threads run into it.
    A connection the outage broke fails once more on first use after the server is back:
    a failure that soon after a recovery is the same outage, and says nothing new."""

    def __init__(self, say: Notify) -> None:
        self.say = say
        self._lock = threading.Lock()
        self._down = self._announced = False
        self._up_at = -math.inf

    def down(self, exc: JournalError) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
            self._announced = time.monotonic() - self._up_at > OUTAGE_QUIET_S
        if self._announced:
            self.say(f"{exc}. Waiting for it (trying again every {POOL_RETRY_S:g} s); "
                     "batches in flight keep running at the API")

    @property
    def is_down(self) -> bool:
        with self._lock:
            return self._down

    def up(self) -> None:
        with self._lock:
            if not self._down:
                return
            self._down, self._up_at, announced = False, time.monotonic(), self._announced
        if announced:
            self.say("the pool is reachable again; carrying on")


@dataclass
class _Sending:
    """One local agent's turn in the shared queue, until its batch id is recorded."""

    custom_id: str
    ready_at: float
    window_s: float
    adopted: bool = False  # queued by another process (reconcile): it may take it back out
    done: threading.Event = field(default_factory=threading.Event)
    batch_id: str | None = None
    error: BaseException | None = None


class SharedPoolChannel:
    """The batch lane for a fleet whose pool is shared by many processes through the store
    (PostgreSQL; see the banner above). To its agents it is PooledBatchChannel: `send`
    returns once the turn's batch id is recorded, `watch` gives a ticket resolved when the
    turn's end is in the store. Behind that, three threads per process: a listener (NOTIFY
    wakes agents, the flusher and the poller), a flusher that serves the pool keys whose role
    it holds, and a poller that serves the account when it holds that role.

    Flush policy, as in-process: the width cap, the window (from the oldest queued turn),
    and "all waiting" across hosts: every process keeps a member row with its active agents
    (leased), and the store's queue counts the account's turns waiting on the model; when
    those reach the active agents, nobody anywhere can add a turn and the flusher sends at
    once. A process that has not yet joined counts from its first join: a host starting late
    joins the next batch, never delays this one past the window."""

    lane = "batch"
    stops_on_ctrl_c = False  # a paid batch in flight: the user (or the fleet) decides
    cancel_scope = ("cancel the batches only this run rides in (from batches shared with "
                    "other runs, this run's turns are detached)")

    def __init__(self, store: Store, batch: BatchChannel, *, account: str,
                 max_width: int = DEFAULT_MAX_WIDTH,
                 window_s: Callable[[str], float] = lambda _model: MAX_POOL_WINDOW_S,
                 say: Notify = _ignore, clock: Clock | None = None,
                 member: str | None = None, outage: PoolOutage | None = None,
                 log_bug: Callable[[BaseException], object] | None = None,
                 own_prefix: str = "") -> None:
        """`own_prefix`: the custom_id prefix of this run's turns (the only ones its Ctrl-C
        may cancel)."""
        self.store, self.batch, self.api = store, batch, batch.api
        self.own_prefix = own_prefix
        self.account, self.max_width, self.window_s, self.say = account, max_width, window_s, say
        self.clock = clock or Clock()
        self.member = member or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.flushes: list[PoolFlush] = []
        self._sending: dict[str, _Sending] = {}
        self._tickets: dict[str, Ticket] = {}
        self._notifies: dict[str, Notify] = {}
        self._keys: set[str] = set()
        self._landed: collections.deque[Ticket] = collections.deque()
        self._active = 0
        self._halted: BaseException | None = None
        self._canceled: set[str] = set()  # batches this process asked to cancel
        self._kept: set[str] = set()  # shared batches it would not cancel (told once)
        self.outage = outage or PoolOutage(say)
        self._log_bug = log_bug
        self._lock = threading.RLock()
        self._flush_wake, self._poll_wake = threading.Event(), threading.Event()
        self._listening, self._closed = threading.Event(), threading.Event()
        self._member_dirty = threading.Event()
        self._threads: list[threading.Thread] = []
        self._roles_checked_at = -math.inf  # monotonic time: checked on the first pass
        self._creating: dict[int, tuple[Claim, float]] = {}  # intent -> (claim, renewed at)

    # -- who is active -------------------------------------------------------------------
    def join(self) -> None:
        with self._lock:
            self._active += 1
        self._member_changed()
        self._start()  # counted in the pool before its first turn is queued

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
        self._member_changed()

    def halt(self, error: BaseException) -> None:
        """Take no more turns; this process's turns nobody has claimed yet leave the queue
        (a resume sends them); ones already claimed still get their batch."""
        with self._lock:
            self._halted = error
            waiting = [s for s in self._sending.values() if not s.done.is_set()]
        try:
            withdrawn = set(self.store.withdraw_turns([s.custom_id for s in waiting]))
        except JournalError:
            withdrawn = {s.custom_id for s in waiting}  # unreachable: resume reconciles them
        for sending in waiting:
            if sending.custom_id in withdrawn:
                self._settle(sending, error=error)

    def close(self) -> None:
        """Let go of every role and of this process's member row (a fleet ending)."""
        self._closed.set()
        for event in (self._flush_wake, self._poll_wake):
            event.set()
        for thread in self._threads:
            thread.join(timeout=5)
        with contextlib.suppress(JournalError):
            self.store.drop_member(self.member)

    # -- the Channel protocol ----------------------------------------------------------
    def send(self, custom_id: str, params: dict[str, Any], *, exclude: Callable[[], set[str]],
             notify: Notify, betas: Sequence[str] = ()) -> str:
        """Queue the turn in the store and block until a flusher (on any host) records the
        batch that carries it; its id then. `betas`: the create's (a proxy's client asked)."""
        key = shared_pool_key(self.account, params, betas)
        sending = _Sending(custom_id, self.clock.now(), self.window_s(str(params.get("model"))))
        with self._lock:
            if self._halted is not None:
                raise self._halted
            self._sending[custom_id], self._notifies[custom_id] = sending, notify
            self._keys.add(key)
        self._start()
        self._until_stored(lambda: self.store.queue_turn(custom_id, key, params,
                                                         sending.window_s), sending.done)
        if self._halted is not None:  # halted while it was being queued: take it back out
            self.halt(self._halted)
        self._member_changed()
        return self._result(sending)

    def reconcile(self, sent_at: float, *, exclude: set[str], notify: Notify,
                  custom_id: str = "") -> str | None:
        """A turn journaled but not known to be in a batch (its process died in `send`): if it
        is in the shared queue, wait for its batch as `send` does; else it was never queued."""
        entry = self.store.queue_entry(custom_id) if custom_id else None
        if entry is None or entry[0] == "failed":
            return None
        sending = _Sending(custom_id, self.clock.now(), 0.0, adopted=True)
        with self._lock:
            self._sending[custom_id], self._notifies[custom_id] = sending, notify
            if entry[3].startswith(self.account + "/"):  # another account's: not ours to send
                self._keys.add(entry[3])  # its process died: this one may have to flush it
        self._start()
        self._check(custom_id)
        return self._result(sending)

    def watch(self, custom_id: str, handle: str, *, sent_at: float, expected_s: float | None,
              on_status: Callable[[str], None], notify: Notify,
              on_stream: StreamListener | None = None) -> Ticket:
        """A ticket resolved from the store once the pool's poller (on any host) has written
        the turn's end; registered before the first look, so no NOTIFY falls in between."""
        ticket = Ticket(custom_id, handle)
        with self._lock:
            self._tickets[custom_id], self._notifies[custom_id] = ticket, notify
        self._start()
        on_status("in_progress")
        with contextlib.suppress(JournalError):  # looked at again once it is back
            self._check(custom_id)
        return ticket

    def cancel(self, handle: str, notify: Notify) -> None:
        """A batch is cancelled whole: once, however many agents ask, and only when every turn
        still in it is this run's. Other runs' agents (other hosts) did not ask; from a
        batch they share, the asking turn is detached (BatchShared) and the batch goes on."""
        with self._lock:
            if handle in self._canceled:
                return
        entries = next((ids for batch_id, _at, ids in self.store.batches_in_flight(
            self.account) if batch_id == handle), [])
        if any(not c.startswith(self.own_prefix) for c in entries):
            if first_time(self._kept, handle, self._lock):
                self.say(f"batch {handle} also carries other runs' turns: not cancelled; this "
                         "run's turns in it are detached (`fleet --continue` collects them)")
            raise BatchShared(f"batch {handle} is shared with other runs: detached, not "
                              "cancelled")
        if first_time(self._canceled, handle, self._lock):
            self.api.cancel(handle, notify)

    def forget(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.pop(ticket.custom_id, None)
            self._notifies.pop(ticket.custom_id, None)

    def recover(self, journal: Store, run_id: str, notify: Notify) -> list[str]:
        """In-process pooled creates of this run cut by a crash (before it shared a pool);
        the shared pool's own intents are taken over by whichever flusher sees them expire."""
        return recover_pooled_creates(self.api, self.clock, journal, run_id, notify)

    # -- what the pool line shows ---------------------------------------------------------
    def widths_in_flight(self) -> list[int]:
        with self._lock:
            flying = {t.handle for t in self._tickets.values()} | self.batch.in_flight_ids()
            return [f.width for f in self.flushes if f.batch_id in flying]

    def queued(self) -> int:
        with self._lock:
            return sum(1 for s in self._sending.values() if not s.done.is_set())

    def next_flush(self) -> tuple[float, str] | None:
        with self._lock:
            due = [s.ready_at + s.window_s for s in self._sending.values() if not s.done.is_set()]
        return (max(0.0, min(due) - self.clock.now()), "window") if due else None

    # -- agents' side: waiting for what the store says -----------------------------------
    def _result(self, sending: _Sending) -> str:
        while not sending.done.wait(0.5):  # set by the listener, by halt(), or by our flusher
            pass
        with self._lock:
            self._sending.pop(sending.custom_id, None)
        if sending.error is not None:
            raise sending.error
        assert sending.batch_id is not None
        return sending.batch_id

    def _settle(self, sending: _Sending, *, batch_id: str | None = None,
                error: BaseException | None = None) -> None:
        if not sending.done.is_set():
            sending.batch_id, sending.error = batch_id, error
            sending.done.set()

    def _check(self, *custom_ids: str) -> None:
        """Look up local turns in the store (one query) and wake each agent whose turn has
        moved on: into a batch (`send`), or to its end (`watch`)."""
        with self._lock:
            ids = [c for c in custom_ids if c in self._sending or c in self._tickets]
        for custom_id, (row, queue_state) in self.store.turn_states(ids).items():
            with self._lock:
                sending, ticket = self._sending.get(custom_id), self._tickets.get(custom_id)
            if sending is not None and row.batch_id and queue_state in ("sent", "done"):
                self._settle(sending, batch_id=row.batch_id)
            elif sending is not None and queue_state == "failed":
                self._settle(sending, error=_shared_error(row.error_message))
            elif sending is not None and sending.adopted and queue_state is None and \
                    not row.batch_id:
                self._settle(sending, error=Withdrawn(f"turn {custom_id} was taken back out "
                                                      "of the queue by the process that "
                                                      "queued it; nothing was sent"))
            if ticket is None or row.result_type is None or row.state in ("submitting",
                                                                          "submitted"):
                continue
            if row.result_type == "missing" and row.error_message == BATCH_UNKNOWN:
                self._fail(custom_id, _unknown_batch(row.batch_id or ticket.handle))
            else:
                self._resolve(custom_id, Arrival(_stored_entry(row), BatchView(
                    row.batch_id or ticket.handle, "ended", (row.ended_at or 0.0) -
                    (row.wait_s or 0.0), 0, row.ended_at)))

    def _resolve(self, custom_id: str, arrival: Arrival) -> None:
        with self._lock:
            ticket = self._tickets.pop(custom_id, None)
            self._notifies.pop(custom_id, None)
            asked = ticket is not None and ticket.handle in self._canceled
        entry = arrival.entry
        if entry is not None and entry.type == "canceled" and not asked:
            # another run cancelled the batch this turn shared: not this agent's end
            arrival = dataclasses.replace(arrival, entry=dataclasses.replace(
                entry, error_type=CANCELED_ELSEWHERE,
                error_message="another run cancelled the shared batch"))
        if ticket is not None:
            ticket.resolve(arrival)

    def _fail(self, custom_id: str, error: BaseException) -> None:
        with self._lock:
            ticket = self._tickets.pop(custom_id, None)
            self._notifies.pop(custom_id, None)
        if ticket is not None:
            ticket.fail(error)

    def _sweep(self) -> None:
        """Every local turn looked at once: what NOTIFY said while nobody listened."""
        with self._lock:
            ids = set(self._sending) | set(self._tickets)
        self._check(*ids)

    def _member_changed(self) -> None:
        self._member_dirty.set()
        self._flush_wake.set()

    # -- threads ------------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for name, target in (("pool-listener", self._listen_forever),
                                 ("pool-flusher", self._flush_forever),
                                 ("pool-poller", self._poll_forever)):
                thread = threading.Thread(target=self._guarded, args=(target,), daemon=True,
                                          name=name)
                self._threads.append(thread)
                thread.start()
        while not self._listening.wait(0.5):  # a send before LISTEN could miss its NOTIFY
            if self._closed.is_set():
                return

    def _guarded(self, target: Callable[[], None]) -> None:
        """A bug in a pool thread: logged, and every local agent hears it (none hangs)."""
        try:
            target()
        except BaseException as exc:
            where = self._log_bug(exc) if self._log_bug else "the log"
            error = HarnessError(f"internal error in the shared pool ({type(exc).__name__}: "
                                 f"{exc}); see {where}")
            self.say(str(error))
            self.halt(error)
            with self._lock:  # claimed turns too: this process's flusher may be the dead one
                tickets, self._tickets = list(self._tickets.values()), {}
                sendings = list(self._sending.values())
            for sending in sendings:
                self._settle(sending, error=error)
            for ticket in tickets:
                ticket.fail(error)

    def _until_stored(self, write: Callable[[], object], give_up: threading.Event) -> None:
        """Run a store write, waiting out an unreachable store (one message, then retries)."""
        while not give_up.is_set():
            try:
                write()
                self._recovered()
                return
            except JournalError as exc:
                self._unreachable(exc)
                give_up.wait(POOL_RETRY_S)

    def _unreachable(self, exc: JournalError) -> None:
        self.outage.down(exc)

    def _recovered(self) -> None:
        self.outage.up()

    def _pass_recovered(self) -> None:
        """The end of a flusher or poller pass, which may have made no store call at all
        (between role checks and heartbeats): "reachable again" only after a round trip."""
        if self.outage.is_down:
            _ = self.store.schema_version  # still down: JournalError, and the outage goes on
        self._recovered()

    def _listen_forever(self) -> None:
        listener: Listener | None = None
        while not self._closed.is_set():
            try:
                if listener is None:
                    listener = self.store.listen("turns", "queue")
                    self._listening.set()
                    self._sweep()
                    self._flush_wake.set()
                    self._poll_wake.set()
                    self._recovered()
                self._heard(listener.wait(ROLE_RETRY_S))
                self._renew_leases()
            except JournalError as exc:
                if listener is not None:
                    listener.close()
                listener = None
                self._unreachable(exc)
                self._closed.wait(POOL_RETRY_S)
        if listener is not None:
            listener.close()

    def _heard(self, heard: Sequence[tuple[str, str]]) -> None:
        turns = [payload for channel, payload in heard if channel == "turns"]
        for payload in (p for channel, p in heard if channel == "queue"):
            if payload.startswith(self.account + "/"):
                with self._lock:
                    self._keys.add(payload)
            if payload.startswith(self.account):
                self._flush_wake.set()
        if turns:
            self._check(*turns)  # our own agents' turns among them, in one query
            self._poll_wake.set()

    # -- the flusher: one process per pool key ------------------------------------------
    def _flush_forever(self) -> None:
        """Serve the pool keys whose flusher role this process holds: look at a key when
        NOTIFY says something changed or its window falls due, never on a fixed tick."""
        roles: dict[str, Role] = {}
        due: dict[str, float] = {}  # key -> when to look at it again unprompted
        next_roles_at = next_beat_at = 0.0
        while not self._closed.is_set():
            woken = self._flush_wake.is_set()
            self._flush_wake.clear()
            try:
                now = time.monotonic()
                if self._member_dirty.is_set() or now >= next_beat_at:
                    self._member_dirty.clear()
                    self._write_member()
                    next_beat_at = now + MEMBER_LEASE_S / 3
                if now >= next_roles_at:
                    next_roles_at = now + ROLE_RETRY_S
                    for key in self._take_roles(roles, now):
                        due[key] = 0.0
                for key in list(roles):
                    if woken or time.monotonic() >= due.get(key, 0.0):
                        due[key] = time.monotonic() + self._serve(key)
                self._pass_recovered()
                wait_s = min([next_roles_at, next_beat_at,
                              *(due[k] for k in roles)]) - time.monotonic()
            except JournalError as exc:
                self._unreachable(exc)
                wait_s = POOL_RETRY_S
            if wait_s > 0:
                self._flush_wake.wait(wait_s)
        for role in roles.values():
            with contextlib.suppress(JournalError):
                role.release()

    def _write_member(self) -> None:
        with self._lock:
            active = self._active
            waiting = sum(1 for s in self._sending.values() if not s.done.is_set()) + len(
                self._tickets)
        self.store.set_member(self.member, self.account, active, waiting, MEMBER_LEASE_S)

    def _take_roles(self, roles: dict[str, Role], now: float) -> list[str]:
        """Try for the flusher role of every key this process has seen (once its API client
        is ready: a holder still importing the SDK would hold everyone's turns back); now
        and then check the held ones, and reconcile intents whose holder died. The keys
        newly taken."""
        if not self.api.ready:
            self.api.warm_up()
            return []
        if now >= self._roles_checked_at + ROLE_CHECK_S:
            self._roles_checked_at = now
            for key, role in list(roles.items()):
                if not role.alive():
                    del roles[key]
            for key in roles:
                for claim in self.store.take_over_expired_claims(self.member, POOL_LEASE_S, key):
                    self._reconcile_claim(claim)
        with self._lock:
            keys = sorted(self._keys - set(roles))
        taken = []
        for key in keys:
            role = self.store.hold_role("flusher", key)
            if role is not None:
                roles[key] = role
                taken.append(key)
                # the last holder may have died mid-create
                for claim in self.store.take_over_expired_claims(self.member, POOL_LEASE_S, key):
                    self._reconcile_claim(claim)
        return taken

    def _serve(self, key: str) -> float:
        """Flush `key` if its turns are due; seconds until they will be otherwise."""
        # Each turn's own deadline (its process's window), by the store's clock, not ours
        count, due_in_s = self.store.queue_head(key, self.window_s(pool_key_model(key)))
        if not count or due_in_s is None:
            return ROLE_CHECK_S  # NOTIFY says when something is queued
        active, waiting = self.store.pool_census(self.account)
        reason = ("width cap" if count >= self.max_width else "all waiting"
                  if active and waiting >= active else "window" if due_in_s <= 0 else None)
        if reason is None:
            return due_in_s
        self._flush(key, reason)
        return 0.0  # more may be queued behind a width cap

    def _flush(self, key: str, reason: str) -> None:
        claim = self.store.claim_turns(key, self.member, limit=self.max_width,
                                       lease_s=POOL_LEASE_S, reason=reason)
        if claim is None:
            return
        notify = self._fan_out(claim.custom_ids)
        sent_at = self.clock.now()
        try:
            with self._leased(claim):
                batch_id = self.api.create(
                    [{"custom_id": cid, "params": params} for cid, params in claim.turns],
                    exclude=self.store.known_batch_ids, notify=notify,
                    betas=pool_key_betas(key))
        except RetriesExhausted as exc:  # unknown outcome: the lease runs out, list decides
            notify(f"{exc}; the pool looks for its batch by list before sending again")
            return
        except HarnessError as exc:  # certainly nothing made: its agents hear why
            self.say(f"a shared batch of {len(claim.turns)} turn(s) was not created: {exc}")
            self.store.fail_claim(claim.intent_id, f"{type(exc).__name__}: {exc}")
            return
        self._record(claim, batch_id, notify)
        delays = tuple(round(sent_at - queued, 3) for queued in self._ready_times(claim))
        with self._lock:
            self.flushes.append(PoolFlush(batch_id, pool_key_model(key), len(claim.turns), reason,
                                          sent_at, delays))

    def _record(self, claim: Claim, batch_id: str, notify: Notify) -> None:
        """The batch id, committed right after the create; a batch whose intent another
        process settled meanwhile (our lease ran out) is a duplicate, cancelled."""
        recorded: list[bool] = []

        def write() -> None:
            recorded.append(self.store.record_claim_batch(claim.intent_id, batch_id))

        try:  # tried even while the pool closes: recorded now, not found by list later
            write()
        except JournalError as exc:
            self._unreachable(exc)
            self._until_stored(write, self._closed)
        if recorded and recorded[0]:
            for custom_id in claim.custom_ids:  # our own agents need no NOTIFY round trip
                with self._lock:
                    sending = self._sending.get(custom_id)
                if sending is not None:
                    self._settle(sending, batch_id=batch_id)
            return
        if recorded and self.store.intent_batch(claim.intent_id) != batch_id:
            notify(f"batch {batch_id} duplicates one another process made for the same turns "
                   "(this one's lease ran out); cancelling it")
            with contextlib.suppress(TransportError):
                self.api.cancel(batch_id, notify)

    def _ready_times(self, claim: Claim) -> list[float]:
        with self._lock:
            return [self._sending[c].ready_at for c in claim.custom_ids if c in self._sending]

    @contextlib.contextmanager
    def _leased(self, claim: Claim) -> Iterator[None]:
        """The claim's lease is renewed (by the listener thread) while the create is tried:
        retries can take minutes."""
        with self._lock:
            self._creating[claim.intent_id] = (claim, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._creating.pop(claim.intent_id, None)

    def _renew_leases(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [c for c, at in self._creating.values() if now - at >= POOL_LEASE_S / 3]
        for claim in due:
            self.store.renew_claim(claim, POOL_LEASE_S)
            with self._lock:
                if claim.intent_id in self._creating:
                    self._creating[claim.intent_id] = (claim, now)

    def _reconcile_claim(self, claim: Claim) -> None:
        """A dead holder's intent: its create may have made a batch. Look for it by list
        (time and width) once; record it, or put the turns back in the queue."""
        wait_s = UNKNOWN_CREATE_WAIT_S - claim.age_s
        if wait_s > 0:  # a create cut off moments ago may not be listed yet
            self._closed.wait(wait_s)
        try:
            batch_id = self.api.find(not_before=claim.created_at, size=len(claim.turns),
                                     exclude=self.store.known_batch_ids(), notify=self.say)
        except HarnessError as exc:
            self.say(f"could not look for the batch of a claim another process left: {exc}; "
                     "trying again when its lease runs out")
            return
        if batch_id is None:
            self.store.release_claim(claim.intent_id)
            return
        self.say(f"re-attached to {batch_id}, created by a process that stopped before "
                 "recording it")
        self.store.record_claim_batch(claim.intent_id, batch_id)

    def _fan_out(self, custom_ids: Sequence[str]) -> Notify:
        with self._lock:
            listeners = [self._notifies[c] for c in custom_ids if c in self._notifies]

        def notify(text: str) -> None:
            for listener in listeners:
                listener(text)

        return notify

    # -- the poller: one process per account ---------------------------------------------
    def _poll_forever(self) -> None:
        role: Role | None = None
        watched: dict[str, Ticket] = {}
        next_role_at = next_refresh_at = 0.0
        while not self._closed.is_set():
            woken = self._poll_wake.is_set()
            self._poll_wake.clear()
            try:
                now = time.monotonic()
                if now >= next_role_at:  # held: checked now and then; not held: tried often
                    next_role_at = now + (ROLE_CHECK_S if role is not None else ROLE_RETRY_S)
                    if role is not None and not role.alive():
                        role = self._stop_polling(watched)
                    if role is None and self.api.ready and (
                            role := self.store.hold_role("poller", self.account)):
                        next_refresh_at = 0.0
                if role is not None:
                    self._write_landed(watched)
                    if woken or now >= next_refresh_at:
                        self._watch_in_flight(watched)
                        next_refresh_at = now + IN_FLIGHT_REFRESH_S
                self._pass_recovered()
                wait_s = min(next_role_at, next_refresh_at if role else math.inf) - \
                    time.monotonic()
            except JournalError as exc:
                self._unreachable(exc)
                wait_s = POOL_RETRY_S
            if wait_s > 0:
                self._poll_wake.wait(wait_s)
        if role is not None:
            self._stop_polling(watched)
            with contextlib.suppress(JournalError):
                role.release()

    def _stop_polling(self, watched: dict[str, Ticket]) -> Role | None:
        """The role was lost (the store went away): another process may poll now."""
        for ticket in watched.values():
            self.batch.forget(ticket)
        watched.clear()
        return None

    def _watch_in_flight(self, watched: dict[str, Ticket]) -> None:
        """Every batch of the account in flight, whoever created it, on this process's
        BatchChannel: one list call per tick for all of them."""
        for batch_id, created_at, custom_ids in self.store.batches_in_flight(self.account):
            for custom_id in custom_ids:
                if custom_id in watched:
                    continue
                ticket = self.batch.watch(custom_id, batch_id, sent_at=created_at,
                                          expected_s=None, on_status=_ignore, notify=self.say)
                watched[custom_id] = ticket
                ticket.add_done_callback(self._on_landed)

    def _on_landed(self, ticket: Ticket) -> None:
        self._landed.append(ticket)  # written by the poller thread, which can wait out outages
        self._poll_wake.set()

    def _write_landed(self, watched: dict[str, Ticket]) -> None:
        """Each ended turn's result, ledger and turnaround in the transaction that marks it
        done (the first host to write it wins); a failed look is tried again by a refresh,
        but a batch the API does not know is the end of its turns (else polled forever)."""
        landed: dict[str, Arrival] = {}
        tickets: list[Ticket] = []  # kept themselves: a lost role empties `watched` meanwhile
        unknown: list[Ticket] = []
        while self._landed:
            ticket = self._landed.popleft()
            try:
                landed[ticket.custom_id] = ticket.result()
                tickets.append(ticket)
            except BatchNotFound:
                unknown.append(ticket)
            except HarnessError as exc:
                self.say(f"polling {ticket.handle}: {exc}; trying again")
                watched.pop(ticket.custom_id, None)
        if unknown:
            self._write_unknown(unknown, watched)
        if not landed:
            return
        try:
            now = self.clock.now()
            self.store.finish_turns({custom_id: outcome_of(self.store.request(custom_id),
                                                           arrival, now)
                                     for custom_id, arrival in landed.items()})
        except JournalError:
            self._landed.extendleft(reversed(tickets))  # written once it is back
            raise
        for custom_id, arrival in landed.items():
            watched.pop(custom_id, None)
            self._resolve(custom_id, arrival)  # our own agent: the arrival as it came

    def _write_unknown(self, tickets: Sequence[Ticket], watched: dict[str, Ticket]) -> None:
        """The end of turns whose batch is unknown to the API, so that no host waits on it."""
        now = self.clock.now()
        try:
            self.store.finish_turns({t.custom_id: Outcome(
                "missing", now, now - self.store.request(t.custom_id).submitted_at,
                error_message=BATCH_UNKNOWN) for t in tickets})
        except JournalError:
            self._landed.extendleft(reversed(tickets))  # written once it is back
            raise
        for ticket in tickets:
            watched.pop(ticket.custom_id, None)
            self.say(f"batch {ticket.handle} is unknown to the API: its turn "
                     f"{ticket.custom_id} has ended without an answer")
            self._fail(ticket.custom_id, _unknown_batch(ticket.handle))


# What the poller stores for a turn whose batch the API does not know (404): every host's
# agent then fails the turn as the in-process path does (Collector: BatchNotFound).
BATCH_UNKNOWN = "batch unknown to the API"


def _stored_entry(row: RequestRow) -> EntryResult | None:
    """A turn's result as the poller stored it, back in the form a ticket carries (None:
    the batch held no entry for it)."""
    message = json.loads(row.message) if row.message else None
    if row.result_type == "missing":
        return None
    return EntryResult(row.custom_id, str(row.result_type), message, row.error_type,
                       row.error_message)


def _unknown_batch(batch_id: str) -> BatchNotFound:
    return BatchNotFound(f"polling {batch_id}: the API does not know it (404)")


def _shared_error(stored: str | None) -> TransportError:
    """The create failure a flusher stored for a turn, as the exception its agent expects."""
    kind, _, text = (stored or "NotSent: the shared batch was not created").partition(": ")
    return SHARED_CREATE_ERRORS.get(kind, NotSent)(text or kind)


class FleetPool(Channel, Protocol):
    """What a fleet needs from its pool beyond the Channel protocol: PooledBatchChannel (one
    process) or SharedPoolChannel (many processes through the store), from FLEET_POOLS."""

    api: BatchAPI
    cancel_scope: str  # what [c] of the Ctrl-C menu cancels

    def join(self) -> None: ...
    def leave(self) -> None: ...
    def halt(self, error: BaseException) -> None: ...
    def recover(self, journal: Store, run_id: str, notify: Notify) -> list[str]: ...
    def widths_in_flight(self) -> list[int]: ...
    def queued(self) -> int: ...
    def next_flush(self) -> tuple[float, str] | None: ...
    def close(self) -> None: ...


def _in_process_pool(store: Store, run: FleetRunRow, batch: BatchChannel, config: Config,
                     plan: FleetPlan, say: Notify, outage: PoolOutage) -> FleetPool:
    return PooledBatchChannel(batch, journal=RunPoolJournal(store, run.id),
                              max_width=plan.max_width, window_s=_window(store, plan))


def _shared_pool(store: Store, run: FleetRunRow, batch: BatchChannel, config: Config,
                 plan: FleetPlan, say: Notify, outage: PoolOutage) -> FleetPool:
    return SharedPoolChannel(store, batch, account=pool_account(config.api_key, config.base_url),
                             max_width=plan.max_width, window_s=_window(store, plan), say=say,
                             outage=outage, log_bug=lambda exc: log_bug(config.home, exc),
                             own_prefix=f"{run.token}-")


FLEET_POOLS: dict[str, Callable[..., FleetPool]] = {"sqlite": _in_process_pool,
                                                    "postgresql": _shared_pool}
"""The fleet's pool by the store's dialect: a SQLite journal lives on one host, so its pool
stays in the process; a PostgreSQL pool is shared by every process that points at it."""


# -- what the live table shows -------------------------------------------------------------
@dataclass
class AgentView:
    """One row of the live table."""

    row: FleetAgentRow
    state: str = "queued"
    turn: int = 0
    waited_s: float = 0.0
    cost_usd: float = 0.0
    waiting_since: float | None = None
    detail: str = ""


class FleetBoard:
    """Follows every agent's events (they carry their session id) for the live table. The
    agents never see it; the clock comes in so tests render a fixed picture."""

    def __init__(self, agents: Sequence[FleetAgentRow], clock: Callable[[], float],
                 history: Mapping[str, Sequence[RequestRow]] | None = None) -> None:
        """`history`: each agent's journaled requests, so a resumed fleet's table goes on
        from where it was (the turn number is the /stats row, as for one agent)."""
        self.views = {a.session_id: self._view(a, (history or {}).get(a.session_id, ()))
                      for a in agents}
        self.clock = clock
        self._lock = threading.Lock()
        self.listeners: list[Callable[[Event], None]] = []

    @staticmethod
    def _view(agent: FleetAgentRow, requests: Sequence[RequestRow]) -> AgentView:
        t = stats_totals(requests)
        return AgentView(agent, state=agent.state, turn=len(requests), waited_s=t.waited_s,
                         cost_usd=t.paid_usd)

    def handle(self, event: Event) -> None:
        with self._lock:
            view = self.views.get(event.session_id)
            if view is not None:
                self._apply(view, event)
        for listener in self.listeners:
            listener(event)

    def _apply(self, view: AgentView, event: Event) -> None:
        if isinstance(event, TurnSent):
            view.turn += 1
            view.state, view.waiting_since = f"waiting on batch {event.handle[-8:]}", event.sent_at
        elif isinstance(event, TurnEnded):
            view.waited_s += event.wait_s
            view.cost_usd += (event.cost.paid_usd or 0.0) if event.cost else 0.0
            view.state, view.waiting_since = "thinking", None
        elif isinstance(event, ToolStarted):
            view.state, view.detail = "running a tool", event.label
        elif isinstance(event, Notice) and event.level != "info":
            view.detail = event.text

    def set_state(self, session_id: str, state: str, detail: str = "") -> None:
        with self._lock:
            view = self.views[session_id]
            if view.waiting_since is not None:  # detached mid-wait: the wait so far counts
                view.waited_s += max(0.0, self.clock() - view.waiting_since)
            view.state, view.waiting_since = state, None
            view.detail = detail or view.detail

    def rows(self) -> list[AgentView]:
        with self._lock:
            return [dataclasses.replace(v) for v in self.views.values()]


def render_fleet_table(board: FleetBoard, pool_line: str, now: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("agent", "state", "turn", "waited", "cost"):
        table.add_column(name, justify="right" if name in ("turn", "waited", "cost") else "left")
    for v in board.rows():
        waited = v.waited_s + (now - v.waiting_since if v.waiting_since else 0.0)
        table.add_row(v.row.agent_id, v.state, str(v.turn), fmt_elapsed(waited),
                      fmt_usd(v.cost_usd))
    return Group(table, Text(pool_line, style="dim"))


def pool_line(pool: FleetPool, now: float) -> str:
    """Batches in flight and their widths, the next flush and why, requests in the last minute."""
    widths = pool.widths_in_flight()
    shown = ", ".join(str(w) for w in widths[:8]) + (" …" if len(widths) > 8 else "")
    flight = f"{len(widths)} batch(es) in flight" + (f" (widths {shown})" if widths else "")
    upcoming = pool.next_flush()
    flush = "nothing queued" if upcoming is None else (
        f"{pool.queued()} queued, flush in ≤{upcoming[0]:.1f}s ({upcoming[1]})")
    return f"pool: {flight} · {flush} · {pool.api.budget.in_last_minute()} API requests/min"


# -- running a fleet ------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetPlan:
    """What a run needs to start or pick up again; journaled as the run's options."""

    system: str
    max_width: int
    window_s: float | None
    prime: bool
    settings: dict[str, Any]  # AgentSettings fields shared by every agent

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Fleet:
    """Runs one fleet: each agent a plain blocking loop in a thread of its own (bounded by
    --concurrency), all sending into one pool (FLEET_POOLS). The primer goes first when the
    agents share a cacheable prefix; the rest are released when its first turn ends."""

    def __init__(self, store: Store, run: FleetRunRow, plan: FleetPlan,
                 pool: FleetPool, make_toolbox: Callable[[FleetAgentRow], Toolbox], *,
                 concurrency: int, tool_slots: int, clock: Clock | None = None,
                 log_bug: Callable[[BaseException], Path] | None = None,
                 outage: PoolOutage | None = None,
                 run_lock: SessionLock | None = None) -> None:
        self.store, self.run, self.plan, self.pool = store, run, plan, pool
        self.outage = outage or PoolOutage(_ignore)
        self.run_lock = run_lock
        self.make_toolbox, self.clock = make_toolbox, clock or Clock()
        self.agents = store.fleet_agents(run.id)
        self.board = FleetBoard(self.agents, self.clock.now,
                                {a.session_id: store.requests(a.session_id) for a in self.agents})
        self.board.listeners.append(self._on_event)
        self.stopping = threading.Event()
        self.stop_choice = "detach"
        self.agent_clock = FleetClock(self.stopping)
        self.concurrency, self._log_bug = concurrency, log_bug
        self._slots = threading.BoundedSemaphore(max(1, tool_slots))
        self._executor: Any = None
        self._futures: list[Any] = []
        self._held: list[FleetAgentRow] = []
        self._primer: str | None = None
        self._lock = threading.Lock()
        self._all_submitted = threading.Event()

    # -- starting and stopping -----------------------------------------------------------
    def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        todo = [a for a in self.agents if a.state not in ("done", "failed")]
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency,
                                            thread_name_prefix="agent")
        if self.plan.prime and len(todo) >= PRIME_MIN_AGENTS and self._fresh(todo[0]):
            self._primer, self._held = todo[0].session_id, todo[1:]
            self.board.set_state(todo[0].session_id, "priming")
            for row in self._held:
                self.board.set_state(row.session_id, "held for the primer")
            todo = todo[:1]
        else:
            self._all_submitted.set()
        self._submit(todo)

    def _fresh(self, row: FleetAgentRow) -> bool:
        return not self.store.messages(row.session_id, 0)

    def _submit(self, rows: Sequence[FleetAgentRow]) -> None:
        with self._lock:
            self._futures += [self._executor.submit(self._run_agent, row) for row in rows]

    def _release_held(self) -> None:
        """The primer's first turn has ended (or it failed): its prefix is in the cache."""
        with self._lock:
            held, self._held = self._held, []
        if held and not self.stopping.is_set():
            self._submit(held)
        self._all_submitted.set()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TurnEnded) and event.session_id == self._primer:
            self._release_held()

    def stop(self, choice: str = "detach", error: BaseException | None = None) -> None:
        """detach: batches in flight keep running, `fleet --continue` collects them; cancel:
        every batch in flight is cancelled. Either way no new turn is sent."""
        self.stop_choice = choice
        self.stopping.set()
        self.pool.halt(error or Halted("the fleet is stopping; this turn was not sent"))
        self._release_held()

    def wait(self, timeout_s: float) -> bool:
        """True once every agent has finished (done, failed, detached or stopped)."""
        if not self._all_submitted.wait(timeout_s):
            return False
        with self._lock:
            futures = list(self._futures)
        from concurrent.futures import wait as wait_futures

        return not wait_futures(futures, timeout=timeout_s).not_done

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- one agent ----------------------------------------------------------------------------
    def _run_agent(self, row: FleetAgentRow) -> None:
        if self.stopping.is_set():
            return
        self.pool.join()
        state, error = "failed", "never started"
        try:
            if not self._start_agent(row):
                state, error = "queued", None
                return
            state, error = self._drive(row)
        finally:
            self.pool.leave()
            if state != "queued":
                self._through_outages(lambda: self.store.set_agent_state(
                    self.run.id, row.idx, state, error))
            self.board.set_state(row.session_id, state, error or "")
            if row.session_id == self._primer:
                self._release_held()

    def _start_agent(self, row: FleetAgentRow) -> bool:
        """Journal the start, waiting out an unreachable pool; False when the fleet stopped
        first: the agent stays queued for a resume (a 'failed' here lost the task for good,
        as `fleet --resume` skips failed agents)."""
        try:
            self._through_outages(lambda: self.store.set_agent_state(self.run.id, row.idx,
                                                                     "running"))
        except Halted:
            return False
        self.board.set_state(row.session_id, "starting")
        return True

    def _drive(self, row: FleetAgentRow) -> tuple[str, str | None]:
        toolbox = BoundedToolbox(self.make_toolbox(row), self._slots)
        try:
            agent = self._through_outages(lambda: self._agent(row, toolbox))
            self._through_outages(lambda: self._advance(row, agent))
            return "done", None
        except Detached:
            return "detached", None
        except Halted as exc:
            if isinstance(exc, AccountRefused) and not self.stopping.is_set():
                self.stop("detach", exc)
            return "stopped", str(exc)
        except TurnFailed as exc:
            self._stop_if_fatal(exc)
            return "failed", str(exc)
        except HarnessError as exc:
            return "failed", str(exc)
        except Exception as exc:  # a bug in one agent: the others go on, the trace is kept
            where = self._log_bug(exc) if self._log_bug else "the log"
            return "failed", f"internal error ({type(exc).__name__}: {exc}); see {where}"
        finally:
            toolbox.close()

    def _advance(self, row: FleetAgentRow, agent: Agent) -> None:
        if self._fresh(row):
            agent.prompt(f"{row.prompt}\n\n(Your working directory: {row.workdir})")
        else:
            agent.resume()

    def _through_outages(self, step: Callable[[], T]) -> T:
        """Run `step`; while a shared pool's store is unreachable, wait for it and run it
        again. The agent decides every step from the journal, so running it again picks up
        where the outage cut it (each write is a transaction that happened or did not)."""
        while True:
            try:
                self._confirm_run_lock()
                done = step()
                self.outage.up()
                return done
            except PoolUnreachable as exc:
                self.outage.down(exc)
                self._wait_for_store()

    def _confirm_run_lock(self) -> None:
        """Before each step: the run is still this process's (an outage can cut the lock's
        connection; another process may then have taken the run). If not, stop here."""
        if self.run_lock is None:
            return
        try:
            self.run_lock.confirm()
        except SessionTaken as exc:
            if not self.stopping.is_set():
                self.outage.say(str(exc))
                self.stop("detach", Halted(str(exc)))
            raise Halted(str(exc)) from None

    def _wait_for_store(self) -> None:
        while not self.stopping.wait(POOL_RETRY_S):
            try:
                _ = self.store.schema_version  # one round trip: is it back?
                return
            except JournalError:
                continue
        raise Halted("the fleet stopped while its pool was unreachable")

    def _agent(self, row: FleetAgentRow, toolbox: Any) -> Agent:
        session = self.store.session(row.session_id)
        assert session is not None, f"fleet agent {row.agent_id} has no session"
        settings = AgentSettings(**{**self.plan.settings, "model": row.model,
                                    "system": self.plan.system,
                                    "max_turns": row.max_turns or self.plan.settings.get(
                                        "max_turns")})
        token = self.run.token
        return Agent(self.store, self.pool, toolbox, settings, session, emit=self.board.handle,
                     ask_interrupt=lambda _handle: self.stop_choice, clock=self.agent_clock,
                     name_request=lambda n, attempt: fleet_custom_id(token, row.idx, n, attempt))

    def _stop_if_fatal(self, exc: TurnFailed) -> None:
        """An entry refused for billing, permission or authentication: so will every other."""
        if exc.custom_id is None:
            return
        request = self.store.request(exc.custom_id)
        if request.error_type in FLEET_FATAL_ERRORS and not self.stopping.is_set():
            self.stop("detach", AccountRefused(f"{request.error_type}: {request.error_message}"))


# -- the summary --------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSummary:
    """What the fleet did, from the journal: the same figures live and after a crash."""

    run_id: str
    agents: tuple[dict[str, Any], ...]
    totals: dict[str, Any]


def summarize_fleet(store: Store, run: FleetRunRow, *, wall_s: float | None = None,
                    api_requests: int | None = None) -> FleetSummary:
    agents = store.fleet_agents(run.id)
    per_agent = [_agent_summary(store, a) for a in agents]
    requests = [r for a in agents for r in store.requests(a.session_id)]
    pooled = [*store.pool_batches(run.id, state="created"),
              *store.shared_batches(f"{run.token}-")]  # in-process, then shared creates
    return FleetSummary(run.id, tuple(per_agent),
                        _fleet_totals(requests, pooled, agents, wall_s, api_requests))


def _agent_summary(store: Store, a: FleetAgentRow) -> dict[str, Any]:
    requests = tuple(store.requests(a.session_id))
    messages = store.messages(a.session_id, 0)
    last = messages[-1] if messages else {}
    answer = final_text(last.get("content")) if last.get("role") == "assistant" else ""
    report = RunReport(a.session_id, a.model, requests, answer, store.pending_request(a.session_id))
    fields = headless_fields(report, a.error if a.state != "done" else None)
    return {"id": a.agent_id, "state": a.state, "workdir": a.workdir, **fields}


def _fleet_totals(requests: Sequence[RequestRow], pooled: Sequence[PoolBatchRow],
                  agents: Sequence[FleetAgentRow], wall_s: float | None,
                  api_requests: int | None) -> dict[str, Any]:
    t = stats_totals(requests)
    widths = [p.width for p in pooled]
    delays = [d for p in pooled for d in json.loads(p.delays)]
    ended = [r for r in requests if r.wait_s is not None and r.result_type == "succeeded"]
    return {
        "agents": len(agents),
        "states": dict(collections.Counter(a.state for a in agents)),
        "lanes": dict(collections.Counter(r.lane for r in requests)),
        "batches_created": len(pooled),
        "width": {"mean": round(sum(widths) / len(widths), 2) if widths else None,
                  "median": median(widths), "max": max(widths, default=None)},
        "flush_reasons": dict(collections.Counter(p.reason for p in pooled)),
        "turnaround_by_width_s": _turnaround_by_width(requests, pooled),
        "pool_delay_s": {"median": median(delays), "max": max(delays, default=None)},
        "detection_lag_s": median(_detection_lags(ended, pooled)),
        "requests_per_minute": round(api_requests / (wall_s / 60), 1)
        if api_requests is not None and wall_s else None,
        "cache_hit_rate": cache_hit_ratio(t.usage),
        "cache_write_tokens": t.usage.cache_creation_input_tokens,
        "cost_usd": None if t.unknown_prices else round(t.paid_usd, 6),
        "sync_cost_usd": None if t.unknown_prices else round(t.sync_usd, 6),
        "waste_usd": round(sum(r.cost_usd or 0.0 for r in requests if r.state != "applied"), 6),
        "wall_s": round(wall_s, 2) if wall_s is not None else None,
    }


def _turnaround_by_width(requests: Sequence[RequestRow],
                         pooled: Sequence[PoolBatchRow]) -> dict[str, float | None]:
    """Do wide batches take longer? Median API turnaround per width bucket, all models; a
    shared batch's width counts every host's entries, not only this run's."""
    merged: dict[str, list[float]] = {}
    known = {p.batch_id: p.width for p in pooled if p.batch_id}
    for _model, label, waits in turnaround_by_width(requests, known):
        merged.setdefault(label, []).extend(waits)
    labels = [width_label(low, high) for low, high in WIDTH_BUCKETS]
    return {label: round(median(merged[label]) or 0.0, 2) for label in labels if label in merged}


def _detection_lags(ended: Sequence[RequestRow], pooled: Sequence[PoolBatchRow]) -> list[float]:
    """Seen minus ended: (noticed - journaled) - pool delay - the API's own turnaround."""
    delay_of = {cid: d for p in pooled
                for cid, d in zip(p.custom_id_list, json.loads(p.delays), strict=False)}
    return [max(0.0, (r.ended_at or 0.0) - r.submitted_at - (r.wait_s or 0.0)
                - delay_of.get(r.custom_id, 0.0)) for r in ended]


def render_fleet_summary(console: Any, summary: FleetSummary) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("agent", "state", "turns", "waited", "cost", "result"):
        table.add_column(name, justify="right" if name in ("turns", "waited", "cost") else "left",
                         overflow="ellipsis", no_wrap=name == "result")
    for a in summary.agents:
        text = a["error"] if a["is_error"] else a["result"]
        table.add_row(a["id"], a["state"], str(a["turns"]), fmt_elapsed(a["wait_s"]),
                      fmt_usd(a["cost_usd"]), (text or "").splitlines()[0] if text else "")
    console.print(table)
    for line in _totals_lines(summary.totals):
        console.print(line, markup=False, highlight=False)


def _totals_lines(t: Mapping[str, Any]) -> list[str]:
    w, delay = t["width"], t["pool_delay_s"]
    hit = t["cache_hit_rate"]
    by_width = ", ".join(f"{k}: {v:g}s" for k, v in t["turnaround_by_width_s"].items()) or "-"
    return [
        f"fleet: {t['agents']} agents ({_counts(t['states'])}); lanes {_counts(t['lanes'])}",
        f"batches: {t['batches_created']} created, width mean {w['mean']} / median "
        f"{w['median']} / max {w['max']}; flushes {_counts(t['flush_reasons'])}",
        f"turnaround by width: {by_width}; pool delay median {_secs(delay['median'])} "
        f"(max {_secs(delay['max'])}); detection lag median {_secs(t['detection_lag_s'])}",
        f"API: {t['requests_per_minute'] if t['requests_per_minute'] is not None else '-'} "
        f"batch requests/min; cache hit rate {'-' if hit is None else f'{100 * hit:.0f}%'}, "
        f"{fmt_tokens(t['cache_write_tokens'])} tokens written to the cache",
        f"cost: {fmt_usd(t['cost_usd'])} paid vs {fmt_usd(t['sync_cost_usd'])} at synchronous "
        f"prices; waste {fmt_usd(t['waste_usd'])} (paid for turns never used)",
    ]


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counter.items()) or "none"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


# -- the front-end ------------------------------------------------------------------------
FLEET_INTERRUPT_MENU = ("[bold]Interrupted.[/] \\[d] detach: batches in flight keep running; "
                        "pick them up with `fleet --continue` · \\[c] {cancel_scope} · Enter: "
                        "keep going")  # \\[ : a key, not a rich style tag


# `fleet --continue` looks this far back for the newest run started on this host.
FLEET_RUNS_SCANNED = 200


def run_origin(home: Path) -> str:
    """Where a run was started (host and state dir): `--continue` picks up this host's."""
    return f"{socket.gethostname()}:{home}"


def open_fleet_run(store: Store, fc: FleetConfig) -> tuple[FleetRunRow, FleetPlan]:
    """A new run (the task file parsed whole BEFORE anything is created or sent), or the
    run named by --continue / --resume with the plan it was started with."""
    if fc.continue_last or fc.resume_run:
        run = store.fleet_run(fc.resume_run) if fc.resume_run else \
            store.latest_fleet_run(run_origin(fc.base.home))
        if run is None:
            hint = "; a run started with --pool URL is there: add it" \
                if store.dialect == "sqlite" else ""
            raise ConfigError(f"no fleet run {fc.resume_run or ''} in {store.location}{hint}"
                              .replace("run  in", "run in"))
        plan_fields = {f.name for f in dataclasses.fields(FleetPlan)}
        return run, FleetPlan(**{k: v for k, v in run.options_value.items() if k in plan_fields})
    assert fc.tasks is not None
    tasks = parse_tasks(fc.tasks.read_text(encoding="utf-8", errors="replace"))
    plan = _plan(fc)
    run = store.create_run(str(fc.tasks), {**plan.to_json(), "origin": run_origin(fc.base.home)})
    for idx, task in enumerate(tasks):
        workdir = task.workdir or _fresh_workdir(fc, run, task)
        model = task.model or fc.base.model
        session = store.create_session(workdir, model)
        store.update_session(session.id, title=f"fleet {run.id} · {task.id}")
        store.add_agent(FleetAgentRow(run.id, idx, task.id, session.id, task.prompt, str(workdir),
                                      model, task.max_turns, "queued"))
    return run, plan


def _plan(fc: FleetConfig) -> FleetPlan:
    system = FLEET_SYSTEM_PROMPT
    if fc.preamble is not None:
        system += "\n\n" + fc.preamble.read_text(encoding="utf-8", errors="replace").strip()
    settings = {f.name: getattr(fc.base, f.name) for f in dataclasses.fields(AgentSettings)
                if hasattr(fc.base, f.name) and f.name != "model"}
    return FleetPlan(system, fc.max_width, fc.window_s, fc.prime, settings)


def _fresh_workdir(fc: FleetConfig, run: FleetRunRow, task: FleetTask) -> Path:
    import shutil

    path = fc.runs_dir / run.id / task.id
    if fc.template is not None:
        shutil.copytree(fc.template, path, symlinks=True)
    else:
        path.mkdir(parents=True)
    return path.resolve()


def run_fleet_command(fc: FleetConfig) -> int:
    from rich.console import Console

    config = fc.base
    if not config.api_key:
        raise ConfigError("ANTHROPIC_API_KEY is not set. Export your key, or try it offline "
                          "against the stand-in: see 'Try it offline' in README.md")
    store = open_store(config.pool, config.home)
    lock = store.session_lock(config.home)
    try:
        run, plan = open_fleet_run(store, fc)
        lock.acquire(f"fleet-{run.id}")  # two processes on one run would pay turns twice
        console = Console(stderr=config.output_format == "json", highlight=False)
        return _run_fleet(fc, store, run, plan, console, lock)
    finally:
        lock.release()
        store.close()


def _run_fleet(fc: FleetConfig, store: Store, run: FleetRunRow, plan: FleetPlan,
               console: Any, run_lock: SessionLock | None = None) -> int:
    config = fc.base
    say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731
    api = BatchAPI(make_client_factory(config.api_key, config.base_url))
    api.warm_up()
    outage = PoolOutage(say)
    pool = FLEET_POOLS[store.dialect](
        store, run, BatchChannel(api, poll_interval_s=config.poll_interval_s), config, plan, say,
        outage)
    toolboxes = _toolbox_maker(config, say)
    for batch_id in pool.recover(store, run.id, say):
        say(f"re-attached to {batch_id}, created before the interruption")
    fleet = Fleet(store, run, plan, pool, toolboxes, concurrency=fc.concurrency,
                  tool_slots=max(2, os.cpu_count() or 2),
                  log_bug=lambda exc: log_bug(config.home, exc), outage=outage,
                  run_lock=run_lock)
    fleet.plan = dataclasses.replace(plan, prime=plan.prime and shares_cacheable_prefix(
        [a.model for a in fleet.agents], plan.system))
    prime = fleet.plan.prime
    say(f"fleet {run.id}: {len(fleet.agents)} agents"
        + (", one primer first (shared prefix written once)" if prime else ""))
    store.set_run_state(run.id, "running")
    started, taken = time.time(), api.budget.taken
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fleet.start()
        watch_fleet(fleet, pool, console)
    finally:
        fleet.close()
        pool.close()
    return _finish_fleet(fc, store, run, time.time() - started, api.budget.taken - taken, console)


def _window(store: Store, plan: FleetPlan) -> Callable[[str], float]:
    if plan.window_s is not None:
        fixed = plan.window_s
        return lambda _model: fixed
    return lambda model: pool_window_s(store.turnaround_samples(model, 50))


def _toolbox_maker(config: Config, say: Callable[[str], object]) -> Callable[[FleetAgentRow],
                                                                               Toolbox]:
    """Each agent its own sandbox (policy = its work dir); the start-up probe runs once."""
    probed = threading.Event()

    def make(row: FleetAgentRow) -> Toolbox:
        toolbox = build_toolbox(config, Path(row.workdir))
        for note in stop_leftovers(sandbox_policy(config, Path(row.workdir))):
            say(note)
        if not probed.is_set():
            probed.set()
            _check_sandbox(config, toolbox, say)
        return toolbox

    return make


def watch_fleet(fleet: Fleet, pool: FleetPool, console: Any, *,
                read_key: Callable[[float | None], str | None] = read_key_from_tty) -> None:
    """The live table until every agent has finished; Ctrl-C offers detach or cancel."""
    from rich.live import Live

    interactive = console.is_terminal and sys.stdin.isatty()

    def picture() -> Any:
        now = time.time()
        return render_fleet_table(fleet.board, pool_line(pool, now), now)

    live = Live(picture(), console=console, auto_refresh=False, transient=False) \
        if console.is_terminal else None
    if live is not None:
        live.start()
    try:
        while True:
            try:
                if fleet.wait(0.5):
                    break
                if live is not None:
                    live.update(picture(), refresh=True)
            except KeyboardInterrupt:
                choice = _ask_fleet_interrupt(console, live, interactive, read_key,
                                              pool.cancel_scope)
                if choice != "wait":
                    fleet.stop(choice)
    finally:
        if live is not None:
            live.update(picture(), refresh=True)
            live.stop()


def _ask_fleet_interrupt(console: Any, live: Any, interactive: bool,
                         read_key: Callable[[float | None], str | None],
                         cancel_scope: str) -> str:
    if not interactive:
        return "detach"
    if live is not None:
        live.stop()
    console.print(FLEET_INTERRUPT_MENU.format(cancel_scope=cancel_scope))
    try:
        key = read_key(None) or ""  # the agents go on meanwhile; the table is back after
    except (KeyboardInterrupt, EOFError):
        key = "d"
    if live is not None:
        live.start()
    return {"c": "cancel", "d": "detach", "\x03": "detach"}.get(key.lower(), "wait")


def _finish_fleet(fc: FleetConfig, store: Store, run: FleetRunRow, wall_s: float,
                  api_requests: int, console: Any) -> int:
    agents = store.fleet_agents(run.id)
    unfinished = [a for a in agents if a.state not in ("done", "failed")]
    store.set_run_state(run.id, "detached" if unfinished else "done")
    summary = summarize_fleet(store, run, wall_s=wall_s, api_requests=api_requests)
    if fc.base.output_format == "json":
        print(json.dumps({"run_id": run.id, "agents": list(summary.agents),
                          "totals": summary.totals}))
    else:
        render_fleet_summary(console, summary)
    if unfinished:
        program = "batching-harness" if not sys.argv[0].endswith(".py") else \
            f"python {sys.argv[0]}"
        again = " ".join(["fleet", "--resume", run.id, *map(shlex.quote, carried_flags(fc.base))])
        console.print(f"{len(unfinished)} agent(s) not finished; pick them up with: "
                      f"{program} {again}", markup=False, highlight=False)
        return 130
    return 1 if any(a.state == "failed" for a in agents) else 0


##############################################################################
# Proxy (a local Anthropic-compatible endpoint: harnesses that know nothing about batches
# point ANTHROPIC_BASE_URL here, and their agent turns go through pooled batches)
##############################################################################

PROXY_DEFAULT_PORT = 8787
DEFAULT_UPSTREAM = "https://api.anthropic.com"
# A ping at least this often while a batch waits: Claude Code 2.1.332 kept a stream open
# for 200 s with a ping every 5 s (reference/clients.md); the issue asks for 10 s at most.
PROXY_PING_S = 5.0
# A streaming client gets its headers once its entry is in a batch, or this long after the
# pool flushed at the latest. A create refused at once (a bad key, a spend limit) is then
# the plain HTTP error the client knows how to show; a slow create still starts the stream.
HEADERS_GRACE_S = 5.0
# Pool narrow and flush fast: a batch returns nothing until its slowest entry ends and its
# width does not change the price, so an entry waits at most this long for company.
DEFAULT_POOL_WINDOW_S = 2.0
DEFAULT_POOL_WIDTH = 32
# A client's retry re-attaches to an undelivered entry sent within this long (a batch
# expires 24 h after it is created).
REATTACH_WINDOW_S = 24 * 3600.0
# Side requests go sync under --route batch: nobody should wait minutes for a title or a
# quota probe, and on a cheap model the discount is worth a fraction of a cent.
SIDE_MAX_TOKENS = 1024
FAST_MODEL_PREFIXES = ("claude-haiku-",)
ROUTE_HEADER = "x-batching-route"
TOKEN_HEADER = "x-batching-token"
TOKEN_ENV = "BATCHING_HARNESS_PROXY_TOKEN"
# Never handed on: hop-by-hop headers, the ones this proxy recomputes, and its own.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", ROUTE_HEADER, TOKEN_HEADER})
# The HTTP status the synchronous API answers each error type with (batch-api.md, Errors).
ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "conflict_error": 409,
    "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529}
_DELTA_USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                     "output_tokens", "server_tool_use")
MAX_BODY_BYTES = 256 * 1024 * 1024
# Claude Code settings that keep ONE stream open for a long batch, measured with Claude Code
# 2.1.332 through this proxy (README, "Proxy"): without them it gives up on a stream after
# 600 s (5 minutes of pings, then its 5-minute idle limit; API_FORCE_IDLE_TIMEOUT=0 does
# not change that) and sends the turn again, or falls back to a non-streaming request. The
# proxy re-attaches both, so nothing is paid twice, but the turn is sent twice. With these
# four, one stream stayed open through a 40-minute batch; the idle limit alone (its longest,
# 30 min) gave up at 35 minutes, so the watchdog switch is the one that matters.
CLAUDE_CODE_SETTINGS = (
    ("API_TIMEOUT_MS", "86400000", "the SDK's request timeout (600 s by default)"),
    ("CLAUDE_ENABLE_STREAM_WATCHDOG", "0", "no watchdog on a stream that only pings"),
    ("CLAUDE_STREAM_IDLE_TIMEOUT_MS", "1800000", "the longest idle limit, should it apply"),
    ("CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK", "1",
     "no second, non-streaming request for the same turn"),
)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything, so it is not loopback


@dataclass(frozen=True)
class ProxyConfig:
    """`batching-harness proxy`: everything its user can set."""

    host: str = field(default="127.0.0.1", metadata=option(
        "--host", metavar="ADDR", help="address to listen on (default 127.0.0.1; anything "
        "but loopback needs --token)"))
    port: int = field(default=PROXY_DEFAULT_PORT, metadata=option(
        "--port", metavar="N", parse=int,
        help=f"port to listen on (default {PROXY_DEFAULT_PORT}; 0 picks a free one, printed)"))
    route: str = field(default="batch", metadata=option(
        "--route", choices=ROUTES, help="batch (default: agent turns batched, side requests "
        "sync), sync (everything passes through) or auto (per request, from measured "
        "turnaround and --wait-price)"))
    upstream: str = field(default=DEFAULT_UPSTREAM, metadata=option(
        "--upstream", metavar="URL", help=f"the API the proxy talks to (default "
        f"{DEFAULT_UPSTREAM}; e.g. the offline stand-in)"))
    token: str | None = field(default=None, metadata=option(
        "--token", metavar="TOKEN", help=f"clients must send it in {TOKEN_HEADER}; needed to "
        f"listen beyond loopback (or set {TOKEN_ENV})"))
    wait_price_usd_per_min: float = field(default=HEADLESS_WAIT_PRICE, metadata=option(
        "--wait-price", metavar="USD_PER_MIN", parse=float, help=f"for --route auto: what a "
        f"minute of a client's waiting is worth (default {HEADLESS_WAIT_PRICE:g})"))
    pool_window_s: float = field(default=DEFAULT_POOL_WINDOW_S, metadata=option(
        "--pool-window", metavar="S", parse=float, help=f"how long a batch entry waits for "
        f"others of the same key, model and betas (default {DEFAULT_POOL_WINDOW_S:g}; 0 sends "
        "one-entry batches)"))
    pool_width: int = field(default=DEFAULT_POOL_WIDTH, metadata=option(
        "--max-width", metavar="N", parse=int,
        help=f"entries per batch at most (default {DEFAULT_POOL_WIDTH})"))
    poll_interval_s: float = field(default=DEFAULT_POLL_INTERVAL_S, metadata=option(
        "--poll-interval", metavar="S", parse=float,
        help=f"first poll interval in seconds (default {DEFAULT_POLL_INTERVAL_S})"))
    output_format: str = field(default="text", metadata=option(
        "--output-format", choices=OUTPUT_FORMATS, help="text, or one JSON object per line"))
    log_path: Path | None = field(default=None, metadata=option(
        "--log", metavar="FILE", parse=lambda v: Path(v).expanduser(),
        help="also append one JSON object per line to FILE (0600)"))
    pool: str | None = field(default=None, metadata=option(
        "--pool", metavar="URL", show=_pool_shown,
        help="pool entries with every proxy and fleet on any host that points at this "
        "PostgreSQL pool: postgresql://user@host/db[?schema=NAME] (default: this proxy's own "
        "pool, journaled in BATCHING_HARNESS_HOME; also BATCHING_HARNESS_POOL)"))
    home: Path = Path("~/.batching-harness")
    """Where the journal lives (BATCHING_HARNESS_HOME)."""

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_proxy_config(argv: Sequence[str], environ: Mapping[str, str]) -> ProxyConfig:
    """Pure: `proxy ...` arguments and the environment in, a validated ProxyConfig out."""
    p = argparse.ArgumentParser(prog="batching-harness proxy", description=(
        "A local Anthropic-compatible endpoint that batches other harnesses' turns (50% "
        "cheaper, slower)."))
    _add_options(p, ProxyConfig)
    try:
        ns = p.parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed usage or --help
        raise _ArgparseExit(int(exc.code or 0)) from None
    values = _parsed_values(ns, ProxyConfig)
    home = Path(environ.get("BATCHING_HARNESS_HOME") or Path.home() / ".batching-harness")
    values["token"] = values.get("token") or environ.get(TOKEN_ENV) or None
    values["pool"] = values.get("pool") or environ.get("BATCHING_HARNESS_POOL") or None
    config = ProxyConfig(**values, home=home.expanduser().resolve())
    _check_proxy_values(config)
    return config


def _check_proxy_values(c: ProxyConfig) -> None:
    if not _loopback(c.host) and not c.token:
        raise ConfigError(f"--host {c.host}: the proxy spends the API keys of whoever reaches "
                          "it; listening beyond loopback needs --token (clients then send it "
                          f"in {TOKEN_HEADER})")
    if not 0 <= c.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535")
    if urllib.parse.urlsplit(c.upstream).scheme not in ("http", "https"):
        raise ConfigError(f"--upstream {c.upstream}: an http:// or https:// URL, please")
    if c.pool_window_s < 0 or c.poll_interval_s <= 0 or c.wait_price_usd_per_min < 0:
        raise ConfigError("--pool-window, --poll-interval and --wait-price take positive numbers")
    if not 1 <= c.pool_width <= 100_000:
        raise ConfigError("--max-width must be between 1 and 100000 (the API's limit)")


# -- what a request is -----------------------------------------------------------------


class ProxyError(HarnessError):
    """An answer the API itself would give: its HTTP status and error body."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.error_type, "message": str(self)},
                "request_id": "req_proxy_" + secrets.token_hex(8)}


class ClientGone(Exception):
    """The client closed its connection: its entry stays in flight for its retry."""


@dataclass(frozen=True)
class Credential:
    """The client's own key, exactly as it sent it; told apart by a fingerprint that is
    safe to log and to journal. The key itself is never written anywhere."""

    header: str  # x-api-key | authorization
    secret: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return "key_" + hashlib.sha256(self.secret.encode()).hexdigest()[:12]

    def client_kwargs(self) -> dict[str, str]:
        """How the SDK carries it (explicit, so the proxy's own environment never leaks in)."""
        return {"api_key": self.secret} if self.header == "x-api-key" else {
            "auth_token": self.secret}

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Credential | None:
        key = (headers.get("x-api-key") or "").strip()
        if key:
            return cls("x-api-key", key)
        scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
        return cls("authorization", token.strip()) if scheme.lower() == "bearer" and \
            token.strip() else None


@dataclass(frozen=True)
class ProxyRequest:
    """One HTTP request as the client sent it (header names in lower case)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    received_at: float

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


@dataclass(frozen=True)
class MessagesCall:
    """A POST /v1/messages: its parameters exactly as sent, and who sent them."""

    params: dict[str, Any]
    credential: Credential
    betas: tuple[str, ...]
    client: str
    route_header: str | None

    @property
    def model(self) -> str:
        return str(self.params["model"])

    @property
    def stream(self) -> bool:
        return self.params.get("stream") is True

    @property
    def batch_params(self) -> dict[str, Any]:
        """Every parameter the client sent but `stream`, which a batch entry may not carry."""
        return {k: v for k, v in self.params.items() if k != "stream"}

    @property
    def turn_key(self) -> str:
        """The same turn: the same body but for `stream` and `max_tokens` (Claude Code's
        non-streaming fallback lowers max_tokens), the same betas, the same key."""
        same = {k: v for k, v in self.params.items() if k not in ("stream", "max_tokens")}
        blob = json.dumps({"params": same, "betas": sorted(self.betas),
                           "key": self.credential.fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def client_label(headers: Mapping[str, str]) -> str:
    """Who is asking, for the log: Claude Code by its session id, the SDKs by name."""
    session = headers.get("x-claude-code-session-id") or ""
    agent = headers.get("user-agent") or ""
    if session or agent.startswith("claude-cli"):
        return f"claude-code:{session[:8]}" if session else "claude-code"
    if agent.startswith("Anthropic/"):
        return "sdk-" + agent.split("/")[1].split(" ")[0].lower()
    return re.sub(r"[^A-Za-z0-9._-]", "", agent.split("/")[0])[:24] or "client"


def parse_messages_call(req: ProxyRequest) -> MessagesCall:
    """The request's parameters, checked as the API checks them first (400 otherwise)."""
    credential = Credential.from_headers(req.headers)
    if credential is None:
        raise ProxyError(401, "authentication_error", "x-api-key header is required")
    try:
        params = json.loads(req.body or b"null")
    except ValueError:
        raise ProxyError(400, "invalid_request_error", "There was an error parsing the body "
                         "of your request as JSON.") from None
    problem = _shape_problem(params)
    if problem:
        raise ProxyError(400, "invalid_request_error", problem)
    betas = tuple(b.strip() for b in (req.headers.get("anthropic-beta") or "").split(",")
                  if b.strip())
    route = (req.headers.get(ROUTE_HEADER) or "").strip().lower() or None
    if route not in (None, "batch", "sync"):
        raise ProxyError(400, "invalid_request_error", f"{ROUTE_HEADER}: batch or sync, "
                         f"not {route!r}")
    return MessagesCall(params, credential, betas, client_label(req.headers), route)


def _shape_problem(params: Any) -> str | None:
    if not isinstance(params, dict):
        return "body: Input should be a valid dictionary"
    for name, kind, text in (("model", str, "string"), ("messages", list, "list"),
                             ("max_tokens", int, "integer")):
        if name not in params:
            return f"{name}: Field required"
        if not isinstance(params[name], kind) or isinstance(params[name], bool):
            return f"{name}: Input should be a valid {text}"
    if params.get("stream") not in (None, True, False):
        return "stream: Input should be a valid boolean"
    return None


# -- which lane ------------------------------------------------------------------------


def side_request(params: Mapping[str, Any]) -> str | None:
    """Why a request is a side request (sync under --route batch), or None for an agent turn."""
    model = str(params.get("model"))
    if model.startswith(FAST_MODEL_PREFIXES):
        return f"fast cheap model {model}"
    if not params.get("tools") and int(params.get("max_tokens") or 0) <= SIDE_MAX_TOKENS:
        return f"short request without tools (max_tokens ≤ {SIDE_MAX_TOKENS})"
    return None


def choose_proxy_lane(call: MessagesCall, route: str, router: Router,
                      waits: Sequence[float]) -> RouteDecision:
    """The client's header wins; then what a batch cannot carry; then the policy."""
    if "speed" in call.params:
        return RouteDecision("sync", "sync · fast mode cannot be batched")
    if call.route_header:
        return RouteDecision(call.route_header, f"{call.route_header} · asked for "
                                                f"({ROUTE_HEADER})")
    if route == "sync":
        return RouteDecision("sync", "sync · --route sync")
    why = side_request(call.params)
    if why:
        return RouteDecision("sync", f"sync · side request: {why}")
    if route == "batch":
        return RouteDecision("batch", "batch · agent turn")
    return router.choose(call.params, previous=None, waits=waits)


# -- the event sequence of a finished message ------------------------------------------


def message_head(model: str, message: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The message_start event: the real message's head when it is known, else a stand-in
    (the usage that message_delta carries at the end replaces its zeros)."""
    if message is not None:
        usage = dict(message.get("usage") or {})
        usage["output_tokens"] = min(1, int(usage.get("output_tokens") or 0))
        head = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": usage}
        head.pop("stop_details", None)
    else:
        head = {"id": "msg_proxy_" + secrets.token_hex(12), "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0,
                                                 "service_tier": "batch"}}
    return {"type": "message_start", "message": head}


def replay_events(message: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Everything after message_start that the streaming API sends for `message`: per block
    content_block_start / _delta / _stop, then message_delta (final stop_reason, the usage
    figures) and message_stop."""
    events: list[tuple[str, dict[str, Any]]] = []
    for index, block in enumerate(message.get("content") or []):
        events += _block_events(index, block)
    delta = {k: message.get(k) for k in ("stop_reason", "stop_sequence")}
    for key in ("stop_details", "container"):
        if message.get(key) is not None:
            delta[key] = message[key]
    usage = {k: v for k, v in (message.get("usage") or {}).items() if k in _DELTA_USAGE_KEYS}
    events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _block_events(index: int, block: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    kind = block.get("type")
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start: dict[str, Any] = {**block, "text": ""}
        if isinstance(block.get("citations"), list):
            start["citations"] = []
            deltas = [{"type": "citations_delta", "citation": c} for c in block["citations"]]
        if block.get("text"):
            deltas.insert(0, {"type": "text_delta", "text": block["text"]})
    elif kind == "thinking":
        start = {**block, "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")},
                  {"type": "signature_delta", "signature": block.get("signature", "")}]
    elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
        start = {**block, "input": {}}
        deltas = [{"type": "input_json_delta",
                   "partial_json": json.dumps(block.get("input", {}))}]
    else:  # redacted_thinking, server tool results: the whole block at once, no delta
        start = dict(block)
    events = [("content_block_start", {"type": "content_block_start", "index": index,
                                       "content_block": start})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": index,
                                        "delta": d}) for d in deltas]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def entry_error(result: EntryResult) -> ProxyError:
    """The error the synchronous API would have answered for an entry that did not succeed."""
    if result.type == "errored":
        kind = result.error_type or "api_error"
        return ProxyError(ERROR_STATUS.get(kind, 500), kind, result.error_message or kind)
    if result.type == "expired":
        return ProxyError(504, "timeout_error", "the batch expired (24 h) before this request "
                          "ran; nothing was billed; send it again")
    if result.type == "canceled":
        return ProxyError(500, "api_error", "the batch entry was canceled before it ran; "
                          "nothing was billed; send it again")
    return ProxyError(500, "api_error", f"the batch holds no result for {result.custom_id}")


def transport_error(exc: HarnessError) -> ProxyError:
    """A batch call that failed, as the client should hear it. Faults outlasting our retries
    become 529 (the client's SDK retries, and its retry re-attaches to the entry)."""
    if isinstance(exc, TransportError) and exc.status is not None:
        kind = exc.error_type or next((k for k, v in ERROR_STATUS.items()
                                       if v == exc.status), "api_error")
        return ProxyError(exc.status, kind, str(exc))
    if isinstance(exc, SpendLimitReached):
        return ProxyError(429, "rate_limit_error", str(exc))
    if isinstance(exc, Unreachable):
        return ProxyError(500, "api_error", f"the proxy cannot reach its upstream: {exc}")
    return ProxyError(529, "overloaded_error", f"{exc}; send the request again to re-attach "
                      "to the same batch entry")


def entry_cost(model: str, params: Mapping[str, Any],
               message: Mapping[str, Any] | None) -> CostBreakdown:
    """Paid (batch rates) and synchronous dollars of one entry's answer."""
    if message is None:
        return CostBreakdown(0.0, 0.0, 0.0)  # errored, expired, canceled: not billed
    if message.get("stop_reason") == "refusal" and not message.get("content"):
        return CostBreakdown(0.0, 0.0, 0.0)  # a refusal before any output is not charged
    return cost_breakdown(model, Usage.from_api(message.get("usage")), lane="batch",
                          requested_ttl=_request_ttl(params))


# -- batch entries and the pool ----------------------------------------------------------


class ProxyEntry:
    """One batch entry and every client request waiting on it (the first, and the retries
    that re-attached). Resolved once; waiters block on its condition."""

    def __init__(self, custom_id: str, call: MessagesCall, received_at: float, *,
                 batch_id: str | None = None) -> None:
        self.custom_id, self.call, self.received_at = custom_id, call, received_at
        self.batch_id = batch_id
        self.result: EntryResult | None = None
        self.failure: ProxyError | None = None
        self.cost = CostBreakdown(None, None, None)
        self.wait_s: float | None = None
        self._changed = threading.Condition()

    @property
    def done(self) -> bool:
        return self.result is not None or self.failure is not None

    def submitted(self, batch_id: str) -> None:
        with self._changed:
            self.batch_id = batch_id
            self._changed.notify_all()

    def finish(self, result: EntryResult, cost: CostBreakdown, wait_s: float | None) -> None:
        with self._changed:
            self.result, self.cost, self.wait_s = result, cost, wait_s
            self._changed.notify_all()

    def fail(self, error: ProxyError) -> None:
        with self._changed:
            self.failure = error
            self._changed.notify_all()

    def wait(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(ready, timeout=max(0.0, timeout_s))

    def wake(self) -> None:
        """Let every waiter look again (the proxy is stopping)."""
        with self._changed:
            self._changed.notify_all()

    def answer(self) -> dict[str, Any]:
        """The Message, or the ProxyError the synchronous API would have given."""
        if self.failure is not None:
            raise self.failure
        assert self.result is not None, "answer() before the entry ended"
        if self.result.type != "succeeded" or self.result.message is None:
            raise entry_error(self.result)
        return self.result.message


def _proxy_client_factory(credential: Credential, upstream: str) -> Callable[[], Any]:
    def factory() -> Any:
        import anthropic

        return anthropic.Anthropic(base_url=upstream, max_retries=0, timeout=60.0,
                                   **credential.client_kwargs())

    return factory


class KeyChannels:
    """One batch channel per API key: its own poller and its own request budget (the batch
    rate limit is per key), so pools never mix keys and one key's faults stay its own."""

    def __init__(self, upstream: str, *, poll_interval_s: float, clock: Clock,
                 requests_per_minute: int = BATCH_REQUESTS_PER_MINUTE,
                 retry: RetryPolicy = RetryPolicy(),
                 factory: Callable[[Credential, str], Callable[[], Any]] = _proxy_client_factory
                 ) -> None:
        self.upstream, self.poll_interval_s, self.clock = upstream, poll_interval_s, clock
        self.requests_per_minute, self.retry = requests_per_minute, retry
        self._factory = factory
        self._channels: dict[str, BatchChannel] = {}
        self._lock = threading.Lock()

    def for_key(self, credential: Credential) -> BatchChannel:
        with self._lock:
            channel = self._channels.get(credential.fingerprint)
            if channel is None:
                api = BatchAPI(self._factory(credential, self.upstream), retry=self.retry,
                               budget=RequestBudget(self.requests_per_minute, self.clock),
                               clock=self.clock)
                channel = BatchChannel(api, poll_interval_s=self.poll_interval_s,
                                       clock=self.clock)
                self._channels[credential.fingerprint] = channel
            return channel


class Pool(Protocol):
    """Where batch entries go. `add` takes a new entry and eventually calls its
    submitted() / finish() / fail(); `watch` follows an entry already in a batch (a retry
    after a restart); `reconcile` one whose process died before its batch was known. One
    per store kind, from PROXY_POOLS."""

    reattachable: tuple[str, ...]  # the journal states a client's retry re-attaches to

    @staticmethod
    def recover(store: _SqlStore) -> int: ...
    def add(self, entry: ProxyEntry) -> None: ...
    def watch(self, entry: ProxyEntry) -> None: ...
    def reconcile(self, entry: ProxyEntry, row: ProxyRow) -> None: ...
    def close(self, timeout_s: float = 10.0) -> None: ...


@dataclass
class _Group:
    entries: list[ProxyEntry]
    first_at: float


class WindowPool:
    """The proxy's own small pooler: entries of one key, model and betas share a batch,
    flushed `window_s` after the group's first entry or at `width` entries (window 0: one
    entry per batch). Each key's BatchChannel then polls every batch with one list call per
    tick and resolves every entry by custom_id."""

    reattachable = ("submitted", "ended", "unknown")  # 'unknown': a create a crash cut off

    def __init__(self, channels: KeyChannels, store: _SqlStore, *, window_s: float,
                 width: int, clock: Clock, on_batch: Callable[[str, list[ProxyEntry]], None],
                 on_end: Callable[[ProxyEntry], None], say: Notify = _ignore,
                 log_bug: Callable[[BaseException], object] | None = None) -> None:
        """`say`, `log_bug`: for pools with threads of their own to report from (the shared
        one); this one's creates fail into their entries."""
        self.channels, self.store, self.clock = channels, store, clock
        self.window_s, self.width = window_s, width
        self._on_batch, self._on_end = on_batch, on_end
        self._groups: dict[tuple[str, str, tuple[str, ...]], _Group] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._journal_lock = threading.Lock()  # held for every journal write; close() too
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._creates = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pool-create")
        self._flusher = threading.Thread(target=self._flush_when_due, daemon=True,
                                         name="pool-flusher")
        self._flusher.start()

    def add(self, entry: ProxyEntry) -> None:
        call = entry.call
        key = (call.credential.fingerprint, call.model, tuple(sorted(call.betas)))
        with self._lock:
            group = self._groups.setdefault(key, _Group([], self.clock.now()))
            group.entries.append(entry)
            full = len(group.entries) >= self.width or self.window_s == 0
            if full:
                del self._groups[key]
        if full:
            self._submit(group.entries)
        else:
            self._wake.set()

    def watch(self, entry: ProxyEntry) -> None:
        assert entry.batch_id is not None
        channel = self.channels.for_key(entry.call.credential)
        waits = self.store.proxy_turnarounds(entry.call.model)
        ticket = channel.watch(entry.custom_id, entry.batch_id, sent_at=entry.received_at,
                               expected_s=median(waits) if len(waits) >= ROUTE_SAMPLES else None,
                               on_status=_ignore, notify=_ignore)
        ticket.add_done_callback(lambda t: self._arrived(entry, t))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop pooling: creates under way get `timeout_s` to record their batch; after that
        nothing more is written (the journal is about to close)."""
        self._closed = True
        self._wake.set()
        concurrent.futures.wait(list(self._pending), timeout=timeout_s)
        with self._journal_lock:
            self._creates.shutdown(wait=False, cancel_futures=True)

    def _submit(self, entries: list[ProxyEntry]) -> None:
        future = self._creates.submit(self._create, entries)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    @contextlib.contextmanager
    def _journal(self) -> Iterator[bool]:
        """Journal writes happen in here: False once closed (write nothing)."""
        with self._journal_lock:
            yield not self._closed

    def _flush_when_due(self) -> None:
        while not self._closed:
            self._wake.clear()  # before looking: an add() from here on wakes the wait below
            now = self.clock.now()
            with self._lock:
                due = [k for k, g in self._groups.items() if now >= g.first_at + self.window_s]
                flushed = [self._groups.pop(k).entries for k in due]
                next_at = min((g.first_at + self.window_s for g in self._groups.values()),
                              default=now + 60.0)
            for entries in flushed:
                self._submit(entries)
            if not flushed:
                self.clock.wait(self._wake, next_at - now)

    def _create(self, entries: list[ProxyEntry]) -> None:
        """One create for the group (the BatchAPI reconciles an unknown outcome by list()
        before trying again: never two paid batches), then every entry is watched."""
        call = entries[0].call
        channel = self.channels.for_key(call.credential)
        requests = [{"custom_id": e.custom_id, "params": e.call.batch_params} for e in entries]
        with self._journal() as open_:
            if not open_:
                return
            self.store.proxy_creating([e.custom_id for e in entries],
                                      "pool_" + secrets.token_hex(8), self.clock.now())
        try:
            batch_id = channel.api.create(
                requests, exclude=lambda: self.store.known_batch_ids() |
                self.store.proxy_batch_ids(), notify=_ignore, betas=call.betas)
        except HarnessError as exc:
            if len(entries) > 1 and getattr(exc, "status", None) == 400:
                for e in entries:  # one malformed entry must not sink the others
                    self._create([e])
                return
            for e in entries:
                with self._journal() as open_:
                    if open_:
                        self.store.update_proxy_request(e.custom_id, state="failed",
                                                        error_message=str(exc))
                e.fail(transport_error(exc))
            return
        with self._journal_lock:  # even while closing (close waits): a paid batch is kept
            for e in entries:
                self.store.update_proxy_request(e.custom_id, state="submitted",
                                                batch_id=batch_id)
        for e in entries:
            e.submitted(batch_id)
        if self._closed:
            return
        self._on_batch(batch_id, entries)
        for e in entries:
            self.watch(e)

    def reconcile(self, entry: ProxyEntry, row: ProxyRow) -> None:
        """A retry of an entry whose create a crash cut off: the batch it made, found by
        time and width among batches this journal does not know (results confirm the
        custom_id), is adopted and watched; no batch means it was never made, and the
        entry is pooled again under its own custom_id."""
        assert row.pool_id is not None and row.sent_at is not None
        channel = self.channels.for_key(entry.call.credential)
        try:
            found = channel.api.find(not_before=row.sent_at, size=row.width or 1,
                                     exclude=self.store.known_batch_ids() |
                                     self.store.proxy_batch_ids(), notify=_ignore)
        except HarnessError as exc:
            entry.fail(transport_error(exc))
            return
        with self._journal_lock:
            self.store.proxy_adopt(row.pool_id, found)
        if found is None:
            self.add(entry)
            return
        entry.submitted(found)
        self.watch(entry)

    def _arrived(self, entry: ProxyEntry, ticket: Ticket) -> None:
        try:
            result, cost, wait_s = entry_end(entry, ticket)
        except HarnessError as exc:  # polling gave up; the batch itself goes on
            entry.fail(transport_error(exc))
            self._on_end(entry)
            return
        with self._journal() as open_:
            if not open_:
                return  # shutting down: the row stays 'submitted', a retry re-attaches
            journal_entry_end(self.store, entry, result, cost, wait_s, self.clock.now())
        entry.finish(result, cost, wait_s)
        self._on_end(entry)

    @staticmethod
    def recover(store: _SqlStore) -> int:
        """At start-up, before any entry: rows a crash left before a known batch (how many
        were never sent; a retry of those sends them again)."""
        return store.proxy_unsent()


def entry_end(entry: ProxyEntry, ticket: Ticket) -> tuple[EntryResult, CostBreakdown,
                                                          float | None]:
    """A landed ticket as its entry's end: the result, its price, the turnaround (a
    HarnessError when polling gave up; the batch itself goes on)."""
    arrival = ticket.result()
    result = arrival.entry or EntryResult(entry.custom_id, "missing")
    return (result, entry_cost(entry.call.model, entry.call.params, result.message),
            arrival.view.turnaround_s)


def journal_entry_end(store: _SqlStore, entry: ProxyEntry, result: EntryResult,
                      cost: CostBreakdown, wait_s: float | None, now: float) -> None:
    store.update_proxy_request(
        entry.custom_id, unless_state="delivered", state="ended", ended_at=now, wait_s=wait_s,
        result_type=result.type, error_type=result.error_type,
        error_message=result.error_message,
        message=json.dumps(result.message) if result.message else None,
        usage=json.dumps(result.message.get("usage")) if result.message else None,
        cost_usd=cost.paid_usd, sync_cost_usd=cost.sync_usd)


def entry_request_row(entry: ProxyEntry, now: float) -> RequestRow:
    """A proxied entry as a shared pool's queue and ledger know a turn."""
    params = entry.call.batch_params
    return RequestRow(entry.custom_id, PROXY_SESSION, 0, len(params.get("messages") or ()),
                      entry.call.model, _request_ttl(params), int(params.get("max_tokens") or 0),
                      request_hash(params), 1, "submitting", None, now, route="proxy")


class SharedProxyPool:
    """`proxy --pool postgresql://…`: entries join the shared pool's queue, the one fleets
    use, so proxies and fleets on many hosts that send with one API key to one endpoint
    fill the same batches (one flusher per pool key, one poller per key, anywhere; see the
    shared pool's banner). One SharedPoolChannel per key: a key lives only in the memory
    of the processes its clients reached, never in the store, so only those flush or poll
    for it. Entries of a key whose proxies all stopped wait in the queue (or in their
    batch) until a client with that key comes back; its retry re-attaches to them.

    A proxy counts in the pool as one agent that is never waiting (a client may send at
    any moment) plus one waiting agent per entry it carries: while a proxy is open, a
    flusher sends at the window or the width cap, never "because everyone is waiting"."""

    reattachable = ("pooled", "submitted", "ended")  # 'pooled': queued, or sent by another

    def __init__(self, channels: KeyChannels, store: _SqlStore, *, window_s: float,
                 width: int, clock: Clock, on_batch: Callable[..., None],
                 on_end: Callable[[ProxyEntry], None], say: Notify = _ignore,
                 log_bug: Callable[[BaseException], object] | None = None) -> None:
        self.channels, self.store, self.clock = channels, store, clock
        self.window_s, self.width, self.say, self._log_bug = window_s, width, say, log_bug
        self._on_batch, self._on_end = on_batch, on_end
        self._pools: dict[str, SharedPoolChannel] = {}
        self._logged: set[str] = set()  # batch ids already in the log
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._closed = False

    @staticmethod
    def recover(store: _SqlStore) -> int:
        """Nothing to sweep at start-up: a row left 'pooled' may be another live proxy's;
        each is reconciled through the shared queue when its client retries."""
        return 0

    # -- the Pool protocol ------------------------------------------------------------
    def add(self, entry: ProxyEntry) -> None:
        self.store.begin_proxy_entry(entry_request_row(entry, self.clock.now()))
        self._carry(entry, lambda shared: self._send(shared, entry))

    def watch(self, entry: ProxyEntry) -> None:
        batch_id = entry.batch_id
        assert batch_id is not None
        self._carry(entry, lambda _shared: batch_id)

    def reconcile(self, entry: ProxyEntry, row: ProxyRow) -> None:
        """A retry of an entry whose proxy stopped before it knew the batch: if the entry is
        in the shared queue or already in a batch, wait for that; if its create was refused,
        that refusal; if it never reached the queue (or was taken back out), queue it now."""
        self._carry(entry, lambda shared: self._find_or_send(shared, entry))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop: this proxy's entries nobody has claimed leave the queue (their clients'
        retries queue them again), creates under way record their batch, roles and the
        member row are let go. Nothing is written to the proxy's rows after this."""
        with self._journal_lock:
            self._closed = True
        with self._lock:
            pools = list(self._pools.values())
        stopping = ProxyError(529, "overloaded_error", "the proxy is stopping; send the "
                              "request again to re-attach to the same batch entry")
        for shared in pools:
            shared.halt(stopping)
            shared.close()

    # -- each entry: into a batch, then to its end ------------------------------------
    def _shared(self, credential: Credential) -> SharedPoolChannel:
        with self._lock:
            shared = self._pools.get(credential.fingerprint)
            fresh = shared is None
            if shared is None:
                shared = self._pools[credential.fingerprint] = SharedPoolChannel(
                    self.store, self.channels.for_key(credential),
                    account=pool_account(credential.secret, self.channels.upstream),
                    max_width=self.width, window_s=lambda _model: self.window_s,
                    say=self.say, clock=self.clock, log_bug=self._log_bug)
        if fresh:
            shared.join()  # the open door: a client of this key may send at any moment
        return shared

    def _carry(self, entry: ProxyEntry, into_batch: Callable[[SharedPoolChannel], str]) -> None:
        """The entry's batch (waiting for it may take a window and more) and its end, on a
        thread of its own: the client's handler streams pings meanwhile."""
        shared = self._shared(entry.call.credential)
        shared.join()
        threading.Thread(target=self._follow, args=(entry, shared, into_batch), daemon=True,
                         name="proxy-entry").start()

    def _follow(self, entry: ProxyEntry, shared: SharedPoolChannel,
                into_batch: Callable[[SharedPoolChannel], str]) -> None:
        try:
            batch_id = into_batch(shared)
        except HarnessError as exc:
            self._failed(entry, shared, exc)
            return
        except Exception as exc:  # a bug: this client hears a 500, the others go on
            where = self._log_bug(exc) if self._log_bug else "the log"
            self._failed(entry, shared, ProxyError(500, "api_error", "batching-harness proxy: "
                                                   f"internal error; see {where}"))
            return
        # In a batch: from here on the entry is never failed for a journal write (its
        # retry would pay again); it ends when its batch does.
        self._submitted(entry, batch_id)
        ticket = shared.watch(entry.custom_id, batch_id, sent_at=entry.received_at,
                              expected_s=None, on_status=_ignore, notify=_ignore)
        ticket.add_done_callback(lambda t: self._arrived(entry, shared, t))

    def _send(self, shared: SharedPoolChannel, entry: ProxyEntry) -> str:
        self.store.release_connection()  # a window, or an outage, may pass before the batch
        return shared.send(entry.custom_id, entry.call.batch_params,
                           exclude=self.store.known_batch_ids, notify=_ignore,
                           betas=entry.call.betas)

    def _find_or_send(self, shared: SharedPoolChannel, entry: ProxyEntry) -> str:
        queued = self.store.queue_entry(entry.custom_id)
        if queued is not None and queued[0] == "failed":
            raise _shared_error(queued[2])
        if queued is not None:
            with contextlib.suppress(Withdrawn):  # its proxy stopped first: queued anew
                found = shared.reconcile(entry.received_at, exclude=set(), notify=_ignore,
                                         custom_id=entry.custom_id)
                if found is not None:
                    return found
        self.store.begin_proxy_entry(entry_request_row(entry, self.clock.now()))
        return self._send(shared, entry)

    def _write_row(self, custom_id: str, **fields: Any) -> None:
        """A write to the entry's row, best effort: the pool's server may be away, and the
        row as it was still leads a retry to the same entry (never to a second payment)."""
        with self._journal_lock:
            if self._closed:
                return
            with contextlib.suppress(JournalError):
                self.store.update_proxy_request(custom_id, unless_state="delivered", **fields)

    def _submitted(self, entry: ProxyEntry, batch_id: str) -> None:
        self._write_row(entry.custom_id, state="submitted", batch_id=batch_id)
        entry.submitted(batch_id)
        if first_time(self._logged, batch_id, self._lock):
            width: int | None = None
            with contextlib.suppress(JournalError):
                width = self.store.batch_width(batch_id)
            self._on_batch(batch_id, [entry], width)

    def _failed(self, entry: ProxyEntry, shared: SharedPoolChannel, exc: HarnessError) -> None:
        """Before any batch: refused, withdrawn, or the pool away. Only a refusal is the
        entry's end; otherwise its row stays as it was, and the retry finds it."""
        shared.leave()
        if not isinstance(exc, (JournalError, Halted, ProxyError)):
            self._write_row(entry.custom_id, state="failed", error_message=str(exc))
        entry.fail(exc if isinstance(exc, ProxyError) else transport_error(exc))
        self._on_end(entry)

    def _arrived(self, entry: ProxyEntry, shared: SharedPoolChannel, ticket: Ticket) -> None:
        shared.leave()
        try:
            result, cost, wait_s = entry_end(entry, ticket)
        except HarnessError as exc:  # the row stays 'submitted': a retry re-attaches
            entry.fail(transport_error(exc))
            self._on_end(entry)
            return
        with self._journal_lock:
            if not self._closed:  # closing: the row stays 'submitted', the retry re-attaches
                with contextlib.suppress(JournalError):  # the pool's end is stored: same
                    journal_entry_end(self.store, entry, result, cost, wait_s,
                                      self.clock.now())
        entry.finish(result, cost, wait_s)
        self._on_end(entry)


PROXY_POOLS: dict[str, type[Any]] = {"sqlite": WindowPool, "postgresql": SharedProxyPool}
"""The proxy's pool by the store's dialect: a SQLite journal is one host's, so the proxy
pools its own clients; a PostgreSQL pool is shared by every proxy and fleet pointing at it."""


class EntryBook:
    """Batch entries by (key, turn). A request that is the same turn as an entry in flight,
    or as one that ended and was never delivered (a client that timed out and retried, or
    Claude Code's non-streaming fallback), re-attaches to it instead of paying again; after
    a restart the journal finds it. Only the same key ever re-attaches."""

    def __init__(self, store: _SqlStore, clock: Clock,
                 reattachable: Sequence[str] = ("submitted", "ended", "unknown")) -> None:
        """`reattachable`: the journal states a retry re-attaches to (the pool's)."""
        self.store, self.clock, self.reattachable = store, clock, tuple(reattachable)
        self._entries: dict[tuple[str, str], ProxyEntry] = {}
        self._lock = threading.Lock()

    def attach(self, call: MessagesCall, now: float) -> tuple[ProxyEntry, str]:
        """(entry, how): how is "new" (the caller pools it), "attached" (in memory),
        "journal-ended" (answer ready) or "journal-submitted" (the caller watches it)."""
        key = (call.credential.fingerprint, call.turn_key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.failure is None:
                self.store.proxy_attached(entry.custom_id)
                return entry, "attached"
            row = self.store.proxy_reattachable(key[0], key[1], now - REATTACH_WINDOW_S,
                                                self.reattachable)
            if row is not None:
                entry = self._entries[key] = _entry_from_row(row, call)
                self.store.proxy_attached(row.custom_id)
                return entry, f"journal-{row.state}"
            entry = self._entries[key] = ProxyEntry(new_custom_id(), call, now)
            return entry, "new"

    def delivered(self, entry: ProxyEntry) -> None:
        """A client has the whole answer: the turn is closed, a later identical request is
        a new turn (a user asking the same thing twice)."""
        with self._lock:
            key = (entry.call.credential.fingerprint, entry.call.turn_key)
            if self._entries.get(key) is entry:
                del self._entries[key]
        # Best effort: the answer is out already (an error now would be written after it);
        # a row left 'ended' only lets an identical request within the day re-attach to it.
        with contextlib.suppress(JournalError):
            self.store.update_proxy_request(entry.custom_id, state="delivered",
                                            delivered_at=self.clock.now())

    def wake_all(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            entry.wake()

    def forget(self, entry: ProxyEntry) -> None:
        """Out of memory (failed); the journal row decides whether a retry can re-attach."""
        with self._lock:
            key = (entry.call.credential.fingerprint, entry.call.turn_key)
            if self._entries.get(key) is entry:
                del self._entries[key]


def _entry_from_row(row: ProxyRow, call: MessagesCall) -> ProxyEntry:
    entry = ProxyEntry(row.custom_id, call, row.received_at, batch_id=row.batch_id)
    if row.state == "ended":
        message = json.loads(row.message) if row.message else None
        result = EntryResult(row.custom_id, row.result_type or "missing", message,
                             row.error_type, row.error_message)
        entry.finish(result, CostBreakdown(row.cost_usd, row.sync_cost_usd, None), row.wait_s)
    return entry


# -- the upstream, for everything that is not batched ---------------------------------------


class Upstream:
    """The API behind the proxy, over plain HTTP(S) keep-alive connections (one set per
    handler thread): requests go out byte for byte, answers come back as they stream."""

    def __init__(self, base_url: str, timeout_s: float = 600.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.scheme, self.netloc = parts.scheme, parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._local = threading.local()

    def send(self, method: str, target: str, headers: Mapping[str, str],
             body: bytes) -> Any:
        """The response (an http.client.HTTPResponse, body unread). A kept-alive connection
        the server closed meanwhile is replaced once; it had not carried this request."""
        for fresh in (False, True):
            conn = self._connection(fresh)
            try:
                conn.request(method, self.prefix + target, body=body or None,
                             headers=dict(headers))
                return conn.getresponse()
            except OSError as exc:
                conn.close()
                if fresh or not _stale_connection(exc):
                    raise
        raise AssertionError("unreachable")

    def _connection(self, fresh: bool) -> Any:
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            cls = http.client.HTTPSConnection if self.scheme == "https" else \
                http.client.HTTPConnection
            conn = self._local.conn = cls(self.netloc, timeout=self.timeout_s)
            conn.connect()
            # Headers and body leave in two writes: with Nagle on, the second waits ~40 ms.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


def _stale_connection(exc: BaseException) -> bool:
    import http.client

    return isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                            BrokenPipeError))


def upstream_headers(headers: Mapping[str, str], *, identity: bool) -> dict[str, str]:
    """The client's headers (its key, anthropic-version, anthropic-beta...) minus hop-by-hop
    ones and the proxy's own; `identity` asks for an uncompressed answer the proxy can read."""
    out = {k: v for k, v in headers.items() if k not in _NOT_FORWARDED}
    if identity:
        out["accept-encoding"] = "identity"
    return out


class UsageSniffer:
    """Reads usage out of a synchronous answer as it passes through, streamed or not."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self._buffer = b""
        self.usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if not self.streaming:
            return
        *events, self._buffer = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._take(line[5:])

    def close(self) -> None:
        if not self.streaming:
            self._take(self._buffer)

    def _take(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("type") == "message_start":
            self.usage = dict((obj.get("message") or {}).get("usage") or {})
        elif obj.get("type") in ("message_delta", "message"):
            self.usage.update({k: v for k, v in (obj.get("usage") or {}).items()
                               if v is not None})


# -- talking to the client ------------------------------------------------------------------


class Reply(Protocol):
    """One HTTP answer. The handler implements it; anything it writes to a client that
    went away raises ClientGone."""

    started: bool

    def json(self, status: int, body: Any) -> None: ...
    def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None: ...
    def write(self, data: bytes) -> None: ...
    def event(self, name: str, data: Mapping[str, Any]) -> None: ...
    def end(self) -> None: ...
    def client_gone(self) -> bool: ...


SSE_HEADERS = (("content-type", "text/event-stream; charset=utf-8"),
               ("cache-control", "no-cache"))


class ProxyLog:
    """One line per request (text, or JSON with --output-format json), JSON lines to --log,
    and the totals for the summary on exit. Never a key, never a body."""

    def __init__(self, out: Any, *, output_format: str, log_file: Any | None,
                 clock: Clock) -> None:
        self.out, self.json_out, self.log_file, self.clock = out, output_format == "json", \
            log_file, clock
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.widths: list[int] = []
        self.batch_paid_usd = self.batch_sync_usd = 0.0  # entries ended while running
        self.reattached = 0
        self.sync_usd = 0.0

    def emit(self, record: Mapping[str, Any], text: str) -> None:
        line = json.dumps({"time": round(self.clock.now(), 3), **record})
        with self._lock:
            print(line if self.json_out else text, file=self.out, flush=True)
            if self.log_file is not None:
                print(line, file=self.log_file, flush=True)

    def request(self, r: Mapping[str, Any]) -> None:
        with self._lock:
            self.requests[str(r.get("lane"))] += 1
            self.reattached += bool(r.get("reattached"))
            if r.get("lane") == "sync" and r.get("cost_usd") is not None:
                self.sync_usd += r["cost_usd"]
        self.emit({"event": "request", **r}, _request_text(r, self.clock.now()))

    def batch(self, batch_id: str, entries: Sequence[ProxyEntry],
              width: int | None = None) -> None:
        """A batch this proxy's entries ride in; `width`: all of its entries, when a shared
        pool's batch also carries other processes' turns."""
        width = width or len(entries)
        with self._lock:
            self.widths.append(width)
        call = entries[0].call
        self.emit({"event": "batch", "batch_id": batch_id, "width": width,
                   "model": call.model, "key": call.credential.fingerprint,
                   "betas": list(call.betas)},
                  f"{time.strftime('%H:%M:%S')} batch {batch_id} · {plural(width, 'entry')} · "
                  f"{call.model} · {call.credential.fingerprint}")

    def notice(self, text: str) -> None:
        """What the pool has to say (the shared pool's store went away, came back, ...)."""
        self.emit({"event": "notice", "text": text}, f"{time.strftime('%H:%M:%S')} {text}")

    def entry_ended(self, entry: ProxyEntry) -> None:
        with self._lock:
            self.batch_paid_usd += entry.cost.paid_usd or 0.0
            self.batch_sync_usd += entry.cost.sync_usd or 0.0

    def summary(self) -> dict[str, Any]:
        with self._lock:
            paid, sync = self.batch_paid_usd, self.batch_sync_usd
            return {"event": "summary", "requests": dict(self.requests),
                    "batches": len(self.widths), "entries": sum(self.widths),
                    "widths": sorted(self.widths), "retries_reattached": self.reattached,
                    "batch_paid_usd": round(paid, 6), "batch_sync_usd": round(sync, 6),
                    "saved_usd": round(sync - paid, 6), "sync_lane_usd": round(self.sync_usd, 6)}


def _request_text(r: Mapping[str, Any], now: float) -> str:
    parts = [time.strftime("%H:%M:%S", time.localtime(now)), str(r.get("client")),
             str(r.get("model") or r.get("path")), str(r.get("why") or r.get("lane"))]
    if r.get("wait_s") is not None:
        parts.append(f"waited {fmt_elapsed(r['wait_s'])}")
    if r.get("reattached"):
        parts.append("re-attached to its entry: paid once")
    elif r.get("cost_usd") is not None:
        paid, sync = r["cost_usd"], r.get("sync_cost_usd")
        cost = f"{fmt_usd(paid)}"
        if r.get("lane") == "batch" and sync is not None:
            cost += f" (sync {fmt_usd(sync)}, saved {fmt_usd(sync - paid)})"
        parts.append(cost)
    if r.get("error"):
        parts.append(f"{r.get('status')} {r['error']}")
    elif r.get("status") not in (None, 200):
        parts.append(str(r.get("status")))
    return " · ".join(parts)


# -- the front-end ------------------------------------------------------------------------


class Proxy:
    """One request in, one answer out. The lane is chosen per request; a batch entry is
    pooled and streamed while it waits; every failure ends in `handle`, the one boundary."""

    def __init__(self, config: ProxyConfig, store: _SqlStore, pool: Pool, book: EntryBook,
                 upstream: Upstream, log: ProxyLog, clock: Clock) -> None:
        self.config, self.store, self.pool, self.book = config, store, pool, book
        self.upstream, self.log, self.clock = upstream, log, clock
        self.router = Router({}, route="auto",
                             wait_price_usd_per_min=config.wait_price_usd_per_min)
        self._closing = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        # A synchronous answer is journaled off the request path: an fsync (about 10 ms
        # here) must not stand between a kept-alive client and its next request.
        self._journal_writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="proxy-journal")

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop: waiting clients hear 529 (their retry re-attaches once the proxy is back);
        True when every request has finished within `timeout_s`."""
        self._closing.set()
        self.book.wake_all()
        with self._idle:
            drained = self._idle.wait_for(lambda: self._active == 0, timeout=timeout_s)
        self._journal_writer.shutdown(wait=drained)
        return drained

    def handle(self, req: ProxyRequest, reply: Reply) -> None:
        with self._idle:
            self._active += 1
        try:
            self._handle(req, reply)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _handle(self, req: ProxyRequest, reply: Reply) -> None:
        record: dict[str, Any] = {"method": req.method, "path": req.path,
                                  "client": client_label(req.headers), "lane": "pass"}
        try:
            self._check_token(req)
            if req.method == "POST" and req.path == "/v1/messages":
                self._messages(req, reply, record)
            else:
                self._forward(req, reply, record, sniff=False)
        except ProxyError as exc:
            record.update(status=exc.status, error=exc.error_type)
            with contextlib.suppress(ClientGone):
                self._refuse(reply, exc)
        except ClientGone:
            record.update(status="gone", error="client went away (its entry stays in flight "
                          "for its retry)")
        except JournalError as exc:  # the journal (or the pool's server) cannot be used now
            record.update(status=529, error=str(exc))
            with contextlib.suppress(ClientGone):  # 529: the client's SDK sends it again
                self._refuse(reply, ProxyError(529, "overloaded_error", "batching-harness "
                                               f"proxy: {exc}; send the request again"))
        except Exception as exc:  # a bug: the client hears a 500, the traceback is kept
            where = log_bug(self.config.home, exc)
            record.update(status=500, error=f"internal error, traceback in {where}")
            with contextlib.suppress(ClientGone):
                self._refuse(reply, ProxyError(500, "api_error", "batching-harness proxy: "
                                               f"internal error ({type(exc).__name__})"))
        finally:
            self.log.request(record)

    def _check_token(self, req: ProxyRequest) -> None:
        if self.config.token and not hmac.compare_digest(
                (req.headers.get(TOKEN_HEADER) or "").encode(), self.config.token.encode()):
            raise ProxyError(401, "authentication_error",
                             f"this proxy needs its token in the {TOKEN_HEADER} header")

    def _refuse(self, reply: Reply, exc: ProxyError) -> None:
        """Before the answer started: the API's status and body. After: an error event."""
        if reply.started:
            reply.event("error", exc.body())
            reply.end()
        else:
            reply.json(exc.status, exc.body())

    def _messages(self, req: ProxyRequest, reply: Reply, record: dict[str, Any]) -> None:
        call = parse_messages_call(req)
        waits = self.store.proxy_turnarounds(call.model) if self.config.route == "auto" \
            else ()
        decision = choose_proxy_lane(call, self.config.route, self.router, waits)
        record.update(model=call.model, lane=decision.lane, why=decision.why,
                      stream=call.stream, key=call.credential.fingerprint)
        if decision.lane == "sync":
            self._forward(req, reply, record, sniff=True, call=call)
        else:
            self._batch(req, call, decision, reply, record)

    # -- the batch lane ----------------------------------------------------------------
    def _batch(self, req: ProxyRequest, call: MessagesCall, decision: RouteDecision,
               reply: Reply, record: dict[str, Any]) -> None:
        entry, how = self.book.attach(call, req.received_at)
        try:
            self._to_pool(req, call, decision, entry, how)
        except BaseException as exc:  # not carried: a retry must not attach to it in memory
            entry.fail(exc if isinstance(exc, ProxyError) else ProxyError(
                529, "overloaded_error", "batching-harness proxy: the entry was not pooled; "
                "send the request again"))
            self.book.forget(entry)
            raise
        record.update(custom_id=entry.custom_id, reattached=how != "new")
        if call.stream:
            self._stream_entry(entry, reply)
        else:
            self._await_entry(entry, reply)
        self.book.delivered(entry)
        record.update(status=200, batch_id=entry.batch_id,
                      wait_s=round(self.clock.now() - req.received_at, 3))
        if how == "new":
            record.update(cost_usd=entry.cost.paid_usd, sync_cost_usd=entry.cost.sync_usd)

    def _to_pool(self, req: ProxyRequest, call: MessagesCall, decision: RouteDecision,
               entry: ProxyEntry, how: str) -> None:
        """Hand the entry to the pool as `how` says (a new one, or one a journal row names)."""
        if how == "new":
            self.store.begin_proxy_request(ProxyRow(
                entry.custom_id, call.turn_key, call.credential.fingerprint, call.client,
                call.model, "batch", decision.why, int(call.stream), "pooled", None,
                json.dumps(call.params), json.dumps(list(call.betas)), req.received_at))
            self.pool.add(entry)
        elif how == "journal-submitted":
            self.pool.watch(entry)
        elif how in ("journal-unknown", "journal-pooled"):  # its process died before the batch
            row = self.store.proxy_reattachable(call.credential.fingerprint, call.turn_key,
                                                req.received_at - REATTACH_WINDOW_S,
                                                self.book.reattachable)
            if row is not None and row.state in ("unknown", "pooled"):
                self.pool.reconcile(entry, row)
            elif row is not None and row.batch_id:  # another retry adopted it meanwhile
                entry.submitted(row.batch_id)
                self.pool.watch(entry)
            else:  # it ended otherwise meanwhile (failed): this request starts afresh
                raise ProxyError(529, "overloaded_error", "batching-harness proxy: the entry "
                                 "changed while it was re-attached; send the request again")
        self.store.release_connection()  # the wait may be long: no server slot held for it

    def _stream_entry(self, entry: ProxyEntry, reply: Reply) -> None:
        """Headers and message_start once the entry is in a batch (a refused create is then
        a plain HTTP error), pings while it waits, then the message as the API streams it."""
        grace_s = self.config.pool_window_s + HEADERS_GRACE_S
        entry.wait(lambda: entry.batch_id is not None or entry.done, grace_s)
        known = None
        if entry.done:  # refused, or ended before the stream started: a plain HTTP answer
            try:
                known = entry.answer()
            except ProxyError:
                self._settle_failure(entry)
                raise
        reply.start(200, SSE_HEADERS)
        reply.event("message_start", message_head(entry.call.model, known))
        while not self._wait(entry):
            self._still_there(reply)
            reply.event("ping", {"type": "ping"})
        self._still_there(reply)
        try:
            message = entry.answer()
        except ProxyError:
            self._settle_failure(entry)
            raise
        for name, data in replay_events(message):
            reply.event(name, data)
        reply.end()

    def _await_entry(self, entry: ProxyEntry, reply: Reply) -> None:
        """Non-streaming: the Message (or the API's error) when the batch ends. A client
        that hangs up meanwhile leaves its entry in flight for its retry."""
        while not self._wait(entry):
            self._still_there(reply)
        self._still_there(reply)
        try:
            message = entry.answer()
        except ProxyError:
            self._settle_failure(entry)
            raise
        reply.json(200, message)

    @staticmethod
    def _still_there(reply: Reply) -> bool:
        """A write to a socket the client closed can still succeed, so look before the
        answer goes out: an answer nobody received is not delivered (the retry gets it)."""
        if reply.client_gone():
            raise ClientGone()
        return True

    def _wait(self, entry: ProxyEntry) -> bool:
        """True once the entry has ended; False after a ping interval without news."""
        ended = entry.wait(lambda: entry.done or self._closing.is_set(), PROXY_PING_S)
        if self._closing.is_set() and not entry.done:
            raise ProxyError(529, "overloaded_error", "the proxy is stopping; send the request "
                             "again to re-attach to the same batch entry once it is back")
        return ended

    def _settle_failure(self, entry: ProxyEntry) -> None:
        """An entry that ended without an answer is delivered as its error (a retry is a new
        turn); one whose polling failed stays in the journal for the retry to re-attach."""
        if entry.failure is not None:
            self.book.forget(entry)
        else:
            self.book.delivered(entry)

    # -- the sync lane and everything else: straight through --------------------------------
    def _forward(self, req: ProxyRequest, reply: Reply, record: dict[str, Any], *,
                 sniff: bool, call: MessagesCall | None = None) -> None:
        started = self.clock.now()
        try:
            response = self.upstream.send(req.method, req.target,
                                          upstream_headers(req.headers, identity=sniff),
                                          req.body)
        except OSError as exc:
            raise ProxyError(500, "api_error", f"the proxy cannot reach its upstream "
                             f"{self.config.upstream}: {exc}") from None
        sniffer = UsageSniffer(streaming=call is not None and call.stream)
        try:
            self._relay(response, reply, sniffer if sniff else None)
        finally:
            response.close()
        record.update(status=response.status, wait_s=None)
        record["upstream_s"] = round(self.clock.now() - started, 4)
        if call is not None:
            self._journal_sync(req, call, record, sniffer, response.status)

    def _relay(self, response: Any, reply: Reply, sniffer: UsageSniffer | None) -> None:
        headers = [(k, v) for k, v in response.getheaders()
                   if k.lower() not in _NOT_FORWARDED or k.lower() == "content-length"]
        reply.start(response.status, headers)
        if "event-stream" in (response.getheader("content-type") or ""):
            reply.write(b"")  # a stream's headers go at once, as the API sends them
        while True:
            data = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
            if not data:
                break
            if sniffer is not None:
                sniffer.feed(data)
            reply.write(data)
        reply.end()
        if sniffer is not None:
            sniffer.close()

    def _journal_sync(self, req: ProxyRequest, call: MessagesCall, record: dict[str, Any],
                      sniffer: UsageSniffer, status: int) -> None:
        cost = cost_breakdown(call.model, Usage.from_api(sniffer.usage), lane="sync",
                              requested_ttl=_request_ttl(call.params)) if sniffer.usage and \
            status == 200 else CostBreakdown(0.0, 0.0, 0.0)
        record.update(cost_usd=cost.paid_usd, sync_cost_usd=cost.sync_usd)
        now = self.clock.now()
        self._journal_writer.submit(self.store.begin_proxy_request, ProxyRow(
            new_custom_id(), call.turn_key, call.credential.fingerprint, call.client,
            call.model, "sync", record.get("why"), int(call.stream), "ended", None,
            json.dumps(call.params), json.dumps(list(call.betas)), req.received_at,
            ended_at=now, delivered_at=now, result_type="succeeded" if status == 200 else
            "errored", usage=json.dumps(sniffer.usage) if sniffer.usage else None,
            cost_usd=cost.paid_usd, sync_cost_usd=cost.sync_usd,
            wait_s=now - req.received_at))


def build_proxy_server(proxy: Proxy, host: str, port: int) -> Any:
    """A ThreadingHTTPServer (one thread per connection) handing every request to `proxy`.
    http.server is imported here: 100 ms of start-up that the agent does not need."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # events go out as written, not 40 ms later

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            reply = _HandlerReply(self)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                reply.json(413, ProxyError(413, "request_too_large", "Request exceeds the "
                                           "maximum allowed size.").body())
                return
            parts = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            proxy.handle(ProxyRequest(self.command, parts.path, parts.query, headers, body,
                                      proxy.clock.now()), reply)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # ProxyLog writes one line per request, without keys or bodies

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def handle_error(self, request: Any, client_address: Any) -> None:
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

    return Server((host.strip("[]"), port), Handler)


class _HandlerReply:
    """Reply over one BaseHTTPRequestHandler: a body with content-length, or chunks."""

    def __init__(self, handler: Any) -> None:
        self.handler, self.started, self._chunked = handler, False, False
        self._head = b""  # the status line and headers, sent with the first body bytes

    def json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.start(status, [("content-type", "application/json"),
                            ("content-length", str(len(data)))])
        self.write(data)

    def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        """Headers are held until the first write (`write(b"")` sends them alone): one
        packet instead of two for a small answer."""
        import http

        self._chunked = "content-length" not in {k.lower() for k, _ in headers}
        self.started = True
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers)]
        if self._chunked:
            lines.append("transfer-encoding: chunked")
        self._head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def write(self, data: bytes) -> None:
        if not data and not self._head:
            return
        if data and self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        head, self._head = self._head, b""
        try:
            self.handler.wfile.write(head + data)
            self.handler.wfile.flush()
        except OSError as exc:
            raise ClientGone() from exc

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        self.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    def end(self) -> None:
        self.write(b"")  # headers of an empty answer
        if self._chunked:
            try:
                self.handler.wfile.write(b"0\r\n\r\n")
                self.handler.wfile.flush()
            except OSError as exc:
                raise ClientGone() from exc

    def client_gone(self) -> bool:
        """A client that closed its end: readable with nothing to read."""
        sock = self.handler.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def proxy_banner(config: ProxyConfig, bound_url: str, unsent: int) -> list[str]:
    """What the user needs to point a client at the proxy, printed at start."""
    lines = [f"batching-harness proxy {__version__} · listening on {bound_url}",
             f"  upstream  {config.upstream}",
             f"  route     {config.route}" + (" (agent turns batch; side requests sync)"
                                              if config.route == "batch" else "")
             + f"; a request's {ROUTE_HEADER}: batch|sync wins",
             f"  pool      one key, model and betas per batch; flushed {config.pool_window_s:g}"
             f" s after its first entry or at {config.pool_width} entries"
             + (", shared with every proxy and fleet on this pool" if config.pool else ""),
             f"  journal   {_pool_shown(config.pool) if config.pool else config.home / 'journal.db'}"]
    if unsent:
        lines.append(f"  note      {plural(unsent, 'entry')} cut off by a crash before its "
                     "batch was known; a retry sends it again")
    settings = " ".join(f"{name}={value}" for name, value, _ in CLAUDE_CODE_SETTINGS)
    lines += ["Point a client at it:",
              f"  export ANTHROPIC_BASE_URL={bound_url}"
              + (f" ANTHROPIC_CUSTOM_HEADERS='{TOKEN_HEADER}: <token>'" if config.token else ""),
              "Claude Code: keep one stream open for a long batch (measured with 2.1.332: 40 min):",
              f"  export {settings}",
              "Python SDK: anthropic.Anthropic(timeout=86400) (the default gives up after 600 s; "
              "a retry re-attaches and is not paid twice)"]
    return lines


def render_proxy_stats(console: Any, rows: Sequence[ProxyRow]) -> None:
    """--stats: proxy traffic by client and lane, what it paid against the synchronous
    price, and what retries saved (entries a second client request re-attached to)."""
    from rich.table import Table

    console.print("[bold]proxy traffic[/] (requests each client sent, by lane; a retry "
                  "re-attached to its entry is free)")
    table = Table(show_edge=False)
    for col in ("client", "lane", "requests", "paid", "sync price", "saved", "free retries",
                "lost"):
        table.add_column(col, justify="left" if col in ("client", "lane") else "right",
                         no_wrap=col == "client")
    groups: dict[tuple[str, str], list[ProxyRow]] = collections.defaultdict(list)
    for r in rows:
        groups[(r.client, r.lane)].append(r)
    for (client, lane), group in sorted(groups.items()):
        paid = sum(r.cost_usd or 0.0 for r in group)
        sync = sum(r.sync_cost_usd or 0.0 for r in group)
        waste = sum(1 for r in group if r.state in ("unsent", "failed", "unknown"))
        table.add_row(client, lane, str(sum(r.attaches for r in group)), fmt_usd(paid),
                      fmt_usd(sync), fmt_usd(sync - paid),
                      str(sum(r.attaches - 1 for r in group)), str(waste))
    console.print(table)


@dataclass
class ProxyApp:
    """The proxy's parts, built once; `run_proxy` serves it, tests drive it in a thread."""

    config: ProxyConfig
    store: _SqlStore
    pool: Pool
    log: ProxyLog
    proxy: Proxy
    server: Any
    unsent: int
    log_file: Any = None
    drained: bool | None = None
    """Whether every request finished when the proxy stopped (None: not stopped yet)."""

    @property
    def base_url(self) -> str:
        return dataclasses.replace(self.config, port=self.server.server_address[1]).base_url

    def close(self) -> None:
        """Stop listening, let waiting clients go (529: retry), let creates under way record
        their batch; the journal closes only when nothing is writing to it any more."""
        self.server.server_close()
        drained = self.drained if self.drained is not None else self.proxy.close()
        self.pool.close()
        if drained:  # else the process is about to end anyway; never close under a writer
            self.store.close()
        if self.log_file is not None:
            self.log_file.close()


def open_proxy(config: ProxyConfig, out: Any, clock: Clock | None = None,
               channels: KeyChannels | None = None) -> ProxyApp:
    """Every collaborator of the proxy, wired: the journal, one channel per key, the pool,
    the entry book, the upstream and the listening socket."""
    clock = clock or Clock()
    with contextlib.suppress(OSError):  # a bad location is reported by the store, in one line
        secure_state_dir(config.home)
    store = cast(_SqlStore, open_store(config.pool, config.home))
    pool_kind = PROXY_POOLS[store.dialect]
    log_file = _open_private_log(config.log_path) if config.log_path else None
    unsent = pool_kind.recover(store)
    log = ProxyLog(out, output_format=config.output_format, log_file=log_file, clock=clock)
    book = EntryBook(store, clock, pool_kind.reattachable)
    channels = channels or KeyChannels(config.upstream, poll_interval_s=config.poll_interval_s,
                                       clock=clock)

    def ended(entry: ProxyEntry) -> None:
        log.entry_ended(entry)
        if entry.failure is not None:
            book.forget(entry)

    pool = pool_kind(channels, store, window_s=config.pool_window_s, width=config.pool_width,
                     clock=clock, on_batch=log.batch, on_end=ended, say=log.notice,
                     log_bug=lambda exc: log_bug(config.home, exc))
    proxy = Proxy(config, store, pool, book, Upstream(config.upstream), log, clock)
    try:
        server = build_proxy_server(proxy, config.host, config.port)
    except OSError as exc:
        pool.close()
        store.close()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: "
                          f"{exc.strerror or exc}") from None
    return ProxyApp(config, store, pool, log, proxy, server, unsent, log_file)


def run_proxy(config: ProxyConfig, out: Any = None) -> int:
    """`batching-harness proxy`: serve until Ctrl-C or SIGTERM, then print the summary."""
    app = open_proxy(config, out or sys.stdout)
    try:
        # `import anthropic` takes seconds: do it now, not when the first batch is due.
        threading.Thread(target=lambda: __import__("anthropic"), daemon=True).start()
        _announce(app.log, config, app.base_url, app.unsent)
        _serve_until_stopped(app.server)
        app.server.server_close()
        app.drained = app.proxy.close()  # waiting clients hear 529 and are counted first
        summary = app.log.summary()
        app.log.emit(summary, _summary_text(summary))
        return 0
    finally:
        app.close()


def _announce(log: ProxyLog, config: ProxyConfig, bound_url: str, unsent: int) -> None:
    record = {"event": "started", "base_url": bound_url, "upstream": config.upstream,
              "route": config.route, "pool_window_s": config.pool_window_s,
              "max_width": config.pool_width, "unsent": unsent,
              "client_env": {"ANTHROPIC_BASE_URL": bound_url,
                             **{name: value for name, value, _ in CLAUDE_CODE_SETTINGS}}}
    log.emit(record, "\n".join(proxy_banner(config, bound_url, unsent)))


def _serve_until_stopped(server: Any) -> None:
    """Serve in this thread; SIGTERM stops it like Ctrl-C. Streams still open are cut:
    their entries stay in the journal, and a client's retry re-attaches after a restart."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary_text(s: Mapping[str, Any]) -> str:
    lanes = ", ".join(f"{n} {lane}" for lane, n in sorted(s["requests"].items())) or "none"
    widths = f" (widths {s['widths']})" if s["widths"] else ""
    return (f"proxy summary · requests: {lanes} · {s['batches']} batches, {s['entries']} "
            f"entries{widths} · {s['retries_reattached']} client retries re-attached (paid "
            f"once) · batch lane paid {fmt_usd(s['batch_paid_usd'])} against "
            f"{fmt_usd(s['batch_sync_usd'])} synchronous: saved {fmt_usd(s['saved_usd'])} · "
            f"sync lane {fmt_usd(s['sync_lane_usd'])}")


def _open_private_log(path: Path) -> Any:
    """--log FILE, readable by the user only (it names clients, models and costs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


##############################################################################
# main (the only place real collaborators are built)
##############################################################################


def resume_command(session_id: str, config: Config, *, headless: bool = False) -> str:
    """The exact command that picks the session up again, with the limits and sandbox
    settings of this run (the journal keeps the conversation, not the flags). Headless, it
    is the headless form: a script resumes with its next prompt, which runs once the turn in
    flight is collected (its answer leads the result)."""
    program = sys.argv[0] if sys.argv and sys.argv[0] else "batching-harness"
    head = f"python {program}" if program.endswith(".py") else Path(program).name
    tail = ["--output-format", "json"] if headless and config.output_format == "json" else []
    tail += ["-p", "'<next prompt>'"] if headless else []
    return " ".join([head, "--resume", session_id, *map(shlex.quote, carried_flags(config)),
                     *tail])


def open_session(journal: Store, config: Config) -> SessionRow:
    if config.resume_id:
        session = journal.find_session(config.resume_id)
        if session is None:
            raise ConfigError(f"no session {config.resume_id!r} in {journal.location}")
        return session
    if config.continue_last:
        session = journal.latest_session(config.workdir)
        if session is None:
            raise ConfigError(f"no earlier session in {config.workdir} to continue")
        return session
    return journal.create_session(config.workdir, config.model)


def agent_settings(config: Config, model: str) -> AgentSettings:
    return settings_from(config, AgentSettings, model=model)


def run_headless(agent: Agent, config: Config, prompt: str, err_console: Any) -> int:
    """-p: progress on stderr, the answer (or one JSON object) on stdout."""
    status, error = 0, None
    try:
        agent.prompt(prompt)  # finishes what the session left in flight first
    except (Detached, KeyboardInterrupt):
        status, error = 130, "interrupted"
    except HarnessError as exc:
        status, error = 1, str(exc)
    except Exception as exc:  # a bug: the JSON and the resume hint still come out
        status, error = 1, (f"internal error ({type(exc).__name__}: {exc}); the traceback is "
                            f"in {log_bug(config.home, exc)}")
    if error:
        err_console.print(f"error: {error}")
    report = agent.report()
    if report.in_flight is not None:
        err_console.print("a turn is still in flight (and billed); resume with: "
                          f"{resume_command(report.session_id, config, headless=True)}")
    print_headless(report, config, error)
    return status


def print_headless(report: RunReport | None, config: Config, error: str | None) -> None:
    """The answer, or the JSON object (also when the run never started: report None)."""
    report = report or RunReport(None, config.model, (), "", None)  # type: ignore[arg-type]
    if config.output_format == "text":
        if report.answer:
            print(report.answer)
        return
    print(json.dumps(headless_fields(report, error)))


def headless_fields(report: RunReport, error: str | None) -> dict[str, Any]:
    """One run as JSON: -p prints it; a fleet prints one per agent."""
    requests, text = list(report.requests), report.answer
    numbers = report.turn_numbers or range(1, len(requests) + 1)
    totals = stats_totals(requests)
    u = totals.usage
    return {
        "session_id": report.session_id, "model": report.model, "result": text,
        "stop_reason": requests[-1].stop_reason if requests else None,
        # A turn is one model request, as the live line and /stats count them: "turn N"
        # there is per_turn's "turn" here. A failed or hurried turn counts; `lanes` counts
        # only the answers the conversation kept.
        "turns": len(requests),
        "lanes": {lane: sum(1 for r in requests if r.lane == lane and r.state == "applied")
                  for lane in LANES},
        "per_turn": [{"turn": n, "lane": r.lane, "handle": r.batch_id,
                      "result": r.result_type, "state": r.state, "cost_usd": r.cost_usd,
                      "wait_s": r.wait_s, "route": r.route}
                     for n, r in zip(numbers, requests, strict=True)],
        "batches": [r.batch_id for r in requests if r.batch_id and r.lane == "batch"],
        "wait_s": round(totals.waited_s, 3),
        "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                  "cache_creation_input_tokens": u.cache_creation_input_tokens,
                  "cache_read_input_tokens": u.cache_read_input_tokens},
        # null, not 0, when any turn's price is unknown: a script must not read it as free
        "cost_usd": None if totals.unknown_prices else round(totals.paid_usd, 6),
        "sync_cost_usd": None if totals.unknown_prices else round(totals.sync_usd, 6),
        "waste_usd": round(totals.waste_usd, 6),
        "is_error": error is not None, "error": error,
    }


def read_prompt_arg(prompt: str) -> str:
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise ConfigError("-p needs a prompt (or '-' with the prompt on stdin)")
    return text


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    config: Config | None = None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["fleet"]:  # the fleet front-end, behind the same error boundary
            return run_fleet_command(parse_fleet_config(argv[1:], environ))
        if argv[:1] == ["proxy"]:  # a front-end for other harnesses: same error boundary
            return run_proxy(parse_proxy_config(argv[1:], environ))
        config = parse_config(argv, environ)
        return _run(config)
    except _ArgparseExit as exc:
        return exc.status
    except (ConfigError, JournalError, SandboxError) as exc:
        print(f"batching-harness: {exc}", file=sys.stderr)
        if config is not None and config.prompt is not None and config.output_format == "json":
            print_headless(None, config, str(exc))  # a script parses stdout whatever happened
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: keep the traceback, say where, exit non-zero
        home = Path(environ.get("BATCHING_HARNESS_HOME") or Path.home() / ".batching-harness")
        print(f"batching-harness: internal error ({type(exc).__name__}: {exc}); the traceback "
              f"is in {log_bug(home, exc)}", file=sys.stderr)
        return 1


def log_bug(home: Path, exc: BaseException) -> Path:
    """Append the traceback to errors.log: bugs are never swallowed, only kept off-screen."""
    import traceback

    path = home.expanduser() / "errors.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} batching-harness {__version__}\n")
        log.write("".join(traceback.format_exception(exc)))
    return path


def _run(config: Config) -> int:
    from rich.console import Console

    if config.action == "doctor":
        return run_doctor(Console(), [*doctor_checks(sandbox_policy(config, config.workdir)),
                                      *store_checks(config.pool)])
    with contextlib.suppress(OSError):  # a bad location is reported by the store, in one line
        secure_state_dir(config.home)
    journal = open_store(config.pool, config.home)
    if config.action == "stats":
        # A shared pool's proxied entries: in the proxy's table below, not twice
        render_history(Console(), [r for r in journal.requests()
                                   if r.session_id != PROXY_SESSION])
        proxied = journal.proxy_requests()
        if proxied:
            render_proxy_stats(Console(), proxied)
        return 0
    if config.prompt is None and not sys.stdin.isatty():
        raise ConfigError("the interactive prompt needs a terminal: run it in one, or pass "
                          "-p PROMPT (-p - reads the prompt from stdin)")
    if not config.api_key:
        raise ConfigError("ANTHROPIC_API_KEY is not set. Export your key, or try it offline "
                          "against the stand-in: see 'Try it offline' in README.md")
    prompt = read_prompt_arg(config.prompt) if config.prompt is not None else None
    if config.model_given or not (config.resume_id or config.continue_last):
        check_max_tokens(config.model, config.max_tokens)  # before a session is made for it
    session = open_session(journal, config)
    lock = journal.session_lock(config.home)
    lock.acquire(session.id)
    check_workdir(session.workdir, state_dir=config.home,
                  allow_dangerous=config.allow_dangerous_workdir,
                  protected=[Path(__file__).resolve()])
    toolbox = build_toolbox(config, Path(session.workdir))
    for note in stop_leftovers(sandbox_policy(config, Path(session.workdir))):
        print(f"batching-harness: {note}", file=sys.stderr)
    try:
        return _run_session(config, journal, session, toolbox, prompt, lock)
    finally:
        toolbox.close()
        journal.close()
        lock.release()


def _run_session(config: Config, journal: Store, session: SessionRow, toolbox: Toolbox,
                 prompt: str | None, lock: SessionLock) -> int:
    from rich.console import Console

    headless = prompt is not None
    console = Console(stderr=headless, highlight=False)
    console.soft_wrap = not console.is_terminal  # a machine reads it: no wrap at 80 columns
    # Headless, the answer goes to stdout only (the JSON's "result", or the text).
    ui = ConsoleUI(console, interactive=console.is_terminal and sys.stdin.isatty(),
                   answers=not headless)
    api = BatchAPI(make_client_factory(config.api_key, config.base_url))
    resumed = config.resume_id or config.continue_last
    model = session.model if resumed and not config.model_given else config.model
    check_max_tokens(model, config.max_tokens)  # a resumed session may keep another model
    agent = Agent(journal, build_router(api, config, headless=headless), toolbox,
                  agent_settings(config, model), session,
                  emit=ui.handle, ask_interrupt=ui.ask_interrupt)
    if headless:
        _check_sandbox(config, toolbox, lambda text: console.print(text, markup=False))
        return run_headless(agent, config, prompt or "", console)
    # Ctrl-C is part of the interface (cancel / detach / stop a tool), even when the shell
    # that started us ignores SIGINT, as non-interactive shells do for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    render_banner(console, config, session, _sandbox_line(config))
    if resumed:
        render_recap(console, journal.messages(session.id, session.conversation),
                     journal.requests(session.id))
    restore_terminal = show_prompt_early(ui.prompt_line)
    try:
        read_line, read_answer = make_prompt_readers(config.home, list(Repl.COMMANDS),
                                                     ui.prompt_line, restore_terminal)
        _warm_up_in_background(api, config, toolbox, ui)
        return Repl(agent, journal, ui, read_line, lambda sid: resume_command(sid, config),
                    lambda exc: log_bug(config.home, exc), lock, read_answer).run()
    finally:
        restore_terminal()


def build_router(api: BatchAPI, config: Config, *, headless: bool) -> Router:
    """Every lane in CHANNELS over one SDK client and one request budget for the key."""
    channels = {lane: cls.from_config(api, config) for lane, cls in CHANNELS.items()}
    price = config.wait_price_usd_per_min
    if price is None:
        price = HEADLESS_WAIT_PRICE if headless else INTERACTIVE_WAIT_PRICE
    return Router(channels, route=config.route, wait_price_usd_per_min=price)


def build_toolbox(config: Config, workdir: Path) -> Toolbox:
    policy = sandbox_policy(config, workdir)
    return Toolbox(BashTool(policy), EditorTool(policy), config.tool_timeout_s)


def sandbox_policy(config: Config, workdir: Path) -> SandboxPolicy:
    return SandboxPolicy(workdir=workdir, state_dir=config.home,
                         allow_domains=config.allow_domains, enabled=config.sandbox,
                         allow_dangerous_workdir=config.allow_dangerous_workdir)


def _sandbox_line(config: Config) -> str:
    if not config.sandbox:
        return "[bold red]OFF (--no-sandbox): bash runs with your full privileges[/]"
    domains = ", ".join(config.allow_domains) or "none"
    return f"[green]on[/] (srt; network: {domains}) — checking in the background"


def _check_sandbox(config: Config, toolbox: Toolbox, say: Callable[[str], object]) -> None:
    """The start-up probe: when srt cannot run, say why and the fix, in plain text."""
    if not config.sandbox:
        say("sandbox OFF (--no-sandbox): bash runs with your full privileges")
        return
    try:
        probe_sandbox(toolbox.bash.policy)
    except SandboxUnavailable as exc:
        say(f"sandbox unavailable: {exc.detail}\n  fix: {exc.fix}\n  bash is refused until "
            "then (or restart with --no-sandbox)")


def _warm_up_in_background(api: BatchAPI, config: Config, toolbox: Toolbox,
                           ui: ConsoleUI) -> None:
    """The prompt shows first; the SDK import (seconds) and the sandbox probe (about a
    second: Node start-up plus srt's proxy) happen while the user types."""

    def warm() -> None:
        api.warm_up()
        if config.sandbox:  # printed above the prompt without disturbing the typed text
            _check_sandbox(config, toolbox, ui.say)

    threading.Thread(target=warm, name="warm-up", daemon=True).start()


def run_doctor(console: Any, checks: Sequence[DoctorCheck]) -> int:
    for c in checks:
        warn = c.ok and c.detail.startswith("WARNING")
        mark = "[yellow]warn[/]" if warn else "[green]ok[/]  " if c.ok else "[red]FAIL[/]"
        console.print(f"{mark} {c.name}: {_escape(c.detail)}")
        if not c.ok and c.fix:
            console.print(f"      fix: {_escape(c.fix)}")
    return 0 if all(c.ok for c in checks) else 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
