"""A small synthetic ChestX-ray14 look-alike, in the real layout, so every command runs offline.

Images are drawn in normalised coordinates (x, y in [-1, 1], y down, patient's right on the image left as
on a PA film); brighter means denser. A chest (body, lungs under domed diaphragms, mediastinum, heart,
spine, ribs, clavicles, vessel markings, noise) gets one visible finding per positive label.
"""

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.config import LABELS
from extract.errors import InputError

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
BROKEN_KINDS = ("empty", "truncated", "not_png", "corrupt")
SPECIAL_SHARE = 0.03  # share of RGBA and of 16-bit files each
COARSE = 16  # grid points across a film for smooth noise


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
) -> dict:
    """Write `images` synthetic chest films in the ChestX-ray14 layout under `out_dir`; same seed, same bytes.

    Writes Data_Entry_2017.csv (2017 shape: trailing commas, 12 fields), images/*.png (8-bit gray; ~3%
    RGBA, ~3% 16-bit), train_val_list.txt / test_list.txt (by patient, ~80/20) and README_SAMPLE.txt.
    Labels follow the real prevalence and co-occurrence, except that every label has at least
    PREVALENCE_FLOOR (8%) positives so that ~1000-2000 images are enough to learn and score each one.
    A few ages are impossible (148, 412, ...) as in the real file. `broken` files (empty, truncated,
    not a PNG, corrupt data) exist on disk but cannot be decoded. Rewrites a sample made earlier in
    `out_dir`, but refuses a folder holding another data set.
    """
    label_names = tuple(label_names)
    _check_arguments(images=images, size=size, broken=broken, label_names=label_names)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    # A rewrite first removes the old CSV, so a run killed half-way leaves no set that looks complete.
    (out_dir / "Data_Entry_2017.csv").unlink(missing_ok=True)
    records = _make_records(np.random.default_rng([seed, 0]), images=images, label_names=label_names)
    broken_kind = _choose_broken(np.random.default_rng([seed, 1]), records=records, broken=broken)
    canvas = _Canvas.make(size)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        rng = np.random.default_rng([seed, 2, i])
        image = _draw_chest(
            canvas, rng, findings=record.findings, view=record.view, patient=record.patient, seed=seed
        )
        data = _png_bytes(_to_file_format(image, record.file_format))
        if i in broken_kind:
            data = _break(data, broken_kind[i])
        (out_dir / "images" / record.name).write_bytes(data)
    test_patients = _choose_test_patients(np.random.default_rng([seed, 3]), records)
    _write_lists(out_dir, records, test_patients)
    _write_text(out_dir / "README_SAMPLE.txt", _readme(images=images, size=size, seed=seed))
    _write_text(out_dir / "Data_Entry_2017.csv", _csv_text(records))  # last: it marks the set complete
    return _summary(out_dir, records, label_names, broken_kind, test_patients, size=size, seed=seed)


def _check_arguments(*, images: int, size: int, broken: int, label_names: tuple[str, ...]) -> None:
    if images < 1:
        raise InputError(f"make-sample: --images must be at least 1, got {images}")
    if size < 32:
        raise InputError(f"make-sample: --size must be at least 32 pixels, got {size}")
    if not 0 <= broken <= images:
        raise InputError(f"make-sample: broken files must be between 0 and --images ({images}), got {broken}")
    unknown = [name for name in label_names if name not in LABELS]
    if unknown or not label_names:
        raise InputError(f"make-sample: unknown label {unknown[:1]}; choose from {', '.join(LABELS)}")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite a real data set: only a folder made by make_sample (or with no CSV) is written."""
    has_csv = any((out_dir / name).exists() for name in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"))
    if has_csv and not (out_dir / "README_SAMPLE.txt").is_file():
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


# ----------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True, eq=False)
class _Canvas:
    """Pixel-centre coordinates of a size x size film and what smooth-noise upsampling needs."""

    size: int
    x: np.ndarray  # (S, S) float32 in [-1, 1], left to right
    y: np.ndarray  # (S, S) float32 in [-1, 1], top to bottom
    pixel: float  # one pixel in normalised units
    cell: np.ndarray  # (S,) int: the coarse-grid cell left of / above each pixel
    weight: np.ndarray  # (S,) float32: bilinear weight of the next grid point

    @classmethod
    def make(cls, size: int) -> "_Canvas":
        axis = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
        position = (axis + 1) / 2 * (COARSE - 1)
        cell = np.minimum(position.astype(int), COARSE - 2)
        x, y = np.meshgrid(axis, axis)
        return cls(
            size=size, x=x, y=y, pixel=2 / size, cell=cell, weight=(position - cell).astype(np.float32)
        )

    def smooth_noise(self, rng: np.random.Generator) -> np.ndarray:
        """Low-frequency noise, unit scale, for mottled textures and uneven exposure."""
        # Bilinear upsampling by indexing: BLAS matmuls were slower here on a busy machine.
        grid = rng.standard_normal((COARSE, COARSE)).astype(np.float32)
        w = self.weight
        rows = grid[self.cell] * (1 - w[:, None]) + grid[self.cell + 1] * w[:, None]
        return rows[:, self.cell] * (1 - w) + rows[:, self.cell + 1] * w


@dataclass(frozen=True)
class _Chest:
    """One film's anatomy in normalised coordinates; side -1 is the patient's right (image left)."""

    width: float  # half-width of the thorax
    lung_cx: float  # |x| of each lung centre
    lung_cy: float
    lung_ax: float
    lung_ay: float  # the ellipse reaches below the diaphragm, which cuts it off
    dome: tuple[float, float]  # y of the costophrenic angles, right and left
    dome_rise: float  # how far the diaphragm domes up between the angles
    lung_depth: float  # how much darker aerated lung is than soft tissue
    heart_scale: float
    heart_cx: float
    heart_cy: float
    tissue: float
    rib_period: float
    clavicle_y: float

    @property
    def apex(self) -> float:
        return self.lung_cy - self.lung_ay

    def base(self, side: int) -> float:
        """y of the top of one dome."""
        return self.dome[(side + 1) // 2] - self.dome_rise


def _patient_chest(rng: np.random.Generator, view: str) -> _Chest:
    width = rng.uniform(0.8, 0.88)
    ap = view == "AP"
    return _Chest(
        width=width,
        lung_cx=0.46 * width,
        lung_cy=rng.uniform(0.02, 0.06),
        lung_ax=0.38 * width,
        lung_ay=rng.uniform(0.76, 0.8),
        dome=(rng.uniform(0.5, 0.54), rng.uniform(0.54, 0.58)),  # the right dome sits higher
        dome_rise=rng.uniform(0.1, 0.14),
        lung_depth=rng.uniform(0.34, 0.4),
        heart_scale=rng.uniform(0.94, 1.04) * (1.05 if ap else 1.0),  # AP films magnify the heart
        heart_cx=rng.uniform(0.07, 0.1),
        heart_cy=rng.uniform(0.3, 0.34),
        tissue=rng.uniform(0.56, 0.62),
        rib_period=rng.uniform(0.17, 0.2),
        clavicle_y=rng.uniform(-0.8, -0.76) if ap else rng.uniform(-0.7, -0.66),
    )


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (distance > 0), 0 outside, with a linear ramp `edge` wide."""
    return np.clip(distance / edge + 0.5, 0.0, 1.0)


def _ellipse(c: _Canvas, cx: float, cy: float, ax: float, ay: float, *, edge: float = 0.0) -> np.ndarray:
    r = np.sqrt(((c.x - cx) / ax) ** 2 + ((c.y - cy) / ay) ** 2)
    return _soft((1 - r) * min(ax, ay), max(edge, 1.5 * c.pixel))


def _lung_masks(c: _Canvas, chest: _Chest) -> dict[int, np.ndarray]:
    masks = {}
    for side in (-1, 1):
        cx = side * chest.lung_cx
        inside = _ellipse(c, cx, chest.lung_cy, chest.lung_ax, chest.lung_ay, edge=0.03)
        u = np.clip((c.x - cx) / chest.lung_ax, -1, 1)
        below_dome = chest.base(side) + chest.dome_rise * u**2 - c.y
        masks[side] = inside * _soft(below_dome, 0.03) * _soft(side * c.x - 0.08, 0.03)
    return masks


def _draw_chest(
    canvas: _Canvas, rng: np.random.Generator, *, findings: Sequence[str], view: str, patient: int, seed: int
) -> np.ndarray:
    """One film as float32 (S, S) in [0, 1]: the patient's anatomy plus the findings, noise and exposure."""
    chest = _patient_chest(np.random.default_rng([seed, 4, patient]), view)
    chest = _reshape_for_findings(chest, findings)
    # Separate streams: the same film with or without a finding differs only by that finding.
    anatomy_rng, finding_rng, noise_rng = rng.spawn(3)
    lungs = _lung_masks(canvas, chest)
    image = _draw_anatomy(canvas, anatomy_rng, chest, lungs, findings=findings)
    # Lung findings show where the lung is not hidden behind the heart.
    lungs = {side: mask * (1 - _heart(canvas, chest)) for side, mask in lungs.items()}
    for name in findings:
        FINDINGS[name](canvas, finding_rng, image, chest, lungs)
    noise = canvas.smooth_noise(noise_rng) * 0.015
    image += noise + noise_rng.standard_normal(image.shape, dtype=np.float32) * 0.012
    gain, offset, gamma = (
        noise_rng.uniform(0.92, 1.08),
        noise_rng.uniform(-0.03, 0.03),
        noise_rng.uniform(0.9, 1.1),
    )
    return np.clip(np.clip(image * gain + offset, 0, 1) ** gamma, 0, 1)


def _reshape_for_findings(chest: _Chest, findings: Sequence[str]) -> _Chest:
    """Findings that change the anatomy itself: heart size, lung volume and darkness."""
    changes = {}
    if "Cardiomegaly" in findings:
        changes["heart_scale"] = chest.heart_scale * 1.4
    if "Emphysema" in findings:  # hyperinflated, hyperlucent, flattened diaphragm
        changes.update(dome_rise=0.03, lung_depth=chest.lung_depth + 0.12, lung_ax=chest.lung_ax * 1.06)
        changes["dome"] = (chest.dome[0] + 0.08, chest.dome[1] + 0.08)
    if "Fibrosis" in findings:  # volume loss
        changes["dome"] = (chest.dome[0] - 0.06, chest.dome[1] - 0.06)
    return _Chest(**{**chest.__dict__, **changes})


def _draw_anatomy(c: _Canvas, rng, chest: _Chest, lungs: dict, *, findings: Sequence[str]) -> np.ndarray:
    # A superellipse body: shoulders fill the top corners, the abdomen the bottom.
    body = _soft(1 - (np.abs(c.x / (chest.width + 0.14)) ** 3 + np.abs((c.y - 0.1) / 1.15) ** 3), 0.1)
    image = 0.04 + (chest.tissue - 0.04) * body
    thorax = _soft(max(chest.dome) + 0.05 - c.y, 0.1) * body
    ribs = np.cos(2 * np.pi * (c.y - 0.3 * np.abs(c.x) + 0.5 * c.x**2) / chest.rib_period)
    image += 0.05 * _soft(ribs - 0.5, 0.3) * thorax
    lung = lungs[-1] + lungs[1]
    image -= chest.lung_depth * lung
    # Vessel markings fan out from the hila; emphysema prunes them.
    markings = 0.03 if "Emphysema" in findings else 0.09
    texture = 1 + 0.8 * c.smooth_noise(rng)
    for side in (-1, 1):
        hilum = np.sqrt((c.x - side * 0.2) ** 2 + (c.y + 0.02) ** 2)
        image += markings * lungs[side] * np.exp(-hilum / 0.35) * texture
    for side in (-1, 1):  # clavicles, rising laterally
        lateral = side * c.x
        line = c.y - chest.clavicle_y + 0.15 * (lateral - 0.12)
        image += (
            0.1 * _soft(0.028 - np.abs(line), 0.02) * _soft(lateral - 0.1, 0.04) * _soft(0.72 - lateral, 0.05)
        )
    heart = _heart(c, chest)
    mediastinum = _soft(0.11 - np.abs(c.x - 0.01), 0.04) * (c.y > -0.8)
    image = np.maximum(image, chest.tissue * np.maximum(heart, mediastinum))
    vertebrae = 1 + 0.3 * np.cos(2 * np.pi * c.y / 0.12)
    image += 0.08 * _soft(0.05 - np.abs(c.x), 0.02) * vertebrae * body
    bubble = _ellipse(c, chest.lung_cx, chest.dome[1] + 0.05, 0.08, 0.045)  # gastric air under the left dome
    return (image - 0.2 * bubble).astype(np.float32)


def _heart(c: _Canvas, chest: _Chest) -> np.ndarray:
    height = 0.21 * (0.7 + 0.3 * chest.heart_scale)
    return _ellipse(c, chest.heart_cx, chest.heart_cy, 0.29 * chest.heart_scale, height, edge=0.03)


def _lung_point(rng, chest: _Chest, side: int, *, t=(0.1, 0.9), u=(-0.7, 0.7)) -> tuple[float, float]:
    """A point in one lung: t runs from apex (0) to dome (1), u from medial (-1) to lateral (+1) edge."""
    y = chest.apex + rng.uniform(*t) * (chest.base(side) - chest.apex)
    half_width = chest.lung_ax * np.sqrt(max(0.0, 1 - ((y - chest.lung_cy) / chest.lung_ay) ** 2))
    half_width = min(half_width, chest.lung_cx - 0.1)  # stay clear of the mediastinum
    return side * (chest.lung_cx + rng.uniform(*u) * half_width), y


def _sides(rng, both: float) -> tuple[int, ...]:
    """One lung, or both with probability `both`."""
    return (-1, 1) if rng.random() < both else (int(rng.choice((-1, 1))),)


def _blob(c: _Canvas, cx: float, cy: float, radius: float, *, edge: float) -> np.ndarray:
    return _ellipse(c, cx, cy, radius, radius, edge=edge)


# Each finding adds its sign to `image` in place; the lung masks keep lung findings inside the lungs.


def _effusion(c, rng, image, chest, lungs):
    """Fluid filling the base, blunting the costophrenic angle, with a meniscus up the lateral wall."""
    for side in _sides(rng, both=0.4):
        level = chest.base(side) - rng.uniform(0.18, 0.32)
        lateral = np.clip(side * (c.x - side * chest.lung_cx) / chest.lung_ax, 0, 1)
        fluid = _soft(c.y - level + 0.14 * lateral**2, 0.06)
        image += 0.36 * fluid * lungs[side]


def _atelectasis(c, rng, image, chest, lungs):
    """Plate-like bands and denser, smaller lower zones."""
    for side in _sides(rng, both=0.25):
        for _ in range(rng.integers(2, 4)):
            cx, cy = _lung_point(rng, chest, side, t=(0.55, 0.85), u=(-0.3, 0.3))
            tilt = rng.uniform(-0.25, 0.25)
            band = _soft(0.025 - np.abs(c.y - cy - tilt * (c.x - cx)), 0.02) * _soft(
                0.2 - np.abs(c.x - cx), 0.05
            )
            image += 0.3 * band * lungs[side]
        image += 0.1 * lungs[side] * _soft(c.y - chest.lung_cy - 0.1, 0.3)


def _infiltration(c, rng, image, chest, lungs):
    """Ill-defined, mottled hazy patches in the mid and lower zones."""
    mottle = np.clip(1 + 0.6 * c.smooth_noise(rng), 0, 2)
    for side in _sides(rng, both=0.5):
        for _ in range(rng.integers(3, 6)):
            cx, cy = _lung_point(rng, chest, side, t=(0.35, 0.85))
            sigma = rng.uniform(0.07, 0.11)
            image += (
                0.14 * np.exp(-((c.x - cx) ** 2 + (c.y - cy) ** 2) / (2 * sigma**2)) * mottle * lungs[side]
            )


def _mass(c, rng, image, chest, lungs):
    """One (sometimes two) large, lobulated round opacity."""
    for _ in range(1 if rng.random() < 0.85 else 2):
        side = int(rng.choice((-1, 1)))
        cx, cy = _lung_point(rng, chest, side, t=(0.2, 0.7), u=(-0.4, 0.4))
        radius = rng.uniform(0.09, 0.14)
        lobe = _blob(
            c,
            cx + rng.uniform(-0.6, 0.6) * radius,
            cy + rng.uniform(-0.6, 0.6) * radius,
            radius * 0.6,
            edge=0.02,
        )
        image += (
            0.36 * np.minimum(_blob(c, cx, cy, radius, edge=0.02) + lobe, 1) * _soft(lungs[side] - 0.3, 0.3)
        )


def _nodule(c, rng, image, chest, lungs):
    """Several small, well-defined round opacities."""
    for _ in range(rng.integers(3, 7)):
        side = int(rng.choice((-1, 1)))
        cx, cy = _lung_point(rng, chest, side, t=(0.1, 0.85))
        image += 0.4 * _blob(c, cx, cy, rng.uniform(0.03, 0.05), edge=0.01) * lungs[side]


def _pneumonia(c, rng, image, chest, lungs):
    """Dense patchy lower-lobe opacity with dark air bronchograms."""
    side = int(rng.choice((-1, 1)))
    cx, cy = _lung_point(rng, chest, side, t=(0.6, 0.8), u=(-0.2, 0.3))
    patch = _ellipse(c, cx, cy, rng.uniform(0.16, 0.22), rng.uniform(0.16, 0.22), edge=0.1)
    patch *= 1 + 0.3 * c.smooth_noise(rng)
    angle = rng.uniform(0, np.pi)
    across = np.cos(angle) * (c.x - cx) + np.sin(angle) * (c.y - cy)
    air = _soft(0.2 - np.abs(np.sin(across * 45.0)), 0.2)
    image += (0.38 - 0.18 * air) * patch * lungs[side]


def _pneumothorax(c, rng, image, chest, lungs):
    """Collapsed lung: a dark rim without markings at the apex and lateral wall, edged by the pleural line."""
    side = int(rng.choice((-1, 1)))
    shrink = rng.uniform(0.72, 0.82)
    ax, ay = chest.lung_ax * shrink, chest.lung_ay * shrink
    cx, cy = side * chest.lung_cx - side * (chest.lung_ax - ax), chest.lung_cy + (chest.lung_ay - ay)
    r = np.sqrt(((c.x - cx) / ax) ** 2 + ((c.y - cy) / ay) ** 2)
    upper = _soft(chest.lung_cy + 0.25 - c.y, 0.1) * lungs[side]
    air = _soft(r - 1, 0.02) * upper
    image -= air * (image - 0.07)  # darker than lung, and no markings
    image += 0.22 * _soft(0.012 - np.abs(r - 1) * ax, 0.01) * upper  # the visceral pleural line


def _consolidation(c, rng, image, chest, lungs):
    """Homogeneous dense upper-zone lobar opacity with a sharp lower border at the fissure."""
    side = int(rng.choice((-1, 1)))
    fissure = chest.apex + rng.uniform(0.45, 0.6) * (chest.base(side) - chest.apex)
    lobe = _soft(fissure - c.y, 0.01) * _soft(side * c.x - chest.lung_cx * 0.7, 0.15)
    image += 0.38 * lobe * lungs[side]


def _edema(c, rng, image, chest, lungs):
    """Bilateral perihilar (bat-wing) haze plus Kerley B lines at the lateral bases."""
    for side in (-1, 1):
        hilum = ((c.x - side * 0.25) / 0.24) ** 2 + ((c.y + 0.02) / 0.32) ** 2
        image += 0.24 * np.exp(-hilum) * lungs[side]
        for _ in range(rng.integers(4, 8)):
            y0 = chest.base(side) - rng.uniform(0.0, 0.25)
            x0 = side * (chest.lung_cx + chest.lung_ax * rng.uniform(0.5, 0.8))
            line = _soft(0.008 - np.abs(c.y - y0), 0.008) * _soft(0.05 - np.abs(c.x - x0), 0.01)
            image += 0.25 * line * lungs[side]


def _emphysema(c, rng, image, chest, lungs):
    """Besides the hyperinflation drawn in the anatomy: dark bullae at the apices."""
    for side in _sides(rng, both=0.6):
        cx, cy = _lung_point(rng, chest, side, t=(0.1, 0.3), u=(-0.3, 0.4))
        image -= 0.1 * _blob(c, cx, cy, rng.uniform(0.07, 0.11), edge=0.01) * lungs[side]


def _fibrosis(c, rng, image, chest, lungs):
    """Coarse reticular network in the lower, peripheral lung."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.045, 0.06)
    a = (np.cos(angle) * c.x + np.sin(angle) * c.y) / period
    b = (np.cos(angle) * c.y - np.sin(angle) * c.x) / period
    net = np.maximum(_soft(0.3 - np.abs(np.cos(np.pi * a)), 0.3), _soft(0.3 - np.abs(np.cos(np.pi * b)), 0.3))
    peripheral = _soft(np.abs(c.x) - chest.lung_cx * 0.8, 0.15) * _soft(c.y - chest.lung_cy + 0.1, 0.25)
    image += 0.22 * net * peripheral * (lungs[-1] + lungs[1])


def _pleural_thickening(c, rng, image, chest, lungs):
    """A smooth dense band along the lateral chest wall and apex (apical cap)."""
    for side in _sides(rng, both=0.4):
        cx = side * chest.lung_cx
        r = np.sqrt(((c.x - cx) / chest.lung_ax) ** 2 + ((c.y - chest.lung_cy) / chest.lung_ay) ** 2)
        band = _soft(r - (1 - rng.uniform(0.12, 0.18)), 0.04) * _soft(side * (c.x - cx) + 0.1, 0.1)
        image += 0.34 * band * lungs[side] * _soft(chest.lung_cy + 0.3 - c.y, 0.1)


def _hernia(c, rng, image, chest, lungs):
    """Hiatal hernia: a round retrocardiac bulge above the diaphragm with an air-fluid level."""
    cx = rng.uniform(-0.02, 0.08)
    cy = chest.heart_cy + rng.uniform(0.0, 0.06)
    radius = rng.uniform(0.12, 0.16)
    sac = _blob(c, cx, cy, radius, edge=0.015)
    gas = sac * _soft(cy - 0.2 * radius - c.y, 0.01)
    rim = _soft(0.015 - np.abs(np.sqrt((c.x - cx) ** 2 + (c.y - cy) ** 2) - radius), 0.01)
    image += 0.18 * rim - 0.4 * gas + 0.08 * (sac - gas)


def _cardiomegaly(c, rng, image, chest, lungs):
    """Drawn as the heart's size in the anatomy."""


FINDINGS = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


# ------------------------------------------------------------------------------------------------- files


def _to_file_format(image: np.ndarray, file_format: str) -> np.ndarray:
    gray = np.round(image * 255).astype(np.uint8)
    if file_format == "gray16":
        return np.round(image * 65535).astype(np.uint16)
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
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


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
