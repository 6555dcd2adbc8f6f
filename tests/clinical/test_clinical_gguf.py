"""The one-read GGUF loader gives transformers' weights, logits and tokens: a tiny file written as llama.cpp
writes one, and the shipped SmolLM2 file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.clinical.backbones import BackboneError, load_backbone, smollm2_gguf_path, tiny_llama
from pipelines.clinical.gguf_file import load_llama, plain_llama, read_header

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 7, 200]])


def _llama_cpp_order(weights: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's convert_hf_to_gguf.py writes query and key weights in (its ``permute``)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_tiny_gguf(path, model) -> None:
    """The tiny Llama as a GGUF file: F32 tensors, the MLP weights as Q8_0 blocks."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            _, _, layer, rest = stem.split(".", 3)
            stem_out = f"blk.{layer}.{parts[rest]}"
        else:
            stem_out = names[stem]
        weights = tensor.numpy().astype(np.float32)
        if stem_out.endswith("attn_q"):
            weights = _llama_cpp_order(weights, config.num_attention_heads)
        if stem_out.endswith("attn_k"):
            weights = _llama_cpp_order(weights, config.num_key_value_heads)
        if "ffn_" in stem_out and not stem_out.endswith("norm"):
            blocks = gguf.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(f"{stem_out}.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{stem_out}.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_tiny_gguf_loads_as_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_llama(vocab_size=259, hidden_size=64, layers=2, heads=4, kv_heads=2)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, original)
    header, blob = read_header(path)
    assert plain_llama(header) and len(header.tensors) == len(original.state_dict())
    ours = load_llama(header, blob)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    mine, theirs = ours.state_dict(), oracle.state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    exact = [k for k in mine if "mlp" not in k]  # F32 in the file: the rows of q and k back in HF order
    assert all(torch.equal(mine[k], original.state_dict()[k]) for k in exact)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, oracle(IDS).logits)
        torch.testing.assert_close(ours(IDS).logits, original(IDS).logits, atol=2e-3, rtol=0)


def test_a_file_that_is_not_gguf_is_one_line_naming_it(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(
        BackboneError, match=r"backbone GGUF file .*fake\.gguf could not be read \(ValueError\)"
    ):
        load_backbone(str(path))


@pytest.mark.slow
def test_smollm2_loads_with_the_logits_and_tokens_of_transformers_gguf_path():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = smollm2_gguf_path()
    except BackboneError as error:
        pytest.skip(str(error))
    ours = load_backbone("smollm2-135m")
    before = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Chest pain, BP 120/80; échographie normale.\n\nPlan: aspirin 81 mg <|im_end|>"
    assert ours.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (ours.tokenizer.eos_token_id, ours.tokenizer.pad_token_id) == (tokenizer.eos_token_id, 2)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(ours.model(ids).logits, before(ids).logits)
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight  # tied, as transformers ties
