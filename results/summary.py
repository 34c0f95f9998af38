"""The short per-disease table a command prints when a run is trained or scored."""

from pathlib import Path

from results.format import format_auc, format_difference, probe_note


def _baseline_summary(metrics: dict) -> list[str]:
    """The metadata baseline in one line, and a flag when the run does not beat it."""
    baselines = metrics.get("baselines") or {}
    metadata = baselines.get("metadata")
    if not metadata:
        return []
    line = f"{'metadata baseline':<20} {format_auc(metadata['mean_auc'], metadata['mean_ci'])}"
    lines = [line + f"  (age, sex, view; chance {baselines['chance_auc']:.3f})"]
    if not baselines["beats_metadata"]:
        lines.append("warning: this run does not beat the metadata-only baseline (age, sex, view position)")
    return lines


def summarize_metrics(
    metrics: dict, *, run_dir: Path, split: str = "test", written: Path | None = None
) -> str:
    """A short per-disease table for the terminal."""
    lines = [f"** {metrics['notice']} **"] if metrics.get("notice") else []
    lines += [f"{'label':<20} AUC [95% CI, patients]"]
    for label, m in metrics["labels"].items():
        one_class = f" (one class only in {split})" if m["auc"] is None else ""
        lines.append(f"{label:<20} {format_auc(m['auc'], m['ci'])}{one_class}")
    lines.append(f"{'mean':<20} {format_auc(metrics['mean_auc'], metrics['mean_ci'])}")
    reference = metrics.get("reference")
    if reference:
        difference = format_difference(reference["difference"], reference["difference_ci"])
        lines.append(f"{'ridge probe':<20} {format_auc(reference['mean_auc'])}  head - probe {difference}")
    if probe_note(metrics):
        lines.append(f"this head {probe_note(metrics)}")
    lines += [f"warning: {warning}" for warning in metrics.get("warnings", [])]
    if metrics.get("converged") is False:
        lines.append(
            f"not converged: validation AUC was still rising at the last allowed epoch ({metrics['epochs']}); "
            "train with more epochs"
        )
    lines += _baseline_summary(metrics)
    where = f"wrote {written}" if written else f"outputs in {run_dir}"
    lines.append(f"{split}: {metrics['images']:,} images, {metrics['patients']:,} patients; {where}")
    return "\n".join(lines)
