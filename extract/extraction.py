"""The extraction loop: a frozen backbone over every image, shard by shard, into the feature store."""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from cache import store
from cache.status import Status
from cxr14.errors import InputError
from cxr14.temps import remove_stale_temps
from extract import pipeline

MAX_FAILURES_SHOWN = 10


@dataclass(frozen=True)
class ExtractSummary:
    """What one `extract_features` call did; counts cover this worker's shards, old and new."""

    backbone: str
    path: Path | None  # the merged file, or None while other workers' shards are pending
    done: int  # images with features
    failed: int  # images recorded with a failure status
    failures: list[tuple[str, str]]  # the first few (name, reason)
    shards_done: int  # shards extracted by this call
    shards_skipped: int  # shards found already finished
    seconds: float
    images_per_s: float  # over the images this call extracted


def extract_features(
    *,
    backbone,
    names: Sequence[str],
    paths: Sequence[str],
    cache_dir: Path,
    batch_size: int,
    shard_size: int,
    dtype: str = "float16",
    shard: tuple[int, int] = (0, 1),
    views: int = 1,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    max_pixels: int | None = None,
) -> ExtractSummary:
    """Run `backbone` (an extract.backbones.Backbone) over `paths`, writing shards K, K+N, ... of `shard=(K, N)`.

    `names` are in the index's fixed (sorted) order and `paths[i]` is the file for `names[i]` ("" when absent).
    Finished shards are skipped; when every shard exists the final `<cache_dir>/<backbone>.h5` is merged.
    Images with more than `max_pixels` pixels (read from their header) are recorded as failed, not decoded.
    """
    started = time.perf_counter()
    names, paths = np.asarray(names, dtype=object), np.asarray(paths, dtype=object)
    _check_args(names=names, paths=paths, shard=shard)
    dtype = "uint8" if backbone.kind == "pixels" else dtype
    attrs = file_attrs(
        backbone=backbone, names=names, dtype=dtype, views=views, seed=seed, shard_size=shard_size
    )
    final, directory = store.cache_path(cache_dir, backbone.name), store.shard_dir(cache_dir, backbone.name)
    ranges = store.shard_ranges(len(names), shard_size)
    mine = ranges[shard[0] :: shard[1]]
    if force:
        final.unlink(missing_ok=True)
        remove_stale_temps(final)  # a killed merge's temporary file is as large as the final one
        store.discard_shards(directory, fingerprint=attrs["fingerprint"], ranges=mine)
    elif final.exists():
        return _existing(final, wanted=attrs, name=backbone.name, mine=len(mine), started=started)
    finished = store.finished_shards(directory, wanted=attrs)
    todo = [r for r in mine if r not in finished]
    bar = tqdm(total=sum(b - a for a, b in todo), unit="img", desc=backbone.name, disable=not progress)
    with bar:
        written = _extract_shards(
            backbone,
            names=names,
            paths=paths,
            todo=todo,
            directory=directory,
            attrs=attrs,
            batch_size=batch_size,
            views=views,
            seed=seed,
            bar=bar,
            max_pixels=max_pixels,
        )
    finished = store.finished_shards(directory, wanted=attrs)
    path = store.merge_shards(directory, out_path=final) if all(r in finished for r in ranges) else None
    records = [written[r] if r in written else store.read_status(finished[r]) for r in mine]
    return _summary(
        backbone.name,
        path,
        records,
        shards=(len(todo), len(mine) - len(todo)),
        extracted=sum(b - a for a, b in todo),
        started=started,
    )


def merge(*, cache_dir: Path, backbone_name: str) -> Path:
    """Build `<cache_dir>/<backbone_name>.h5` from its finished shards by hand (`run.py merge`)."""
    directory = store.shard_dir(cache_dir, backbone_name)
    return store.merge_shards(directory, out_path=store.cache_path(cache_dir, backbone_name))


def file_attrs(*, backbone, names: np.ndarray, dtype: str, views: int, seed: int, shard_size: int) -> dict:
    """The attributes stamped on every shard and on the merged file, fingerprint included."""
    preprocess = backbone.spec.as_dict()
    if views > 1:  # the seed only shapes the augmented views, so it only counts when there are some
        preprocess["augment_seed"] = seed
    recipe = dict(backbone_config=backbone.config, preprocess=preprocess, dtype=dtype, views=views)
    return {
        "backbone": backbone.name,
        "kind": backbone.kind,
        **recipe,
        "image_size": backbone.spec.size,
        "shard_size": shard_size,
        "fingerprint": store.fingerprint(names=list(names), shard_size=shard_size, **recipe),
        "image_list_sha256": store.image_list_sha256(list(names)),
        "versions": store.library_versions(),
    }


def _check_args(*, names, paths, shard: tuple[int, int]) -> None:
    if len(names) == 0:
        raise InputError("no images to extract: the index is empty (check --limit and the CSV)")
    if len(names) != len(paths):
        raise InputError(f"got {len(names)} image names but {len(paths)} paths; they must align")
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise InputError(f"shard {k}/{n}: expected K/N with 0 <= K < N, e.g. shards 0/2 and 1/2")


def _existing(final: Path, *, wanted: dict, name: str, mine: int, started: float) -> ExtractSummary:
    """A finished file is reused only when it was made by exactly this recipe."""
    found = store.read_attrs(final)
    if found.get("fingerprint") != wanted["fingerprint"]:
        raise InputError(store.recipe_mismatch(final, found=found, wanted=wanted))
    return _summary(name, final, [store.read_status(final)], shards=(0, mine), extracted=0, started=started)


def _extract_shards(
    backbone, *, names, paths, todo, directory, attrs, batch_size, views, seed, bar, max_pixels
) -> dict[tuple[int, int], tuple]:
    """Extract and write each shard in `todo`; returns each shard's (names, status, errors) by range."""
    if not todo:
        return {}
    checks = {
        int(row): pipeline.check_file(paths[row], max_pixels=max_pixels)
        for a, b in todo
        for row in range(a, b)
    }
    batches = iter(
        _dataset(
            backbone, paths=paths, todo=todo, checks=checks, batch_size=batch_size, views=views, seed=seed
        )
    )
    pending = next(batches, None)
    written = {}
    for start, stop in todo:
        part = _empty_part(backbone, names=names[start:stop], dtype=attrs["dtype"], views=views)
        # Batches never cross a shard boundary, so every batch starting before `stop` belongs here.
        while pending is not None and int(pending[0][0]) < stop:
            rows, images = pending
            at = rows.numpy() - start
            assert at.min() >= 0 and at.max() < stop - start, "a batch crossed a shard boundary"
            part["features"][at] = _embed(backbone, images, batch_size=batch_size, views=views)
            part["filled"][at] = True
            bar.update(len(at))
            pending = next(batches, None)
        _record_failures(part, start=start, paths=paths, checks=checks)
        bar.update(int((~part.pop("filled")).sum()))
        store.write_shard(directory, start=start, stop=stop, total_rows=len(names), attrs=attrs, **part)
        written[(start, stop)] = (part["names"], part["status"], part["errors"])
    return written


def _dataset(backbone, *, paths, todo, checks, batch_size, views, seed):
    """The pipeline over the rows of `todo` that passed the cheap check, cut at the same shard bounds."""
    # Missing, empty, truncated and non-PNG files are classified up front and never reach the pipeline.
    readable = np.array([row for row, (status, _) in checks.items() if status == Status.OK], dtype=np.int64)
    positions = [tuple(np.searchsorted(readable, bounds).tolist()) for bounds in todo]
    return pipeline.make_dataset(
        paths[readable],
        readable,
        spec=backbone.spec,
        batch_size=batch_size,
        shards=positions,
        views=views,
        seed=seed,
    )


def _empty_part(backbone, *, names, dtype: str, views: int) -> dict:
    """Preallocated arrays for one shard; rows start as NOT_RUN until filled or classified."""
    item = (backbone.dim,) if backbone.kind == "features" else (backbone.dim, backbone.dim)
    shape = (len(names), *((views,) if views > 1 else ()), *item)
    return {
        "names": names,
        "features": np.zeros(shape, dtype=dtype),
        "status": np.full(len(names), Status.NOT_RUN, dtype=np.int8),
        "errors": np.full(len(names), "", dtype=object),
        "filled": np.zeros(len(names), dtype=bool),
    }


def _embed(backbone, images: tf.Tensor, *, batch_size: int, views: int) -> np.ndarray:
    """Backbone outputs for one batch, padded to a fixed batch so the tf.function never retraces."""
    b = int(images.shape[0])
    flat = tf.reshape(images, (-1, *images.shape[-3:])) if views > 1 else images
    out = np.asarray(backbone.fn(pad_batch(flat, batch_size * views)))[: b * views].astype(np.float32)
    if backbone.kind == "pixels":
        out = np.clip(np.rint(out), 0, 255)
    return out.reshape(b, views, *out.shape[1:]) if views > 1 else out


def pad_batch(images: tf.Tensor, size: int) -> tf.Tensor:
    """Pad a short batch with zero images up to `size` rows (extraction and its benchmark both do)."""
    short = size - int(images.shape[0])
    if short <= 0:
        return images
    return tf.concat([images, tf.zeros((short, *images.shape[1:]), images.dtype)], axis=0)


def _record_failures(part: dict, *, start: int, paths, checks: dict) -> None:
    """Mark filled rows OK; rows the pipeline dropped get the pre-check's reason or a decode error."""
    part["status"][part["filled"]] = Status.OK
    for i in np.flatnonzero(~part["filled"]):
        status, reason = checks[start + int(i)]
        if status == Status.OK:  # passed the cheap check, so decoding itself failed
            status, reason = Status.UNDECODABLE, pipeline.decode_error(paths[start + int(i)])
        part["status"][i], part["errors"][i] = status, reason or Status(status).name.lower()


def _summary(
    name, path, records, *, shards: tuple[int, int], extracted: int, started: float
) -> ExtractSummary:
    """`records`: (names, status, errors) per shard or file; `shards`: (extracted now, found finished)."""
    status = np.concatenate([r[1] for r in records])
    bad = [(names[i], errors[i]) for names, s, errors in records for i in np.flatnonzero(s != Status.OK)]
    seconds = time.perf_counter() - started
    return ExtractSummary(
        backbone=name,
        path=path,
        done=int((status == Status.OK).sum()),
        failed=len(bad),
        failures=bad[:MAX_FAILURES_SHOWN],
        shards_done=shards[0],
        shards_skipped=shards[1],
        seconds=seconds,
        images_per_s=extracted / seconds if seconds > 0 else 0.0,
    )
