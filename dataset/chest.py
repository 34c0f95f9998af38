"""Synthetic chest films for make-sample: a drawn chest plus one visible sign per positive label.

Drawn in normalised coordinates (x, y in [-1, 1], y down, patient's right on the image left as on a
PA film); brighter means denser. The chest has a body, lungs under domed diaphragms, mediastinum,
heart, spine, ribs, clavicles, vessel markings and noise.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

COARSE = 16  # grid points across a film for smooth noise
# A finding's boxes cover where it visibly changes the film (by >= BOX_LEVEL of the [0, 1] range, after a
# blur of BOX_BLUR x the film's size that joins stripes and bands), one box per connected part of at
# least BOX_MIN_PART of the largest part (drops fringes, keeps every nodule).
BOX_LEVEL = 0.05
BOX_BLUR = 0.01
BOX_MIN_PART = 0.1
PATCH_REACH = 5.5  # sigmas around an infiltration patch: 0.28 exp(-5.5^2 / 2) < 1e-7
BOX_TRUNCATE = 4.0  # the blur's kernel reaches this many sigmas (scipy's default)


@dataclass(frozen=True, eq=False)
class Canvas:
    """Pixel-centre coordinates of a size x size film and what smooth-noise upsampling needs."""

    size: int
    # One row and one column, not (S, S) grids: an expression in x alone or y alone costs S, not S^2, and
    # broadcasting gives each pixel the same value a full grid would.
    x: np.ndarray  # (1, S) float32 in [-1, 1], left to right
    y: np.ndarray  # (S, 1) float32 in [-1, 1], top to bottom
    pixel: float  # one pixel in normalised units
    cell: np.ndarray  # (S,) int: the coarse-grid cell left of / above each pixel
    weight: np.ndarray  # (S,) float32: bilinear weight of the next grid point
    # The film's pixels this canvas covers (all of them, or a crop's): x, y and every array drawn on it
    # are these rows and columns of the whole film's.
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))

    @classmethod
    def make(cls, size: int) -> "Canvas":
        axis = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
        position = (axis + 1) / 2 * (COARSE - 1)
        cell = np.minimum(position.astype(int), COARSE - 2)
        return cls(
            size=size,
            x=axis[None, :],
            y=axis[:, None],
            pixel=2 / size,
            cell=cell,
            weight=(position - cell).astype(np.float32),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.x.shape[1]

    def crop(self, rows: slice, cols: slice) -> "Canvas":
        """The film's pixels in rows x cols (slices of this whole-film canvas), at the same coordinates:
        what is drawn on the crop is what the whole canvas would draw there."""
        x_rows = rows if self.x.shape[0] > 1 else slice(None)  # a full grid (tests) is cropped both ways
        y_cols = cols if self.y.shape[1] > 1 else slice(None)
        return dataclasses.replace(self, x=self.x[x_rows, cols], y=self.y[rows, y_cols], rows=rows, cols=cols)

    def smooth_noise(self, rng: np.random.Generator) -> np.ndarray:
        """Low-frequency noise, unit scale, for mottled textures and uneven exposure."""
        # Bilinear upsampling by indexing: BLAS matmuls were slower here on a busy machine.
        grid = rng.standard_normal((COARSE, COARSE)).astype(np.float32)
        row_cell, row_w = self.cell[self.rows], self.weight[self.rows]
        col_cell, col_w = self.cell[self.cols], self.weight[self.cols]
        rows = grid[row_cell] * (1 - row_w[:, None]) + grid[row_cell + 1] * row_w[:, None]
        return rows[:, col_cell] * (1 - col_w) + rows[:, col_cell + 1] * col_w


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
    ramp = distance / edge
    ramp += 0.5  # in place: a film is drawn with some 25 of these, and each temporary costs as much as a step
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def _ellipse(c: Canvas, cx: float, cy: float, ax: float, ay: float, *, edge: float = 0.0) -> np.ndarray:
    edge = max(edge, 1.5 * c.pixel)
    # Only the bounding window is computed: most ellipses cover a small part of the film.
    rows, cols = _ellipse_window(c, cx, cy, ax, ay, edge=edge)
    out = np.zeros(c.shape, np.float32)
    x, y = c.x[:1, cols], c.y[rows, :1]
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    out[rows, cols] = _soft((1 - r) * min(ax, ay), edge)
    return out


def _ellipse_window(c: Canvas, cx: float, cy: float, ax: float, ay: float, *, edge: float) -> tuple:
    """(rows, cols): the slices outside which _ellipse's ramp is exactly 0."""
    edge = max(edge, 1.5 * c.pixel)
    # The ramp reaches 0 at r = 1 + edge / (2 min(ax, ay)); the window holds that and a pixel more.
    reach = 1 + edge / (2 * min(ax, ay))
    return _window(c.y[:, 0], cy, ay * reach + c.pixel), _window(c.x[0], cx, ax * reach + c.pixel)


def _window(axis: np.ndarray, centre: float, half: float) -> slice:
    """The pixels of a sorted axis within `half` of `centre`."""
    return slice(
        int(np.searchsorted(axis, centre - half)), int(np.searchsorted(axis, centre + half, "right"))
    )


def _lung_masks(c: Canvas, chest: _Chest) -> dict[int, np.ndarray]:
    masks = {}
    for side, (rows, cols) in _lung_windows(c, chest).items():
        cx = side * chest.lung_cx
        inside = _ellipse(c, cx, chest.lung_cy, chest.lung_ax, chest.lung_ay, edge=0.03)
        x, y = c.x[:1, cols], c.y[rows, :1]  # outside the ellipse's window the mask is 0 whatever the dome
        u = np.clip((x - cx) / chest.lung_ax, -1, 1)
        below_dome = chest.base(side) + chest.dome_rise * u**2 - y
        inside[rows, cols] *= _soft(below_dome, 0.03) * _soft(side * x - 0.08, 0.03)
        masks[side] = inside
    return masks


def _lung_windows(c: Canvas, chest: _Chest) -> dict[int, tuple[slice, slice]]:
    """Per side, the (rows, cols) outside which that lung's mask is exactly 0."""
    return {
        side: _ellipse_window(c, side * chest.lung_cx, chest.lung_cy, chest.lung_ax, chest.lung_ay, edge=0.03)
        for side in (-1, 1)
    }


Box = tuple[int, int, int, int]  # x, y, width, height in pixels, as in NIH's BBox_List_2017.csv


@dataclass(frozen=True)
class Film:
    """A drawn film and where each finding was drawn: one box per connected part of its sign."""

    image: np.ndarray  # (S, S) float32 in [0, 1]
    boxes: dict[str, list[Box]]


def draw_chest(
    canvas: Canvas, rng: np.random.Generator, *, findings: Sequence[str], view: str, patient: int, seed: int
) -> np.ndarray:
    """One film as float32 (S, S) in [0, 1]: the patient's anatomy plus the findings, noise and exposure."""
    return draw_film(canvas, rng, findings=findings, view=view, patient=patient, seed=seed).image


def draw_film(
    canvas: Canvas, rng: np.random.Generator, *, findings: Sequence[str], view: str, patient: int, seed: int
) -> Film:
    """draw_chest's film together with the boxes of its findings (the same pixels either way)."""
    chest = _patient_chest(np.random.default_rng([seed, 4, patient]), view)
    chest = _reshape_for_findings(chest, findings)
    # Separate streams: the same film with or without a finding differs only by that finding.
    anatomy_rng, finding_rng, noise_rng = rng.spawn(3)
    lungs = _lung_masks(canvas, chest)
    heart = _heart(canvas, chest)
    image = _draw_anatomy(canvas, anatomy_rng, chest, lungs, heart=heart, findings=findings)
    # Lung findings show where the lung is not hidden behind the heart.
    lungs = {side: mask * (1 - heart) for side, mask in lungs.items()}
    boxes = {
        name: _draw_finding(name, canvas, finding_rng, image, chest, lungs, heart=heart) for name in findings
    }
    noise = canvas.smooth_noise(noise_rng) * 0.015
    image += noise + noise_rng.standard_normal(image.shape, dtype=np.float32) * 0.012
    gain, offset, gamma = (
        noise_rng.uniform(0.92, 1.08),
        noise_rng.uniform(-0.03, 0.03),
        noise_rng.uniform(0.9, 1.1),
    )
    return Film(image=np.clip(np.clip(image * gain + offset, 0, 1) ** gamma, 0, 1), boxes=boxes)


def change_boxes(change: np.ndarray, *, film_size: int | None = None) -> list[Box]:
    """Boxes (x, y, w, h) around the connected parts of a visible change to a film, largest first.

    `change` is the whole film, or a crop of a film of `film_size` pixels that holds all of the change and
    the blur's reach around it (or ends at the film's edge); the boxes are in the crop's pixels.
    """
    top, left, window = _changed_window(change, film_size=film_size or change.shape[0])
    if window is None:
        return []
    sigma = BOX_BLUR * (film_size or change.shape[0])
    size = ndimage.gaussian_filter(np.abs(window), sigma, truncate=BOX_TRUNCATE)
    parts, count = ndimage.label(size >= BOX_LEVEL)
    if count == 0:
        return []
    areas = np.bincount(parts.ravel(), minlength=count + 1)[1:]
    extents = ndimage.find_objects(parts)
    boxes = []
    for k in np.argsort(-areas, kind="stable"):
        if areas[k] < BOX_MIN_PART * areas.max():
            break
        rows, cols = extents[k]
        boxes.append(
            (
                int(left + cols.start),
                int(top + rows.start),
                int(cols.stop - cols.start),
                int(rows.stop - rows.start),
            )
        )
    return boxes


def _changed_window(change: np.ndarray, *, film_size: int) -> tuple[int, int, np.ndarray | None]:
    """The part of `change` the blur can reach from its nonzero pixels: (top, left, window), window None
    where nothing changed. Most signs touch a small part of the film, and outside the window both the
    change and its blur are exactly zero, so blurring the window alone gives the same boxes, sooner."""
    rows, cols = np.flatnonzero(change.any(axis=1)), np.flatnonzero(change.any(axis=0))
    if rows.size == 0:
        return 0, 0, None
    # The blur reaches int(truncate * sigma + 0.5) pixels; a margin that wide holds only zeros, so the
    # window's mirrored edges add nothing the whole film's zeros would not.
    reach = _blur_reach(film_size)
    top, left = max(int(rows[0]) - reach, 0), max(int(cols[0]) - reach, 0)
    return top, left, change[top : int(rows[-1]) + reach + 1, left : int(cols[-1]) + reach + 1]


def _blur_reach(film_size: int) -> int:
    """Pixels the boxes' blur reaches on a film of `film_size`."""
    return int(BOX_TRUNCATE * BOX_BLUR * film_size + 0.5)


def _draw_finding(name: str, c: Canvas, rng, image: np.ndarray, chest: _Chest, lungs: dict, *, heart) -> list:
    """Add one finding's sign to `image` in place; its boxes."""
    if name == "Cardiomegaly":  # drawn as the heart's size in the anatomy: its place is the heart itself
        return change_boxes(heart)
    if name not in OUTSIDE_LUNGS:  # the rest is drawn on the lungs' crop (~60% of the film), same pixels
        rows, cols = _lung_crop(c, chest)
        c, image, lungs = c.crop(rows, cols), image[rows, cols], {s: m[rows, cols] for s, m in lungs.items()}
    before = image.copy()
    FINDINGS[name](c, rng, image, chest, lungs)
    top, left = c.rows.start or 0, c.cols.start or 0
    return [(x + left, y + top, w, h) for x, y, w, h in change_boxes(image - before, film_size=c.size)]


def _lung_crop(c: Canvas, chest: _Chest) -> tuple[slice, slice]:
    """Both lungs' windows and the boxes' blur reach around them: outside, every lung finding is exactly 0
    (each is masked by a lung), and the margin keeps their boxes' blur as far from the crop's edges as on
    the whole film."""
    (rows, left), (_, right) = _lung_windows(c, chest).values()  # the two lungs share their rows
    reach = _blur_reach(c.size)
    return (
        slice(max(rows.start - reach, 0), min(rows.stop + reach, c.size)),
        slice(max(left.start - reach, 0), min(right.stop + reach, c.size)),
    )


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


def _draw_anatomy(
    c: Canvas, rng, chest: _Chest, lungs: dict, *, heart: np.ndarray, findings: Sequence[str]
) -> np.ndarray:
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
    # Markings and clavicles are drawn only in the windows where they are nonzero (~1/4 and ~1/20 of the
    # film): the same pixels, and the anatomy took ~40% less time at 1024 px.
    for side, (rows, cols) in _lung_windows(c, chest).items():
        hilum = np.sqrt((c.x[:1, cols] - side * 0.2) ** 2 + (c.y[rows, :1] + 0.02) ** 2)
        image[rows, cols] += markings * lungs[side][rows, cols] * np.exp(-hilum / 0.35) * texture[rows, cols]
    for side in (-1, 1):  # clavicles, rising laterally
        rows, cols = _clavicle_window(c, chest, side)
        lateral = side * c.x[:1, cols]
        line = c.y[rows, :1] - chest.clavicle_y + 0.15 * (lateral - 0.12)
        image[rows, cols] += (
            0.1 * _soft(0.028 - np.abs(line), 0.02) * _soft(lateral - 0.1, 0.04) * _soft(0.72 - lateral, 0.05)
        )
    # Heart and mediastinum hide what lies behind them; each is taken only over its window (where |x - 0.01|
    # < 0.13 for the mediastinum): max(image, t h, t m) is max(image, t max(h, m)) to the last bit.
    rows, cols = _heart_window(c, chest)
    np.maximum(image[rows, cols], chest.tissue * heart[rows, cols], out=image[rows, cols])
    cols = _window(c.x[0], 0.01, 0.13 + c.pixel)
    mediastinum = _soft(0.11 - np.abs(c.x[:1, cols] - 0.01), 0.04) * (c.y[:, :1] > -0.8)
    np.maximum(image[:, cols], chest.tissue * mediastinum, out=image[:, cols])
    vertebrae = 1 + 0.3 * np.cos(2 * np.pi * c.y / 0.12)
    image += 0.08 * _soft(0.05 - np.abs(c.x), 0.02) * vertebrae * body
    bubble = _ellipse(c, chest.lung_cx, chest.dome[1] + 0.05, 0.08, 0.045)  # gastric air under the left dome
    return (image - 0.2 * bubble).astype(np.float32)


def _clavicle_window(c: Canvas, chest: _Chest, side: int) -> tuple[slice, slice]:
    """(rows, cols) outside which one clavicle is exactly 0: where 0.08 < lateral < 0.745 (its two side
    ramps) and |line| < 0.038 (its own), with line's lateral term between -0.006 and 0.094 there."""
    rows = _window(c.y[:, 0], chest.clavicle_y - 0.044, 0.088 + c.pixel)
    return rows, _window(c.x[0], side * 0.4125, 0.3325 + c.pixel)


def _heart(c: Canvas, chest: _Chest) -> np.ndarray:
    return _ellipse(c, *_heart_ellipse(chest), edge=0.03)


def _heart_window(c: Canvas, chest: _Chest) -> tuple[slice, slice]:
    return _ellipse_window(c, *_heart_ellipse(chest), edge=0.03)


def _heart_ellipse(chest: _Chest) -> tuple[float, float, float, float]:
    """The heart's centre and half-axes."""
    return chest.heart_cx, chest.heart_cy, 0.29 * chest.heart_scale, 0.21 * (0.7 + 0.3 * chest.heart_scale)


def _lung_point(rng, chest: _Chest, side: int, *, t=(0.1, 0.9), u=(-0.7, 0.7)) -> tuple[float, float]:
    """A point in one lung: t runs from apex (0) to dome (1), u from medial (-1) to lateral (+1) edge."""
    y = chest.apex + rng.uniform(*t) * (chest.base(side) - chest.apex)
    half_width = chest.lung_ax * np.sqrt(max(0.0, 1 - ((y - chest.lung_cy) / chest.lung_ay) ** 2))
    half_width = min(half_width, chest.lung_cx - 0.1)  # stay clear of the mediastinum
    return side * (chest.lung_cx + rng.uniform(*u) * half_width), y


def _sides(rng, both: float) -> tuple[int, ...]:
    """One lung, or both with probability `both`."""
    return (-1, 1) if rng.random() < both else (int(rng.choice((-1, 1))),)


def _blob(c: Canvas, cx: float, cy: float, radius: float, *, edge: float) -> np.ndarray:
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
            # Each patch is drawn within PATCH_REACH sigmas, beyond which it adds under 1e-7 (a 255th is
            # 4e-3): a quarter of the film or less, not all of it.
            rows, cols = (
                _window(c.y[:, 0], cy, PATCH_REACH * sigma),
                _window(c.x[0], cx, PATCH_REACH * sigma),
            )
            x, y = c.x[:1, cols], c.y[rows, :1]
            patch = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
            image[rows, cols] += 0.14 * patch * mottle[rows, cols] * lungs[side][rows, cols]


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


OUTSIDE_LUNGS = ("Hernia",)  # drawn on the whole film; every other finding only within the lungs
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
