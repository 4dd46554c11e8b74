"""The tiny GGUF models behind the real llama-server tests: seeded, distinct, readable."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.llama.models import TinyModels, write_models


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_the_same_call_writes_the_same_bytes(tiny_models: TinyModels, tmp_path: Path) -> None:
    again = write_models(tmp_path)
    for model_id in (again.chat_small, again.chat_large, again.embedding, again.broken):
        assert again.path(model_id).read_bytes() == tiny_models.path(model_id).read_bytes()


def test_sizes_differ_enough_to_give_distinct_footprints(tiny_models: TinyModels) -> None:
    small = tiny_models.path(tiny_models.chat_small).stat().st_size
    large = tiny_models.path(tiny_models.chat_large).stat().st_size
    assert small < 600_000 and 10_000_000 < large < 12_000_000


def test_chat_model_samples_only_printable_ascii(tiny_models: TinyModels) -> None:
    reader = gguf.GGUFReader(tiny_models.path(tiny_models.chat_small))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.merges")  # llama.cpp refuses a gpt2 vocab without
    tokens = field(reader, "tokenizer.ggml.tokens")
    output = next(t for t in reader.tensors if t.name == "output.weight").data
    live = {tokens[i] for i in np.flatnonzero(np.abs(output).sum(axis=1))}
    printable = {chr(c) for c in range(0x21, 0x7F)} | {"Ġ"}  # Ġ is GPT-2's space
    assert live and all(set(t) <= printable for t in live)


def test_embedding_model_is_a_bert_with_a_wordpiece_vocabulary(tiny_models: TinyModels) -> None:
    reader = gguf.GGUFReader(tiny_models.path(tiny_models.embedding))
    assert field(reader, "general.architecture") == "bert"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(set(tokens)) == len(tokens)  # a duplicate aborts loading
    assert [tokens[i] for i in (0, 100, 101, 102, 103)] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_broken_model_has_a_header_but_not_its_tensors(tiny_models: TinyModels) -> None:
    path = tiny_models.path(tiny_models.broken)
    assert path.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ValueError, match="cannot reshape"):  # a tensor runs past the end
        gguf.GGUFReader(path)
