"""`bench extract`: decoding (one core, all cores), each backbone alone and the one-pass pipeline, on the
same images; optionally the same pipeline reading a pixel cache instead of the PNGs."""

import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from cache import store
from cache.status import Status
from cxr14.errors import Fix, InputError
from cxr14.text import duration, megabytes
from dataset.files import sample_folder
from dataset.image_loader import PngFiles, cores, make_dataset
from dataset.index import find_images
from experiments.config import Config
from experiments.extract import extract_names, load_backbones
from extract.extraction import embed_all

FULL_SET_IMAGES = 112_120  # ChestX-ray14
KEPT_BATCHES = 8  # the backbone-alone passes cycle over these, so memory does not grow with the images


def bench_extract(
    *, backbones: Sequence, paths: Sequence[str], batch_size: int, pixels=None, repeats: int = 3
) -> dict:
    """Time the stages of one extraction pass over `paths`; JSON-ready figures.

    decode: read + decode + resize to every backbone's size, on one core and on all. ratio = pipeline
    time / (decode time + the sum of the backbones' times): about 1 when decoding and the backbones take
    turns (one CPU does both), below 1 when they overlap (a GPU fed by the cores). With `pixels` (an
    extract.inputs.PixelInput over the same images) the pipeline is also timed reading stored pixels.
    Each figure is the best of `repeats` interleaved passes, so a burst of load from other processes
    skews none of them.
    """
    paths = np.asarray([str(p) for p in paths])
    if not len(paths) or batch_size < 1 or not backbones:
        raise InputError(
            f"bench extract needs images, backbones and a positive batch size, got {len(paths)}, "
            f"{len(backbones)} and {batch_size}"
        )
    for path in paths:  # warm the OS file cache, so the first timed pass is not the only one reading disk
        if os.path.isfile(path):
            Path(path).read_bytes()
    sizes = sorted({b.spec.size for b in backbones})
    dataset = _dataset_maker(paths, pixels=pixels, sizes=sizes, batch_size=batch_size)
    first = next(iter(dataset()), None)
    if first is None:
        raise InputError(
            f"bench extract: none of the {len(paths)} images could be decoded (first: {paths[0]})"
        )
    _embed(backbones, first[1], sizes=sizes, batch_size=batch_size)  # trace once, outside every timing
    timings = [
        _time_pass(dataset, backbones, sizes=sizes, batch_size=batch_size, with_pixels=pixels is not None)
        for _ in range(max(1, repeats))
    ]
    # Per stage, the repeat with the least wall time; images, wall and CPU seconds come from that one.
    best = {key: min((t[key] for t in timings), key=lambda m: m[1]) for key in timings[0]}
    result = {
        **_setting(backbones, images=len(paths), batch_size=batch_size, repeats=max(1, repeats)),
        **_figures(best, backbones),
    }
    if pixels is not None:
        result |= _pixel_figures(best, pixels, backbones, png_rate=result["pipeline_images_per_s"])
        result["pixels_vs_png"] = _gap(dataset, backbones, sizes=sizes, batch_size=batch_size)
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def _dataset_maker(paths: np.ndarray, *, pixels, sizes: list[int], batch_size: int):
    """dataset(source="png" | "pixels", workers=None): a fresh one-pass pipeline over all the images."""
    sources = {"png": PngFiles(paths=paths, rows=np.arange(len(paths)))}
    if pixels is not None:
        sources["pixels"] = pixels.source(np.flatnonzero(pixels.status == Status.OK))

    def dataset(source="png", workers=None):
        shards = [(0, len(sources[source]))]
        return make_dataset(
            sources[source], sizes=sizes, batch_size=batch_size, shards=shards, workers=workers
        )

    return dataset


def _setting(backbones: Sequence, *, images: int, batch_size: int, repeats: int) -> dict:
    """What was measured, and on what."""
    resolved = {b.name: b.config.get("resolved", {}) for b in backbones}
    return {
        "backbones": [b.name for b in backbones],
        "device": _device(),
        "cores": cores(),
        "images": images,
        "batch_size": batch_size,
        "repeats": repeats,
        "image_sizes": {b.name: b.spec.size for b in backbones},
        "mixed_precision": {name: bool(r.get("mixed_precision")) for name, r in resolved.items()},
        "xla": {name: bool(r.get("xla")) for name, r in resolved.items()},
    }


def _time_pass(dataset, backbones, *, sizes, batch_size, with_pixels: bool) -> dict:
    """One repeat: {stage: (images, wall s, cpu s)}."""
    out = {"decode_per_core": _measure(lambda: _decode_all(dataset(workers=1)))}
    out["decode"] = _measure(lambda: _decode_all(dataset()))
    kept = _keep_batches(dataset())
    batches = -(-out["decode"][0] // batch_size)
    for i, backbone in enumerate(backbones):
        work = [batch[sizes.index(backbone.spec.size)] for batch in kept]
        out[f"backbone {i}"] = _measure(
            lambda b=backbone, w=work: _run_backbone(b, w, batches=batches, batch_size=batch_size)
        )
    out["pipeline"] = _measure(
        lambda: _run_pipeline(dataset(), backbones, sizes=sizes, batch_size=batch_size)
    )
    if with_pixels:
        out["pixels_read"] = _measure(lambda: _decode_all(dataset("pixels")))
        out["pixels_pipeline"] = _measure(
            lambda: _run_pipeline(dataset("pixels"), backbones, sizes=sizes, batch_size=batch_size)
        )
    return out


def _figures(best: dict, backbones: Sequence) -> dict:
    """Rates, the one-pass ratio and the full-set projection from the best timings."""
    decoded = best["decode"][0]
    assert best["pipeline"][0] == best["decode_per_core"][0] == decoded, "the passes saw different images"
    per_backbone = [best[f"backbone {i}"] for i in range(len(backbones))]
    pipeline_s, decode_s = best["pipeline"][1], best["decode"][1]
    pipeline_cpu, decode_cpu = best["pipeline"][2], best["decode"][2]
    names = [b.name for b in backbones]
    minutes = FULL_SET_IMAGES / (decoded / pipeline_s) / 60
    return {
        "decoded": decoded,
        "decode_images_per_s_per_core": decoded / best["decode_per_core"][1],
        "decode_images_per_s": decoded / decode_s,
        "backbone_images_per_s": {n: decoded / t[1] for n, t in zip(names, per_backbone, strict=True)},
        "pipeline_images_per_s": decoded / pipeline_s,
        "ratio": pipeline_s / (decode_s + sum(t[1] for t in per_backbone)),
        "decode_s": decode_s,
        "backbone_s": {n: t[1] for n, t in zip(names, per_backbone, strict=True)},
        "pipeline_s": pipeline_s,
        # CPU seconds of this process: unlike wall time, not inflated by other processes on the machine.
        "decode_cpu_ms_per_image": 1000 * decode_cpu / decoded,
        "backbone_cpu_ms_per_image": {
            n: 1000 * t[2] / decoded for n, t in zip(names, per_backbone, strict=True)
        },
        "pipeline_cpu_ms_per_image": 1000 * pipeline_cpu / decoded,
        "cpu_ratio": pipeline_cpu / (decode_cpu + sum(t[2] for t in per_backbone)),
        "full_set_minutes": minutes,
        "projection": f"full ChestX-ray14 on this machine: {minutes:.1f} min for backbones "
        f"[{', '.join(names)}] in one pass",
    }


def _pixel_figures(best: dict, pixels, backbones: Sequence, *, png_rate: float) -> dict:
    """The same pass reading the pixel cache: its rates, its projection and its speed-up over PNGs."""
    read, piped = best["pixels_read"], best["pixels_pipeline"]
    rate = piped[0] / piped[1]
    minutes = FULL_SET_IMAGES / rate / 60
    return {
        "from_pixels": pixels.name,
        "pixels_image_size": pixels.size,
        "pixels_read_images_per_s": read[0] / read[1],
        "pixels_pipeline_images_per_s": rate,
        "pixels_speedup": rate / png_rate,
        "pixels_full_set_minutes": minutes,
        "pixels_projection": f"full ChestX-ray14 on this machine: {minutes:.1f} min for backbones "
        f"[{', '.join(b.name for b in backbones)}] in one pass from pixel cache {pixels.name}",
    }


def _gap(dataset, backbones: Sequence, *, sizes, batch_size: int) -> dict:
    """How far the pass from the pixel cache (resampled twice) lands from the pass from PNGs (once)."""
    png, stored = (
        _outputs(dataset(source), backbones, sizes=sizes, batch_size=batch_size)
        for source in ("png", "pixels")
    )
    rows = sorted(set(png) & set(stored))
    levels = [
        np.stack([png[r][0][i].astype(np.int16) - stored[r][0][i] for r in rows]) for i in range(len(sizes))
    ]
    relative = []
    for j in range(len(backbones)):
        a, b = (np.stack([out[r][1][j].ravel() for r in rows]).astype(np.float64) for out in (png, stored))
        relative.append(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12))
    names = [b.name for b in backbones]
    return {
        "images": len(rows),
        "gray_levels_mean_abs": {s: float(np.abs(d).mean()) for s, d in zip(sizes, levels, strict=True)},
        "gray_levels_max_abs": {s: int(np.abs(d).max()) for s, d in zip(sizes, levels, strict=True)},
        "feature_relative_l2_median": {n: float(np.median(r)) for n, r in zip(names, relative, strict=True)},
        "feature_relative_l2_max": {n: float(r.max()) for n, r in zip(names, relative, strict=True)},
    }


def _outputs(dataset, backbones, *, sizes, batch_size) -> dict:
    """{row: (pixels per size, output per backbone)} of one pass."""
    out = {}
    for rows, pixels in dataset:
        inputs = [pixels[sizes.index(b.spec.size)] for b in backbones]
        features = embed_all(backbones, inputs, batch_size=batch_size, views=1)
        for i, row in enumerate(rows.numpy()):
            out[int(row)] = ([p[i].numpy() for p in pixels], [f[i] for f in features])
    return out


def _measure(work) -> tuple[int, float, float]:
    """(images `work` returned, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    images = work()
    return images, time.perf_counter() - wall, time.process_time() - cpu


def _decode_all(dataset) -> int:
    return sum(int(rows.shape[0]) for rows, _ in dataset)


def _keep_batches(dataset) -> list:
    """The first few decoded batches, for the backbone-alone passes."""
    return [pixels for _, pixels in dataset.take(KEPT_BATCHES)]


def _embed(backbones, pixels, *, sizes, batch_size) -> None:
    embed_all(
        backbones, [pixels[sizes.index(b.spec.size)] for b in backbones], batch_size=batch_size, views=1
    )


def _run_backbone(backbone, kept: list, *, batches: int, batch_size: int) -> int:
    for i in range(batches):
        embed_all([backbone], [kept[i % len(kept)]], batch_size=batch_size, views=1)
    return batches


def _run_pipeline(dataset, backbones, *, sizes, batch_size: int) -> int:
    done = 0
    for _, pixels in dataset:
        _embed(backbones, pixels, sizes=sizes, batch_size=batch_size)
        done += int(pixels[0].shape[0])
    return done


def _device() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
    return f"CPU ({cores()} cores)"


def format_bench_extract(result: dict) -> str:
    """bench_extract's figures for people, with units; --json gives them all, unrounded."""
    r = result
    sizes = ", ".join(f"{name} {size} px" for name, size in r["image_sizes"].items())
    lines = [
        f"bench extract on {r['device']}: {r['decoded']:,} of {r['images']:,} images decoded, batch "
        f"{r['batch_size']}, best of {r['repeats']} ({sizes})",
        f"  decode + resize      {r['decode_images_per_s']:>9,.1f} images/s on {r['cores']} cores "
        f"({r['decode_images_per_s_per_core']:,.1f} on one), {r['decode_cpu_ms_per_image']:.2f} ms CPU an image",
    ]
    for name, rate in r["backbone_images_per_s"].items():
        flags = [
            flag
            for flag, on in (("mixed precision", r["mixed_precision"][name]), ("XLA", r["xla"][name]))
            if on
        ]
        lines.append(
            f"  {name:<20} {rate:>9,.1f} images/s alone, {r['backbone_cpu_ms_per_image'][name]:.2f} ms CPU an image"
            + (f" ({', '.join(flags)})" if flags else "")
        )
    lines += [
        f"  one pass             {r['pipeline_images_per_s']:>9,.1f} images/s, {duration(r['pipeline_s'])} for the "
        f"{r['decoded']:,} images; {r['pipeline_cpu_ms_per_image']:.2f} ms CPU an image",
        f"  pass / (decode + backbones): {r['ratio']:.2f} wall, {r['cpu_ratio']:.2f} CPU "
        "(about 1: they take turns; below 1: they overlap)",
        f"  {r['projection']}",
    ]
    if "pixels_pipeline_images_per_s" in r:
        gap = r["pixels_vs_png"]
        lines += [
            f"  from pixel cache {r['from_pixels']} ({r['pixels_image_size']} px): "
            f"{r['pixels_pipeline_images_per_s']:,.1f} images/s, {r['pixels_speedup']:.1f}x the PNG pass",
            f"  {r['pixels_projection']}",
            "  features from stored pixels vs PNGs (relative L2, median): "
            + ", ".join(f"{name} {v:.2e}" for name, v in gap["feature_relative_l2_median"].items()),
        ]
    lines.append(f"  peak memory {megabytes(r['peak_memory_mb'])}")
    return "\n".join(lines)


def run_bench_extract(
    config: Config, *, backbones: Sequence[str], images: int, from_pixels: str | None = None
) -> dict:
    """Time decoding, each backbone and the one-pass pipeline on the first `images` images of the index."""
    from extract.inputs import PixelInput

    for name in backbones:
        config.backbone(name)
    names = extract_names(config, limit=images)
    paths = find_images(config.data_dir, names)
    present = np.array([bool(p) and os.path.isfile(p) for p in paths], dtype=bool)
    if not present.any():
        raise InputError(
            f"{config.data_dir}: no image files found to benchmark; point --data-dir at the images, or make a "
            f"synthetic sample in a folder of its own and pass --data-dir {sample_folder(config.data_dir)}"
        ).fixed_by(Fix("make-sample", {"out": str(sample_folder(config.data_dir))}))
    pixels = None
    if from_pixels:
        pixels = PixelInput.open(store.cache_path(config.cache_dir, from_pixels), names=names[present])
    return bench_extract(
        backbones=load_backbones(config, backbones),
        paths=paths[present],
        pixels=pixels,
        batch_size=config.extract.batch_size,
    )
