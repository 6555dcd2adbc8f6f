"""Reuse of trained protein models: HF peft as the oracle of the peft export, load() of runs and folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipelines.core.registry import create_pipeline
from pipelines.core.runner import run_recipe
from pipelines.protein.adapters import export_run
from pipelines.protein.backbones import load_backbone
from pipelines.protein.batching import pad_tokens
from pipelines.protein.experiment import ProteinExperiment
from pipelines.protein.model import ProteinModel


def _sequences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(8, 20)))) for _ in range(n)]


def _peft_outputs(peft_model, backbone, sequences, task) -> np.ndarray:
    tokens = pad_tokens([backbone.vocabulary.encode(s) for s in sequences], backbone.vocabulary.padding_index)
    peft_model.eval()
    with torch.no_grad():
        output = peft_model(tokens)
    return (output if task == "regression" else output.softmax(-1)).numpy()


@pytest.mark.parametrize("task,pooling", [("regression", "mean"), ("multiclass", "bos")])
def test_hf_peft_restores_adapter_and_head_of_the_peft_export(tmp_path, transformers_esm, task, pooling):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    sequences = _sequences(24)
    targets = (
        [10.0 + 3 * s.count("W") for s in sequences] if task == "regression" else [i % 3 for i in range(24)]
    )
    lora = {"method": "lora", "r": 2, "alpha": 4, "targets": ["q", "v", "fc1"]}
    train = {"epochs": 2, "batch_size": 8, "lr": 1e-2}
    pipe = create_pipeline("protein/sequence", backbone=str(transformers_esm), task=task, pooling=pooling,
                           adapter=lora, train=train, bootstrap=0)  # fmt: skip
    pipe.fit((sequences, targets))
    expected = pipe.predict((sequences, targets))[1]
    exported = pipe.save_adapter(tmp_path / "task", format="peft")
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head.linear"] and config["peft_type"] == "LORA"

    backbone = load_backbone(str(transformers_esm))[0]
    torch.manual_seed(123)  # a head unlike the trained one until peft restores it
    classes = 2 if task == "regression" else 3
    base = ProteinModel(backbone, task, classes, pooling)
    before = _peft_outputs(base, backbone, sequences, task)
    assert np.abs(before - expected).max() > 1e-2  # so the match below is peft's doing
    theirs = peft.PeftModel.from_pretrained(base, exported)
    np.testing.assert_allclose(
        _peft_outputs(theirs, backbone, sequences, task), expected, rtol=1e-5, atol=1e-5
    )
    inner = theirs.base_model.model
    assert type(inner.head.linear).__name__ == "ModulesToSaveWrapper"
    assert type(inner.backbone.model.contact_head).__name__ != "ModulesToSaveWrapper"  # 'head' alone would

    # peft's own save of the same configuration writes exactly our tensor names and shapes
    oracle = peft.get_peft_model(
        ProteinModel(load_backbone(str(transformers_esm))[0], task, classes, pooling),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=config["target_modules"], modules_to_save=["head.linear"]
        ),
    )
    oracle.save_pretrained(tmp_path / "oracle")
    ours, reference = (
        load_file(exported / "adapter_model.safetensors"),
        load_file(tmp_path / "oracle" / "adapter_model.safetensors"),
    )
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert "base_model.model.head.linear.weight" in ours


def _run(tmp_path, monkeypatch) -> tuple:
    """A two-stage multiclass run (masked-LM LoRA, then task LoRA, BOS pooling) and its test predictions."""
    sequences = _sequences(40, seed=1)
    labels = [min(s.count("A") + s.count("W"), 2) for s in sequences]
    rows = [
        f"{s},{y},{'test' if i >= 30 else 'train'}"
        for i, (s, y) in enumerate(zip(sequences, labels, strict=True))
    ]
    (tmp_path / "classes.csv").write_text("sequence,target,set\n" + "\n".join(rows) + "\n")
    lora = {"method": "lora", "r": 2, "alpha": 4}
    recipe = {
        "name": "reuse", "pipeline": "protein/sequence", "seed": 0, "backbone": {"name": "esm2_tiny_random"},
        "data": {"dataset": str(tmp_path / "classes.csv"), "task": "multiclass"},
        "stages": [
            {"name": "evotune", "objective": "masked_lm", "adapter": {**lora, "targets": ["k"]},
             "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3}},
            {"name": "task", "objective": "classification", "adapter": {**lora, "targets": ["q", "v"]},
             "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2}, "options": {"pooling": "bos"}},
        ],
        "evaluation": {"bootstrap": 10}, "compare": [], "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    (tmp_path / "reuse.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    seen = {}
    predict = ProteinExperiment.predict

    def remember(self, model):
        seen["predictions"] = predict(self, model)
        return seen["predictions"]

    monkeypatch.setattr(ProteinExperiment, "predict", remember)
    run_dir = run_recipe(tmp_path / "reuse.yaml")
    return run_dir, (sequences[30:], labels[30:]), seen["predictions"]


def test_load_restores_a_run_and_predicts_exactly_what_the_run_scored(tmp_path, monkeypatch):
    run_dir, test, (y_true, y_score) = _run(tmp_path, monkeypatch)
    facts = json.loads((run_dir / "adapters" / "task" / "protein_head.json").read_text())
    assert facts["stages"] == ["evotune", "task"] and facts["pooling"] == "bos" and facts["num_classes"] == 3
    for path in (run_dir, run_dir / "adapters" / "task"):  # the task folder brings its evotune adapter
        pipe = create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="multiclass")
        pipe.load(path)
        assert pipe.pooling == "bos" and pipe.model.num_classes == 3
        truth, scores = pipe.predict(test)
        np.testing.assert_array_equal(truth, y_true)
        np.testing.assert_array_equal(scores, y_score)
    other = create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="multiclass",
                            backbone_options={"seed": 1})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"was trained on backbone 'esm2_tiny_random' \(random ESM-2 .* seed 0\)"
    ):
        other.load(run_dir)
    with pytest.raises(ValueError, match="holds a sequence-level multiclass head; create the pipeline with"):
        create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="regression").load(run_dir)

    folders = export_run(run_dir, tmp_path / "peft")
    assert [f.name for f in folders] == ["evotune", "task"]
    assert json.loads((folders[1] / "adapter_config.json").read_text())["modules_to_save"] == ["head.linear"]
    assert json.loads((folders[0] / "adapter_config.json").read_text())["modules_to_save"] is None


def test_save_adapter_then_load_round_trip_in_lab_code(tmp_path):
    sequences = _sequences(24, seed=2)
    targets = [float(s.count("K")) for s in sequences]
    pipe = create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="regression", pooling="bos",
                           train={"epochs": 2, "batch_size": 8, "lr": 1e-2})  # fmt: skip
    pipe.fit((sequences, targets))
    expected = pipe.predict((sequences, targets))[1]
    pipe.save_adapter(tmp_path / "mine")
    fresh = create_pipeline("protein/sequence", backbone="esm2_tiny_random", task="regression")
    fresh.load(tmp_path / "mine")
    assert fresh.pooling == "bos"
    np.testing.assert_array_equal(fresh.predict((sequences, targets))[1], expected)
    fresh.load(tmp_path / "mine")  # a second load starts from a backbone without the first one's adapters
    np.testing.assert_array_equal(fresh.predict((sequences, targets))[1], expected)
