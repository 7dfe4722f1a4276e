"""Price table and cost functions, checked against hand-computed figures from pricing.md.

Every expected value below is written out by hand (tokens x USD-per-MTok / 1,000,000), never
obtained by calling the function under test: a wrong price must not be able to test itself.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import batching_harness as bh
from batching_harness import Usage

REL = 1e-12  # tight: these are sums of a handful of exact-ish products

# Every model id in pricing.md, with the Opus 4.x row expanded to one key per id.
PRICING_MD_IDS = {
    "claude-fable-5-2",
    "claude-mythos-5-2",
    "claude-fable-5-1",
    "claude-mythos-5-1",
    "claude-fable-5",
    "claude-mythos-5",
    "claude-opus-5-5",
    "claude-opus-5",
    "claude-opus-4-8",
    "claude-opus-4-7",
    "claude-opus-4-6",
    "claude-opus-4-5",
    "claude-opus-4-1",
    "claude-sonnet-5-5",
    "claude-sonnet-5",
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-haiku-5-5",
    "claude-haiku-4-5",
}

N = 10_000  # tokens of ONE category per case: dollars = price per MTok x 0.01

# model -> dollars for 10,000 tokens of: input, 5-min write, 1-h write, cache read, output
# (each = 10,000 x price / 1,000,000; the price column from pricing.md is in the comment).
HAND_COMPUTED = {
    # 8 | 10 | 16 | 0.20 | 40
    "claude-fable-5-2": (0.08, 0.10, 0.16, 0.002, 0.40),
    "claude-mythos-5-2": (0.08, 0.10, 0.16, 0.002, 0.40),
    # 10 | 12.50 | 20 | 0.25 | 50
    "claude-fable-5-1": (0.10, 0.125, 0.20, 0.0025, 0.50),
    "claude-mythos-5-1": (0.10, 0.125, 0.20, 0.0025, 0.50),
    # 10 | 12.50 | 20 | 1.00 | 50
    "claude-fable-5": (0.10, 0.125, 0.20, 0.01, 0.50),
    "claude-mythos-5": (0.10, 0.125, 0.20, 0.01, 0.50),
    # 4 | 5 | 8 | 0.20 | 20
    "claude-opus-5-5": (0.04, 0.05, 0.08, 0.002, 0.20),
    # 5 | 6.25 | 10 | 0.50 | 25
    "claude-opus-5": (0.05, 0.0625, 0.10, 0.005, 0.25),
    "claude-opus-4-8": (0.05, 0.0625, 0.10, 0.005, 0.25),
    "claude-opus-4-7": (0.05, 0.0625, 0.10, 0.005, 0.25),
    "claude-opus-4-6": (0.05, 0.0625, 0.10, 0.005, 0.25),
    "claude-opus-4-5": (0.05, 0.0625, 0.10, 0.005, 0.25),
    # 15 | 18.75 | 30 | 1.50 | 75
    "claude-opus-4-1": (0.15, 0.1875, 0.30, 0.015, 0.75),
    # 2 | 2.50 | 4 | 0.10 | 10
    "claude-sonnet-5-5": (0.02, 0.025, 0.04, 0.001, 0.10),
    # 2 | 2.50 | 4 | 0.20 | 10
    "claude-sonnet-5": (0.02, 0.025, 0.04, 0.002, 0.10),
    # 3 | 3.75 | 6 | 0.30 | 15
    "claude-sonnet-4-6": (0.03, 0.0375, 0.06, 0.003, 0.15),
    "claude-sonnet-4-5": (0.03, 0.0375, 0.06, 0.003, 0.15),
    # prompt <= 100,000 tokens: 0.10 | 0.125 | 0.20 | 0.01 | 0.50
    "claude-haiku-5-5": (0.001, 0.00125, 0.002, 0.0001, 0.005),
    # 1 | 1.25 | 2 | 0.10 | 5
    "claude-haiku-4-5": (0.01, 0.0125, 0.02, 0.001, 0.05),
}

CATEGORIES = ("input", "write_5m", "write_1h", "read", "output")


def one_category(category: str, tokens: int) -> Usage:
    """A Usage whose tokens all fall in one billed category (breakdown present)."""
    return {
        "input": Usage(input_tokens=tokens),
        "write_5m": Usage(
            cache_creation_input_tokens=tokens,
            ephemeral_5m_input_tokens=tokens,
            ephemeral_1h_input_tokens=0,
        ),
        "write_1h": Usage(
            cache_creation_input_tokens=tokens,
            ephemeral_5m_input_tokens=0,
            ephemeral_1h_input_tokens=tokens,
        ),
        "read": Usage(cache_read_input_tokens=tokens),
        "output": Usage(output_tokens=tokens),
    }[category]


# ---------------------------------------------------------------- the table itself


def test_table_has_exactly_the_ids_of_pricing_md():
    assert set(bh.PRICES) == PRICING_MD_IDS
    assert set(HAND_COMPUTED) == PRICING_MD_IDS


@pytest.mark.parametrize("model", sorted(PRICING_MD_IDS))
def test_table_obeys_the_multiplier_rules(model):
    """pricing.md's rules: 5m write 1.25x input, 1h write 2x, read 0.1x (with listed exceptions)."""
    price = bh.PRICES[model]
    read_ratio = {
        "claude-opus-5-5": 0.05,
        "claude-sonnet-5-5": 0.05,
        "claude-fable-5-1": 0.025,
        "claude-mythos-5-1": 0.025,
        "claude-fable-5-2": 0.025,
        "claude-mythos-5-2": 0.025,
    }.get(model, 0.1)
    assert price.cache_write_5m == pytest.approx(1.25 * price.input, rel=REL)
    assert price.cache_write_1h == pytest.approx(2 * price.input, rel=REL)
    assert price.cache_read == pytest.approx(read_ratio * price.input, rel=REL)


def test_constants():
    assert bh.BATCH_DISCOUNT == 0.5
    assert bh.HAIKU_55_LONG_PROMPT_TOKENS == 100_000
    threshold, long_row = bh.LONG_PROMPT_TIERS["claude-haiku-5-5"]
    assert threshold == 100_000
    assert long_row == bh.ModelPrice(0.50, 0.625, 1.00, 0.05, 2.50)
    assert set(bh.LONG_PROMPT_TIERS) == {"claude-haiku-5-5"}


# ---------------------------------------------------------------- every row, every category


@pytest.mark.parametrize("model", sorted(PRICING_MD_IDS))
@pytest.mark.parametrize("index", range(len(CATEGORIES)), ids=CATEGORIES)
def test_every_row_every_category_standard_and_batch(model, index):
    usage = one_category(CATEGORIES[index], N)
    expected_usd = HAND_COMPUTED[model][index]
    assert bh.cost_usd(model, usage, lane="sync") == pytest.approx(expected_usd, rel=REL)
    assert bh.cost_usd(model, usage, lane="batch") == pytest.approx(expected_usd / 2, rel=REL)


def test_worked_example_opus_5_5():
    """pricing.md: 2,000 input, 2,000 1h writes, 50,000 reads, 1,000 output."""
    usage = Usage(
        input_tokens=2_000,
        output_tokens=1_000,
        cache_creation_input_tokens=2_000,
        cache_read_input_tokens=50_000,
        ephemeral_5m_input_tokens=0,
        ephemeral_1h_input_tokens=2_000,
    )
    # 2,000x4 + 2,000x8 + 50,000x0.20 + 1,000x20 = 8,000 + 16,000 + 10,000 + 20,000 = 54,000
    assert bh.cost_usd("claude-opus-5-5", usage, lane="sync") == pytest.approx(0.054, rel=REL)
    assert bh.cost_usd("claude-opus-5-5", usage, lane="batch") == pytest.approx(0.027, rel=REL)


# ---------------------------------------------------------------- Haiku 5.5 long prompt

HAIKU = "claude-haiku-5-5"


def test_haiku_55_tier_boundary_in_price_for():
    assert bh.price_for(HAIKU) == bh.ModelPrice(0.10, 0.125, 0.20, 0.01, 0.50)
    assert bh.price_for(HAIKU, 100_000) == bh.ModelPrice(0.10, 0.125, 0.20, 0.01, 0.50)
    assert bh.price_for(HAIKU, 100_001) == bh.ModelPrice(0.50, 0.625, 1.00, 0.05, 2.50)
    # No other model has a long-prompt premium.
    assert bh.price_for("claude-haiku-4-5", 1_000_000) == bh.PRICES["claude-haiku-4-5"]


@pytest.mark.parametrize(
    ("make_usage", "at_100_000_usd", "at_100_001_usd"),
    [
        # input: 100,000 x 0.10 = 10,000 | 100,001 x 0.50 = 50,000.5
        (lambda n: Usage(input_tokens=n), 0.01, 0.0500005),
        # 5m write: 100,000 x 0.125 = 12,500 | 100,001 x 0.625 = 62,500.625
        (
            lambda n: Usage(cache_creation_input_tokens=n, ephemeral_5m_input_tokens=n),
            0.0125,
            0.062500625,
        ),
        # 1h write: 100,000 x 0.20 = 20,000 | 100,001 x 1.00 = 100,001
        (
            lambda n: Usage(cache_creation_input_tokens=n, ephemeral_1h_input_tokens=n),
            0.02,
            0.100001,
        ),
        # read: 100,000 x 0.01 = 1,000 | 100,001 x 0.05 = 5,000.05
        (lambda n: Usage(cache_read_input_tokens=n), 0.001, 0.00500005),
        # output rides on the prompt's tier: 10,000 output on top of an n-token input
        # low:  100,000 x 0.10 + 10,000 x 0.50 = 10,000 + 5,000 = 15,000
        # high: 100,001 x 0.50 + 10,000 x 2.50 = 50,000.5 + 25,000 = 75,000.5
        (lambda n: Usage(input_tokens=n, output_tokens=10_000), 0.015, 0.0750005),
    ],
    ids=CATEGORIES,
)
def test_haiku_55_every_category_switches_row_above_100k(
    make_usage, at_100_000_usd, at_100_001_usd
):
    low = bh.cost_usd(HAIKU, make_usage(100_000), lane="sync", requested_ttl=None)
    high = bh.cost_usd(HAIKU, make_usage(100_001), lane="sync", requested_ttl=None)
    assert low == pytest.approx(at_100_000_usd, rel=REL)
    assert high == pytest.approx(at_100_001_usd, rel=REL)
    high_batch = bh.cost_usd(HAIKU, make_usage(100_001), lane="batch", requested_ttl=None)
    assert high_batch == pytest.approx(at_100_001_usd / 2, rel=REL)


def test_haiku_55_prompt_size_counts_input_reads_and_writes_together():
    """Each part is small, but input + read + write = 100,001 puts the request on the high row."""
    low = Usage(
        input_tokens=40_000,
        output_tokens=10_000,
        cache_creation_input_tokens=40_000,
        cache_read_input_tokens=20_000,
        ephemeral_5m_input_tokens=20_000,
        ephemeral_1h_input_tokens=20_000,
    )
    high = dataclasses.replace(low, input_tokens=40_001)
    # low:  40,000x0.10 + 20,000x0.125 + 20,000x0.20 + 20,000x0.01 + 10,000x0.50
    #     = 4,000 + 2,500 + 4,000 + 200 + 5,000 = 15,700
    assert bh.cost_usd(HAIKU, low, lane="sync") == pytest.approx(0.0157, rel=REL)
    # high: 40,001x0.50 + 20,000x0.625 + 20,000x1.00 + 20,000x0.05 + 10,000x2.50
    #     = 20,000.5 + 12,500 + 20,000 + 1,000 + 25,000 = 78,500.5
    assert bh.cost_usd(HAIKU, high, lane="sync") == pytest.approx(0.0785005, rel=REL)
    assert bh.cost_usd(HAIKU, high, lane="batch") == pytest.approx(0.03925025, rel=REL)


# ---------------------------------------------------------------- model ids


@pytest.mark.parametrize(
    ("alias", "base"),
    [
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-5-5", "claude-opus-5-5"),
    ],
)
def test_dated_aliases_price_like_their_base_id(alias, base):
    assert bh.base_model_id(alias) == base
    assert bh.price_for(alias) == bh.PRICES[base]


def test_dated_alias_cost():
    # claude-sonnet-4-5: 10,000 input x 3 + 10,000 output x 15 = 30,000 + 150,000 = 180,000
    usage = Usage(input_tokens=10_000, output_tokens=10_000)
    cost = bh.cost_usd("claude-sonnet-4-5-20250929", usage, lane="batch")
    assert cost == pytest.approx(0.09, rel=REL)


@pytest.mark.parametrize(
    "model",
    [
        "claude-unknown-9",
        "claude-3-5-sonnet-20241022",  # a real old id the table does not carry
        "claude-opus-4",  # a prefix of known ids is not one of them
        "claude-opus-4-5-2025",  # not a date suffix
        "",
    ],
)
def test_unknown_model_is_priced_as_unknown_never_a_default(model):
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    assert bh.price_for(model) is None
    assert bh.cost_usd(model, usage, lane="batch") is None
    assert bh.estimate_cost_usd(model, {"messages": [], "max_tokens": 10}) is None
    assert bh.cost_breakdown(model, usage, lane="batch", requested_ttl="1h") == bh.CostBreakdown(
        None, None, None
    )


# ---------------------------------------------------------------- missing breakdown

OPUS = "claude-opus-5-5"  # 5m write 5, 1h write 8 per MTok
NO_BREAKDOWN = Usage(cache_creation_input_tokens=10_000)


def test_missing_breakdown_goes_to_the_requested_ttl():
    # 10,000 x 8 = 80,000 -> $0.08 ; 10,000 x 5 = 50,000 -> $0.05
    assert bh.cost_usd(OPUS, NO_BREAKDOWN, lane="sync", requested_ttl="1h") == pytest.approx(
        0.08, rel=REL
    )
    assert bh.cost_usd(OPUS, NO_BREAKDOWN, lane="sync", requested_ttl="5m") == pytest.approx(
        0.05, rel=REL
    )
    assert bh.cost_usd(OPUS, NO_BREAKDOWN, lane="batch", requested_ttl="5m") == pytest.approx(
        0.025, rel=REL
    )


def test_missing_breakdown_defaults_to_1h_and_none_means_5m():
    assert bh.cost_usd(OPUS, NO_BREAKDOWN, lane="sync") == pytest.approx(0.08, rel=REL)
    assert bh.cost_usd(OPUS, NO_BREAKDOWN, lane="sync", requested_ttl=None) == pytest.approx(
        0.05, rel=REL
    )


def test_present_breakdown_wins_over_requested_ttl():
    usage = Usage(
        cache_creation_input_tokens=10_000,
        ephemeral_5m_input_tokens=10_000,
        ephemeral_1h_input_tokens=0,
    )
    # 10,000 x 5 = 50,000, whatever the request asked for
    assert bh.cost_usd(OPUS, usage, lane="sync", requested_ttl="1h") == pytest.approx(0.05, rel=REL)


def test_partial_breakdown_remainder_goes_to_requested_ttl():
    """A Usage summed from responses with and without a breakdown: the rest is the request's TTL."""
    usage = Usage(cache_creation_input_tokens=10_000, ephemeral_1h_input_tokens=4_000)
    # 4,000 x 8 + 6,000 x 5 = 32,000 + 30,000 = 62,000
    assert bh.cost_usd(OPUS, usage, lane="sync", requested_ttl="5m") == pytest.approx(
        0.062, rel=REL
    )
    # 10,000 x 8 = 80,000
    assert bh.cost_usd(OPUS, usage, lane="sync", requested_ttl="1h") == pytest.approx(0.08, rel=REL)


def test_bad_ttl_is_a_bug_not_a_price():
    with pytest.raises(ValueError):
        bh.cost_usd(OPUS, NO_BREAKDOWN, lane="sync", requested_ttl="off")


# ---------------------------------------------------------------- breakdown and hit ratio

WORKED = Usage(
    input_tokens=2_000,
    output_tokens=1_000,
    cache_creation_input_tokens=2_000,
    cache_read_input_tokens=50_000,
    ephemeral_5m_input_tokens=0,
    ephemeral_1h_input_tokens=2_000,
)


def test_cost_breakdown_batch():
    got = bh.cost_breakdown(OPUS, WORKED, lane="batch", requested_ttl="1h")
    assert got.paid_usd == pytest.approx(0.027, rel=REL)
    assert got.sync_usd == pytest.approx(0.054, rel=REL)
    # as plain input: (50,000 + 2,000) x 4 = 208,000
    # as paid:        50,000 x 0.20 + 2,000 x 8 = 10,000 + 16,000 = 26,000
    # saved: 182,000 / 1e6 = 0.182 standard, x 0.5 on the batch path = 0.091
    assert got.cache_saved_usd == pytest.approx(0.091, rel=REL)


def test_cost_breakdown_standard():
    got = bh.cost_breakdown(OPUS, WORKED, lane="sync", requested_ttl="1h")
    assert got.paid_usd == pytest.approx(0.054, rel=REL)
    assert got.sync_usd == pytest.approx(0.054, rel=REL)
    assert got.cache_saved_usd == pytest.approx(0.182, rel=REL)


def test_cost_breakdown_unrepaid_writes_save_a_negative_amount():
    usage = Usage(input_tokens=1_000, cache_creation_input_tokens=10_000)  # no breakdown
    got = bh.cost_breakdown(OPUS, usage, lane="batch", requested_ttl="1h")
    # plain 10,000 x 4 = 40,000 ; paid 10,000 x 8 = 80,000 ; saved -40,000 x 0.5 = -20,000
    assert got.cache_saved_usd == pytest.approx(-0.02, rel=REL)
    # paid: (1,000 x 4 + 80,000) x 0.5 = 42,000
    assert got.paid_usd == pytest.approx(0.042, rel=REL)
    assert got.sync_usd == pytest.approx(0.084, rel=REL)


def test_cost_breakdown_5m_requested():
    usage = Usage(cache_creation_input_tokens=10_000, cache_read_input_tokens=10_000)
    got = bh.cost_breakdown(OPUS, usage, lane="sync", requested_ttl="5m")
    # plain 20,000 x 4 = 80,000 ; paid 10,000 x 5 + 10,000 x 0.20 = 52,000 ; saved 28,000
    assert got.cache_saved_usd == pytest.approx(0.028, rel=REL)
    assert got.paid_usd == pytest.approx(0.052, rel=REL)


def test_cache_hit_ratio():
    # 50,000 / (2,000 + 2,000 + 50,000) = 50,000 / 54,000
    assert bh.cache_hit_ratio(WORKED) == pytest.approx(50_000 / 54_000, rel=REL)
    assert bh.cache_hit_ratio(Usage(cache_read_input_tokens=7)) == 1.0
    assert bh.cache_hit_ratio(Usage(input_tokens=7)) == 0.0
    assert bh.cache_hit_ratio(Usage()) is None
    assert bh.cache_hit_ratio(Usage(output_tokens=5)) is None


# ---------------------------------------------------------------- estimate at submit time

# json.dumps([{"role": "user", "content": ""}]) is 33 characters: '[{"role": "user", "content": "' is
# 30 and '"}]' is 3, so a content of n ASCII letters dumps to 33 + n characters.


def user_text(n_chars: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "x" * n_chars}]


def test_estimate_character_count_assumption():
    assert len(json.dumps(user_text(0))) == 33
    assert len(json.dumps([{"name": "t"}])) == 15
    assert len(json.dumps("abc")) == 5


def test_estimate_4000_chars_is_1000_tokens_plus_1000_output():
    params = {"model": OPUS, "max_tokens": 16_000, "messages": user_text(3_967)}  # 4,000 chars
    # 1,000 x 4 + min(16,000, 1,000) x 20 = 4,000 + 20,000 = 24,000
    assert bh.estimate_cost_usd(OPUS, params, lane="sync") == pytest.approx(0.024, rel=REL)
    assert bh.estimate_cost_usd(OPUS, params) == pytest.approx(0.012, rel=REL)  # batch default


def test_estimate_rounds_tokens_up():
    params = {"max_tokens": 16_000, "messages": user_text(3_968)}  # 4,001 chars -> 1,001 tokens
    # 1,001 x 4 + 1,000 x 20 = 4,004 + 20,000 = 24,004 ; x 0.5 = 12,002
    assert bh.estimate_cost_usd(OPUS, params, lane="batch") == pytest.approx(0.012002, rel=REL)


def test_estimate_counts_tools_and_system_and_caps_output_at_max_tokens():
    params = {
        "max_tokens": 200,
        "tools": [{"name": "t"}],  # 15 chars
        "system": "abc",  # 5 chars
        "messages": user_text(3_947),  # 33 + 3,947 = 3,980 chars; total 4,000 -> 1,000 tokens
    }
    # 1,000 x 4 + min(200, 1,000) x 20 = 4,000 + 4,000 = 8,000
    assert bh.estimate_cost_usd(OPUS, params, lane="sync") == pytest.approx(0.008, rel=REL)


def test_estimate_without_max_tokens_uses_the_default_allowance():
    params = {"messages": user_text(3_967)}  # DEFAULT_MAX_TOKENS 16,000 -> 1,000 allowance
    assert bh.estimate_cost_usd(OPUS, params, lane="sync") == pytest.approx(0.024, rel=REL)


def test_estimate_uses_haiku_55_long_row_for_a_long_prompt():
    params = {"max_tokens": 16_000, "messages": user_text(399_972)}  # 400,005 chars
    # ceil(400,005 / 4) = 100,002 tokens > 100,000: high row
    # 100,002 x 0.50 + 1,000 x 2.50 = 50,001 + 2,500 = 52,501
    assert bh.estimate_cost_usd(HAIKU, params, lane="sync") == pytest.approx(0.052501, rel=REL)
    assert bh.estimate_cost_usd(HAIKU, params, lane="batch") == pytest.approx(0.0262505, rel=REL)


def test_estimate_is_an_upper_bound_when_the_request_asks_for_a_1h_cache():
    """Regression: the estimate priced the prompt as plain input, but a 1-hour cache write of
    the same prompt costs 2x, so --max-budget-usd could be overshot."""
    params = {"max_tokens": 100, "system": [{"type": "text", "text": "x" * 3996,
                                             "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
              "messages": [{"role": "user", "content": "hi"}]}
    tokens = bh._estimate_prompt_tokens(params)
    # claude-opus-5-5: 1-hour write $8/MTok, output $20/MTok, batch x0.5.
    expected = (tokens * 8 + 100 * 20) / 1e6 * 0.5
    assert bh.estimate_cost_usd("claude-opus-5-5", params) == pytest.approx(expected)
