"""Backbone loading: random ESM-2, fair-esm files read with weights_only, transformers folders, targets."""

from __future__ import annotations

import argparse
import hashlib
import re

import pytest
import torch

from pipelines.protein.backbones import BackboneError, expand_targets, load_backbone, random_esm2

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


def _tokens(backbone, sequences=(SEQUENCE,)):
    from pipelines.protein.batching import pad_tokens

    return pad_tokens([backbone.vocabulary.encode(s) for s in sequences], backbone.vocabulary.padding_index)


def test_random_backbone_is_seeded_and_says_so():
    a, provenance = load_backbone("esm2_tiny_random")
    b, _ = load_backbone("esm2_tiny_random")
    c, _ = load_backbone("esm2_tiny_random", seed=1)
    assert provenance["weights"] == "random initialisation" and provenance["pretrained"] is False
    assert provenance["architecture"] == {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}
    assert provenance["parameters"] == sum(p.numel() for p in a.parameters())
    assert torch.equal(a(_tokens(a)), b(_tokens(b)))
    assert not torch.equal(a(_tokens(a)), c(_tokens(c)))
    assert a(_tokens(a)).shape == (1, len(SEQUENCE) + 2, 32)


def _fair_esm_checkpoint(backbone, path):
    """Write a checkpoint laid out like the published esm2_*.pt files (fairseq prefixes, cfg Namespace)."""
    state = {f"encoder.sentence_encoder.{k}": v for k, v in backbone.model.state_dict().items()}
    cfg = argparse.Namespace(
        encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True
    )
    torch.save({"cfg": {"model": cfg}, "model": state}, path)


def test_fair_esm_file_loads_with_weights_only_and_records_sha256(tmp_path):
    source, _ = random_esm2(2, 32, 4, seed=3)
    path = tmp_path / "my_esm2.pt"
    _fair_esm_checkpoint(source, path)
    loaded, provenance = load_backbone(str(path))
    assert provenance["pretrained"] is True
    assert provenance["weights"] == {
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert torch.equal(loaded(_tokens(loaded)), source(_tokens(source)))


class Payload:
    """A class that weights_only unpickling must refuse."""


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": Payload()}, "model": {}}, path)
    with pytest.raises(BackboneError, match=r"evil\.pt cannot be read with torch\.load\(weights_only=True\)"):
        load_backbone(str(path))


def test_fair_esm_name_offline_without_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_PIPELINES_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"esm2_t6_8M_UR50D.pt, which is missing.*esm2_small_random"):
        load_backbone("esm2_t6_8M_UR50D", checkpoint_dir=str(tmp_path))


def test_unknown_name_and_option_are_errors():
    with pytest.raises(BackboneError, match="unknown protein backbone 'esm3'"):
        load_backbone("esm3")
    with pytest.raises(BackboneError, match=r"unknown backbone option\(s\) \['layers'\]"):
        load_backbone("esm2_tiny_random", layers=3)


def _module_names(backbone, targets):
    patterns = [t[3:] for t in targets]
    return [n for n, _ in backbone.named_modules() if any(re.fullmatch(p, n) for p in patterns)]


def test_role_targets_and_last_n_layers(tiny_backbone):
    assert _module_names(tiny_backbone, expand_targets(tiny_backbone, ["key", "value"], last_n_layers=1)) == [
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    dense = _module_names(tiny_backbone, expand_targets(tiny_backbone, ["query", "dense"]))
    assert dense == [
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")
    ]
    assert expand_targets(tiny_backbone, ["q", "re:custom"])[1:] == ["re:custom"]
    with pytest.raises(BackboneError, match="last_n_layers=3 is outside 1..2"):
        expand_targets(tiny_backbone, ["q"], last_n_layers=3)
    with pytest.raises(BackboneError, match=r"targets \['fc9'\] are module patterns"):
        expand_targets(tiny_backbone, ["q", "fc9"], last_n_layers=1)


def test_role_targets_work_with_core_lora(tiny_backbone):
    from pipelines.core.peft import LoRA, add_adapter, count_parameters

    targets = expand_targets(tiny_backbone, ["all"], last_n_layers=1)
    add_adapter(tiny_backbone, LoRA(r=2, alpha=4, targets=targets), name="task")
    # q, k, v, out: 2 * (32*2 + 2*32); fc1: 2*32 + 128*2; fc2: 128*2 + 2*32
    assert count_parameters(tiny_backbone).trainable == 4 * 128 + 320 + 320


def _tiny_transformers_folder(path):
    from esm.data import Alphabet
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    alphabet = Alphabet.from_architecture("ESM-1b")
    (path / "vocab.txt").write_text("\n".join(alphabet.all_toks) + "\n")
    config = EsmConfig(
        vocab_size=len(alphabet.all_toks), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, position_embedding_type="rotary", token_dropout=True,
        pad_token_id=alphabet.padding_idx, mask_token_id=alphabet.mask_idx, max_position_embeddings=1026,
        architectures=["EsmForMaskedLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    EsmForMaskedLM(config).save_pretrained(path)
    EsmTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return alphabet


def test_transformers_folder_loads_with_esm_vocabulary_and_targets(tmp_path):
    pytest.importorskip("transformers")
    alphabet = _tiny_transformers_folder(tmp_path)
    backbone, provenance = load_backbone(str(tmp_path))
    assert provenance["source"] == "transformers checkpoint" and provenance["pretrained"] is True
    assert [f["file"].rsplit("/", 1)[1] for f in provenance["weights"]["files"]] == ["model.safetensors"]
    assert backbone.vocabulary.token_to_index == alphabet.tok_to_idx
    tokens = _tokens(backbone, (SEQUENCE, "MKV"))
    assert backbone(tokens).shape == (2, len(SEQUENCE) + 2, 32)
    assert backbone.masked_lm_logits(tokens).shape == (2, len(SEQUENCE) + 2, len(alphabet.all_toks))
    names = _module_names(backbone, expand_targets(backbone, ["value", "fc2"], last_n_layers=1))
    assert names == [
        "model.esm.encoder.layer.1.attention.self.value",
        "model.esm.encoder.layer.1.output.dense",
    ]


def test_transformers_backbone_trains_lora_and_ignores_padding(tmp_path):
    pytest.importorskip("transformers")
    from pipelines.core.peft import LoRA, add_adapter

    _tiny_transformers_folder(tmp_path)
    backbone, _ = load_backbone(str(tmp_path))
    add_adapter(backbone, LoRA(r=2, alpha=4, targets=expand_targets(backbone, ["all"])), name="task")
    backbone.eval()
    alone = backbone(_tokens(backbone, ("MKV",)))
    together = backbone(_tokens(backbone, (SEQUENCE, "MKV")))[1:, : len("MKV") + 2]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    backbone.masked_lm_logits(_tokens(backbone)).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 6 * 2  # A and B on six linears in two layers
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B gets gradient first
