"""The imaging pipeline end to end on tiny random backbones and a synthetic MedMNIST-style file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.core.registry import create_pipeline
from pipelines.core.runner import run_recipe


def _images(n: int, size: int, seed: int, depth: int | None = None):
    """Grey images whose class (0/1) sets the brightness of a centre square."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    shape = (n, depth, size, size) if depth else (n, size, size)
    images = rng.integers(0, 120, shape).astype(np.uint8)
    centre = slice(size // 4, 3 * size // 4)
    if depth:
        images[labels == 1, :, centre, centre] += 120
    else:
        images[labels == 1, centre, centre] += 120
    return images, labels[:, None]


@pytest.fixture
def npz_file(tmp_path):
    path = tmp_path / "tiny.npz"
    arrays = {}
    for split, n, seed in (("train", 48, 0), ("val", 16, 1), ("test", 20, 2)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _images(n, 16, seed)
    np.savez(path, **arrays)
    return path


def _recipe(tmp_path, npz_file, tiny_vit, compare="[linear_probe, full_finetune, ssf]", extra=""):
    options = json.dumps(tiny_vit)
    text = f"""
name: tiny_vit_lora
pipeline: imaging/classification
seed: 0
backbone: {{name: "timm:vit_tiny_patch16_224", options: {options}}}
data:
  dataset: {npz_file}
  task: binary
  options: {{transforms: {{image_size: 32, rotate_degrees: 5}}, eval_batch_size: 8{extra}}}
stages:
  - name: task
    objective: classification
    adapter: {{method: lora, r: 4, alpha: 8, targets: []}}
    train: {{epochs: 3, batch_size: 8, lr: 0.01, log_every: 1}}
evaluation: {{bootstrap: 50}}
compare: {compare}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_run_trains_lora_and_baselines_and_writes_the_report(tmp_path, npz_file, tiny_vit):
    run_dir = run_recipe(_recipe(tmp_path, npz_file, tiny_vit), output_dir=tmp_path / "runs")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["headline"]["metric"] == "auroc" and report["headline"]["model"] == "lora"
    assert set(report["results"]) == {"lora", "linear_probe", "full_finetune", "ssf"}
    assert set(report["results"]["lora"]) == {"auroc", "accuracy", "f1", "sensitivity", "specificity"}
    params = report["parameters"]
    assert params["linear_probe"]["trainable"] == 32 * 2 + 2  # the head only
    assert params["full_finetune"]["trainable"] == params["full_finetune"]["total"]
    lora_extra = 2 * (4 * 32 + 96 * 4)  # two blocks, A (4x32) and B (96x4) on each qkv
    assert params["lora"]["trainable"] == 66 + lora_extra
    assert report["backbone"]["weights"] == "random initialisation"
    assert report["dataset"]["splits"] == {"train": 48, "val": 16, "test": 20}
    assert any("identical outputs" in note for note in report["notes"])  # the engine's reload check
    assert (run_dir / "adapters" / "task" / "adapter_model.safetensors").is_file()
    assert (run_dir / "roc.png").is_file()
    rows = (run_dir / "train" / "lora" / "task" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(row)["loss"] for row in rows if '"loss"' in row]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_low_data_sweep_reports_every_model_at_every_fraction(tmp_path, npz_file, tiny_vit):
    recipe = _recipe(tmp_path, npz_file, tiny_vit, "[linear_probe]", ", sweep_fractions: [0.25, 1.0]")
    report = json.loads((run_recipe(recipe, output_dir=tmp_path / "runs") / "report.json").read_text())
    assert set(report["results"]) == {"lora@25%", "linear_probe@25%", "lora@100%", "linear_probe@100%"}
    assert report["headline"]["model"] == "lora@100%"
    assert report["dataset"]["train_sizes_per_fraction"] == {"25%": 12, "100%": 48}
    run_dir = next((tmp_path / "runs" / "tiny_vit_lora").iterdir())  # adapters where `export` looks
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["task-100pct", "task-25pct"]
    assert report["adapter"]["directory"] == str(run_dir / "adapters" / "task-100pct")
    assert report["adapter"]["directories"] == {"task": str(run_dir / "adapters" / "task-100pct")}
    # the top-level comparisons pair the models at 100%; the 25% models are paired on their own predictions
    assert report["comparisons"]["model"] == "lora@100%"
    assert report["comparisons"]["baselines"] == ["linear_probe@100%"]
    at_25 = report["extra"]["comparisons_by_fraction"]["25%"]
    assert (at_25["model"], at_25["baselines"], at_25["n_examples"]) == ("lora", ["linear_probe"], 20)
    row = at_25["results"]["linear_probe"]["auroc"]
    assert row["value_model"] == pytest.approx(report["results"]["lora@25%"]["auroc"]["value"])
    assert row["value_baseline"] == pytest.approx(report["results"]["linear_probe@25%"]["auroc"]["value"])
    assert row["low"] <= row["difference"] <= row["high"]
    markdown = (run_dir / "report.md").read_text()
    assert "## Paired comparisons at 25% of the training data" in markdown
    assert "comparisons_by_fraction" not in markdown  # not dumped again under Extra


def test_a_sweep_refuses_the_low_data_fields_it_overrides(tmp_path, npz_file, tiny_vit):
    from pipelines.core.recipe import validate_recipe_file

    recipe = _recipe(tmp_path, npz_file, tiny_vit, "[]", ", sweep_fractions: [0.5, 1.5]")
    errors = validate_recipe_file(recipe, ["data.fraction=0.5", "data.shots_per_class=2"])
    assert sorted(error.path for error in errors) == [
        "data.fraction", "data.options.sweep_fractions", "data.shots_per_class"
    ]  # fmt: skip
    assert "has 1.5; every fraction must be in (0, 1]" in str(errors)


def test_compare_takes_full_adapter_specs_with_explicit_or_default_targets(tmp_path, npz_file, tiny_vit):
    from pipelines.core.experiment import compare_label
    from pipelines.core.recipe import load_recipe
    from pipelines.imaging.pipeline import ImagingClassificationPipeline

    compare = "[{method: lora, r: 2, targets: [fc1]}, {method: lora, r: 2, alpha: 4, targets: []}]"
    recipe = load_recipe(_recipe(tmp_path, npz_file, tiny_vit, compare))
    explicit, default = (compare_label(entry) for entry in recipe.compare)
    assert default == "lora_r2_alpha4"  # the schema makes alpha 4.0; a label is also an adapter name
    result = ImagingClassificationPipeline.from_recipe(recipe).run(tmp_path / "run")
    assert list(result.results) == ["lora", explicit, default]
    head = 32 * 2 + 2
    assert result.parameters[explicit]["trainable"] == head + 2 * (2 * 32 + 128 * 2)  # fc1: 32 -> 128
    assert result.parameters[default]["trainable"] == head + 2 * (2 * 32 + 96 * 2)  # the ViT default: qkv
    models = result.info["extra"]["models"]  # the engine's record of each stage as it trained
    (given,), (defaults,) = models[explicit]["stages"], models[default]["stages"]
    blocks = [f"backbone.net.blocks.{i}" for i in (0, 1)]
    assert given["adapter"]["targets"] == ["fc1"]
    assert given["adapted_modules"] == [f"{b}.mlp.fc1" for b in blocks]
    assert defaults["adapter"]["alpha"] == 4 and defaults["adapter"]["targets"] == []  # as written
    assert defaults["adapted_modules"] == [f"{b}.attn.qkv" for b in blocks]
    assert given["trainable"] == [explicit, "head"] and given["lr"] == recipe.stages[0].train.lr


def test_lab_code_fit_trains_the_model_a_recipe_trains(tmp_path, npz_file, tiny_vit):
    """Same backbone, data, adapter and budget: fit() gives the recipe's primary model, bit for bit (with
    augmentation, which both draw from the seeded NumPy generator), and its validation threshold."""
    from pipelines.core.recipe import load_recipe
    from pipelines.imaging.data import load_dataset_splits
    from pipelines.imaging.pipeline import ImagingClassificationPipeline

    recipe = load_recipe(_recipe(tmp_path, npz_file, tiny_vit, "[]"))
    pipe = ImagingClassificationPipeline.from_recipe(recipe)
    result = pipe.run(tmp_path / "run")
    stage = recipe.stages[0]
    lab = create_pipeline(
        "imaging/classification", backbone=pipe.backbone, adapter=stage.adapter, train=stage.train,
        transforms=pipe.options.data.transforms, bootstrap=50,
    )  # fmt: skip
    splits, _ = load_dataset_splits(None, str(npz_file))
    lab.fit(splits["train"], splits["val"])
    y_true, y_score = lab.predict(splits["test"])
    assert np.array_equal(y_true, result.predictions["lora"][0])
    assert np.array_equal(y_score, result.predictions["lora"][1])
    assert lab.threshold == result.results["lora"].threshold
    assert lab.evaluate(splits["test"])["auroc"].value == result.results["lora"]["auroc"].value


def test_a_recipe_run_repeats_exactly_with_its_seed(tmp_path, npz_file, tiny_vit):
    recipe = _recipe(tmp_path, npz_file, tiny_vit, "[linear_probe]")
    first, second = (run_recipe(recipe, output_dir=tmp_path / name) for name in ("a", "b"))
    reports = [json.loads((run / "report.json").read_text())["results"] for run in (first, second)]
    assert reports[0] == reports[1]  # augmentation included: MONAI's own generators are seeded by the OS


def test_lab_code_ssf_on_a_monai_densenet_keeps_the_backbone_frozen(tmp_path, tiny_densenet):
    from monai.data import Dataset

    images, labels = _images(24, 16, 0)
    data = [
        {"image": torch.tensor(x[None] / 255.0, dtype=torch.float32), "label": int(y)}
        for x, y in zip(images, labels[:, 0], strict=True)
    ]
    pipe = create_pipeline(
        "imaging/classification",
        backbone="monai:DenseNet",
        backbone_options=tiny_densenet,
        adapter={"method": "ssf", "targets": []},
        train={"epochs": 2, "batch_size": 8, "lr": 0.01},
        bootstrap=20,
    )
    model = pipe.build_model()
    state = model.backbone.state_dict()
    frozen = {k: v.clone() for k, v in state.items() if ".adapters." not in k}
    adapters = {k: v.clone() for k, v in state.items() if ".adapters." in k}
    result = pipe.fit(Dataset(data[:16]), val=Dataset(data[16:]))
    after = model.backbone.state_dict()
    assert result.steps == 4 and pipe.threshold is not None
    assert [k for k, v in frozen.items() if not torch.equal(v, after[k])] == []  # weights and BN statistics
    assert any(not torch.equal(v, after[k]) for k, v in adapters.items())
    report = pipe.evaluate(Dataset(data[16:]))
    assert report.n_examples == 8 and 0.0 <= report["auroc"].value <= 1.0
    saved = pipe.save_adapter(tmp_path / "ssf")
    other = create_pipeline("imaging/classification", backbone=pipe.backbone, adapter={"method": "ssf"})
    other.load_adapter(saved)
    assert np.array_equal(pipe.predict(Dataset(data[16:]))[1], other.predict(Dataset(data[16:]))[1])


def test_conv_lora_on_a_3d_monai_resnet_and_prompt_tuning_on_a_vit(tiny_vit):
    images, labels = _images(8, 16, 0, depth=8)
    records = [{"image": x[None], "label": int(y)} for x, y in zip(images, labels[:, 0], strict=True)]
    pipe = create_pipeline(
        "imaging/classification",
        backbone="monai:resnet10",
        backbone_options={"pretrained": False, "spatial_dims": 3, "model_kwargs": {"widen_factor": 0.25}},
        adapter={"method": "lora", "r": 2},
        transforms={"image_size": 8, "augment": False},
        train={"epochs": 1, "batch_size": 4},
    )
    pipe.fit(records)
    adapted = [pipe.model.get_submodule(t[3:].replace("\\", "")) for t in pipe.resolved_adapter.targets]
    convs = [m for m in pipe.load_backbone().module.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(adapted) == len(convs) > 0 and all(isinstance(m.base_layer, torch.nn.Conv3d) for m in adapted)
    assert pipe.predict(records)[1].shape == (8,)
    vit = create_pipeline(
        "imaging/classification",
        backbone="timm:vit_tiny_patch16_224",
        backbone_options=tiny_vit,
        adapter={"method": "prompt", "num_tokens": 3, "insert_at": 1},
    )
    model = vit.build_model()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("prompt" in n for n in trainable) and {"head.weight", "head.bias"} <= trainable


@pytest.mark.parametrize("update", [False, True])
def test_batchnorm_statistics_update_only_when_asked_and_only_where_tuned(tiny_densenet, update):
    images, labels = _images(8, 16, 0)
    records = [{"image": x[None], "label": int(y)} for x, y in zip(images, labels[:, 0], strict=True)]
    pipe = create_pipeline(
        "imaging/classification",
        backbone="monai:DenseNet",
        backbone_options=tiny_densenet,
        adapter={"method": "norm", "targets": ["features.norm0"]},
        transforms={"image_size": 16, "augment": False},
        train={"epochs": 1, "batch_size": 4},
        update_batchnorm_stats=update,
    )
    model = pipe.build_model()
    stats = {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}
    pipe.fit(records)
    changed = sorted(n for n, b in model.named_buffers() if n in stats and not torch.equal(stats[n], b))
    assert changed == (["backbone.net.features.norm0.adapters.task.running_mean"] if update else [])


def test_norm_tuning_adapts_norm_layers_with_fused_activations():
    from pipelines.core.peft import AdaptedLayer, NormTuning
    from pipelines.imaging.backbones import load_backbone
    from pipelines.imaging.methods import build_classifier

    torch.manual_seed(0)
    backbone = load_backbone("timm:efficientnet_lite0", pretrained=False)
    model = build_classifier(backbone, "adapter", NormTuning(), 2, "binary", "task")[0].eval()
    adapted = {type(m.base_layer).__name__ for m in model.modules() if isinstance(m, AdaptedLayer)}
    assert adapted == {"BatchNormAct2d"}  # the activation after each norm is kept by the core adapter


def _metric_values(report) -> dict:
    return {name: (m.value, m.low, m.high) for name, m in report.metrics.items()}


def test_a_saved_adapter_keeps_its_validation_threshold_and_scores_the_same(tmp_path, tiny_vit):
    images, labels = _images(60, 16, 0)
    records = [{"image": x[None], "label": int(y)} for x, y in zip(images, labels[:, 0], strict=True)]
    train, val, test = records[:24], records[24:40], records[40:]
    options = {
        "backbone": "timm:vit_tiny_patch16_224", "backbone_options": tiny_vit, "bootstrap": 20,
        "adapter": {"method": "lora", "r": 2}, "transforms": {"image_size": 32, "augment": False},
    }  # fmt: skip
    pipe = create_pipeline("imaging/classification", train={"epochs": 1, "batch_size": 8}, **options)
    pipe.fit(train, val)
    before = pipe.evaluate(test)
    assert pipe.threshold != 0.5 and before.threshold == pipe.threshold
    saved = pipe.save_adapter(tmp_path / "task")
    facts = json.loads((saved / "imaging_head.json").read_text())
    assert facts["operating_point"] == {"threshold": pipe.threshold, "chosen_by": "youden_j", "split": "val",
                                        "examples": 16}  # fmt: skip
    other = create_pipeline("imaging/classification", **{**options, "backbone": pipe.backbone})
    other.load_adapter(saved)
    assert other.threshold == pipe.threshold
    assert _metric_values(other.evaluate(test)) == _metric_values(before)


def test_a_recipe_runs_adapter_folder_reloads_with_the_reports_operating_point(tmp_path, npz_file, tiny_vit):
    from pipelines.core.recipe import load_recipe
    from pipelines.imaging.data import load_dataset_splits
    from pipelines.imaging.pipeline import ImagingClassificationPipeline

    recipe = load_recipe(_recipe(tmp_path, npz_file, tiny_vit, "[]"))
    pipe = ImagingClassificationPipeline.from_recipe(recipe)
    result = pipe.run(tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "adapters" / "task" / "imaging_head.json").read_text())
    assert facts["task"] == "binary" and facts["operating_point"]["split"] == "val"
    assert facts["operating_point"]["examples"] == 16
    lab = create_pipeline("imaging/classification", backbone=pipe.backbone, bootstrap=50,
                          transforms=pipe.options.data.transforms)  # fmt: skip
    lab.load_adapter(tmp_path / "run" / "adapters" / "task")
    assert lab.threshold == result.results["lora"].threshold
    test = load_dataset_splits(None, str(npz_file))[0]["test"]
    assert _metric_values(lab.evaluate(test)) == _metric_values(result.results["lora"])


def test_a_vera_recipe_trains_vectors_only_and_its_saved_adapter_reloads(tmp_path, npz_file, tiny_vit):
    """The shipped VeRA recipe's path on a tiny ViT: r + out values per adapted layer, against LoRA."""
    text = _recipe(tmp_path, npz_file, tiny_vit, "[lora]").read_text()
    text = text.replace("{method: lora, r: 4, alpha: 8, targets: []}", "{method: vera, r: 4, targets: [qkv]}")
    (tmp_path / "vera.yaml").write_text(text)
    report = json.loads(
        (run_recipe(tmp_path / "vera.yaml", output_dir=tmp_path / "runs") / "report.json").read_text()
    )
    assert report["headline"]["model"] == "vera" and set(report["results"]) == {"vera", "lora"}
    head = 32 * 2 + 2
    assert report["parameters"]["vera"]["trainable"] == head + 2 * (4 + 96)  # d (r) and b (qkv's 96 outputs)
    assert report["parameters"]["lora"]["trainable"] == head + 2 * (8 * 32 + 96 * 8)  # the default r=8
    assert any("identical outputs" in note for note in report["notes"])


def test_max_train_caps_what_the_low_data_draw_kept_and_the_notes_say_so(tmp_path, npz_file, tiny_vit):
    recipe = _recipe(tmp_path, npz_file, tiny_vit, "[lora]", ", max_train: 10")
    run_dir = run_recipe(recipe, ["data.fraction=0.5"], output_dir=tmp_path / "runs")
    report = json.loads((run_dir / "report.json").read_text())
    used, low = report["dataset"]["splits"]["train"], report["dataset"]["low_data"]
    assert (low["train_full"], low["train_used"], used) == (48, 24, 10)
    notes = report["notes"]
    assert any(note.startswith("Low-data run: 24 of 48 training examples drawn per class") for note in notes)
    assert (
        "Training images: 10 of the 24 training examples (data.options.max_train=10, a stratified cap "
        "applied after any low-data draw)." in notes
    )
    assert "Compare entry 'lora' is the primary model; trained once." in notes  # the engine's, said once
    assert not any(note.startswith("Baseline 'lora'") for note in notes)
