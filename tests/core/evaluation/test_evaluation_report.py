"""write_report: report.json keys and round trip (NaN as null), report.md content, plots, atomic JSON."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.core.evaluation import (
    EvaluationReport,
    MetricResult,
    RunResult,
    evaluate,
    package_versions,
    to_jsonable,
    write_json_atomic,
    write_report,
)
from pipelines.core.evaluation.report import REPORT_KEYS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class _Spec:
    r: int = 8
    alpha: int = 16


def _info() -> dict:
    return {
        "backbone": {"name": "tiny_vit", "source": "timm", "weights": "random initialisation"},
        "adapter": {"method": "lora", "spec": _Spec(), "file_size_bytes": 2048},
        "dataset": {"name": "toy", "splits": {"train": 80, "test": 120}, "sha256": "ab" * 32},
        "cost": {"wall_time_s": 75.0, "peak_memory_bytes": 3 * 2**30, "samples_per_second": 12.5},
        "notes": ["demo run on random data"],
        "extra": {"undefined": float("nan")},
    }


def _binary_result(bootstrap: int = 50) -> RunResult:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 120)
    lora = np.clip(rng.random(120) * 0.6 + 0.3 * y_true, 0, 1)
    probe = rng.random(120)
    Count = namedtuple("Count", "trainable total fraction")
    return RunResult(
        name="toy_lora",
        pipeline="imaging/classification",
        task="binary",
        headline_metric="auroc",
        primary_model="lora",
        results={
            "lora": evaluate("binary", y_true, lora, bootstrap=bootstrap),
            "linear_probe": evaluate("binary", y_true, probe, bootstrap=bootstrap),
        },
        predictions={"lora": (y_true, lora), "linear_probe": (y_true, probe)},
        parameters={"lora": Count(1000, 100_000, 0.01), "linear_probe": {"trainable": 10, "total": 99_010}},
        histories={
            "lora": [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.5}, {"step": 2, "val_loss": 0.6}]
        },
        info=_info(),
    )


def test_write_report_files_and_json_keys(tmp_path: Path):
    result = _binary_result()
    paths = write_report(tmp_path, result)
    names = sorted(path.name for path in paths)
    assert names == ["loss.png", "pr.png", "report.json", "report.md", "roc.png"]
    for name in ("roc.png", "pr.png", "loss.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads((tmp_path / "report.json").read_text())
    assert tuple(report) == REPORT_KEYS
    lora = result.results["lora"]["auroc"]
    assert report["headline"] == {
        "metric": "auroc", "model": "lora", "value": lora.value, "low": lora.low, "high": lora.high,
        "greater_is_better": True,
    }  # fmt: skip
    assert report["results"]["linear_probe"]["mcc"] == result.results["linear_probe"]["mcc"].to_dict()
    assert report["parameters"] == {
        "lora": {"trainable": 1000, "total": 100_000, "fraction": 0.01},
        "linear_probe": {"trainable": 10, "total": 99_010, "fraction": 10 / 99_010},
    }
    assert report["backbone"]["weights"] == "random initialisation"
    assert report["adapter"]["spec"] == {"r": 8, "alpha": 16}
    assert report["dataset"]["splits"] == {"train": 80, "test": 120}
    assert report["notes"] == ["demo run on random data"]
    assert report["extra"]["undefined"] is None
    assert report["extra"]["evaluation"]["lora"]["bootstrap"] == 50
    assert report["versions"]["numpy"] == np.__version__


def test_report_json_round_trips_with_nan_as_null(tmp_path: Path):
    nan_report = EvaluationReport(
        "binary", {"auroc": MetricResult(math.nan), "accuracy": MetricResult(0.5)}, 4
    )
    result = RunResult("degenerate", "toy/pipeline", "binary", "accuracy", "model", {"model": nan_report})
    write_report(tmp_path, result)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["results"]["model"]["auroc"] == {"value": None, "low": None, "high": None}
    assert report["headline"] == {
        "metric": "accuracy",
        "model": "model",
        "value": 0.5,
        "low": None,
        "high": None,
        "greater_is_better": True,
    }
    restored = EvaluationReport.from_dict(
        {"task": "binary", "n_examples": 4, "metrics": report["results"]["model"], "threshold": 0.5}
    )
    assert math.isnan(restored["auroc"].value) and restored["accuracy"].value == 0.5
    assert not any(tmp_path.glob("*.png"))


def test_report_markdown_has_the_sections(tmp_path: Path):
    result = _binary_result()
    write_report(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    auroc = result.results["lora"]["auroc"]
    assert text.startswith("# toy_lora\n")
    assert f"**auroc** of **lora**: {auroc.value:.3f} [{auroc.low:.3f}, {auroc.high:.3f}]" in text
    assert "| model | auroc | auprc | accuracy | balanced_accuracy | f1 | mcc |" in text
    assert "| lora | 1,000 | 100,000 | 1% |" in text
    for line in (
        "- **weights**: random initialisation",
        "- **splits**: train 80, test 120",
        "- **wall time**: 1 min 15 s",
        "- **peak memory**: 3.00 GiB",
        "- **throughput**: 12.5 samples/s",
        "- **file size**: 2.00 KiB",
        '- **spec**: `{"r": 8, "alpha": 16}`',
        f"| numpy | {np.__version__} |",
        "- demo run on random data",
        "![roc](roc.png)",
        "![loss](loss.png)",
        "95% percentile-bootstrap intervals over 120 test examples (50 resamples, seed 0)",
    ):
        assert line in text, line


def test_regression_report_has_a_scatter_plot(tmp_path: Path):
    rng = np.random.default_rng(1)
    y_true = rng.normal(size=60)
    y_pred = y_true + rng.normal(size=60)
    result = RunResult(
        "toy_regression",
        "protein/fitness",
        "regression",
        "spearman",
        "lora",
        {"lora": evaluate("regression", y_true, y_pred, bootstrap=20)},
        predictions={"lora": (y_true, y_pred)},
    )
    names = sorted(path.name for path in write_report(tmp_path, result))
    assert names == ["report.json", "report.md", "scatter.png"]


def test_multiclass_report_draws_per_class_curves(tmp_path: Path):
    rng = np.random.default_rng(2)
    y_true, probabilities = rng.integers(0, 3, 90), rng.dirichlet(np.ones(3), 90)
    result = RunResult(
        "toy_multiclass",
        "imaging/classification",
        "multiclass",
        "auroc",
        "lora",
        {"lora": evaluate("multiclass", y_true, probabilities, bootstrap=0)},
        predictions={"lora": (y_true, probabilities)},
    )
    names = sorted(path.name for path in write_report(tmp_path, result))
    assert names == ["pr.png", "report.json", "report.md", "roc.png"]


def test_run_result_rejects_inconsistent_fields():
    report = EvaluationReport("binary", {"auroc": MetricResult(0.9)}, 10)
    with pytest.raises(ValueError, match="primary_model 'lora' is not in results"):
        RunResult("run", "p", "binary", "auroc", "lora", {"probe": report})
    with pytest.raises(ValueError, match="headline metric 'mcc' is not in the results of 'lora'"):
        RunResult("run", "p", "binary", "mcc", "lora", {"lora": report})
    with pytest.raises(ValueError, match=r"info has unknown keys \['recipe'\]"):
        RunResult("run", "p", "binary", "auroc", "lora", {"lora": report}, info={"recipe": {}})


def test_write_json_atomic_replaces_and_converts(tmp_path: Path):
    path = tmp_path / "nested" / "state.json"
    write_json_atomic(path, {"a": np.float32(1.5), "b": [float("inf"), np.int64(3)], "c": np.arange(2)})
    write_json_atomic(path, {"a": np.float32(2.5), "path": tmp_path, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2.5, "path": str(tmp_path), "nan": None}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    with pytest.raises(TypeError, match=r"state.json.bad of type object cannot be written as JSON"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["a"] == 2.5
    assert to_jsonable({"x": (1, np.bool_(True))}) == {"x": [1, True]}


def test_package_versions_do_not_import_heavy_packages():
    import sys

    before = {name for name in ("transformers", "timm", "monai", "esm", "torchaudio") if name in sys.modules}
    versions = package_versions()
    after = {name for name in ("transformers", "timm", "monai", "esm", "torchaudio") if name in sys.modules}
    assert after == before
    assert versions["numpy"] == np.__version__ and "python" in versions


def test_loss_plot_of_a_short_run_has_whole_steps_and_no_validation_in_its_title(tmp_path, monkeypatch):
    from pipelines.core.evaluation import plots

    made = []
    original = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    assert plots.plot_losses(
        tmp_path / "loss.png", {"lora": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}]}
    )
    figure, (axes,) = made[0]
    figure.canvas.draw()
    assert axes.get_title() == "Training loss"
    assert all(float(tick).is_integer() for tick in axes.get_xticks())
    assert axes.get_lines()[0].get_marker() == "o"
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "val_loss": 0.6}]
    assert plots.plot_losses(tmp_path / "loss2.png", {"lora": rows})
    assert made[1][1][0].get_title() == "Training and validation loss"
