"""The extraction loop: frozen backbones over every image, shard by shard, into the feature store.

One pass decodes each image once and feeds every backbone it was given; each backbone still gets its
own file, the very file a pass with that backbone alone writes (same rows, batches and attributes).
"""

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from cache import store
from cache.paths import check_shards
from cache.status import Status
from cxr14.errors import Fix, InputError
from cxr14.temps import remove_stale_temps
from dataset import image_loader
from extract import projection as fitting

MAX_FAILURES_SHOWN = 10


@dataclass(frozen=True)
class ExtractSummary:
    """What one `extract_features` call did for one backbone; counts cover this worker's shards, old and new."""

    backbone: str
    path: Path | None  # the merged file, or None while other workers' shards are pending
    done: int  # images with features
    failed: int  # images recorded with a failure status
    failures: list[tuple[str, str]]  # the first few (name, reason)
    shards_done: int  # shards extracted by this call
    shards_skipped: int  # shards found already finished
    seconds: float
    images_per_s: float  # over the images this call extracted (0.0 when there were none)
    extracted: int = 0  # images this call ran the backbone on; 0 when every shard was finished already


@dataclass(frozen=True)
class _Plan:
    """One backbone's share of a pass: its file's attributes and paths, and the shards it still needs."""

    backbone: object  # extract.backbones.Backbone
    attrs: dict
    final: Path
    directory: Path
    ranges: list[tuple[int, int]]  # every shard of the file
    mine: list[tuple[int, int]]  # this worker's shards
    todo: list[tuple[int, int]]  # this worker's shards not yet written
    reused: bool  # the merged file exists with this recipe
    fit_rows: np.ndarray | None = None  # rows its channel projection is fitted on (map_channels), else None
    projection: object = None  # cache.projection.Projection, once fitted or found in the shard directory


def extract_features(
    *,
    backbones: Sequence,
    names: Sequence[str],
    images,
    cache_dir: Path,
    batch_size: int,
    shard_size: int,
    dtype: str = "float16",
    shard: tuple[int, int] = (0, 1),
    views: int = 1,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    dataset: dict | None = None,
    train: np.ndarray | None = None,
) -> list[ExtractSummary]:
    """Run `backbones` (extract.backbones.Backbone) over `images` in one pass; one summary per backbone.

    `names` are in the index's fixed (sorted) order; `images` (extract.inputs.PngInput or PixelInput)
    holds row i's image. Shards K, K+N, ... of `shard=(K, N)` are written for each backbone; each image
    is decoded once for all of them. Every recipe is checked before any work starts; finished shards are
    skipped; when every shard of a backbone exists, its `<cache_dir>/<backbone>.h5` is merged.
    `dataset`: the fingerprint of the index rows `names` are (cache.origin), recorded in every file.
    `train`: per row, whether it is a training image; a backbone with map_channels fits its projection
    on those alone, before any of its shards is written.
    """
    started = time.perf_counter()
    names = np.asarray(names, dtype=object)
    _check_args(names=names, images=images, backbones=backbones, shard=shard)
    options = dict(
        dtype=dtype, views=views, seed=seed, shard_size=shard_size, shard=shard, force=force, dataset=dataset
    )
    fits = [_with_fit(b, names=names, train=train) for b in backbones]
    plans = [
        _plan(b, fit_rows=rows, names=names, source=images.describe(), cache_dir=cache_dir, **options)
        for b, rows in fits
    ]
    plans = [_projected(plan, names=names, images=images, batch_size=batch_size) for plan in plans]
    todo = sorted(set().union(*(plan.todo for plan in plans)))
    bar = tqdm(
        total=sum(b - a for a, b in todo),
        unit="img",
        desc=",".join(plan.backbone.name for plan in plans),
        disable=not progress or not todo,  # nothing to do: no empty bar before the summary
    )
    with bar:
        written = _extract_shards(
            plans,
            names=names,
            images=images,
            todo=todo,
            batch_size=batch_size,
            views=views,
            seed=seed,
            bar=bar,
        )
    return [_finish(plan, written=written, started=started) for plan in plans]


def merge(*, cache_dir: Path, backbone_name: str) -> Path:
    """Build `<cache_dir>/<backbone_name>.h5` from its finished shards by hand (`run.py merge`)."""
    directory = check_shards(cache_dir, backbone_name)
    with _start_over_fixes(backbone_name):
        return store.merge_shards(directory, out_path=store.cache_path(cache_dir, backbone_name))


@contextmanager
def _start_over_fixes(backbone: str) -> Iterator[None]:
    """The store's refusals of shards made differently come with their fix: extracting again from scratch."""
    try:
        yield
    except store.MadeDifferently as err:
        raise InputError(str(err)).fixed_by(Fix("extract", {"backbone": backbone, "force": True})) from None


def file_attrs(
    *,
    backbone,
    names: np.ndarray,
    dtype: str,
    views: int,
    seed: int,
    shard_size: int,
    source: dict,
    dataset: dict | None = None,
) -> dict:
    """The attributes stamped on every shard and on the merged file, fingerprint included.

    `source` describes where the pixels came from (PNG decoding, or a pixel cache and its fingerprint).
    """
    preprocess = backbone.spec.as_dict() | {"input": source}
    if views > 1:  # the seed only shapes the augmented views, so it only counts when there are some
        preprocess["augment_seed"] = seed
    recipe = dict(
        backbone_config=backbone.config, preprocess=preprocess, dtype=dtype, views=views, dataset=dataset
    )
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


def _check_args(*, names, images, backbones: Sequence, shard: tuple[int, int]) -> None:
    if len(names) == 0:
        raise InputError("no images to extract: the index is empty (check --limit and the CSV)")
    if len(names) != len(images):
        raise InputError(f"got {len(names)} image names but {len(images)} images; they must align")
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise InputError(f"shard {k}/{n}: expected K/N with 0 <= K < N, e.g. shards 0/2 and 1/2")
    given = [b.name for b in backbones]
    if not given or len(set(given)) != len(given):
        raise InputError(f"backbones {given}: name each backbone once, e.g. --backbone a,b")
    images.check_backbones(backbones)


def _plan(
    backbone,
    *,
    fit_rows,
    names,
    source: dict,
    cache_dir: Path,
    dtype,
    views,
    seed,
    shard_size,
    shard,
    force,
    dataset,
) -> _Plan:
    """What this worker still owes `backbone`; a file or shard of another recipe is refused here, early."""
    dtype = "uint8" if backbone.kind == "pixels" else dtype
    attrs = file_attrs(
        backbone=backbone,
        names=names,
        dtype=dtype,
        views=views,
        seed=seed,
        shard_size=shard_size,
        source=source,
        dataset=dataset,
    )
    final, directory = store.cache_path(cache_dir, backbone.name), store.shard_dir(cache_dir, backbone.name)
    ranges = store.shard_ranges(len(names), shard_size)
    mine = ranges[shard[0] :: shard[1]]
    plan = dict(backbone=backbone, attrs=attrs, final=final, directory=directory, ranges=ranges, mine=mine)
    plan["fit_rows"] = fit_rows
    store.refuse_folder(final)  # before --force tries to unlink it
    if force:
        final.unlink(missing_ok=True)
        remove_stale_temps(final)  # a killed merge's temporary file is as large as the final one
        store.discard_shards(directory, fingerprint=attrs["fingerprint"], ranges=mine)
    elif final.exists():
        found = store.read_attrs(final)
        if found.get("fingerprint") != attrs["fingerprint"]:
            differ = store.recipe_differences(found=found, wanted=attrs)
            raise InputError(f"{store.recipe_mismatch(final, differ=differ)}; start over").fixed_by(
                Fix("extract", {"backbone": backbone.name, "force": True})
            )
        return _Plan(**plan, todo=[], reused=True)
    with _start_over_fixes(backbone.name):
        finished = store.finished_shards(directory, wanted=attrs)
    return _Plan(**plan, todo=[r for r in mine if r not in finished], reused=False)


def _with_fit(backbone, *, names: np.ndarray, train: np.ndarray | None):
    """(backbone, fit rows): a backbone with map_channels records which training images its projection is
    fitted on (in its resolved config, and so in the fingerprint), and checks K against its channels."""
    channels, images, fit_seed = fitting.settings(backbone.config)
    if not channels:
        return backbone, None
    fitting.check_channels(channels, width=backbone.dim, backbone=backbone.name)  # before any work
    if train is not None and len(train) != len(names):
        raise ValueError(f"train marks {len(train)} rows, not the {len(names)} to extract")
    rows = fitting.fit_rows(train, images=images, seed=fit_seed, backbone=backbone.name)
    resolved = dict(backbone.config.get("resolved", {}))
    resolved["map_fit"] = {"images": len(rows), "names_sha256": fitting.names_sha256(names[rows])}
    config = backbone.config | {"resolved": resolved}
    return dataclasses.replace(backbone, config=config), rows


def _projected(plan: _Plan, *, names, images, batch_size: int) -> _Plan:
    """The plan with its fitted projection: the one its shard directory keeps from an earlier pass, or
    one fitted now and saved there before any shard is written (so a resumed pass projects alike)."""
    if plan.fit_rows is None or not plan.todo:  # nothing to project, or only a merge left to do
        return plan
    fingerprint = plan.attrs["fingerprint"]
    with _start_over_fixes(plan.backbone.name):
        found = store.load_fitted(plan.directory, fingerprint=fingerprint)
    if found is None:
        tokens, kept = _fit_tokens(plan.backbone, rows=plan.fit_rows, images=images, batch_size=batch_size)
        channels, _, fit_seed = fitting.settings(plan.backbone.config)
        found = fitting.fit_projection(
            tokens, channels=channels, fit_names=names[kept], seed=fit_seed, backbone=plan.backbone.name
        )
        store.save_fitted(plan.directory, found, fingerprint=fingerprint)
    return dataclasses.replace(plan, projection=found)


def _fit_tokens(backbone, *, rows: np.ndarray, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, rows) of the fit images that decode: every token of theirs as one row of C channels
    (float16, half float32's memory), and the rows they came from."""
    checks = images.check(rows.tolist())
    readable = np.array([r for r in rows if checks[int(r)][0] == Status.OK], dtype=np.int64)
    dataset = image_loader.make_dataset(
        images.source(readable),
        sizes=[backbone.spec.size],
        batch_size=batch_size,
        shards=[(0, len(readable))],
    )
    parts, kept = [], []
    for batch_rows, pixels in dataset:
        (out,) = embed_all([backbone], [pixels[0]], batch_size=batch_size, views=1)
        parts.append(out.reshape(-1, out.shape[-1]).astype(np.float16))
        kept.append(batch_rows.numpy())
    if not parts:
        raise InputError(
            f"backbones.{backbone.name}.map_channels: none of the {len(rows)} training images to fit the "
            "projection on could be read; check the images, or set map_channels = 0"
        )
    return np.concatenate(parts), np.concatenate(kept)


def _finish(plan: _Plan, *, written: dict, started: float) -> ExtractSummary:
    """Merge the backbone's file when all its shards exist; sum up its part of the pass."""
    name = plan.backbone.name
    if plan.reused:
        records = [store.read_status(plan.final)]
        return _summary(name, plan.final, records, shards=(0, len(plan.mine)), extracted=0, started=started)
    with _start_over_fixes(name):
        finished = store.finished_shards(plan.directory, wanted=plan.attrs)
    complete = all(r in finished for r in plan.ranges)
    path = store.merge_shards(plan.directory, out_path=plan.final) if complete else None
    records = [written.get((name, r)) or store.read_status(finished[r]) for r in plan.mine]
    shards = (len(plan.todo), len(plan.mine) - len(plan.todo))
    extracted = sum(b - a for a, b in plan.todo)
    return _summary(name, path, records, shards=shards, extracted=extracted, started=started)


def _extract_shards(plans, *, names, images, todo, batch_size, views, seed, bar) -> dict:
    """Decode the rows of `todo` once and write each shard for every backbone that needs it.

    Returns each written shard's (names, status, errors), keyed by (backbone name, range).
    """
    if not todo:
        return {}
    checks = images.check([row for a, b in todo for row in range(a, b)])
    sizes = sorted({plan.backbone.spec.size for plan in plans if plan.todo})
    dataset = _dataset(
        images, todo=todo, checks=checks, sizes=sizes, batch_size=batch_size, views=views, seed=seed
    )
    written = {}
    for (start, stop), batches in zip(todo, _by_shard(dataset, todo), strict=True):
        needing = [plan for plan in plans if (start, stop) in plan.todo]
        features, filled = _run_shard(
            needing,
            batches,
            start=start,
            rows=stop - start,
            sizes=sizes,
            batch_size=batch_size,
            views=views,
            bar=bar,
        )
        status, errors = _statuses(filled, start=start, images=images, checks=checks)
        bar.update(int((~filled).sum()))
        for plan in needing:
            name = plan.backbone.name
            store.write_shard(
                plan.directory,
                start=start,
                stop=stop,
                total_rows=len(names),
                attrs=plan.attrs,
                names=names[start:stop],
                features=features[name],
                status=status,
                errors=errors,
                projection=plan.projection,
            )
            written[(name, (start, stop))] = (names[start:stop], status, errors)
    return written


def _by_shard(dataset, todo):
    """For each shard of `todo` in turn, an iterator over its batches (none when all its images failed)."""
    batches = iter(dataset)
    pending = next(batches, None)

    def shard_batches(stop):
        nonlocal pending
        # Batches never cross a shard boundary, so every batch starting before `stop` belongs here.
        while pending is not None and int(pending[0][0]) < stop:
            yield pending
            pending = next(batches, None)

    for _, stop in todo:
        yield shard_batches(stop)


def _run_shard(plans, batches, *, start, rows, sizes, batch_size, views, bar) -> tuple[dict, np.ndarray]:
    """Every backbone of `plans` over one shard's batches: (features by backbone name, rows filled)."""
    backbones = [plan.backbone for plan in plans]
    features = {
        plan.backbone.name: _empty_features(plan, rows=rows, dtype=plan.attrs["dtype"], views=views)
        for plan in plans
    }
    filled = np.zeros(rows, dtype=bool)
    for batch_rows, pixels in batches:
        at = batch_rows.numpy() - start
        assert at.min() >= 0 and at.max() < rows, "a batch crossed a shard boundary"
        inputs = [pixels[sizes.index(b.spec.size)] for b in backbones]
        outputs = embed_all(backbones, inputs, batch_size=batch_size, views=views)
        for plan, out in zip(plans, outputs, strict=True):
            # Projected on the host in float32, the arithmetic the tests check it against.
            features[plan.backbone.name][at] = plan.projection.apply(out) if plan.projection else out
        filled[at] = True
        bar.update(len(at))
    return features, filled


def _dataset(images, *, todo, checks, sizes, batch_size, views, seed):
    """The pipeline over the rows of `todo` that passed the cheap check, cut at the same shard bounds."""
    # Rows that fail the cheap check (a missing, empty, truncated or non-PNG file; a row that failed in
    # the pixel cache) are classified up front and never reach the pipeline.
    readable = np.array(
        sorted(row for row, (status, _) in checks.items() if status == Status.OK), dtype=np.int64
    )
    positions = [tuple(np.searchsorted(readable, bounds).tolist()) for bounds in todo]
    return image_loader.make_dataset(
        images.source(readable), sizes=sizes, batch_size=batch_size, shards=positions, views=views, seed=seed
    )


def _empty_features(plan: _Plan, *, rows: int, dtype: str, views: int) -> np.ndarray:
    """Preallocated features for one shard; rows that never get filled stay zero, as failed rows must."""
    backbone = plan.backbone
    channels = plan.projection.channels if plan.projection else backbone.dim
    items = {
        "features": (backbone.dim,),
        "tokens": (backbone.tokens, channels),
        "pixels": (backbone.dim, backbone.dim),
    }
    item = items[backbone.kind]
    return np.zeros((rows, *((views,) if views > 1 else ()), *item), dtype=dtype)


def embed_all(
    backbones: Sequence, pixels: Sequence[tf.Tensor], *, batch_size: int, views: int
) -> list[np.ndarray]:
    """Each backbone's outputs for its uint8 batch, as float32 (uint8 for pixels) numpy arrays.

    Every backbone is called before any result is read back, so a GPU runs them back to back.
    """
    calls = [_call(b, x, batch_size=batch_size, views=views) for b, x in zip(backbones, pixels, strict=True)]
    return [
        _collect(b, out, rows=int(x.shape[0]), views=views)
        for b, out, x in zip(backbones, calls, pixels, strict=True)
    ]


def _call(backbone, pixels: tf.Tensor, *, batch_size: int, views: int):
    """Start the backbone on one batch. Its tf.function takes any batch size without retracing, so only
    under XLA, which compiles each shape anew, is a short batch padded, to a power of two (a few shapes,
    at most batch_size * views rows): memory follows the images, not the setting (padding every call to
    2,048 rows took 300 images from 0.8 to 1.7 GB)."""
    if backbone.kind == "pixels":
        # The stored image is the uint8 input itself; a round trip through the device would only copy it back.
        return pixels
    flat = tf.reshape(pixels, (-1, *pixels.shape[-3:])) if views > 1 else pixels
    if not backbone.config.get("resolved", {}).get("xla"):
        return backbone.fn(flat)
    return backbone.fn(pad_batch(flat, padded_rows(int(flat.shape[0]), most=batch_size * views)))


def _collect(backbone, out, *, rows: int, views: int) -> np.ndarray:
    if backbone.kind == "pixels":
        return np.asarray(out)[..., 0]
    out = np.asarray(out)[: rows * views].astype(np.float32)
    return out.reshape(rows, views, *out.shape[1:]) if views > 1 else out


def padded_rows(rows: int, *, most: int) -> int:
    """The rows a batch of `rows` is padded to: the next power of two, never more than `most`."""
    return min(most, 1 << max(rows - 1, 0).bit_length())


def pad_batch(images: tf.Tensor, size: int) -> tf.Tensor:
    """Pad a short batch with zero images up to `size` rows (extraction and its benchmark both do)."""
    short = size - int(images.shape[0])
    if short <= 0:
        return images
    return tf.concat([images, tf.zeros((short, *images.shape[1:]), images.dtype)], axis=0)


def _statuses(filled: np.ndarray, *, start: int, images, checks: dict) -> tuple[np.ndarray, np.ndarray]:
    """Status and reason per row of a shard: OK where filled, else the pre-check's or the decoder's reason."""
    status = np.full(len(filled), Status.OK, dtype=np.int8)
    errors = np.full(len(filled), "", dtype=object)
    for i in np.flatnonzero(~filled):
        code, reason = checks[start + int(i)]
        if code == Status.OK:  # passed the cheap check, so reading it in the pipeline failed
            code, reason = images.explain(start + int(i))
        status[i], errors[i] = code, reason or Status(code).name.lower()
    return status, errors


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
        images_per_s=extracted / seconds if extracted and seconds > 0 else 0.0,
        extracted=extracted,
    )
