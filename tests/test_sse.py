"""The SSE decoder: the event-stream rules of the HTML standard, whatever the chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.backends.sse import SSEDecoder


def decode(*chunks: bytes) -> list[tuple[bytes, bytes]]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_dashscope_framing_with_its_comment_line() -> None:
    stream = b'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"a":1}\n\nid:2\nevent:error\n:HTTP_STATUS/400\ndata:{"code":"X"}\n\n'
    assert decode(stream) == [(b"result", b'{"a":1}'), (b"error", b'{"code":"X"}')]


def test_several_data_lines_join_with_a_line_feed_and_one_leading_space_is_dropped() -> None:
    assert decode(b"data: one\ndata:  two\ndata\n\n") == [(b"message", b"one\n two\n")]


def test_crlf_and_lone_cr_end_lines_even_split_across_chunks() -> None:
    assert decode(b"data:a\r", b"\n\r", b"\ndata:b\r\r") == [(b"message", b"a"), (b"message", b"b")]


def test_an_event_without_its_blank_line_is_never_dispatched() -> None:
    # A stream cut before the blank line: the partial event must not count.
    assert decode(b'data:{"a":1}\n\ndata:{"b":') == [(b"message", b'{"a":1}')]
    assert decode(b"data:x\n") == []


def test_comments_and_unknown_fields_are_ignored_and_a_blank_line_alone_dispatches_nothing() -> None:
    assert decode(b": keep-alive\n\nretry:10\nid:3\nfoo:bar\n\n") == []


def test_a_leading_byte_order_mark_is_dropped_even_when_split() -> None:
    assert decode(b"\xef\xbb", b"\xbfdata:x\n\n") == [(b"message", b"x")]


def test_the_event_type_resets_after_each_event() -> None:
    assert decode(b"event:error\ndata:1\n\ndata:2\n\n") == [(b"error", b"1"), (b"message", b"2")]


EVENTS = st.lists(
    st.tuples(
        st.sampled_from([b"result", b"error", b"message"]),
        st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), min_size=1, max_size=3),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(0, 400), max_size=8))
def test_any_chunking_of_any_line_ending_gives_the_same_events(events, newline, cuts) -> None:
    stream = b"".join(
        b"event:" + kind + newline + b"".join(b"data: " + line + newline for line in lines) + newline
        for kind, lines in events
    )
    points = sorted({min(cut, len(stream)) for cut in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    expected = [(kind, b"\n".join(lines)) for kind, lines in events]
    assert decode(*chunks) == expected
