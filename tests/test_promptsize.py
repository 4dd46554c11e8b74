"""The prompt's lower bound in characters: counted only as far as the refusal needs, and a lower
bound however a long string is cut for counting."""
from __future__ import annotations

import pytest

from proxy.errors import ContextLengthExceeded
from proxy.server.promptsize import RUN_CHUNK_CHARS, prompt_chars, refuse_oversized


def test_counting_stops_once_the_prompt_is_known_to_be_long_enough():
    messages = [{"role": "user", "content": "ab"}] * 1000
    assert prompt_chars([messages], 10**9) == 2000
    assert prompt_chars([messages], 11) == 12              # six messages, not a thousand


def test_a_run_cut_where_a_long_string_is_counted_in_chunks_is_still_counted_once():
    head = "ab" * ((RUN_CHUNK_CHARS - 3) // 2) + "c"      # ends 3 before the chunk's edge
    tail = "b" + "ab" * 49 + "c"
    text = head + "aaaaaa" + tail                          # the run: 3 | 3 across the edge
    assert prompt_chars([text], 10**9) == len(head) + 1 + len(tail)


def test_a_long_string_stops_being_counted_after_the_chunk_that_is_enough():
    text = "ab" * (2 * RUN_CHUNK_CHARS)
    assert prompt_chars([text], 100) == RUN_CHUNK_CHARS


def test_a_million_tiny_messages_are_refused_by_what_the_first_thousands_show():
    payload = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 1_000_000}
    with pytest.raises(ContextLengthExceeded, match="at least 4097 tokens"):
        refuse_oversized("/v1/chat/completions", payload, 4096)


def test_content_parts_and_input_items_are_counted_as_the_emulator_reads_them():
    """A part's `text`, an item's `input`, a message's `content`: each is prompt text."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "abc"}]},
                {"type": "input", "input": "de"}]
    assert prompt_chars([messages], 10**9) == 5


def test_a_run_of_four_is_one_character_however_short_the_string():
    assert prompt_chars(["aaaa"], 10**9) == 1
    assert prompt_chars(["abc"], 10**9) == 3


def test_a_long_run_across_chunks_counts_one_character_never_less():
    """Each later chunk of one long run folds to one character, less the edge's 5: the string
    still counts as one, not as a negative that would hide the next message's characters."""
    assert prompt_chars(["a" * (2 * RUN_CHUNK_CHARS)], 10**9) == 1
    assert prompt_chars(["a" * (3 * RUN_CHUNK_CHARS), "xyz"], 10**9) == 4
