"""A GGUF file of a LLaMA model read once: its header parsed with ``struct``, its tensors dequantised by
the ``gguf`` package, the model built from them.

transformers reads such a file three times (the config, the tokenizer, the weights), each time with gguf's
``GGUFReader``, which makes a NumPy view for each of SmolLM2's ~100,000 vocabulary and merge strings, and
it maps tensor names once per module: most of the ~22 CPU-seconds SmolLM2-135M took to load. Here the
header is read once; each tensor goes through the same ``gguf.dequantize`` and the same query/key row
order as transformers' LlamaTensorProcessor, so the weights are bit for bit transformers' (a test compares
the two on the shipped file). The tokenizer is still transformers' own, which reads only the vocabulary.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["GgufHeader", "TensorEntry", "read_header", "plain_llama", "load_llama"]

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}  # fmt: skip
_STRING, _ARRAY = 8, 9
# GGUF metadata key -> LlamaConfig field, as transformers maps them (integrations/ggml.py).
_CONFIG_KEYS = {
    "llama.context_length": "max_position_embeddings",
    "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size",
    "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_UNUSED = ("rope_freqs",)  # transformers' LLaMA loader skips it too


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its GGUF name, dimensions (GGUF order, fastest first), type and offset."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GgufHeader:
    """The file's scalar metadata, the length of each metadata array, its tensors and where data starts."""

    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: tuple[TensorEntry, ...]
    data_start: int


class _Cursor:
    def __init__(self, blob: Any) -> None:
        self.blob, self.at = blob, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.blob, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("<Q")
        self.at += length
        if self.at > len(self.blob):
            raise EOFError("a string runs past the end of the file")
        return bytes(self.blob[self.at - length : self.at]).decode("utf-8")

    def skip_array(self, kind: int, count: int) -> None:
        if kind == _STRING:
            for _ in range(count):
                self.at += 8 + struct.unpack_from("<Q", self.blob, self.at)[0]
        elif kind in _SCALARS:
            self.at += count * struct.calcsize(_SCALARS[kind])
        else:  # nested arrays: no LLaMA file has them
            raise ValueError(f"metadata array of type {kind} is not supported")


def read_header(path: Path) -> tuple[GgufHeader, Any]:
    """Parse the header once; return it and the memory-mapped file (the tensors' bytes)."""
    with open(path, "rb") as handle:
        blob = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(blob)
    if bytes(blob[:4]) != _MAGIC:
        raise ValueError("not a GGUF file (no GGUF magic)")
    cursor.at = 4
    version, tensor_count, kv_count = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key, kind = cursor.string(), cursor.take("<I")
        if kind == _ARRAY:
            item, count = cursor.take("<I"), cursor.take("<Q")
            lengths[key] = count
            cursor.skip_array(item, count)
        else:
            metadata[key] = cursor.string() if kind == _STRING else cursor.take(_SCALARS[kind])
    tensors = []
    for _ in range(tensor_count):
        name, rank = cursor.string(), cursor.take("<I")
        dims = tuple(cursor.take("<Q") for _ in range(rank))
        tensors.append(TensorEntry(name, dims, cursor.take("<I"), cursor.take("<Q")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-cursor.at // align) * align
    return GgufHeader(metadata, lengths, tuple(tensors), start), blob


def plain_llama(header: GgufHeader) -> bool:
    """Whether transformers loads this file as a LlamaForCausalLM (it makes a Mistral of 'mistral' files)."""
    name = str(header.metadata.get("general.name", "")).lower()
    return header.metadata.get("general.architecture") == "llama" and "mistral" not in name


def _config(header: GgufHeader) -> Any:
    from transformers import LlamaConfig

    values = {field: header.metadata[key] for key, field in _CONFIG_KEYS.items() if key in header.metadata}
    values.setdefault("vocab_size", header.array_lengths.get("tokenizer.ggml.tokens"))
    names = {t.name for t in header.tensors}
    return LlamaConfig(**values, tie_word_embeddings="output.weight" not in names)


def _hf_name(name: str) -> str | None:
    """The LlamaForCausalLM parameter a GGUF tensor fills (None for ones transformers skips)."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    if stem in _UNUSED:
        return None
    raise ValueError(f"tensor '{name}' is not one of a LLaMA model")


def _weights(entry: TensorEntry, header: GgufHeader, blob: Any, config: Any) -> np.ndarray:
    """One tensor dequantised to float32, its query/key rows in transformers' order."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quant_shape_to_byte_shape

    kind = GGMLQuantizationType(entry.ggml_type)
    block, size = GGML_QUANT_SIZES[kind]
    shape = tuple(reversed(entry.dims))
    count = int(np.prod(entry.dims)) * size // block
    data = np.frombuffer(blob, np.uint8, count, header.data_start + entry.offset)
    if kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = data.reshape(quant_shape_to_byte_shape(shape, kind))
    weights = dequantize(data, kind).reshape(shape)
    heads = {".attn_q.": config.num_attention_heads, ".attn_k.": config.num_key_value_heads}
    for part, count_heads in heads.items():
        if part in entry.name:  # llama.cpp interleaves the rotary halves; undo as transformers does
            rows = weights.shape[0] // count_heads // 2
            weights = weights.reshape(count_heads, rows, 2, *weights.shape[1:]).swapaxes(2, 1)
            weights = weights.reshape(shape)
    return weights


def load_llama(header: GgufHeader, blob: Any) -> Any:
    """Return the float32 LlamaForCausalLM of a plain LLaMA file (see :func:`plain_llama`), in eval mode,
    from its header and bytes (:func:`read_header`)."""
    from transformers import LlamaForCausalLM

    config = _config(header)
    state = {}
    for entry in header.tensors:
        name = _hf_name(entry.name)
        if name is not None:
            state[name] = torch.from_numpy(np.copy(_weights(entry, header, blob, config)))
    # transformers' own loading of a state dict: weights tied, rotary tables computed, nothing initialised.
    return LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32).eval()
