"""Stage one from the config: find the images of the index, load the backbones, extract or benchmark."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cache import store
from cache.origin import index_fingerprint
from cxr14.text import count, duration
from dataset.index import find_images
from experiments.config import Config
from experiments.data import open_config_dataset


def extract_names(config: Config, *, limit: int | None):
    """Image names in the index's order (the first `limit`)."""
    names = open_config_dataset(config).index.names
    return names if limit is None else names[:limit]


def _input(config: Config, *, names, from_pixels: str | None, index=None):
    """PNG files found under the data folder (names without a file are recorded), or a pixel cache
    (refused when made from another data set than `index`'s)."""
    from extract.inputs import PixelInput, PngInput

    if from_pixels:
        return PixelInput.open(store.cache_path(config.cache_dir, from_pixels), names=names, index=index)
    return PngInput(find_images(config.data_dir, names), max_pixels=config.extract.max_pixels)


def load_backbones(config: Config, names: Sequence[str]) -> list:
    """The backbones, with mixed precision and XLA as the config's [extract] says."""
    from extract.backbones import load_backbone

    chosen = [config.backbone(name) for name in names]  # an unknown name fails before any loading
    settings = config.extract
    return [load_backbone(c, mixed_precision=settings.mixed_precision, xla=settings.xla) for c in chosen]


def run_extract(
    config: Config,
    *,
    backbones: Sequence[str],
    from_pixels: str | None = None,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    force: bool = False,
) -> list:
    """Extract every backbone named in one pass (each image decoded once) into <cache_dir>/<backbone>.h5."""
    from extract.extraction import extract_features

    settings = config.extract
    for name in backbones:
        config.backbone(name)  # an unknown name fails before the index is read
    dataset = open_config_dataset(config)
    index = dataset.index
    names = index.names if limit is None else index.names[:limit]
    images = _input(config, names=names, from_pixels=from_pixels, index=index)
    return extract_features(
        backbones=load_backbones(config, backbones),
        names=names,
        images=images,
        cache_dir=Path(config.cache_dir),
        batch_size=settings.batch_size,
        shard_size=settings.shard_size,
        dtype=settings.dtype,
        shard=shard,
        views=settings.views,
        seed=settings.seed,
        force=force,
        dataset=index_fingerprint(index, rows=np.arange(len(names))),
        # A channel projection (map_channels) is fitted on the patient-wise training split alone.
        train=dataset.splits.mask("train")[: len(names)],
    )


def format_extract_summary(summary) -> str:
    """The end-of-run lines: what was done, what failed and why, how fast."""
    if summary.extracted:
        work = (
            f"{count(summary.shards_done, 'shard')} written, {summary.shards_skipped} already finished; "
            f"{summary.extracted:,} images in {duration(summary.seconds)}, {summary.images_per_s:,.0f} images/s"
        )
    else:
        work = f"already extracted ({count(summary.shards_skipped, 'shard')}), nothing to do"
    lines = [f"{summary.backbone}: {summary.done:,} images with features, {summary.failed} failed; {work}"]
    lines += [f"  failed: {name}: {reason}" for name, reason in summary.failures]
    if summary.path is None:
        lines.append("  other shards are still pending; the file is merged when the last one lands")
    else:
        lines.append(f"  features: {summary.path}")
    return "\n".join(lines)
