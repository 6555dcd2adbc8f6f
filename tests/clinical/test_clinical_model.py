from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional

from pipelines.clinical.backbones import BackboneError, load_backbone, smollm2_gguf_path
from pipelines.clinical.model import ClinicalModel, classification_loss, predict_scores, scores_from_logits
from pipelines.clinical.tokens import ClassificationSet, PadCollate, encode_notes, pack_blocks


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random-llama")


def test_tiny_backbone_records_random_provenance(tiny):
    assert tiny.info["weights"] == "random initialisation" and tiny.info["architecture"] == "LlamaForCausalLM"
    assert (
        tiny.tokenizer.pad_token_id == 0 and tiny.tokenizer.eos_token_id == 1 and len(tiny.tokenizer) == 259
    )


def test_backbone_errors_name_the_path(tmp_path):
    with pytest.raises(BackboneError, match=r"GGUF file .*missing.gguf does not exist"):
        load_backbone(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(BackboneError, match="weights.bin is a file but not a .gguf file"):
        load_backbone(str(tmp_path / "weights.bin"))


def test_smollm2_gguf_is_found_without_importing_the_package():
    try:
        path = smollm2_gguf_path()
    except BackboneError as error:
        pytest.skip(str(error))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_pack_blocks_appends_eos_and_drops_the_tail():
    blocks = pack_blocks([[5, 6, 7], [8], [9, 10, 11, 12]], block_length=4, eos_id=1)
    assert blocks.tolist() == [[5, 6, 7, 1], [8, 1, 9, 10]]
    assert pack_blocks([[5, 6, 7], [8], [9, 10, 11, 12]], 2, 1, max_blocks=1).tolist() == [[5, 6]]


def test_encode_truncates_and_collate_pads_right(tiny):
    ids = encode_notes(tiny.tokenizer, ["abcdef", "ab"], max_tokens=4)
    assert [len(row) for row in ids] == [4, 2]
    batch = PadCollate(0)([{"input_ids": torch.tensor(r), "labels": torch.tensor(1)} for r in ids])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["input_ids"][1, 2:].tolist() == [0, 0] and batch["labels"].tolist() == [1, 1]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_ignores_padding_on_either_side(tiny, pooling):
    model = ClinicalModel(tiny.model, outputs=3, pooling=pooling)
    short = torch.tensor([[7, 8, 9]])
    alone = model(short)
    right = model(torch.tensor([[7, 8, 9, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    left = model(torch.tensor([[0, 0, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-4)
    hidden = tiny.model.model(input_ids=short).last_hidden_state[0]
    expected = hidden[-1] if pooling == "last" else hidden.mean(0)
    torch.testing.assert_close(model.features(short)[0], expected)


def test_losses_and_scores_match_torch():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.2, 0.1]])
    labels = torch.tensor([1, 0, 1])
    assert classification_loss(logits, labels, "binary").item() == pytest.approx(
        functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float()).item()
    )
    weighted = classification_loss(logits, labels, "binary", torch.tensor([2.0]))
    manual = -(2 * math.log(torch.sigmoid(logits[0, 0])) + math.log(1 - torch.sigmoid(logits[1, 0])))
    manual -= 2 * math.log(torch.sigmoid(logits[2, 0]))
    assert weighted.item() == pytest.approx(manual / 3, rel=1e-6)
    assert classification_loss(logits, labels, "multiclass").item() == pytest.approx(
        functional.cross_entropy(logits, labels).item()
    )
    assert scores_from_logits(logits, "multiclass").sum(1).tolist() == pytest.approx([1, 1, 1])
    assert scores_from_logits(logits, "binary").shape == (3,)


def test_predict_scores_returns_truth_in_order(tiny):
    model = ClinicalModel(tiny.model, outputs=1)
    data = ClassificationSet([[5, 6], [7], [8, 9, 10]], np.array([1, 0, 1]))
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=PadCollate(0))
    truth, score = predict_scores(model, loader, "binary")
    assert truth.tolist() == [1, 0, 1] and score.dtype == np.float64
    single = torch.sigmoid(model(torch.tensor([[7]])))[0, 0].item()
    assert score[1] == pytest.approx(single, rel=1e-5)


def test_cached_prefix_gives_the_full_forward_pass(tiny):
    from pipelines.clinical.tokens import LMBlocks

    model = ClinicalModel(tiny.model, outputs=2, pooling="last")
    data = ClassificationSet([[5, 6, 7, 8], [9, 10], [11, 12, 13]], np.array([1, 0, 1]))
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=PadCollate(0))
    full = predict_scores(model, loader, "multiclass")[1]
    with pytest.raises(ValueError, match="cached_layers is 0"):
        data.attach_prefix(model)
    model.cached_layers = 1
    data.attach_prefix(model, batch_size=2)
    assert [p.shape for p in data.prefix] == [(4, 32), (2, 32), (3, 32)]
    cached = predict_scores(model, loader, "multiclass")[1]
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
    assert len(model.decoder.layers) == 2 and not isinstance(model.decoder.norm, torch.nn.Identity)
    blocks = torch.randint(3, 259, (3, 6), generator=torch.Generator().manual_seed(1))
    prefix = LMBlocks.prefix_of(model, blocks, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(model.token_nll(blocks, prefix), model.token_nll(blocks))
        torch.testing.assert_close(
            model.lm_loss(blocks, prefix=prefix), tiny.model(blocks, labels=blocks).loss
        )
