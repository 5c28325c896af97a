"""Write-key discovery: Jitsu's precedence, Basic decoding, masking and redaction (proxy/auth.py).

Jitsu reference: research notes §2.1 (getDataLocator), §2.4 (bad Authorization is a 400 on
batch / s2s and a 200 with an error body on browser routes), §2.5 (keys in stored data).
"""

from __future__ import annotations

import base64
import itertools

import pytest
from multidict import CIMultiDict

from proxy.auth import (
    KeySource,
    WriteKey,
    decode_basic,
    find_write_key,
    key_id,
    mask_key,
    redact,
)
from proxy.errors import IngestError

# Shaped like console keys: `keyId:secret` (research notes §2.2).
AUTH_KEY = "AuthKeyIdAAAAAAAAAAAAAAAAAAAAAAA:AuthSecretAAAAAAAAAAAAAAAAAAAAAA"
HEADER_KEY = "HeaderKeyIdBBBBBBBBBBBBBBBBBBBBB:HeaderSecretBBBBBBBBBBBBBBBBBBBB"
QUERY_KEY = "QueryKeyIdCCCCCCCCCCCCCCCCCCCCCC:QuerySecretCCCCCCCCCCCCCCCCCCCCC"
BODY_KEY = "BodyKeyIdDDDDDDDDDDDDDDDDDDDDDDD:BodySecretDDDDDDDDDDDDDDDDDDDDDD"

KEYS = {
    KeySource.AUTHORIZATION: AUTH_KEY,
    KeySource.HEADER: HEADER_KEY,
    KeySource.QUERY: QUERY_KEY,
    KeySource.BODY: BODY_KEY,
}
PRECEDENCE = (KeySource.AUTHORIZATION, KeySource.HEADER, KeySource.QUERY, KeySource.BODY)

DECODE_ERROR = (
    "error processing message: failed to decode writeKey from Authorization header as base64"
)


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def request_parts(
    sources: tuple[KeySource, ...],
) -> tuple[CIMultiDict[str], dict[str, str], str | None]:
    """Headers, query and body key for a request carrying a key in each of `sources`."""
    headers: CIMultiDict[str] = CIMultiDict()
    query: dict[str, str] = {}
    body_key = None
    if KeySource.AUTHORIZATION in sources:
        # Username = key, empty password: what the docs tell clients to send.
        headers["Authorization"] = basic(AUTH_KEY + ":")
    if KeySource.HEADER in sources:
        headers["X-Write-Key"] = HEADER_KEY
    if KeySource.QUERY in sources:
        query["writekey"] = QUERY_KEY
    if KeySource.BODY in sources:
        body_key = BODY_KEY
    return headers, query, body_key


def _combo_id(combo: tuple[KeySource, ...]) -> str:
    return "+".join(source.value for source in combo)


COMBOS = [
    combo
    for size in range(1, len(PRECEDENCE) + 1)
    for combo in itertools.combinations(PRECEDENCE, size)
]


# ---- precedence --------------------------------------------------------------------------


@pytest.mark.parametrize("sources", COMBOS, ids=[_combo_id(c) for c in COMBOS])
def test_precedence_first_present_source_wins(sources: tuple[KeySource, ...]) -> None:
    """Every single source and every combination: Authorization > X-Write-Key > ?writekey= >
    body writeKey (Jitsu getDataLocator)."""
    headers, query, body_key = request_parts(sources)
    winner = next(source for source in PRECEDENCE if source in sources)

    assert find_write_key(headers, query, body_key) == WriteKey(KEYS[winner], winner)


@pytest.mark.parametrize(
    ("first", "second"),
    list(itertools.combinations(PRECEDENCE, 2)),
    ids=[f"{a.value}-beats-{b.value}" for a, b in itertools.combinations(PRECEDENCE, 2)],
)
def test_precedence_pairs(first: KeySource, second: KeySource) -> None:
    headers, query, body_key = request_parts((second, first))

    found = find_write_key(headers, query, body_key)

    assert found is not None
    assert found.source is first
    assert found.value == KEYS[first]
    assert KEYS[second] not in found.value


def test_no_key_anywhere_is_none() -> None:
    assert find_write_key(CIMultiDict(), {}, None) is None
    assert find_write_key({}, {}) is None


def test_header_names_are_case_insensitive_as_in_aiohttp() -> None:
    headers = CIMultiDict({"x-write-key": HEADER_KEY})
    assert find_write_key(headers, {}) == WriteKey(HEADER_KEY, KeySource.HEADER)

    headers = CIMultiDict({"authorization": basic(AUTH_KEY + ":"), "x-write-key": HEADER_KEY})
    assert find_write_key(headers, {}) == WriteKey(AUTH_KEY, KeySource.AUTHORIZATION)


def test_query_param_is_lowercase_writekey_only() -> None:
    """Jitsu reads `c.Query("writekey")`; `?writeKey=` does not work there (§2.1)."""
    assert find_write_key(CIMultiDict(), {"writeKey": QUERY_KEY}) is None
    assert find_write_key(CIMultiDict(), {"WRITEKEY": QUERY_KEY}) is None


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_sources_are_skipped(blank: str) -> None:
    headers = CIMultiDict({"X-Write-Key": blank})
    assert find_write_key(headers, {"writekey": blank}, BODY_KEY) == WriteKey(
        BODY_KEY, KeySource.BODY
    )
    assert find_write_key(headers, {"writekey": blank}, blank) is None


def test_whitespace_around_keys_is_trimmed() -> None:
    headers = CIMultiDict({"X-Write-Key": f"  {HEADER_KEY}\t"})
    assert find_write_key(headers, {}) == WriteKey(HEADER_KEY, KeySource.HEADER)
    assert find_write_key(CIMultiDict(), {"writekey": f" {QUERY_KEY} "}) == WriteKey(
        QUERY_KEY, KeySource.QUERY
    )
    assert find_write_key(CIMultiDict(), {}, f" {BODY_KEY}\n") == WriteKey(BODY_KEY, KeySource.BODY)


@pytest.mark.parametrize("body_key", [123, {"key": BODY_KEY}, [BODY_KEY], True])
def test_non_string_body_key_is_ignored(body_key: object) -> None:
    assert find_write_key(CIMultiDict(), {}, body_key) is None


# ---- Basic decoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(basic("writeKey123:"), "writeKey123", id="trailing-colon"),
        pytest.param(basic("writeKey123"), "writeKey123", id="no-trailing-colon"),
        pytest.param(basic("kid:secret:"), "kid:secret", id="key-id-and-secret-with-colon"),
        pytest.param(basic("kid:secret"), "kid:secret", id="key-id-and-secret-no-colon"),
        # Jitsu trims exactly one ':' (bytes.TrimSuffix).
        pytest.param(basic("kid:secret::"), "kid:secret:", id="only-one-colon-trimmed"),
        pytest.param(basic("  kid:secret:  \n"), "kid:secret", id="decoded-whitespace"),
        pytest.param(basic("kid:secret \n"), "kid:secret", id="whitespace-after-key"),
        pytest.param("  " + basic("kid:secret:") + "  ", "kid:secret", id="header-whitespace"),
        pytest.param(
            "Basic    " + base64.b64encode(b"kid:secret:").decode(),
            "kid:secret",
            id="spaces-after-scheme",
        ),
        pytest.param(
            "basic " + base64.b64encode(b"kid:secret:").decode(), "kid:secret", id="lowercase"
        ),
        pytest.param(
            "BASIC " + base64.b64encode(b"kid:secret:").decode(), "kid:secret", id="uppercase"
        ),
        pytest.param(
            "bAsIc " + base64.b64encode(b"kid:secret:").decode(), "kid:secret", id="mixed-case"
        ),
        # Jitsu's TrimPrefix("Basic ") is a no-op here and the whole value is decoded.
        pytest.param(base64.b64encode(b"kid:secret:").decode(), "kid:secret", id="no-scheme"),
        pytest.param(basic("kïd:sécret:"), "kïd:sécret", id="utf-8"),
    ],
)
def test_decode_basic(header: str, expected: str) -> None:
    assert decode_basic(header) == expected


def test_docs_example_with_trailing_newline_is_accepted() -> None:
    """jitsu.com/docs/sending-data/http: `d3JpdGVLZXkxMjM6Cg==` encodes "writeKey123:\\n";
    Jitsu itself would keep the newline, the proxy is lenient (§2.1)."""
    assert base64.b64decode("d3JpdGVLZXkxMjM6Cg==") == b"writeKey123:\n"
    assert decode_basic("Basic d3JpdGVLZXkxMjM6Cg==") == "writeKey123"

    headers = CIMultiDict({"Authorization": "Basic d3JpdGVLZXkxMjM6Cg=="})
    assert find_write_key(headers, {}) == WriteKey("writeKey123", KeySource.AUTHORIZATION)


MALFORMED = [
    pytest.param("Basic !!!not-base64!!!", id="invalid-base64-chars"),
    pytest.param("Basic abc", id="bad-padding"),
    pytest.param("Basic a2lkOnNlY3JldDo", id="missing-padding"),
    pytest.param("Bearer xyz", id="bearer"),
    pytest.param(f"Bearer {HEADER_KEY}", id="bearer-with-key"),
    pytest.param("Basic", id="scheme-only"),
    pytest.param("Basic " + base64.b64encode(b"\xff\xfekid:").decode(), id="not-utf-8"),
    pytest.param("Basic " + base64.b64encode(b"kid:\x80:").decode(), id="stray-continuation"),
    pytest.param("Basic a2lk OnNl", id="space-inside-base64"),
]


@pytest.mark.parametrize("header", MALFORMED)
def test_malformed_basic_is_a_400(header: str) -> None:
    with pytest.raises(IngestError) as info:
        decode_basic(header)

    assert info.value.status == 400
    assert info.value.message == DECODE_ERROR
    # Jitsu answers 200 + error body on browser routes for this (§2.4 table).
    assert info.value.browser_ok is True


@pytest.mark.parametrize("header", MALFORMED)
def test_malformed_authorization_wins_over_every_other_source(header: str) -> None:
    """Jitsu: any non-empty Authorization is used first, even when X-Write-Key is fine."""
    headers, query, body_key = request_parts((KeySource.HEADER, KeySource.QUERY, KeySource.BODY))
    headers["Authorization"] = header

    with pytest.raises(IngestError) as info:
        find_write_key(headers, query, body_key)

    assert info.value.status == 400
    assert info.value.message == DECODE_ERROR


def test_decode_error_does_not_echo_the_header() -> None:
    """The secret half must never reach an error body."""
    header = "Bearer " + AUTH_KEY
    with pytest.raises(IngestError) as info:
        decode_basic(header)

    secret = AUTH_KEY.split(":", 1)[1]
    assert secret not in str(info.value)
    assert secret not in info.value.message


# ---- key id, masking ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("kid:secret", "kid"),
        ("kid:sec:ret", "kid"),
        (AUTH_KEY, "AuthKeyIdAAAAAAAAAAAAAAAAAAAAAAA"),
        (":secret", ""),
        # Plain keys (legacy or stream id): a short prefix only.
        ("cl9v3ecgk0000m2m3abcd1234", "cl9v…"),
        ("abcde", "abcd…"),
        ("abcd", "…"),
        ("ab", "…"),
        ("", "…"),
    ],
)
def test_key_id(value: str, expected: str) -> None:
    assert key_id(value) == expected
    assert WriteKey(value, KeySource.HEADER).key_id == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("kid:secret", "kid:***"),
        (HEADER_KEY, "HeaderKeyIdBBBBBBBBBBBBBBBBBBBBB:***"),
        ("plainkey123", "plai…:***"),
        ("abc", "…:***"),
    ],
)
def test_mask_key(value: str, expected: str) -> None:
    assert mask_key(value) == expected


def test_write_key_is_frozen() -> None:
    key = WriteKey(HEADER_KEY, KeySource.HEADER)
    with pytest.raises(AttributeError):
        key.value = "other"  # type: ignore[misc]


# ---- redact ------------------------------------------------------------------------------


def test_redact_masks_the_full_key_in_jitsu_stream_not_found_error() -> None:
    """Jitsu echoes the unmasked key in "stream not found" (§2.4)."""
    text = f'{{"error":"stream not found: for: [slug: ][domain: x][writeKey: {HEADER_KEY}]"}}'

    assert redact(text, HEADER_KEY) == (
        '{"error":"stream not found: for: [slug: ][domain: x]'
        '[writeKey: HeaderKeyIdBBBBBBBBBBBBBBBBBBBBB:***]"}'
    )


def test_redact_masks_a_bare_secret() -> None:
    secret = HEADER_KEY.split(":", 1)[1]
    assert redact(f"auth failed for {secret}, retrying {secret}", HEADER_KEY) == (
        "auth failed for ***, retrying ***"
    )


def test_redact_plain_key() -> None:
    assert redact("writeKey: plainkey123!", "plainkey123") == "writeKey: plai…:***!"


@pytest.mark.parametrize("key", [None, ""])
def test_redact_without_key_returns_text_unchanged(key: str | None) -> None:
    assert redact("nothing to hide: kid:secret", key) == "nothing to hide: kid:secret"


@pytest.mark.parametrize("key", [AUTH_KEY, HEADER_KEY, "kid:s3cr3tvalue", "plainlegacykey42"])
@pytest.mark.parametrize(
    "template",
    [
        "{key}",
        "[writeKey: {key}]",
        "{key}{key}",
        "secret={secret}&key={key}",
        "Basic {b64} -> {key}",
        "{secret}",
        "prefix{secret}suffix",
    ],
)
def test_redact_never_leaves_the_secret(key: str, template: str) -> None:
    secret = key.split(":", 1)[1] if ":" in key else key
    b64 = base64.b64encode(f"{key}:".encode()).decode()
    text = template.format(key=key, secret=secret, b64=b64)

    out = redact(text, key)

    assert secret not in out
    assert key not in out
