"""`bench extract`: decoding alone, the backbone alone, and the whole pipeline, on the same images."""

import os
import resource
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import tensorflow as tf

from cxr14.errors import InputError
from extract.extraction import pad_batch
from extract.pipeline import make_dataset

KEPT_BATCHES = 8  # the backbone-alone pass cycles over these, so memory does not grow with `images`


def bench_extract(*, backbone, paths: Sequence[str], batch_size: int, images: int, repeats: int = 3) -> dict:
    """Time decode+preprocess, backbone on in-memory batches, and both together; JSON-ready figures.

    ratio = pipeline time per image / (decode time per image + backbone time per image): below 1
    when decoding overlaps the backbone, about 1 when they run one after the other. Each figure is
    the best of `repeats` interleaved passes, so a burst of load from other processes skews none of them.
    """
    paths = [str(p) for p in list(paths)[:images]]
    if not paths or batch_size < 1:
        raise InputError(
            f"bench extract needs images and a positive batch size, got {len(paths)} and {batch_size}"
        )
    for path in paths:  # warm the OS file cache, so the first timed pass is not the only one reading disk
        if os.path.isfile(path):
            Path(path).read_bytes()

    def dataset():
        return make_dataset(
            paths, np.arange(len(paths)), spec=backbone.spec, batch_size=batch_size, shards=[(0, len(paths))]
        )

    first = next(iter(dataset()), None)
    if first is None:
        raise InputError(
            f"bench extract: none of the {len(paths)} images could be decoded (first: {paths[0]})"
        )
    backbone.fn(pad_batch(first[1], batch_size)).numpy()  # trace once, outside every timing

    wall, cpu = {"decode": [], "backbone": [], "pipeline": []}, {"decode": [], "backbone": [], "pipeline": []}
    for _ in range(max(1, repeats)):
        (decoded, kept), *spent = _measure(partial(_decode_all, dataset(), batch_size=batch_size))
        _record(wall, cpu, "decode", spent)
        _, *spent = _measure(partial(_run_backbone, backbone, kept, batches=-(-decoded // batch_size)))
        _record(wall, cpu, "backbone", spent)
        piped, *spent = _measure(partial(_run_pipeline, dataset(), backbone, batch_size=batch_size))
        _record(wall, cpu, "pipeline", spent)
        assert piped == decoded, (piped, decoded)  # both passes must see the same images
    decode_s, backbone_s, pipeline_s = (min(wall[k]) for k in ("decode", "backbone", "pipeline"))
    decode_cpu, backbone_cpu, pipeline_cpu = (min(cpu[k]) for k in ("decode", "backbone", "pipeline"))

    return {
        "backbone": backbone.name,
        "device": _device(),
        "images": len(paths),
        "decoded": decoded,
        "batch_size": batch_size,
        "repeats": max(1, repeats),
        "image_size": backbone.spec.size,
        "mixed_precision": bool(backbone.config.get("resolved", {}).get("mixed_precision", False)),
        "xla": bool(backbone.config.get("resolved", {}).get("xla", False)),
        "decode_images_per_s": decoded / decode_s,
        "backbone_images_per_s": decoded / backbone_s,
        "pipeline_images_per_s": decoded / pipeline_s,
        "ratio": pipeline_s / (decode_s + backbone_s),
        "decode_s": decode_s,
        "backbone_s": backbone_s,
        "pipeline_s": pipeline_s,
        # CPU seconds of this process: unlike wall time, not inflated by other processes on the machine.
        "decode_cpu_ms_per_image": 1000 * decode_cpu / decoded,
        "backbone_cpu_ms_per_image": 1000 * backbone_cpu / decoded,
        "pipeline_cpu_ms_per_image": 1000 * pipeline_cpu / decoded,
        "cpu_ratio": pipeline_cpu / (decode_cpu + backbone_cpu),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def _measure(work) -> tuple:
    """(result, wall seconds, process CPU seconds) of calling `work`."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _record(wall: dict, cpu: dict, key: str, spent: list) -> None:
    wall[key].append(spent[0])
    cpu[key].append(spent[1])


def _decode_all(dataset, *, batch_size: int) -> tuple[int, list]:
    kept, decoded = [], 0
    for _, images in dataset:
        decoded += int(images.shape[0])
        if len(kept) < KEPT_BATCHES:
            kept.append(pad_batch(images, batch_size))
    return decoded, kept


def _run_backbone(backbone, kept: list, *, batches: int) -> None:
    for i in range(batches):
        backbone.fn(kept[i % len(kept)]).numpy()


def _run_pipeline(dataset, backbone, *, batch_size: int) -> int:
    done = 0
    for _, images in dataset:
        backbone.fn(pad_batch(images, batch_size)).numpy()
        done += int(images.shape[0])
    return done


def _device() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({cores} cores)"
