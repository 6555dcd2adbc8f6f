"""report.md: the human-readable run report, rendered from the report.json payload."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pipelines.core.evaluation.comparisons import BY_FRACTION


def format_number(value: Any) -> str:
    """A metric value for a table: 3 decimals in the usual range, 4 significant digits otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or 0.01 <= abs(value) < 1000:
        return f"{value:.3f}"
    return f"{value:.4g}"


def format_interval(result: Mapping[str, Any]) -> str:
    """`value [low, high]`, or the value alone without an interval."""
    value, low, high = (result.get(key) for key in ("value", "low", "high"))
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return format_number(value)
    return f"{format_number(value)} [{format_number(low)}, {format_number(high)}]"


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} B" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"  # pragma: no cover


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _format_field(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.endswith("_bytes"):
            return format_bytes(value)
        if key.endswith("_s"):
            return format_seconds(value)
        if key == "samples_per_second":
            return f"{value:,.1f} samples/s"
        if key == "fraction":
            return f"{100 * value:.3g}%"
        return f"{value:,}" if isinstance(value, int) else format_number(value)
    if key in ("splits", "sizes") and isinstance(value, Mapping):
        return ", ".join(f"{split} {_format_field('', size)}" for split, size in value.items())
    if isinstance(value, (Mapping, list)):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    if key in ("sha256", "file", "path") or "/" in str(value):
        return f"`{value}`"
    return str(value)


_LABELS = {
    "wall_time_s": "wall time",
    "peak_memory_bytes": "peak memory",
    "samples_per_second": "throughput",
    "file_size_bytes": "file size",
}


def _key_values(section: Mapping[str, Any]) -> list[str]:
    if not section:
        return ["Not recorded."]
    return [f"- **{_LABELS.get(key, key)}**: {_format_field(key, value)}" for key, value in section.items()]


def _results_table(results: Mapping[str, Mapping[str, Any]], primary: str) -> list[str]:
    metrics = list(dict.fromkeys(metric for table in results.values() for metric in table))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model, table in results.items():
        label = f"**{model}**" if model == primary else model
        cells = [format_interval(table[metric]) if metric in table else "" for metric in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _parameters_table(parameters: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| model | trainable | total | fraction |", "|---|---:|---:|---:|"]
    for model, count in parameters.items():
        cells = [_format_field(key, count.get(key)) for key in ("trainable", "total", "fraction")]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _evaluation_sentence(payload: Mapping[str, Any]) -> str:
    settings = (payload.get("extra") or {}).get("evaluation") or {}
    primary = settings.get(payload["headline"]["model"])
    if not primary:
        return ""
    if not primary.get("bootstrap"):
        return f"Computed on {primary['n_examples']} test examples, without bootstrap intervals."
    sentence = (
        f"Brackets: 95% percentile-bootstrap intervals over {primary['n_examples']} test examples "
        f"({primary['bootstrap']} resamples, seed {primary['seed']})."
    )
    skipped = {model: s["skipped"] for model, s in settings.items() if s.get("skipped")}
    if skipped:
        sentence += f" Resamples skipped as degenerate: {json.dumps(skipped)}."
    return sentence


def signed_numbers(*values: Any) -> list[str]:
    """Signed numbers in one format, so a difference and its interval read alike: 3 decimals when the
    largest is 0 or in [0.01, 1000), else 3 significant digits; ``n/a`` for a missing or NaN one."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    largest = max(finite, default=0.0)
    spec = "+.3f" if largest == 0 or 0.01 <= largest < 1000 else "+.3g"
    return ["n/a" if v is None or not math.isfinite(v) else format(v, spec) for v in values]


def format_p(value: Any) -> str:
    """Two significant digits (`p = 0.11`, `p = 0.020`, `p = 0.0042`, `p = 1.0`), `p < 0.001`, `p = n/a`."""
    if value is None or not math.isfinite(value):
        return "p = n/a"
    if value < 0.001:
        return "p < 0.001"
    return f"p = {value:#.2g}"


def comparison_sentence(model: str, baseline: str, metric: str, row: Mapping[str, Any]) -> str:
    """One comparison of a report's `comparisons` section as a sentence."""
    difference, low, high = signed_numbers(row.get("difference"), row.get("low"), row.get("high"))
    text = f"{model} minus {baseline}: {metric} {difference}"
    if row.get("low") is not None and row.get("high") is not None:
        text += f" [{low}, {high}]"
    if row.get("p_value") is not None:  # None: no resamples, or the metric is undefined
        text += f", paired bootstrap {format_p(row['p_value'])}"
        if "p_holm" in row:
            text += f" (Holm-adjusted {format_p(row['p_holm'])})"
    delong = row.get("delong")
    if delong and delong.get("z") is not None:
        text += f"; DeLong z = {delong['z']:.2f}, {format_p(delong.get('p_value'))}"
        if "p_holm" in delong:
            text += f" (Holm-adjusted {format_p(delong['p_holm'])})"
    elif delong:
        text += f"; DeLong's test is undefined ({delong.get('reason')})"
    return text + "."


def _comparison_lines(section: Mapping[str, Any], title: str = "Paired comparisons") -> list[str]:
    if not section:
        return []
    model, baselines, results = section["model"], section.get("baselines") or [], section.get("results") or {}
    lines = [f"## {title}", ""]
    if results:
        if section.get("bootstrap"):
            method = (
                f"with 95% intervals from {section['bootstrap']} paired bootstrap resamples (seed "
                f"{section['seed']}; both models scored on the same resampled examples) and two-sided "
                "p-values from the centred bootstrap, `p = (1 + #{|d* - d| >= |d|}) / (1 + B)` "
                f"(so p >= 1/{section['bootstrap'] + 1})"
            )
        else:
            method = "without bootstrap resamples (no intervals or bootstrap p-values)"
        plural = "s" if len(baselines) != 1 else ""
        lines.append(
            f"`{model}` against {len(baselines)} baseline{plural} on the same {section['n_examples']} test "
            f"examples: differences are {model} minus the baseline, {method}; for a binary AUROC also "
            "DeLong's test."
        )
        count = sum(len(rows) for rows in results.values())
        if len(baselines) > 1:
            lines.append(
                f"{count} comparisons in all; Holm's step-down method adjusts the p-values of each metric "
                f"over its {len(baselines)} comparisons (one per baseline)."
            )
        else:
            lines.append(f"{count} comparisons against one baseline, so no Holm adjustment across baselines.")
        lines.append("")
        for baseline, rows in results.items():
            lines += [f"- {comparison_sentence(model, baseline, name, row)}" for name, row in rows.items()]
        lines.append("")
    not_compared = {name: "a reference, not a competitor" for name in section.get("excluded") or []}
    not_compared.update(section.get("not_compared") or {})
    if section.get("error"):
        lines += [f"The paired comparisons failed: {section['error'].rstrip('.')}.", ""]
    if not_compared:
        reasons = "; ".join(f"{name} ({reason})" for name, reason in not_compared.items())
        lines += [f"Not compared: {reasons}.", ""]
    return lines


def render_markdown(payload: Mapping[str, Any], plots: list[str], created: str) -> str:
    """The report.md text for a report.json `payload`, embedding the `plots` written beside it."""
    headline = payload["headline"]
    models = ", ".join(f"`{model}`" for model in payload["results"])
    backbone = payload["backbone"].get("name", "an unnamed backbone")
    adapter = payload["adapter"].get("method", "no adapter")
    dataset = payload["dataset"].get("name", "an unnamed dataset")
    lines = [
        f"# {payload['name']}",
        "",
        f"Pipeline `{payload['pipeline']}` ({payload['task']} task): {adapter} on {backbone}, evaluated on "
        f"{dataset}. Models compared: {models}. Written {created}.",
        "",
        "## Headline",
        "",
        f"**{headline['metric']}** of **{headline['model']}**: {format_interval(headline)}",
        "",
        "## Results",
        "",
        *_results_table(payload["results"], headline["model"]),
        "",
    ]
    sentence = _evaluation_sentence(payload)
    if sentence:
        lines += [sentence, ""]
    lines += _comparison_lines(payload.get("comparisons") or {})
    for fraction, section in ((payload.get("extra") or {}).get(BY_FRACTION) or {}).items():
        lines += _comparison_lines(section, f"Paired comparisons at {fraction} of the training data")
    if payload["parameters"]:
        lines += ["## Parameters", "", *_parameters_table(payload["parameters"]), ""]
    for title, key in (
        ("Backbone", "backbone"),
        ("Adapter", "adapter"),
        ("Dataset", "dataset"),
        ("Cost", "cost"),
    ):
        lines += [f"## {title}", "", *_key_values(payload[key]), ""]
    lines += ["## Software", "", "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in payload["versions"].items()]
    lines.append("")
    if payload["notes"]:
        lines += ["## Notes", "", *[f"- {note}" for note in payload["notes"]], ""]
    extra = {key: value for key, value in payload["extra"].items() if key not in ("evaluation", BY_FRACTION)}
    if extra:
        lines += ["## Extra", "", *_key_values(extra), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name.removesuffix('.png')}]({name})" for name in plots]
        lines.append("")
    return "\n".join(lines)
