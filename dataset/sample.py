"""A small synthetic ChestX-ray14 look-alike, in the real layout, so every command runs offline.

The metadata (patients, labels, demographics, splits) and the files are made here; the films
themselves are drawn by dataset.chest.
"""

import ctypes
import functools
import multiprocessing
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr14.caveats import SAMPLE_README, SYNTHETIC_MARKER, SYNTHETIC_NOTICE
from cxr14.errors import InputError
from dataset.chest import Canvas, draw_film
from dataset.settings import LABELS

# Real prevalence in Data_Entry_2017.csv (positives / 112,120 images).
REAL_PREVALENCE = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.052,
    "Nodule": 0.056,
    "Pneumonia": 0.013,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030,
    "Hernia": 0.002,
}
# Rare labels are raised to this so ~1000 images hold enough positives to learn and to score on a test split.
PREVALENCE_FLOOR = 0.08
# Labels that co-occur in the real data share a latent factor (airspace/fluid, nodular, chronic).
CLUSTERS = {
    "Atelectasis": 0,
    "Cardiomegaly": 0,
    "Effusion": 0,
    "Infiltration": 0,
    "Pneumonia": 0,
    "Consolidation": 0,
    "Edema": 0,
    "Mass": 1,
    "Nodule": 1,
    "Emphysema": 2,
    "Fibrosis": 2,
    "Pleural_Thickening": 2,
    "Pneumothorax": 2,
    "Hernia": 3,
}
INVALID_AGES = (148, 149, 150, 151, 152, 153, 154, 155, 411, 412, 413, 414)  # as found in the 2017 CSV
ORIGINAL_SIZES = ((2500, 2048), (2048, 2500), (2992, 2991), (3056, 2544), (2682, 2749), (2021, 2021))
PIXEL_SPACINGS = ("0.143", "0.139", "0.168", "0.171")
CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # as NIH's BBox_List_2017.csv
BROKEN_KINDS = ("empty", "truncated", "not_png", "corrupt")
SPECIAL_SHARE = 0.03  # share of RGBA and of 16-bit files each
# zlib level and strategy of the films: their grain leaves little for string matching to find, so Huffman
# coding alone (level 1) wrote 1024 px films 1.8x faster than level 1's default strategy, and 13% smaller
# (level 1 was itself 2.7x faster than level 6).
PNG_LEVEL = 1
PNG_STRATEGY = zlib.Z_HUFFMAN_ONLY
# Pixels (images x size^2) one worker process is worth: starting one costs ~1 s (numpy, scipy), about 16
# films of 1024 px; a smaller sample is drawn in this process.
PIXELS_PER_WORKER = 16 * 1024**2
MALLOPT_TRIM_THRESHOLD, MALLOPT_MMAP_THRESHOLD = -1, -3  # glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD
LOG_INTERVAL = 10.0  # seconds between the bar's refreshes where standard error is not a terminal


@dataclass(frozen=True)
class _Record:
    name: str
    patient: int
    follow_up: int
    findings: tuple[str, ...]
    age: int
    sex: str
    view: str
    width: int
    height: int
    spacing: str
    file_format: str  # "gray8" | "rgba" | "gray16"


def make_sample(
    out_dir: Path,
    *,
    images: int = 1000,
    size: int = 256,
    seed: int = 0,
    label_names: Sequence[str] = LABELS,
    broken: int = 3,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write `images` synthetic chest films in the ChestX-ray14 layout under `out_dir`; same seed, same bytes.

    Writes Data_Entry_2017.csv (2017 shape: trailing commas, 12 fields), images/*.png (8-bit gray; ~3%
    RGBA, ~3% 16-bit), train_val_list.txt / test_list.txt (by patient, ~80/20), README_SAMPLE.txt and
    SYNTHETIC.txt, the mark every later output reads to say its results are not comparable with published
    ones, and BBox_List_2017.csv (NIH's shape: where each drawn finding is, in the film's pixels).
    Labels follow the real prevalence and co-occurrence, except that every label has at least
    PREVALENCE_FLOOR (8%) positives so that ~1000-2000 images are enough to learn and score each one.
    A few ages are impossible (148, 412, ...) as in the real file. `broken` files (empty, truncated,
    not a PNG, corrupt data) exist on disk but cannot be decoded. Rewrites a sample made earlier in
    `out_dir`, but refuses a folder holding another data set. `workers` processes draw the films (None:
    as many as pay off, up to the CPUs; the bytes do not depend on it); `progress` shows a bar on stderr.
    """
    label_names = tuple(label_names)
    _check_arguments(images=images, size=size, broken=broken, label_names=label_names, workers=workers)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    # A rewrite first removes the old CSV, so a run killed half-way leaves no set that looks complete.
    (out_dir / "Data_Entry_2017.csv").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(
        out_dir / SYNTHETIC_MARKER, f"{SYNTHETIC_NOTICE}\n{_readme(images=images, size=size, seed=seed)}"
    )
    records = _make_records(np.random.default_rng([seed, 0]), images=images, label_names=label_names)
    broken_kind = _choose_broken(np.random.default_rng([seed, 1]), records=records, broken=broken)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [_FilmJob(i, record, broken_kind.get(i)) for i, record in enumerate(records)]
    boxes = _write_films(
        jobs, images_dir=out_dir / "images", size=size, seed=seed, workers=workers, progress=progress
    )
    test_patients = _choose_test_patients(np.random.default_rng([seed, 3]), records)
    _write_lists(out_dir, records, test_patients)
    _write_text(out_dir / SAMPLE_README, _readme(images=images, size=size, seed=seed))
    _write_text(out_dir / "BBox_List_2017.csv", _bbox_text(boxes))
    _write_text(out_dir / "Data_Entry_2017.csv", _csv_text(records))  # last: it marks the set complete
    summary = _summary(out_dir, records, label_names, broken_kind, test_patients, size=size, seed=seed)
    return summary | {"boxes": len(boxes)}


def _check_arguments(
    *, images: int, size: int, broken: int, label_names: tuple[str, ...], workers: int | None
) -> None:
    if images < 1:
        raise InputError(f"make-sample: --images must be at least 1, got {images}")
    if size < 32:
        raise InputError(f"make-sample: --size must be at least 32 pixels, got {size}")
    if not 0 <= broken <= images:
        raise InputError(f"make-sample: broken files must be between 0 and --images ({images}), got {broken}")
    unknown = [name for name in label_names if name not in LABELS]
    if unknown or not label_names:
        raise InputError(f"make-sample: unknown label {unknown[:1]}; choose from {', '.join(LABELS)}")
    if workers is not None and workers < 1:
        raise InputError(f"make-sample: workers must be at least 1, got {workers}")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite a real data set: only a folder made by make_sample (or with no CSV) is written."""
    has_csv = any((out_dir / name).exists() for name in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"))
    if has_csv and not (out_dir / SAMPLE_README).is_file():
        raise InputError(
            f"{out_dir}: holds a metadata CSV that make-sample did not write; choose an empty folder for --out"
        )


# ---------------------------------------------------------------------------------------------- metadata


def _prevalence(label_names: tuple[str, ...]) -> np.ndarray:
    return np.array([max(REAL_PREVALENCE[name], PREVALENCE_FLOOR) for name in label_names])


def _make_records(rng: np.random.Generator, *, images: int, label_names: tuple[str, ...]) -> list[_Record]:
    """Patients with several follow-ups each, their demographics and labels."""
    follow_ups = []
    while sum(follow_ups) < images:
        follow_ups.append(int(min(rng.geometric(0.28), 15)))  # ~3.5 images a patient (real: 3.6)
    follow_ups[-1] -= sum(follow_ups) - images
    patient = np.repeat(np.arange(1, len(follow_ups) + 1), follow_ups)
    follow_up = np.concatenate([np.arange(k) for k in follow_ups])
    sickness = rng.standard_normal(len(follow_ups))[patient - 1]  # shared by a patient's films
    labels = _draw_labels(rng, patient=patient, sickness=sickness, label_names=label_names)
    age = np.clip(rng.normal(47, 17, len(follow_ups)), 1, 95).astype(int)[patient - 1] + follow_up // 4
    impossible = rng.choice(images, size=min(images, images // 500 + 1), replace=False)
    age[impossible] = rng.choice(INVALID_AGES, size=impossible.size)
    sex = np.where(rng.random(len(follow_ups)) < 0.565, "M", "F")[patient - 1]
    # Sicker patients are filmed AP (portable, in bed) more often, as in the real set (~40% AP).
    view = np.where(sickness + rng.normal(0, 1, images) > 0.36, "AP", "PA")
    sizes = rng.integers(len(ORIGINAL_SIZES), size=images)
    spacing = rng.integers(len(PIXEL_SPACINGS), size=images)
    file_format = _choose_formats(rng, images)
    return [
        _Record(
            name=f"{patient[i]:08d}_{follow_up[i]:03d}.png",
            patient=int(patient[i]),
            follow_up=int(follow_up[i]),
            findings=tuple(name for name, on in zip(label_names, labels[i], strict=True) if on),
            age=int(age[i]),
            sex=str(sex[i]),
            view=str(view[i]),
            width=ORIGINAL_SIZES[sizes[i]][0],
            height=ORIGINAL_SIZES[sizes[i]][1],
            spacing=PIXEL_SPACINGS[spacing[i]],
            file_format=str(file_format[i]),
        )
        for i in range(images)
    ]


def _draw_labels(
    rng, *, patient: np.ndarray, sickness: np.ndarray, label_names: tuple[str, ...]
) -> np.ndarray:
    """Multi-hot labels from a latent model: patient sickness + shared cluster factor + per-patient label."""
    n, n_patients = patient.size, int(patient.max())
    cluster = rng.standard_normal((n, 4))[:, [CLUSTERS[name] for name in label_names]]
    persistent = rng.standard_normal((n_patients, len(label_names)))[patient - 1]
    noise = rng.standard_normal((n, len(label_names)))
    latent = 0.4 * sickness[:, None] + 0.45 * cluster + 0.35 * persistent + 0.72 * noise
    # The top round(p * n) latents of each label are its positives: the intended prevalence in every sample.
    positives = np.round(_prevalence(label_names) * n).astype(int)
    ranked = np.sort(latent, axis=0)[::-1]
    threshold = np.where(
        positives > 0, ranked[np.maximum(positives - 1, 0), np.arange(len(label_names))], np.inf
    )
    return (latent >= threshold).astype(np.uint8)


def _choose_formats(rng: np.random.Generator, images: int) -> np.ndarray:
    formats = np.full(images, "gray8", dtype=object)
    special = max(1, round(SPECIAL_SHARE * images)) if images >= 10 else 0
    chosen = rng.choice(images, size=2 * special, replace=False)
    formats[chosen[:special]] = "rgba"
    formats[chosen[special:]] = "gray16"
    return formats


def _choose_broken(rng: np.random.Generator, *, records: list[_Record], broken: int) -> dict[int, str]:
    """Which files to break, and how; 8-bit ones first, so the RGBA and 16-bit files stay readable."""
    plain = [i for i, r in enumerate(records) if r.file_format == "gray8"]
    pool = plain if len(plain) >= broken else list(range(len(records)))
    chosen = sorted(rng.choice(pool, size=broken, replace=False).tolist())
    return {int(i): BROKEN_KINDS[k % len(BROKEN_KINDS)] for k, i in enumerate(chosen)}


def _choose_test_patients(rng: np.random.Generator, records: list[_Record]) -> set[int]:
    patients = np.unique([r.patient for r in records])
    return set(rng.permutation(patients)[: round(0.2 * patients.size)].tolist())


# ------------------------------------------------------------------------------------------------- films


@dataclass(frozen=True)
class _FilmJob:
    index: int  # the record's row: its film's seed
    record: _Record
    broken: str | None  # how to break its file, or None


def _write_films(
    jobs: list[_FilmJob], *, images_dir: Path, size: int, seed: int, workers: int | None, progress: bool
) -> list:
    """Draw and write every job's film, in `workers` processes; the boxes of the readable ones, in order.

    Each film draws from its own seed ([seed, 2, row]), so which process draws it changes no byte.
    """
    workers = _worker_count(workers, images=len(jobs), size=size)
    write = functools.partial(_write_film, images_dir=images_dir, size=size, seed=seed)
    bar = tqdm(
        total=len(jobs),
        unit="img",
        desc=f"make-sample {size} px",
        disable=not progress,
        mininterval=0.1 if sys.stderr.isatty() else LOG_INTERVAL,
    )
    boxes = []
    with bar:
        for film_boxes in _map_in_order(write, jobs, workers=workers):
            boxes += film_boxes
            bar.update()
    return boxes


def _worker_count(workers: int | None, *, images: int, size: int) -> int:
    if workers is not None:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, images * size * size // PIXELS_PER_WORKER))


def _map_in_order(function, jobs: list, *, workers: int) -> Iterator:
    """function over jobs, results in the jobs' order, in this process or in `workers` fresh ones."""
    if workers == 1:
        yield from map(function, jobs)
        return
    # Fresh (spawned) processes: forking one that has loaded TensorFlow, or holds threads, can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_keep_freed_films) as pool:
        yield from pool.map(function, jobs, chunksize=max(1, min(8, len(jobs) // (8 * workers))))


def _keep_freed_films() -> None:
    """In a worker process: freed film-sized arrays stay in the heap for the next film.

    By default glibc maps large arrays afresh and trims freed memory back to the system, so a 1024 px
    film's 4 MB temporaries were faulted in page by page: 24 ms of ~130 ms per film went to the kernel
    (7,500 page faults a film), under 1 ms with these settings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(MALLOPT_TRIM_THRESHOLD, 256 * 1024**2)
    libc.mallopt(MALLOPT_MMAP_THRESHOLD, 64 * 1024**2)


def _write_film(job: _FilmJob, *, images_dir: Path, size: int, seed: int) -> list:
    """Draw one film, write its file (broken if asked); its boxes as (name, label, box), none if broken."""
    record = job.record
    rng = np.random.default_rng([seed, 2, job.index])
    film = draw_film(
        Canvas.make(size), rng, findings=record.findings, view=record.view, patient=record.patient, seed=seed
    )
    data = _png_bytes(_to_file_format(film.image, record.file_format))
    if job.broken:
        data = _break(data, job.broken)
    (images_dir / record.name).write_bytes(data)
    if job.broken:  # a broken file has no film to point at
        return []
    return [(record.name, label, box) for label in record.findings for box in film.boxes[label]]


# ------------------------------------------------------------------------------------------------- files


def _to_file_format(image: np.ndarray, file_format: str) -> np.ndarray:
    if file_format == "gray16":
        return np.round(image * 65535).astype(np.uint16)
    gray = np.round(image * 255).astype(np.uint8)
    if file_format == "rgba":
        return np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    return gray


def _png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of (H, W) uint8/uint16 gray or (H, W, 4) uint8 RGBA; zlib alone, so bytes depend on nothing else."""
    height, width = pixels.shape[:2]
    color_type = 6 if pixels.ndim == 3 else 0
    bit_depth = 16 if pixels.dtype == np.uint16 else 8
    rows = pixels.astype(pixels.dtype.newbyteorder(">")).reshape(height, -1).view(np.uint8)
    # Filter "Up" (2) on every row: the difference to the row above compresses smooth films well.
    up = rows.copy()
    up[1:] -= rows[:-1]
    raw = np.hstack([np.full((height, 1), 2, np.uint8), up]).tobytes()
    header = np.array([width, height], ">u4").tobytes() + bytes([bit_depth, color_type, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", _deflate(raw)) + _chunk(b"IEND", b"")
    )


def _deflate(raw: bytes) -> bytes:
    packer = zlib.compressobj(PNG_LEVEL, zlib.DEFLATED, 15, 8, PNG_STRATEGY)
    return packer.compress(raw) + packer.flush()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")


def _break(png: bytes, kind: str) -> bytes:
    """A file that exists but will not decode, as a bad download or a full disk leaves them."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        return png[: len(png) // 2]
    if kind == "not_png":
        return b"<html><body><h1>404 Not Found</h1></body></html>\n"
    ihdr = png[8 : 8 + 25]  # signature, then the 25-byte IHDR chunk; the pixel data is not zlib
    return png[:8] + ihdr + _chunk(b"IDAT", b"this is not a zlib stream" * 4) + _chunk(b"IEND", b"")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def _csv_text(records: list[_Record]) -> str:
    rows = [
        f"{r.name},{'|'.join(r.findings) or 'No Finding'},{r.follow_up},{r.patient},{r.age},{r.sex},{r.view},"
        f"{r.width},{r.height},{r.spacing},{r.spacing},"
        for r in records
    ]
    return "\n".join([CSV_HEADER, *rows]) + "\n"


def _bbox_text(boxes: list) -> str:
    rows = [f"{name},{label},{x},{y},{w},{h}" for name, label, (x, y, w, h) in boxes]
    return "\n".join([BBOX_HEADER, *rows]) + "\n"


def _write_lists(out_dir: Path, records: list[_Record], test_patients: set[int]) -> None:
    test = [r.name for r in records if r.patient in test_patients]
    train_val = [r.name for r in records if r.patient not in test_patients]
    _write_text(out_dir / "train_val_list.txt", "".join(f"{name}\n" for name in sorted(train_val)))
    _write_text(out_dir / "test_list.txt", "".join(f"{name}\n" for name in sorted(test)))


def _readme(*, images: int, size: int, seed: int) -> str:
    return (
        "Synthetic ChestX-ray14 look-alike written by `python run.py make-sample` "
        f"(images={images}, size={size}, seed={seed}).\n"
        "Not medical data: drawn chests with one drawn finding per label, for offline runs and tests.\n"
        "BBox_List_2017.csv says where each finding was drawn (x, y, w, h in the film's pixels).\n"
        "make-sample rewrites this folder only while this file is here.\n"
    )


def _summary(out_dir, records, label_names, broken_kind, test_patients, *, size: int, seed: int) -> dict:
    positives = {name: sum(name in r.findings for r in records) for name in label_names}
    return {
        "out_dir": str(out_dir),
        "images": len(records),
        "patients": len({r.patient for r in records}),
        "size": size,
        "seed": seed,
        "labels": positives,
        "no_finding": sum(not r.findings for r in records),
        "formats": {f: sum(r.file_format == f for r in records) for f in ("gray8", "rgba", "gray16")},
        "broken": {records[i].name: kind for i, kind in broken_kind.items()},
        "train_val": sum(r.patient not in test_patients for r in records),
        "test": sum(r.patient in test_patients for r in records),
    }


FORMAT_NAMES = {"gray8": "8-bit gray", "gray16": "16-bit gray", "rgba": "RGBA"}


def format_sample_summary(info: dict) -> str:
    """make_sample's summary for people: size, split, findings, file formats and the files broken on purpose."""
    formats = ", ".join(f"{n:,} {FORMAT_NAMES.get(k, k)}" for k, n in info["formats"].items())
    findings = ", ".join(f"{label} {n:,}" for label, n in info["labels"].items())
    lines = [
        f"wrote a sample data set to {info['out_dir']}: {info['images']:,} images of {info['patients']:,} "
        f"patients, {info['size']} px, seed {info['seed']}",
        f"  split lists: {info['train_val']:,} train_val and {info['test']:,} test images",
        f"  images per finding: {findings}; no finding: {info['no_finding']:,}",
        f"  file formats: {formats}",
    ]
    if info["broken"]:
        broken = ", ".join(f"{name} ({kind.replace('_', ' ')})" for name, kind in info["broken"].items())
        lines.append(f"  unreadable on purpose (extraction records and skips them): {broken}")
    return "\n".join(lines)
