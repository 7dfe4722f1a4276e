"""batching-harness: an interactive coding agent whose every model turn is a Message Batch.

Batches cost half the synchronous price but take a minute or more per turn, so
this harness is for work nobody is watching in real time: evals, audits,
background research. Each model turn is submitted as a one-entry batch, polled
until it ends, and its tool calls (bash inside sandbox-runtime, a file editor
confined to the work directory) are run before the next turn is submitted.

Run:        python batching_harness.py [--model ID] [--workdir DIR] [-p PROMPT]
Doctor:     python batching_harness.py --doctor
Environment:
    ANTHROPIC_API_KEY      the API key (required to submit turns)
    ANTHROPIC_BASE_URL     another API endpoint, e.g. the offline stand-in
    BATCHING_HARNESS_HOME  where state lives (default ~/.batching-harness):
                           journal.db (SQLite, every session), history, tmp/

Sections, in dependency order (grep '^#####' for this table):
    constants and prices, errors, config, value types, accounting, journal,
    transport, sandbox and tools, agent loop, UI, REPL, main
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__version__ = "0.1.0"

##############################################################################
# Constants and prices (data only)
##############################################################################

DEFAULT_MODEL = "claude-opus-5-5"
DEFAULT_MAX_TOKENS = 16_000
CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# PRICES-BEGIN (owned by the accounting section)
# PRICES-END

##############################################################################
# Errors and control-flow signals
##############################################################################


class HarnessError(Exception):
    """Root of every expected failure: the REPL reports it in one line."""


class ConfigError(HarnessError):
    """Bad flags or environment: exit status 2."""


# ERRORS-SANDBOX-BEGIN (owned by the sandbox section)
class SandboxUnavailable(HarnessError):
    """The sandbox cannot run here; carries the first line of the real error and the fix."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(f"{detail}\nfix: {fix}")
        self.detail = detail
        self.fix = fix


# ERRORS-SANDBOX-END

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
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ToolResult:
    """What one tool call produced; `output` is what the model sees."""

    output: str
    is_error: bool = False
    exit_code: int | None = None
    # Things the user must hear about that the model need not (e.g. an undone git redirect).
    warnings: tuple[str, ...] = ()


##############################################################################
# Accounting
##############################################################################

# ACCOUNTING-BEGIN (owned by the accounting section)
# ACCOUNTING-END

##############################################################################
# Sandbox and tools
##############################################################################

# TOOLS-BEGIN (owned by the sandbox section)
# TOOLS-END
