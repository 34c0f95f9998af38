"""Stage one from the config: find the images of the index, load the backbone, extract or benchmark."""

import os
from pathlib import Path

from cxr14.config import Config
from cxr14.errors import InputError
from extract.dataset import open_dataset
from extract.index import find_images


def _images(config: Config, *, limit: int | None):
    """Names (index order) and their paths; names without a file keep an empty path and are recorded."""
    index = open_dataset(config).index
    names = index.names if limit is None else index.names[:limit]
    return names, find_images(config.data_dir, names)


def _load_backbone(config: Config, chosen):
    """The backbone, with mixed precision and XLA as the config's [extract] says."""
    from extract.backbones import load_backbone

    return load_backbone(chosen, mixed_precision=config.extract.mixed_precision, xla=config.extract.xla)


def run_extract(
    config: Config,
    *,
    backbone: str,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    force: bool = False,
):
    """Extract one backbone's features for the index into <cache_dir>/<backbone>.h5."""
    from extract.extraction import extract_features

    settings = config.extract
    chosen = config.backbone(backbone)  # an unknown name fails before the index is read
    names, paths = _images(config, limit=limit)
    return extract_features(
        backbone=_load_backbone(config, chosen),
        names=names,
        paths=paths,
        cache_dir=Path(config.cache_dir),
        batch_size=settings.batch_size,
        shard_size=settings.shard_size,
        dtype=settings.dtype,
        shard=shard,
        views=settings.views,
        seed=settings.seed,
        force=force,
        max_pixels=settings.max_pixels,
    )


def run_bench_extract(config: Config, *, backbone: str, images: int) -> dict:
    """Time decoding, the backbone and the whole pipeline on the first `images` images of the index."""
    from extract.bench import bench_extract

    chosen = config.backbone(backbone)
    names, paths = _images(config, limit=images)
    present = [p for p in paths if p and os.path.isfile(p)]
    if not present:
        raise InputError(
            f"{config.data_dir}: no image files found to benchmark (make one with run.py make-sample)"
        )
    return bench_extract(
        backbone=_load_backbone(config, chosen),
        paths=present,
        batch_size=config.extract.batch_size,
        images=len(present),
    )


def format_extract_summary(summary) -> str:
    """The end-of-run lines: what was done, what failed and why, how fast."""
    lines = [
        f"{summary.backbone}: {summary.done} images done, {summary.failed} failed, "
        f"{summary.shards_done} shards written, {summary.shards_skipped} already finished; "
        f"{summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s"
    ]
    lines += [f"  failed: {name}: {reason}" for name, reason in summary.failures]
    if summary.path is None:
        lines.append("  other shards are still pending; the file is merged when the last one lands")
    else:
        lines.append(f"  features: {summary.path}")
    return "\n".join(lines)
