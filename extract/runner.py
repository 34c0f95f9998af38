"""Stage one from the config: find the images of the index, load the backbone, extract or benchmark."""

from pathlib import Path

from extract.config import Config
from extract.dataset import open_dataset
from extract.errors import InputError
from extract.index import find_images


def _images(config: Config, *, limit: int | None):
    """Names (index order) and their paths; names without a file keep an empty path and are recorded."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    index = open_dataset(config).index
    names = index.names if limit is None else index.names[:limit]
    return names, find_images(config.data_dir, names)


def _load_backbone(config: Config, chosen, *, mixed_precision: bool | None, xla: bool | None):
    """The backbone, with mixed precision and XLA from the flags, else from the config's [extract]."""
    from extract.backbones import load_backbone

    settings = config.extract
    return load_backbone(
        chosen,
        mixed_precision=settings.mixed_precision if mixed_precision is None else mixed_precision,
        xla=settings.xla if xla is None else xla,
    )


def run_extract(
    config: Config,
    *,
    backbone: str,
    batch_size: int | None = None,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    force: bool = False,
    views: int | None = None,
    mixed_precision: bool | None = None,
    xla: bool | None = None,
    dtype: str | None = None,
):
    """Extract one backbone's features for the index into <cache_dir>/<backbone>.h5."""
    from extract.extraction import extract_features

    settings = config.extract
    chosen = config.backbone(backbone)  # an unknown name fails before the index is read
    names, paths = _images(config, limit=limit)
    model = _load_backbone(config, chosen, mixed_precision=mixed_precision, xla=xla)
    return extract_features(
        backbone=model,
        names=names,
        paths=paths,
        cache_dir=Path(config.cache_dir),
        batch_size=batch_size or settings.batch_size,
        shard_size=settings.shard_size,
        dtype=dtype or settings.dtype,
        shard=shard,
        views=views or settings.views,
        seed=settings.seed,
        force=force,
    )


def run_bench_extract(
    config: Config,
    *,
    backbone: str,
    images: int,
    batch_size: int | None,
    mixed_precision: bool | None = None,
    xla: bool | None = None,
) -> dict:
    """Time decoding, the backbone and the whole pipeline on the first `images` images of the index.

    Mixed precision and XLA default to the config's [extract] settings, as in `run_extract`.
    """
    from extract.bench import bench_extract

    chosen = config.backbone(backbone)
    names, paths = _images(config, limit=images)
    present = [p for p in paths if p]
    if not present:
        raise InputError(
            f"{config.data_dir}: no image files found to benchmark (make one with run.py make-sample)"
        )
    return bench_extract(
        backbone=_load_backbone(config, chosen, mixed_precision=mixed_precision, xla=xla),
        paths=present,
        batch_size=batch_size or config.extract.batch_size,
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
