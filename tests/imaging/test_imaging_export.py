"""HF peft restores an imaging adapter and its head from ``save_adapter(format="peft")`` and ``export``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines import cli
from pipelines.core.registry import create_pipeline
from pipelines.core.runner import run_recipe
from pipelines.imaging.model import ImageClassifier


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, 1, 16, 16)).astype(np.uint8)
    images[labels == 1, :, 4:12, 4:12] += 120
    return [{"image": x, "label": int(y)} for x, y in zip(images, labels, strict=True)]


def _pipe(tiny_vit, backbone=None):
    return create_pipeline(
        "imaging/classification", backbone=backbone or "timm:vit_tiny_patch16_224", backbone_options=tiny_vit,
        adapter={"method": "lora", "r": 2, "alpha": 4}, transforms={"image_size": 32, "augment": False},
        train={"epochs": 2, "batch_size": 8, "lr": 0.01}, bootstrap=0,
    )  # fmt: skip


def _peft_outputs(peft, base, folder, images) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        return model(images).numpy()


def test_hf_peft_restores_adapter_and_head_of_the_peft_save(tmp_path, tiny_vit):
    peft = pytest.importorskip("peft")
    pipe = _pipe(tiny_vit)
    pipe.fit(_records(24, 0), _records(8, 1))
    images = torch.rand(6, 1, 32, 32)
    pipe.model.eval()
    with torch.no_grad():
        expected = pipe.model(images).numpy()
    exported = pipe.save_adapter(tmp_path / "task", format="peft")
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    facts = json.loads((exported / "imaging_head.json").read_text())
    assert facts["operating_point"]["threshold"] == pipe.threshold

    torch.manual_seed(123)  # a head unlike the trained one until peft restores it
    base = ImageClassifier(pipe.backbone, 2, "binary").eval()
    with torch.no_grad():
        assert np.abs(base(images).numpy() - expected).max() > 1e-3  # so the match below is peft's doing
    np.testing.assert_allclose(_peft_outputs(peft, base, exported, images), expected, rtol=1e-5, atol=1e-6)

    # peft's own save of the same configuration writes exactly these tensor names and shapes
    oracle = peft.get_peft_model(
        ImageClassifier(pipe.backbone, 2, "binary"),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=config["target_modules"], modules_to_save=["head"]),
    )
    oracle.save_pretrained(tmp_path / "oracle")
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (exported, tmp_path / "oracle"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_export_of_an_imaging_run_writes_the_head_for_hf_peft(tmp_path, tiny_vit):
    peft = pytest.importorskip("peft")
    arrays = {}
    for split, n, seed in (("train", 24, 0), ("val", 8, 1), ("test", 8, 2)):
        records = _records(n, seed)
        arrays[f"{split}_images"] = np.stack([r["image"][0] for r in records])
        arrays[f"{split}_labels"] = np.array([[r["label"]] for r in records])
    np.savez(tmp_path / "tiny.npz", **arrays)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "export", "pipeline": "imaging/classification", "seed": 0,
        "backbone": {"name": "timm:vit_tiny_patch16_224", "options": tiny_vit},
        "data": {"dataset": str(tmp_path / "tiny.npz"), "task": "binary",
                 "options": {"transforms": {"image_size": 32, "augment": False}}},
        "stages": [{"name": "task", "objective": "classification", "adapter": {"method": "lora", "r": 2},
                    "train": {"max_steps": 3, "batch_size": 8, "lr": 0.01}}],
        "evaluation": {"bootstrap": 0},
    }))  # fmt: skip
    run_dir = run_recipe(recipe, output_dir=tmp_path / "runs")
    assert cli.main(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "out")]) == 0
    exported = tmp_path / "out" / "task"
    assert json.loads((exported / "adapter_config.json").read_text())["modules_to_save"] == ["head"]

    lab = _pipe(tiny_vit)
    lab.load_adapter(run_dir / "adapters" / "task")
    images = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = lab.model.eval()(images).numpy()
    torch.manual_seed(7)
    base = ImageClassifier(lab.load_backbone(), 2, "binary")
    np.testing.assert_allclose(_peft_outputs(peft, base, exported, images), expected, rtol=1e-5, atol=1e-6)
