"""Upstream answer classification, Retry-After parsing and backoff (proxy/retry.py)."""

from __future__ import annotations

import datetime
import random
import sys
import time

import pytest

from proxy.retry import (
    Backoff,
    Outcome,
    RowFailures,
    RowVerdict,
    classify_answer,
    classify_status,
    parse_retry_after,
    rejection_in_body,
)

# A fixed "now": 30 s before Wed, 21 Oct 2026 07:28:00 GMT.
WHEN = datetime.datetime(2026, 10, 21, 7, 28, 0, tzinfo=datetime.UTC).timestamp()
NOW = WHEN - 30

# ---- classify_status ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (301, Outcome.RETRY),  # a redirect is never followed: upstream.url is wrong
        (304, Outcome.RETRY),
        (400, Outcome.REJECTED),
        (401, Outcome.REJECTED),
        (402, Outcome.REJECTED),  # Jitsu billing throttle: retrying will not help
        (403, Outcome.REJECTED),
        (404, Outcome.REJECTED),
        (408, Outcome.RETRY),
        (413, Outcome.REJECTED),
        (425, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (501, Outcome.REJECTED),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (599, Outcome.RETRY),
        (600, Outcome.REJECTED),
        (199, Outcome.REJECTED),
    ],
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


# ---- rejection_in_body -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # Jitsu browser routes: 200 + {"error": ...} is a refusal (research notes §2.4, §3.8).
        (
            200,
            b'{"error":"stream not found: for: [slug: ][domain: x][writeKey: k:***]"}',
            "stream not found: for: [slug: ][domain: x][writeKey: k:***]",
        ),
        (
            200,
            b'{"error":"event error: Unknown event type: foo"}',
            "event error: Unknown event type: foo",
        ),
        (202, b'{"error":"nope","ok":false}', "nope"),
        (200, b'{"error":{"code":1}}', "{'code': 1}"),
        (200, b'{"ok":true}', None),
        (200, b'{"destinations":[],"ok":true}', None),
        (200, b'{"ok":true,"error":"ignored when ok is true"}', None),
        (200, b'{"error":""}', None),
        # Jitsu took it: the stream just has no destinations (issue 8).
        (200, b'{"error":"no destinations found for stream: s1"}{"ok":true}', None),
        # Jitsu's classic handler: gin appends {"ok":true} to its refusal of an event.
        (
            200,
            b'{"error":"event error: quota exceeded"}{"ok":true}',
            "event error: quota exceeded",
        ),
        (200, b'{"ok":true}\n{"ok":true}', None),
        (200, b'{"error":"x"} trailing', None),
        (200, b'{"error":null}', None),
        # A batch's per-event errors are a partial result, not a rejection of the request.
        (200, b'{"errors":["Message ID: m1: event error: x"],"ok":false,"okEvents":0}', None),
        (200, b"not json", None),
        (200, b"<html>error</html>", None),
        (200, b"\xff\xfe\x00", None),
        (200, b"", None),
        (200, b'[{"error":"x"}]', None),
        (200, b'"error"', None),
        (204, b"", None),
        (400, b'{"error":"invalid content type: text/html. Expected: application/json"}', None),
        (401, b'{"error":"stream not found"}', None),
        (500, b'{"error":"error# abc: producer error"}', None),
        (301, b'{"error":"moved"}', None),
    ],
)
def test_rejection_in_body(status: int, body: bytes, expected: str | None) -> None:
    assert rejection_in_body(status, body) == expected


# ---- parse_retry_after -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("007", 7.0),
        (" 120 ", 120.0),
        ("\t5\t", 5.0),
        ("86400", 86400.0),
    ],
)
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    result = parse_retry_after(value, now=NOW)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    "value", ["-1", "1.5", "1 2", "+5", "1e3", "0x10", "soon", "5s", "", "   ", None]
)
def test_retry_after_invalid_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Wed, 21 Oct 2026 07:28:00 GMT", id="imf-fixdate"),
        pytest.param("Wednesday, 21-Oct-26 07:28:00 GMT", id="rfc850"),
        pytest.param("  Wed, 21 Oct 2026 07:28:00 GMT ", id="imf-fixdate-whitespace"),
        pytest.param("Wed, 21 Oct 2026 07:28:00 +0000", id="numeric-utc-offset"),
        pytest.param("Wed, 21 Oct 2026 09:28:00 +0200", id="numeric-offset"),
    ],
)
def test_retry_after_http_date(value: str) -> None:
    assert parse_retry_after(value, now=NOW) == 30.0


def test_retry_after_asctime_date() -> None:
    assert parse_retry_after("Wed Oct 21 07:28:00 2026", now=NOW) == 30.0


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Wed, 21 Oct 2026 07:27:29 GMT",
    ],
)
def test_retry_after_past_date_is_zero(value: str) -> None:
    assert parse_retry_after(value, now=NOW) == 0.0


def test_retry_after_date_exactly_now_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now=WHEN) == 0.0


def test_retry_after_date_defaults_to_wall_clock() -> None:
    before = time.time()
    result = parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT")
    after = time.time()
    target = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC).timestamp()

    assert result is not None
    assert target - after <= result <= target - before


@pytest.mark.parametrize(
    "value", ["Wed, 32 Oct 2026 07:28:00 GMT", "Wed, 21 Foo 2026 07:28:00 GMT"]
)
def test_retry_after_bad_date_is_none(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize("value", ["²", "٣", "１０"])
def test_retry_after_non_ascii_digits_are_invalid(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_retry_after_absurdly_long_number_does_not_raise() -> None:
    result = parse_retry_after("9" * 5000, now=NOW)
    # Either refused or "very long": Backoff.max_retry_after_s caps it anyway.
    assert result is None or result > 86400


# ---- Backoff -----------------------------------------------------------------------------


def test_ceiling_grows_by_multiplier_and_caps() -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0, multiplier=2.0)
    assert [backoff.ceiling(n) for n in range(1, 9)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_ceiling_other_multiplier() -> None:
    backoff = Backoff(initial_s=0.5, max_s=10.0, multiplier=3.0)
    assert [backoff.ceiling(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]


def test_ceiling_multiplier_one_is_constant() -> None:
    backoff = Backoff(initial_s=2.0, max_s=30.0, multiplier=1.0)
    assert {backoff.ceiling(n) for n in (1, 2, 10, 1000)} == {2.0}


@pytest.mark.parametrize("failures", [0, -3])
def test_ceiling_before_first_failure_is_initial(failures: int) -> None:
    assert Backoff(initial_s=1.5, max_s=30.0).ceiling(failures) == 1.5


@pytest.mark.parametrize("failures", [65, 66, 1000, 10**9, sys.maxsize, 10**30])
@pytest.mark.parametrize("multiplier", [1.5, 2.0, 10.0])
def test_huge_failure_counts_do_not_overflow(failures: int, multiplier: float) -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0, multiplier=multiplier)
    assert backoff.ceiling(failures) == 30.0
    delay = backoff.delay(failures, rng=random.Random(7))
    assert 15.0 <= delay <= 30.0


@pytest.mark.parametrize("seed", [0, 1, 42, 1234])
def test_delay_is_equal_jitter_within_half_to_full_ceiling(seed: int) -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    rng = random.Random(seed)
    for failures in range(1, 10):
        d = backoff.ceiling(failures)
        draws = [backoff.delay(failures, rng=rng) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in draws)
        assert len(set(draws)) > 1  # jittered, not a constant


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    expected = random.Random(42).uniform(4.0, 8.0)

    assert backoff.delay(4, rng=random.Random(42)) == expected
    assert backoff.delay(4, rng=random.Random(42)) == backoff.delay(4, rng=random.Random(42))


def test_delay_without_rng_stays_in_bounds() -> None:
    backoff = Backoff(initial_s=2.0, max_s=30.0)
    assert all(4.0 <= backoff.delay(3) <= 8.0 for _ in range(100))  # ceiling(3) == 8


def test_retry_after_is_a_floor() -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    assert backoff.delay(1, retry_after_s=20.0, rng=random.Random(1)) == 20.0


def test_retry_after_may_exceed_max_backoff() -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    assert backoff.delay(1, retry_after_s=100.0, rng=random.Random(1)) == 100.0


def test_retry_after_is_capped_by_max_retry_after() -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    assert backoff.delay(1, retry_after_s=5000.0, rng=random.Random(1)) == 900.0

    short = Backoff(initial_s=1.0, max_s=30.0, max_retry_after_s=60.0)
    assert short.delay(1, retry_after_s=5000.0, rng=random.Random(1)) == 60.0
    assert short.delay(1, retry_after_s=float("inf"), rng=random.Random(1)) == 60.0


@pytest.mark.parametrize("retry_after", [None, 0.0, 3.0])
def test_small_retry_after_leaves_the_jittered_draw(retry_after: float | None) -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    expected = random.Random(9).uniform(8.0, 16.0)  # ceiling(5) == 16

    assert backoff.delay(5, retry_after_s=retry_after, rng=random.Random(9)) == expected


def test_parsed_retry_after_feeds_the_backoff() -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    retry_after = parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now=NOW)
    assert backoff.delay(1, retry_after_s=retry_after, rng=random.Random(3)) == 30.0


# ---- classify_answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "body", "jitsu_error", "outcome"),
    [
        ("POST", 200, b'{"ok":true}', None, Outcome.DELIVERED),
        ("POST", 200, b'{"ok":true,"destinations":[]}', None, Outcome.DELIVERED),
        ("POST", 200, b'{"error":"stream not found"}', None, Outcome.REJECTED),
        ("POST", 200, b"<html>Welcome to nginx!</html>", None, Outcome.RETRY),
        ("POST", 200, b"", None, Outcome.RETRY),
        ("POST", 204, b"", None, Outcome.RETRY),
        ("POST", 400, b'{"error":"event error: Unknown event type: x"}', None, Outcome.REJECTED),
        ("POST", 401, b'{"error":"stream not found: for: ..."}', None, Outcome.REJECTED),
        ("POST", 402, b'{"error":"quota exceeded"}', None, Outcome.REJECTED),
        # The classic handler's refusal with gin's second body behind it.
        ("POST", 400, b'{"error":"event error: too big"}{"ok":true}', None, Outcome.REJECTED),
        ("POST", 200, b'{"error":"event error: too big"}{"ok":true}', None, Outcome.REJECTED),
        ("POST", 200, b'{"ok":true} <html>', None, Outcome.RETRY),
        ("POST", 400, b"<html>400 Bad Request</html>", None, Outcome.RETRY),
        ("POST", 403, b"Forbidden", None, Outcome.RETRY),
        ("POST", 404, b'{"error":"not found"}', None, Outcome.RETRY),
        ("POST", 404, b"default backend - 404", None, Outcome.RETRY),
        ("POST", 405, b'{"error":"method"}', None, Outcome.RETRY),
        # Too large is too large, whoever says so: a batch is split, one event dead-lettered.
        ("POST", 413, b"<html>413 Request Entity Too Large</html>", None, Outcome.REJECTED),
        ("POST", 413, b'{"error":"too big"}', None, Outcome.REJECTED),
        # A stream without destinations: Jitsu took the event and did what it does with it.
        ("POST", 200, b'{"error":"no destinations found for stream: s1"}', None, Outcome.DELIVERED),
        ("POST", 400, b'{"error":""}', None, Outcome.RETRY),
        ("POST", 400, b'{"error":{"x":1}}', None, Outcome.RETRY),
        ("POST", 301, b"", None, Outcome.RETRY),
        ("POST", 307, b'{"ok":true}', None, Outcome.RETRY),
        ("POST", 503, b'{"error":"producer error"}', None, Outcome.RETRY),
        ("GET", 200, b"GIF89a", None, Outcome.DELIVERED),
        ("GET", 200, b"GIF89a", "stream not found", Outcome.REJECTED),
        ("GET", 200, b"GIF89a", "no destinations found for stream: s1", Outcome.DELIVERED),
        ("GET", 404, b"", None, Outcome.RETRY),
        ("GET", 302, b"", None, Outcome.RETRY),
    ],
)
def test_classify_answer_only_jitsus_verdicts_reject(
    method: str, status: int, body: bytes, jitsu_error: str | None, outcome: Outcome
) -> None:
    assert classify_answer(method, status, body, jitsu_error)[0] is outcome


def test_pixel_redirect_to_its_destination_is_delivered() -> None:
    """Jitsu's pixel answers 302 to destination_url after taking the event; any other
    redirect still means upstream.url is wrong."""
    assert classify_answer("GET", 302, b"", to_destination=True) == (Outcome.DELIVERED, "ok")
    assert classify_answer("GET", 301, b"", to_destination=True)[0] is Outcome.RETRY
    assert classify_answer("POST", 302, b"", to_destination=True)[0] is Outcome.RETRY


def test_classify_answer_reasons() -> None:
    assert classify_answer("POST", 308, b"")[1] == (
        "upstream answered 308 (a redirect): is upstream.url right?"
    )
    assert classify_answer("POST", 400, b'{"error":"event error: x"}')[1] == (
        "upstream answered 400: event error: x"
    )


# ---- RowFailures -------------------------------------------------------------------------


def test_a_row_failing_while_others_go_through_is_lone_and_then_dead() -> None:
    rows = RowFailures(max_strikes=3)
    rows.sent(1)
    first = rows.failure(1)  # nothing delivered since it was sent: could be an outage
    assert (first.lone, first.dead) == (False, False)
    verdicts = []
    for other in range(2, 5):
        rows.sent(other)
        rows.ok(other)
        verdicts.append(rows.failure(1))
    assert [(v.lone, v.failures, v.dead) for v in verdicts] == [
        (True, 1, False),
        (True, 2, False),
        (True, 3, True),
    ]


def test_in_an_outage_nothing_is_lone() -> None:
    rows = RowFailures(max_strikes=1)
    for seq in range(1, 20):
        rows.sent(seq)
    for _ in range(5):
        for seq in range(1, 20):
            assert rows.failure(seq) == RowVerdict(False, 0, False)


def test_a_suspect_stays_alone_without_traffic_but_gets_no_strike() -> None:
    rows = RowFailures(max_strikes=2)
    rows.sent(1)
    rows.failure(1)
    rows.ok(2)
    assert rows.failure(1) == RowVerdict(True, 1, False)
    # Nothing else is sent: still handled alone (no outage mode), its own backoff grows, but
    # no step towards dead.
    assert [rows.failure(1) for _ in range(3)] == [
        RowVerdict(True, 2, False),
        RowVerdict(True, 3, False),
        RowVerdict(True, 4, False),
    ]


def test_two_suspects_failing_in_turn_are_no_outage() -> None:
    rows = RowFailures(max_strikes=5)
    for seq in (1, 2):
        rows.sent(seq)
    rows.ok(3)
    assert rows.failure(1).lone and rows.failure(2).lone
    for _ in range(5):
        assert rows.failure(1).lone and rows.failure(2).lone
    # A fresh row failing with nothing delivered since is a sign of an outage; after it the
    # suspects' failures count as outage failures too.
    rows.sent(4)
    assert not rows.failure(4).lone
    assert not rows.failure(1).lone


def test_a_flapping_upstream_strikes_no_one() -> None:
    """Half of all attempts fail: a row's lone failures do not count towards dead."""
    rows = RowFailures(max_strikes=1)
    rows.sent(1)
    rows.failure(1)
    for round_ in range(10):
        rows.ok(100 + round_)
        rows.failure(200 + round_)  # another row fails as often as one succeeds
        verdict = rows.failure(1)
        assert verdict.lone and not verdict.dead


def test_a_delivered_row_is_forgotten() -> None:
    rows = RowFailures(max_strikes=1)
    rows.sent(1)
    rows.failure(1)
    rows.ok(1)
    assert len(rows) == 0


def test_a_4xx_about_the_row_soon_after_a_delivery_is_the_rows_own() -> None:
    now = [100.0]
    rows = RowFailures(10, recent_s=5, clock=lambda: now[0])
    rows.sent(1)
    rows.ok(1)
    for seq in (2, 3):
        rows.sent(seq)
    assert rows.failure(2, about_the_row=True).lone
    assert not rows.failure(3).lone  # a transport error or 5xx: a sign of an outage
    now[0] = 106.0
    rows.sent(4)
    assert not rows.failure(4, about_the_row=True).lone  # nothing delivered for a while


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("Mon, 01 Jan 99999999999 00:00:00 GMT", None),  # once an OverflowError
        ("000000000000000005", 5.0),  # once read as its first 12 digits: 0
        ("9" * 30, 1e12),
    ],
)
def test_retry_after_values_that_once_broke_the_parser(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, now=0) == seconds
