"""Tests for sidecar.sse: framing must not depend on where the socket happened to split the body."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sse import SSEError, SSEEvent, SSEParser

# Every framing feature at once: CRLF, LF and lone-CR terminators, comments, a field without a space
# after the colon, a value whose second leading space is content, id/retry lines, multi-line data,
# multi-byte UTF-8 (2-, 3- and 4-byte sequences), a "data" line without colon, an event type without
# data (not dispatched, and its type must not leak into the next event).
BODY = (
    b": keep-alive\r\n"
    b"\r\n"
    b"event: message_start\r\n"
    b'data: {"a": 1}\r\n'
    b"\r\n"
    b"data: line one\r\n"
    b"data:line two\n"
    b"data:  two spaces\r\n"
    b"\n"
    b"id: 7\rretry: 100\r"
    b"data: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\r\r"
    b"event: done\n"
    b": comment between fields\n"
    b"data\n"
    b"\n"
    b"event: lonely\n"
    b"\n"
    b"data: after\r\n"
    b"\r\n"
)

EXPECTED = [
    SSEEvent(event="message_start", data='{"a": 1}'),
    SSEEvent(event=None, data="line one\nline two\n two spaces"),
    SSEEvent(event=None, data="caf\u00e9 \u20ac \U0001f600"),
    SSEEvent(event="done", data=""),
    SSEEvent(event=None, data="after"),
]


def parse(*chunks: bytes, max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes=max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


def test_whole_body() -> None:
    assert parse(BODY) == EXPECTED


@pytest.mark.parametrize("split", range(len(BODY) + 1))
def test_every_split_point(split: int) -> None:
    assert parse(BODY[:split], BODY[split:]) == EXPECTED


def test_byte_by_byte() -> None:
    assert parse(*(BODY[i : i + 1] for i in range(len(BODY)))) == EXPECTED


def test_events_are_returned_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\ndata: b\n\ndata: c") == [SSEEvent(None, "a"), SSEEvent(None, "b")]
    assert parser.close() == [SSEEvent(None, "c")]


def test_cr_then_lf_in_next_chunk_is_one_terminator() -> None:
    parser = SSEParser()
    # If the "\n" were taken as a second terminator it would be a blank line and dispatch "x" early,
    # splitting one event into two.
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\ndata: y\r") == []
    assert parser.feed(b"\n\r\n") == [SSEEvent(None, "x\ny")]


def test_lone_cr_then_data_in_next_chunk() -> None:
    assert parse(b"data: x\r", b"data: y\r", b"\r") == [SSEEvent(None, "x\ny")]


def test_leading_bom_is_ignored_even_when_split() -> None:
    assert parse(b"\xef\xbb", b"\xbfdata: x\n\n") == [SSEEvent(None, "x")]
    # Only the first one: a later BOM is content.
    assert parse(b"data: \xef\xbb\xbfx\n\n") == [SSEEvent(None, "\ufeffx")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse(b"data: \xff\xfe ok\n\n") == [SSEEvent(None, "\ufffd\ufffd ok")]


def test_truncated_utf8_at_close_is_replaced() -> None:
    assert parse(b"data: \xe2\x82") == [SSEEvent(None, "\ufffd")]


def test_close_flushes_unterminated_event() -> None:
    assert parse(b"event: e\ndata: x") == [SSEEvent("e", "x")]
    assert parse(b"data: x\n") == [SSEEvent(None, "x")]
    assert parse(b"data: x\r") == [SSEEvent(None, "x")]
    assert parse(b"event: e\n") == []
    assert parse(b": only a comment") == []
    assert parse() == []


def test_close_is_idempotent_and_feed_after_close_is_a_bug() -> None:
    parser = SSEParser()
    parser.feed(b"data: x")
    assert parser.close() == [SSEEvent(None, "x")]
    assert parser.close() == []
    with pytest.raises(RuntimeError):
        parser.feed(b"data: y\n\n")


def test_field_parsing_rules() -> None:
    assert parse(b"data:\n\n") == [SSEEvent(None, "")]
    assert parse(b"data: \n\n") == [SSEEvent(None, "")]
    assert parse(b"data:a:b\n\n") == [SSEEvent(None, "a:b")]
    assert parse(b"event:\ndata: x\n\n") == [SSEEvent(None, "x")]
    assert parse(b"Data: x\n\n") == []  # field names are case-sensitive
    assert parse(b"unknown: x\ndata: y\n\n") == [SSEEvent(None, "y")]
    assert parse(b"event: a\nevent: b\ndata: x\n\n") == [SSEEvent("b", "x")]


def test_cap_on_unterminated_line() -> None:
    parser = SSEParser(max_event_bytes=16)
    parser.feed(b"data: 0123456789")  # 16 bytes buffered: at the cap, not beyond
    with pytest.raises(SSEError):
        parser.feed(b"a")
    # Dead after failure: the stream must be abandoned, not resumed mid-event.
    with pytest.raises(SSEError):
        parser.feed(b"\n\n")
    assert parser.close() == []


def test_cap_on_accumulated_data_lines() -> None:
    parser = SSEParser(max_event_bytes=16)
    parser.feed(b"data: 0123456\n")  # 7 + 1 joining newline
    with pytest.raises(SSEError):
        parser.feed(b"data: 01234567\n")


def test_cap_counts_utf8_bytes_not_characters() -> None:
    # Four characters, twelve bytes.
    with pytest.raises(SSEError):
        parse("data: \u20ac\u20ac\u20ac\u20ac".encode(), max_event_bytes=10)


def test_cap_exceeded_in_a_single_chunk() -> None:
    with pytest.raises(SSEError):
        parse(b"data: " + b"x" * 100 + b"\n\n", max_event_bytes=50)


def test_cap_is_per_event() -> None:
    body = b"".join(b"data: 0123456789\n\n" for _ in range(100))
    assert len(parse(body, max_event_bytes=16)) == 100


def test_long_comment_line_counts_while_unterminated() -> None:
    parser = SSEParser(max_event_bytes=32)
    with pytest.raises(SSEError):
        for _ in range(10):
            parser.feed(b": " + b"z" * 8)


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=0)


def test_default_cap_is_16_mib() -> None:
    parser = SSEParser()
    parser.feed(b"data: " + b"x" * (16 * 1024 * 1024 - 6))
    with pytest.raises(SSEError):
        parser.feed(b"x")


# ------------------------------------------------------------------------------------------------
# Property: any event list, serialised with any line-ending style and split anywhere, round-trips.

_line_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    # One terminator style per stream: mixing "\r" with a following "\n" terminator would legitimately
    # fuse them into a single CRLF, which is not what the generator meant.
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    events = draw(st.lists(st.tuples(st.none() | _line_text, st.lists(_line_text, min_size=1, max_size=4)), max_size=6))
    lines: list[str] = []
    expected: list[SSEEvent] = []
    for name, data_lines in events:
        if draw(st.booleans()):
            lines.append(":" + draw(_line_text))
        if name is not None:
            lines.append("event: " + name)
        lines.extend("data: " + line for line in data_lines)
        lines.append("")
        expected.append(SSEEvent(event=name or None, data="\n".join(data_lines)))
    body = "".join(line + eol for line in lines).encode()
    return body, expected


@settings(max_examples=300, deadline=None)
@given(data=st.data(), stream=streams())
def test_random_events_and_splits_round_trip(data: st.DataObject, stream: tuple[bytes, list[SSEEvent]]) -> None:
    body, expected = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert parse(*chunks) == expected
