"""Tiny random-weight GGUF models that a real llama-server loads in milliseconds.

Written with the `gguf` package, seeded, so the same call writes the same bytes. The chat models
are of architecture `llama` with a byte-level GPT-2 tokenizer and a ChatML template; the output
rows of every token that is not printable ASCII are zero, so with the server's default sampler
(top-k, min-p) the sampled text is printable. The embedding model is a BERT with a WordPiece
vocabulary. The broken model is a valid GGUF header whose tensor data is cut short.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CONTEXT_LENGTH = 512
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A few merges: a gpt2 tokenizer without any fails to load ("cannot find tokenizer merges").
MERGES = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n"]


@dataclass(frozen=True)
class ChatShape:
    n_embd: int = 64
    n_block: int = 2
    n_ff: int = 128
    n_head: int = 4


SMALL = ChatShape()  # ~0.5 MB
LARGE = ChatShape(n_embd=256, n_block=4, n_ff=512, n_head=4)  # ~11 MB


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: token i is the printable stand-in for byte value i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # numpy shape is ggml's dimensions reversed: (out, in) for a matrix ggml calls {in, out}.
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def write_chat_model(path: Path, shape: ChatShape = SMALL, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tokens = _byte_tokens() + [m.replace(" ", "") for m in MERGES] + ["<|im_start|>",
                                                                      "<|im_end|>"]
    n_vocab, bos, eos = len(tokens), len(tokens) - 2, len(tokens) - 1
    token_types = [gguf.TokenType.NORMAL] * (n_vocab - 2) + [gguf.TokenType.CONTROL] * 2

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_block)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    e, f = shape.n_embd, shape.n_ff
    output = _weights(rng, n_vocab, e)
    # Zero rows: logit 0 for every byte token outside printable ASCII and for the control
    # tokens; the sampler's top-k keeps only the highest (printable, positive) logits.
    for i in [*range(0x20), *range(0x7F, 256), bos, eos]:
        output[i] = 0.0
    w.add_tensor("token_embd.weight", _weights(rng, n_vocab, e))
    w.add_tensor("output_norm.weight", np.ones(e, np.float32))
    w.add_tensor("output.weight", output)
    for b in range(shape.n_block):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", np.ones(e, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", _weights(rng, e, e))
        w.add_tensor(p + "ffn_norm.weight", np.ones(e, np.float32))
        w.add_tensor(p + "ffn_gate.weight", _weights(rng, f, e))
        w.add_tensor(p + "ffn_up.weight", _weights(rng, f, e))
        w.add_tensor(p + "ffn_down.weight", _weights(rng, e, f))
    _finish(w)
    return path


def _wordpiece_vocab(n_vocab: int) -> list[str]:
    """[PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, the rest unique (a duplicate aborts
    loading). In llama.cpp's spelling of WordPiece, a word-initial piece starts with "▁" and a
    continuation has no "##": ASCII letters and digits as both, and a few whole words."""
    vocab = [f"[unused{i}]" for i in range(n_vocab)]
    vocab[0], vocab[100:104] = "[PAD]", ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = chars + ["▁" + w for w in chars + ["hello", "world", "the", "memory", "proxy"]]
    vocab[104:104 + len(words)] = words
    assert len(vocab) == n_vocab and len(set(vocab)) == n_vocab
    return vocab


def write_embedding_model(path: Path, *, n_embd: int = 64, n_block: int = 2, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    n_vocab, n_ff, n_types = 256, 4 * n_embd, 2
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name(path.stem)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_block)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_token_type_count(n_types)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("bert")
    w.add_token_list(_wordpiece_vocab(n_vocab))
    w.add_token_types([gguf.TokenType.CONTROL if i in (0, 100, 101, 102, 103)
                       else gguf.TokenType.NORMAL for i in range(n_vocab)])

    def norm(name: str) -> None:
        w.add_tensor(name + ".weight", np.ones(n_embd, np.float32))
        w.add_tensor(name + ".bias", np.zeros(n_embd, np.float32))

    w.add_tensor("token_embd.weight", _weights(rng, n_vocab, n_embd))
    w.add_tensor("token_types.weight", _weights(rng, n_types, n_embd))
    w.add_tensor("position_embd.weight", _weights(rng, CONTEXT_LENGTH, n_embd))
    norm("token_embd_norm")
    for b in range(n_block):
        p = f"blk.{b}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", _weights(rng, n_embd, n_embd))
            w.add_tensor(p + name + ".bias", np.zeros(n_embd, np.float32))
        norm(p + "attn_output_norm")
        w.add_tensor(p + "ffn_up.weight", _weights(rng, n_ff, n_embd))
        w.add_tensor(p + "ffn_up.bias", np.zeros(n_ff, np.float32))
        w.add_tensor(p + "ffn_down.weight", _weights(rng, n_embd, n_ff))
        w.add_tensor(p + "ffn_down.bias", np.zeros(n_embd, np.float32))
        norm(p + "layer_output_norm")
    _finish(w)
    return path


def write_broken_model(path: Path) -> Path:
    """A small chat model with its tensor data cut in half: the header parses, loading fails."""
    write_chat_model(path, SMALL, seed=2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@dataclass(frozen=True)
class TinyModels:
    """The standard set, by router model id (a models-dir file's name without `.gguf`)."""
    directory: Path
    chat_small: str = "tiny-chat-small"
    chat_large: str = "tiny-chat-large"
    embedding: str = "tiny-embed"
    broken: str = "tiny-broken"

    def path(self, model_id: str) -> Path:
        return self.directory / f"{model_id}.gguf"


def write_models(directory: Path) -> TinyModels:
    directory.mkdir(parents=True, exist_ok=True)
    m = TinyModels(directory)
    write_chat_model(m.path(m.chat_small), SMALL, seed=0)
    write_chat_model(m.path(m.chat_large), LARGE, seed=1)
    write_embedding_model(m.path(m.embedding))
    write_broken_model(m.path(m.broken))
    return m
