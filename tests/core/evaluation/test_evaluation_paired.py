"""Paired comparisons: paired bootstrap, DeLong's test, Holm, and the report's `comparisons` section."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from pipelines.core.evaluation import (
    RunResult,
    UndefinedMetricWarning,
    best_baseline_comparison,
    compare_models,
    delong_test,
    evaluate,
    holm,
    paired_bootstrap,
    write_report,
)
from pipelines.core.evaluation.report import build_report


def _two_models(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    shared = rng.random(n)  # both models see the same hard examples: that is what pairing captures
    a = np.clip(0.5 * shared + 0.3 * rng.random(n) + 0.25 * y_true, 0, 1)
    b = np.clip(0.5 * shared + 0.3 * rng.random(n) + 0.15 * y_true, 0, 1)
    return y_true, a, b


def _oracle_summary(d: np.ndarray, observed: float, scale: float = 1.0) -> dict:
    """Interval, SE and the documented p-value from resampled differences, written out here."""
    valid = d[~np.isnan(d)]
    count = sum(abs(x - observed) >= abs(observed) - 1e-10 * scale for x in valid)
    return {
        "low": np.percentile(valid, 2.5),
        "high": np.percentile(valid, 97.5),
        "standard_error": np.std(valid, ddof=1),
        "p_value": (1 + count) / (1 + len(valid)),
        "skipped": int(d.size - valid.size),
    }


def _auroc_or_nan(y_true, y_score) -> float:
    return sk.roc_auc_score(y_true, y_score) if len(np.unique(y_true)) == 2 else math.nan


def test_paired_bootstrap_matches_a_loop_over_the_same_indices():
    n, resamples, seed = 40, 300, 3
    y_true, a, b = _two_models(n, seed=1)
    result = paired_bootstrap("binary", y_true, a, b, ["auroc", "accuracy"], bootstrap=resamples, seed=seed)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    a_star = np.array([_auroc_or_nan(y_true[i], a[i]) for i in indices])
    b_star = np.array([_auroc_or_nan(y_true[i], b[i]) for i in indices])
    auroc = result["auroc"]
    assert auroc.value_a == pytest.approx(sk.roc_auc_score(y_true, a), abs=1e-12)
    assert auroc.difference == pytest.approx(sk.roc_auc_score(y_true, a) - sk.roc_auc_score(y_true, b))
    expected = _oracle_summary(a_star - b_star, auroc.difference)
    for key, value in expected.items():
        assert getattr(auroc, key) == pytest.approx(value, abs=1e-12), key
    correct_a = [sk.accuracy_score(y_true[i], a[i] >= 0.5) for i in indices]
    correct_b = [sk.accuracy_score(y_true[i], b[i] >= 0.5) for i in indices]
    accuracy = result["accuracy"]
    expected = _oracle_summary(np.subtract(correct_a, correct_b), accuracy.difference)
    for key, value in expected.items():
        assert getattr(accuracy, key) == pytest.approx(value, abs=1e-12), key
    assert (accuracy.n_examples, accuracy.bootstrap, accuracy.seed) == (n, resamples, seed)
    # The same draws as evaluate() with that seed: the report's own intervals come from these resamples.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        alone = evaluate("binary", y_true, a, ["auroc"], bootstrap=resamples, seed=seed)["auroc"]
    finite = a_star[~np.isnan(a_star)]
    assert (alone.low, alone.high) == pytest.approx(tuple(np.percentile(finite, [2.5, 97.5])), abs=1e-12)


def test_paired_bootstrap_regression_against_scipy():
    rng = np.random.default_rng(4)
    targets = rng.normal(size=50)
    a, b = targets + rng.normal(size=50), targets + 1.5 * rng.normal(size=50)
    result = paired_bootstrap("regression", targets, a, b, ["spearman", "mse"], bootstrap=200, seed=9)
    indices = np.random.default_rng(9).integers(0, 50, size=(200, 50))
    rho = [
        stats.spearmanr(targets[i], a[i]).statistic - stats.spearmanr(targets[i], b[i]).statistic
        for i in indices
    ]
    mse = [np.mean((targets[i] - a[i]) ** 2) - np.mean((targets[i] - b[i]) ** 2) for i in indices]
    for name, d in (("spearman", rho), ("mse", mse)):
        row = result[name]
        expected = _oracle_summary(np.asarray(d), row.difference, max(1, abs(row.value_a), abs(row.value_b)))
        for key, value in expected.items():
            assert getattr(row, key) == pytest.approx(value, abs=1e-10), (name, key)


def test_pairing_narrows_the_interval_of_correlated_models():
    y_true, a, _ = _two_models(400)
    b = np.clip(a + np.random.default_rng(5).normal(0, 0.02, a.size), 0, 1)
    paired = paired_bootstrap("binary", y_true, a, b, ["auroc"], bootstrap=500)["auroc"]
    separate = [evaluate("binary", y_true, s, ["auroc"], bootstrap=500)["auroc"] for s in (a, b)]
    independent = math.hypot(*((r.high - r.low) / (2 * 1.96) for r in separate))
    assert paired.standard_error < 0.3 * independent


def test_identical_models_have_difference_zero_and_p_one():
    y_true, a, _ = _two_models(100)
    for row in paired_bootstrap("binary", y_true, a, a.copy(), bootstrap=100).values():
        assert (row.difference, row.low, row.high, row.p_value) == (0.0, 0.0, 0.0, 1.0), row.metric
    result = delong_test(y_true, a, a.copy())
    assert (result.difference, result.variance, result.z, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    ranks = delong_test(y_true, a, a**3)  # same ranking, different scores: the 0/0 case, no change
    assert (ranks.difference, ranks.variance, ranks.p_value) == (0.0, 0.0, 1.0)


def _delong_by_loops(y_true, a, b):
    """DeLong et al. (1988) from the published formula, with explicit loops over positives and negatives."""
    positives, negatives = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    m, n = len(positives), len(negatives)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10, v01, aurocs = [], [], []
    for s in (a, b):
        v10.append([sum(psi(s[i], s[j]) for j in negatives) / n for i in positives])
        v01.append([sum(psi(s[i], s[j]) for i in positives) / m for j in negatives])
        aurocs.append(sum(v10[-1]) / m)
    s10 = [
        [sum((v10[r][i] - aurocs[r]) * (v10[c][i] - aurocs[c]) for i in range(m)) / (m - 1) for c in (0, 1)]
        for r in (0, 1)
    ]
    s01 = [
        [sum((v01[r][j] - aurocs[r]) * (v01[c][j] - aurocs[c]) for j in range(n)) / (n - 1) for c in (0, 1)]
        for r in (0, 1)
    ]
    variance = (s10[0][0] + s10[1][1] - 2 * s10[0][1]) / m + (s01[0][0] + s01[1][1] - 2 * s01[0][1]) / n
    z = (aurocs[0] - aurocs[1]) / math.sqrt(variance)
    return aurocs, variance, z, 2 * stats.norm.sf(abs(z))


def test_delong_matches_the_published_formula_with_ties():
    y_true, a, b = _two_models(45, seed=2)
    a, b = np.round(a, 1), np.round(b, 1)  # ties within and across classes
    (auroc_a, auroc_b), variance, z, p = _delong_by_loops(y_true, a, b)
    result = delong_test(y_true, a, np.column_stack([1 - b, b]))
    assert result.auroc_a == pytest.approx(sk.roc_auc_score(y_true, a), abs=1e-12)
    assert (result.auroc_a, result.auroc_b) == pytest.approx((auroc_a, auroc_b), abs=1e-12)
    assert result.variance == pytest.approx(variance, rel=1e-10)
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.p_value == pytest.approx(p, rel=1e-8)
    assert (result.n_positive, result.n_negative) == (int(y_true.sum()), int((1 - y_true).sum()))


def test_delong_perfect_against_random_is_significant():
    rng = np.random.default_rng(6)
    y_true = rng.integers(0, 2, 2000)
    result = delong_test(y_true, y_true * 0.5 + 0.25, rng.random(2000))
    assert result.auroc_a == 1.0 and abs(result.auroc_b - 0.5) < 0.05
    assert result.p_value < 1e-12 and result.z > 10


def test_delong_variance_agrees_with_the_paired_bootstrap():
    y_true, a, b = _two_models(600, seed=7)
    result = delong_test(y_true, a, b)
    bootstrap = paired_bootstrap("binary", y_true, a, b, ["auroc"], bootstrap=3000, seed=1)["auroc"]
    # A bootstrap SD from 3000 resamples has about 1.3% Monte-Carlo error; the rest is finite-sample.
    assert bootstrap.standard_error == pytest.approx(math.sqrt(result.variance), rel=0.06)
    assert bootstrap.difference == pytest.approx(result.difference, abs=1e-12)


@pytest.mark.parametrize(
    ("y_true", "match"),
    [
        (np.ones(20, int), "at least two positive and two negative"),
        (np.r_[1, np.zeros(19, int)], "1 positive"),
    ],
)
def test_delong_degenerate_gives_nan_with_a_warning(y_true, match):
    scores = np.linspace(0, 1, 20)
    with pytest.warns(UndefinedMetricWarning, match=match):
        result = delong_test(y_true, scores, scores[::-1])
    assert math.isnan(result.p_value) and math.isnan(result.variance) and match in result.reason


def test_delong_refuses_multiclass_with_a_reason():
    rng = np.random.default_rng(0)
    with pytest.warns(UndefinedMetricWarning, match="only the paired bootstrap applies"):
        result = delong_test(
            rng.integers(0, 3, 30), rng.dirichlet(np.ones(3), 30), rng.dirichlet(np.ones(3), 30)
        )
    assert math.isnan(result.z) and "paired bootstrap" in result.reason


def test_holm_by_hand_and_nan_passed_through():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04): step-down and monotone
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.5, math.nan, 0.6])
    assert adjusted[0] == 1.0 and math.isnan(adjusted[1]) and adjusted[2] == 1.0
    assert holm([0.2]) == [0.2] and holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest", reason="statsmodels is not installed")
    rng = np.random.default_rng(8)
    for size in (2, 5, 12):
        p = rng.random(size) ** 3
        p[0] = p[1] if size > 2 else p[0]  # a tie
        expected = multitest.multipletests(p, method="holm")[1]
        assert holm(p) == pytest.approx(expected.tolist(), abs=1e-15)


def test_paired_bootstrap_degenerate_input_warns_and_gives_nan():
    with pytest.warns(UndefinedMetricWarning, match="only one class"):
        result = paired_bootstrap(
            "binary", np.ones(10, int), np.linspace(0, 1, 10), np.full(10, 0.7), ["auroc", "accuracy"]
        )
    assert math.isnan(result["auroc"].difference) and math.isnan(result["auroc"].p_value)
    assert result["accuracy"].difference == pytest.approx(0.5 - 1.0)
    y_true = np.array([0, 1] * 10)
    with pytest.warns(UndefinedMetricWarning, match="mcc is undefined"):
        constant = paired_bootstrap("binary", y_true, np.full(20, 0.9), np.full(20, 0.9), ["mcc", "accuracy"])
    assert math.isnan(constant["mcc"].difference) and constant["accuracy"].p_value == 1.0
    with pytest.warns(UndefinedMetricWarning, match="NaN or infinite"):
        broken = paired_bootstrap("binary", y_true, np.full(20, np.nan), np.full(20, 0.5), bootstrap=10)
    assert all(math.isnan(row.difference) for row in broken.values())
    with pytest.warns(UndefinedMetricWarning, match=r"of 200 paired resamples were degenerate"):
        rare = paired_bootstrap(
            "binary",
            np.r_[1, np.zeros(19, int)],
            np.linspace(0, 1, 20),
            np.linspace(1, 0, 20),
            ["auroc"],
            200,
        )
    assert 0 < rare["auroc"].skipped < 200 and 0 < rare["auroc"].p_value <= 1


def test_compare_models_adjusts_each_metric_over_the_baselines():
    y_true, a, b = _two_models(150)
    c = np.random.default_rng(3).random(150)
    compared = compare_models(
        "binary", y_true, {"a": a, "b": b, "c": c}, "a", metrics=["auroc", "f1"], bootstrap=200
    )
    assert list(compared) == ["b", "c"]
    for metric in ("auroc", "f1"):
        raw = [compared[name][metric].paired.p_value for name in ("b", "c")]
        assert [compared[name][metric].p_holm for name in ("b", "c")] == pytest.approx(holm(raw))
    raw = [compared[name]["auroc"].delong.p_value for name in ("b", "c")]
    assert [compared[name]["auroc"].delong_p_holm for name in ("b", "c")] == pytest.approx(holm(raw))
    assert compared["b"]["f1"].delong is None
    single = compare_models("binary", y_true, {"a": a, "b": b}, "a", metrics=["auroc"], bootstrap=50)
    assert single["b"]["auroc"].p_holm is None and "p_holm" not in single["b"]["auroc"].to_dict()


def test_a_broken_baseline_does_not_hide_the_others():
    y_true, a, b = _two_models(80)
    scores = {"a": a, "b": b, "nan": np.full(80, np.nan)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compared = compare_models("binary", y_true, scores, "a", metrics=["auroc"], bootstrap=50)
    messages = [str(w.message) for w in caught]
    assert any("every paired difference with nan is undefined" in m for m in messages)
    assert any("DeLong's test is undefined: a model's scores contain NaN" in m for m in messages)
    assert math.isnan(compared["nan"]["auroc"].paired.p_value) and math.isnan(compared["nan"]["auroc"].p_holm)
    assert compared["b"]["auroc"].p_holm == compared["b"]["auroc"].paired.p_value  # Holm over one finite p
    assert math.isnan(compared["nan"]["auroc"].delong.p_value)


def test_best_baseline_follows_the_metric_direction():
    rows = {name: {"mse": {"difference": d}} for name, d in (("ridge", -0.1), ("knn", 0.3))}
    payload = {
        "headline": {"metric": "mse", "model": "lora"},
        "results": {
            "lora": {"mse": {"value": 1.0}},
            "ridge": {"mse": {"value": 1.1}},
            "knn": {"mse": {"value": 0.7}},
        },
        "comparisons": {"model": "lora", "baselines": ["ridge", "knn"], "results": rows},
    }
    best = best_baseline_comparison(payload)
    assert (best["baseline"], best["baseline_value"], best["difference"]) == ("knn", 0.7, 0.3)


def _run(bootstrap: int = 100) -> RunResult:
    y_true, lora, full = _two_models(120, seed=11)
    rng = np.random.default_rng(12)
    probe, recording = rng.random(120), np.clip(y_true * 0.9 + 0.05, 0, 1)
    other_split = rng.integers(0, 2, 120)
    scores = {"lora": lora, "linear_probe": probe, "full_finetune": full, "recording": recording}
    results = {name: evaluate("binary", y_true, s, bootstrap=bootstrap, seed=4) for name, s in scores.items()}
    results["other_split"] = evaluate("binary", other_split, probe, bootstrap=0)
    predictions = {name: (y_true, s) for name, s in scores.items()}
    predictions["other_split"] = (other_split, probe)
    return RunResult(
        "toy", "imaging/classification", "binary", "auroc", "lora", results, predictions,
        info={"extra": {"reference_models": ["recording"]}},
    )  # fmt: skip


def test_build_report_compares_with_each_baseline_but_not_the_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        result = _run()
        section = build_report(result)["comparisons"]
    assert section["baselines"] == ["linear_probe", "full_finetune"]
    assert section["excluded"] == ["recording"] and "recording" not in section["results"]
    assert "labels differ" in section["not_compared"]["other_split"]
    assert (section["bootstrap"], section["seed"], section["adjustment"]) == (100, 4, "holm")
    assert list(section["results"]["full_finetune"]) == [
        "auroc",
        "auprc",
        "accuracy",
        "balanced_accuracy",
        "f1",
        "mcc",
    ]
    y_true, lora = result.predictions["lora"]
    full = result.predictions["full_finetune"][1]
    row = section["results"]["full_finetune"]["auroc"]
    direct = paired_bootstrap("binary", y_true, lora, full, ["auroc"], bootstrap=100, seed=4)["auroc"]
    assert (row["difference"], row["low"], row["high"], row["p_value"]) == (
        direct.difference, direct.low, direct.high, direct.p_value,
    )  # fmt: skip
    assert row["delong"]["z"] == delong_test(y_true, lora, full).z
    probe_p = section["results"]["linear_probe"]["auroc"]["p_value"]
    assert row["p_holm"] == pytest.approx(holm([probe_p, row["p_value"]])[1])
    assert "p_holm" in row["delong"]


def test_write_report_has_the_comparisons_and_the_sentences(tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        write_report(tmp_path, _run())
    payload = json.loads((tmp_path / "report.json").read_text())
    text = (tmp_path / "report.md").read_text()
    row = payload["comparisons"]["results"]["full_finetune"]["auroc"]
    sign = "+" if row["difference"] >= 0 else "-"
    assert "## Paired comparisons" in text
    assert f"- lora minus full_finetune: auroc {sign}{abs(row['difference']):.3f} [" in text
    assert f"; DeLong z = {row['delong']['z']:.2f}, p < 0.001 (Holm-adjusted p < 0.001)." in text
    assert "paired bootstrap p = 0.0099 (Holm-adjusted p = 0.020)" in text  # the floor 1/101, doubled
    assert (
        "12 comparisons in all; Holm's step-down method adjusts the p-values of each metric over its 2"
        in text
    )
    assert (
        "Not compared: recording (a reference, not a competitor); other_split (its test labels differ" in text
    )
    best = best_baseline_comparison(payload)
    values = {name: payload["results"][name]["auroc"]["value"] for name in ("linear_probe", "full_finetune")}
    assert best["baseline"] == max(values, key=values.get) == "full_finetune"
    assert (best["difference"], best["metric"], best["n_baselines"]) == (row["difference"], "auroc", 2)
    assert best_baseline_comparison(payload, baselines=["linear_probe"])["baseline"] == "linear_probe"
    assert best_baseline_comparison({**payload, "comparisons": {}}) is None


def test_report_without_predictions_says_why_nothing_was_compared():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        result = _run(bootstrap=0)
    result.predictions = {}
    section = build_report(result)["comparisons"]
    assert section["results"] == {} and set(section["not_compared"]) == {
        "linear_probe",
        "full_finetune",
        "other_split",
    }
    alone = RunResult("solo", "toy/pipeline", "binary", "auroc", "lora", {"lora": result.results["lora"]})
    assert build_report(alone)["comparisons"] == {}


def test_regression_targets_stored_as_float32_by_one_model_are_the_same_test_set():
    from pipelines.core.evaluation import RunResult, evaluate
    from pipelines.core.evaluation.comparisons import run_comparisons

    y = np.random.default_rng(0).normal(size=50)
    a, b = y + 0.1, y + np.random.default_rng(1).normal(size=50)
    predictions = {"lora": (y.astype(np.float32), a), "one_hot": (y, b)}
    results = {k: evaluate("regression", *v, ["spearman"], bootstrap=50) for k, v in predictions.items()}
    payload = run_comparisons(RunResult("r", "toy/x", "regression", "spearman", "lora", results, predictions))
    assert payload["baselines"] == ["one_hot"] and not payload.get("not_compared")
    changed = {"lora": (y, a), "one_hot": (y + 1e-3, b)}  # really other targets: still refused
    payload = run_comparisons(RunResult("r", "toy/x", "regression", "spearman", "lora", results, changed))
    assert payload["not_compared"] == {"one_hot": "its test labels differ from those of lora"}


def test_a_difference_and_its_interval_share_one_number_format():
    from pipelines.core.evaluation.report_markdown import comparison_sentence

    row = {"difference": -0.0221, "low": -0.0473, "high": 0.003018, "p_value": 0.086}
    assert comparison_sentence("lora", "one_hot", "mse", row) == (
        "lora minus one_hot: mse -0.022 [-0.047, +0.003], paired bootstrap p = 0.086."
    )
    tiny = {"difference": 0.00012, "low": -0.00031, "high": 0.00052, "p_value": float("nan")}
    assert (
        comparison_sentence("a", "b", "mse", tiny)
        == "a minus b: mse +0.00012 [-0.00031, +0.00052], paired bootstrap p = n/a."
    )
