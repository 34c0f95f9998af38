"""bench heads: the fc head on a synthetic cache of the full ChestX-ray14 size and the cnn head on synthetic
cached pixels, each against its compute floor.

Each floor is the time of each conv and dense layer's own products in training (forward, and the
gradients taken of it) at its shapes, each timed alone, in turns with the epochs. So each ratio says how
much time goes to anything but the head's own arithmetic. The fc head is also set against its FLOPs at
the rate of its largest forward product (matmul_ratio).
"""

import dataclasses
import math
import os
import resource
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from bench.planted import PROBLEMS, planted_caches, planted_index, write_planted_cache
from cxr14.errors import InputError
from cxr14.text import duration, megabytes
from cxr14.tf_logging import models_built_in_a_loop
from dataset.index import Index
from dataset.settings import LABELS
from experiments.config import Config, with_training
from heads.data import load_head_data
from heads.models import build_head
from heads.settings import HeadConfig, TrainConfig
from heads.train import compile_for_training, train_head, training_setup

BACKBONE = "bench_synthetic"
PIXELS = "bench_pixels"
# The cnn is timed on the demo sample's size (~1,470 training images) at the pixels backbone's 128 px: a
# step does not depend on the row count, and the full set's pixels would be 1.8 GB.
CNN_ROWS = 2000
CNN_SIZE = 128
SIGNAL = 0.02  # per-dimension label signal: linear-probe AUCs near the real data's ~0.75
CHUNK = 8192


def bench_heads(
    *,
    rows: int = 112120,
    dim: int = 2048,
    workdir: Path,
    epochs: int = 5,
    seed: int = 0,
    fc: HeadConfig | None = None,
    cnn: HeadConfig | None = None,
    cnn_rows: int = CNN_ROWS,
    cnn_size: int = CNN_SIZE,
) -> dict:
    """The fc figures (bench_fc) and the cnn figures (bench_cnn, keys prefixed cnn_); `fc` and `cnn` are
    the head presets to time (default: HeadConfig's)."""
    workdir = Path(workdir)
    result = bench_fc(rows=rows, dim=dim, workdir=workdir, epochs=epochs, seed=seed, head=fc)
    cnn_result = bench_cnn(rows=cnn_rows, size=cnn_size, workdir=workdir, epochs=epochs, seed=seed, head=cnn)
    result |= {f"cnn_{key}": value for key, value in cnn_result.items()}
    result["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def bench_fc(
    *, rows: int, dim: int, workdir: Path, epochs: int, seed: int, head: HeadConfig | None = None
) -> dict:
    """Load time, fc epoch time against its compute floor, and a full train-head run (its time counts
    the load, as a run's does)."""
    cache_dir = workdir / "features"
    index, splits = planted_index(rows, seed=seed)
    write_bench_cache(cache_dir, index=index, dim=dim, seed=seed)
    start = time.perf_counter()
    data = load_head_data(
        cache_dir=cache_dir, backbones=[BACKBONE], index=index, splits=splits, metadata=False
    )
    load_s = time.perf_counter() - start
    head = head or HeadConfig(kind="fc")
    train = TrainConfig(seed=seed).sized_for(data.rows("train").size)
    timed = _time_fc_epochs(data, head=head, train=train, dim=dim, epochs=epochs)
    start = time.perf_counter()
    metrics = _bench_train_head(data, run_dir=workdir / "runs" / "bench-fc", head=head, train=train)
    full_s = load_s + time.perf_counter() - start
    return {
        "rows": rows,
        "dim": dim,
        "train_rows": metrics["rows"]["train"],
        "load_s": round(load_s, 3),
        **timed,
        "train_head_s": round(full_s, 1),
        "train_head_epochs": metrics["epochs"],
        "train_head_test_mean_auc": round(metrics["mean_auc"], 4),
        # Scoring after training: test AUCs, the metadata baseline, calibration and operating points.
        "train_head_evaluate_s": metrics["seconds"]["evaluate"],
        "batch_size": train.batch_size,
        "steps_per_execution": train.steps_per_execution,
        "device": _device(),
        "cpu_threads": len(os.sched_getaffinity(0)),
    }


def _time_fc_epochs(data, *, head: HeadConfig, train: TrainConfig, dim: int, epochs: int) -> dict:
    """The fc epoch, timed in turns, against its FLOPs at the rate of its largest forward product."""
    model = _bench_head(data, kind="fc", head=head, seed=train.seed)
    timed = epochs_and_floor(model, data=data, train=train, turns=epochs, repeats=10)
    flops = training_flops(model, data.rows("train").size)
    rate = matmul_flops_per_s(batch=train.batch_size, dim=dim, units=head.units[0])
    return {
        **timed,
        "epochs_timed": epochs,
        # The same FLOPs at the rate of the head's largest forward product: a lower floor, as the
        # gradient products (transposed operands) run slower than the forward one on a CPU.
        "matmul_gflops": round(rate / 1e9, 1),
        "matmul_floor_s": round(flops / rate, 3),
        "matmul_ratio": round(timed["epoch_s"] * rate / flops, 3),
        "train_gflop_per_epoch": round(flops / 1e9, 1),
    }


def _bench_train_head(data, *, run_dir: Path, head: HeadConfig, train: TrainConfig) -> dict:
    """A whole train-head run on the bench's features; its metrics."""
    snapshot = {"bench": True, "labels": list(LABELS), "backbones": [BACKBONE]}
    snapshot |= {"head": dataclasses.asdict(head), "train": dataclasses.asdict(train)}
    run = {"run_dir": run_dir, "data": data, "head": head, "train": train, "label_names": LABELS}
    return train_head(**run, config_snapshot=snapshot, force=True, progress=False)


def write_bench_cache(cache_dir: Path, *, index: Index, dim: int, seed: int) -> Path:
    """Gaussian float16 features with a weak linear label signal, written through the feature store."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((len(LABELS), dim)).astype(np.float32) * SIGNAL
    features = np.empty((len(index), dim), np.float16)
    for start in range(0, len(index), CHUNK):  # chunks keep float32 temporaries small
        stop = min(start + CHUNK, len(index))
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        features[start:stop] = block + index.labels[start:stop] @ directions
    # Never clear cache_dir: with --workdir set to a project, it is that project's real feature cache.
    return write_planted_cache(cache_dir, BACKBONE, index=index, features=features)


def matmul_flops_per_s(*, batch: int, dim: int, units: int, repeats: int = 20) -> float:
    """float32 (batch, dim) x (dim, units) multiply rate, the fc head's dominant product; best of 5."""
    a = tf.random.normal((batch, dim), seed=1)
    b = tf.random.normal((dim, units), seed=2)
    for _ in range(3):
        tf.matmul(a, b)
    best = np.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            product = tf.matmul(a, b)
        product.numpy()  # waits for the last product
        best = min(best, time.perf_counter() - start)
    return repeats * 2.0 * batch * dim * units / best


def training_flops(model: keras.Model, examples: int) -> float:
    """Multiply-add FLOPs of one epoch of Dense and Conv2D layers: forward, weight gradients and input
    gradients (none before the first layer with weights). Elementwise work, pooling, dropout and Adam are
    left out."""
    per_example, weights_before = 0.0, False
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            macs = layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.Conv2D):
            height, width = layer.output.shape[1:3]
            macs = height * width * math.prod(layer.kernel.shape)
        else:
            continue
        per_example += 2.0 * macs * (3 if weights_before else 2)
        weights_before = True
    return per_example * examples


def _bench_head(data, *, kind: str, head: HeadConfig, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    (name,) = data.features
    return build_head(
        kind=kind,
        inputs={name: data.features[name].shape[1:]},
        n_labels=data.labels.shape[1],
        head=head,
        seed=seed,
        byte_dropout=True,  # as train_head trains it
    )


def epochs_and_floor(model: keras.Model, *, data, train: TrainConfig, turns: int, repeats: int) -> dict:
    """A training epoch, trained as train_head trains, against its compute floor: the time of each Dense
    and Conv2D layer's own products in training (layer_products), summed and scaled to the epoch.

    Epochs and floors are measured in turns, `turns` times, after an untimed epoch that traces the step
    function, and the best of each is kept (like timeit: other load only ever adds time), so a burst of
    load from other processes, or the machine's speed drifting, skews neither figure alone. Wall and
    process CPU seconds alike; the ratios say how much time goes to anything but the layers' arithmetic.
    """
    rows = data.rows("train")
    fit_model, batches = training_setup(model, data=data, rows=rows, train=train)
    compile_for_training(fit_model, train=train, labels_train=data.labels[rows])
    products = layer_products(model, batch=train.batch_size)
    fit_model.fit(batches, epochs=1, shuffle=False, verbose=0)
    turns = max(1, turns)
    epoch, floor = np.full((2, turns), np.inf), np.full((2, turns), np.inf)  # rows: wall, CPU seconds
    with models_built_in_a_loop():  # one product function per layer, from the same code
        for turn in range(turns):
            start, start_cpu = time.perf_counter(), time.process_time()
            fit_model.fit(batches, epochs=1, shuffle=False, verbose=0)
            epoch[:, turn] = time.perf_counter() - start, time.process_time() - start_cpu
            times = [_best_wall_and_cpu(step, x, repeats=repeats, tries=2) for step, x in products]
            floor[:, turn] = np.sum(times, axis=0)
    # The floor is of a full step; the epoch's last step is short, so the epoch counts its examples.
    (epoch_s, epoch_cpu), (floor_s, floor_cpu) = (
        epoch.min(axis=1),
        floor.min(axis=1) * rows.size / train.batch_size,
    )
    return {
        "epoch_s": round(epoch_s, 3),
        "floor_s": round(floor_s, 3),
        "ratio": round(epoch_s / floor_s, 3),
        # CPU seconds of this process: unlike wall time, not inflated by other processes on the machine.
        "epoch_cpu_s": round(epoch_cpu, 3),
        "floor_cpu_s": round(floor_cpu, 3),
        "cpu_ratio": round(epoch_cpu / floor_cpu, 3),
    }


def bench_cnn(
    *, rows: int, size: int, workdir: Path, epochs: int, seed: int, head: HeadConfig | None = None
) -> dict:
    """The cnn head's training epoch on synthetic size x size pixels against its compute floor.

    Epochs and floors are measured in turns, `epochs` times, and the best of each is kept: a burst of
    load from other processes then skews neither figure alone.
    """
    cache_dir = Path(workdir) / "features"
    index, splits = planted_index(rows, seed=seed)
    write_synthetic_pixels(cache_dir, index=index, size=size, seed=seed)
    data = load_head_data(cache_dir=cache_dir, backbones=[PIXELS], index=index, splits=splits, metadata=False)
    head = head or HeadConfig(kind="cnn")
    rows_train = data.rows("train")
    train = TrainConfig(seed=seed).sized_for(rows_train.size)
    model = _bench_head(data, kind="cnn", head=head, seed=seed)
    timed = epochs_and_floor(model, data=data, train=train, turns=epochs, repeats=2)
    steps = math.ceil(rows_train.size / train.batch_size)
    epoch_s = timed["epoch_s"]
    return {
        "rows": rows,
        "train_rows": int(rows_train.size),
        "size": size,
        "filters": list(head.filters),
        "units": list(head.units),
        "batch_size": train.batch_size,
        "steps_per_epoch": steps,
        "step_s": round(epoch_s / steps, 4),
        **timed,
        "train_gflop_per_epoch": round(training_flops(model, rows_train.size) / 1e9, 1),
    }


def write_synthetic_pixels(cache_dir: Path, *, index: Index, size: int, seed: int) -> Path:
    """Random uint8 size x size images as a pixels cache; timing a step needs no signal in them."""
    pixels = np.random.default_rng(seed).integers(0, 256, (len(index), size, size), dtype=np.uint8)
    return write_planted_cache(cache_dir, PIXELS, index=index, features=pixels, kind="pixels")


def layer_products(model: keras.Model, *, batch: int) -> list[tuple]:
    """(step, input batch) per Conv2D and Dense layer: the layer's own product in training (forward,
    weight gradient, and input gradient where a layer with weights comes before it) as a tf.function.

    Their times summed are a training step's compute floor; activations, pooling, dropout and Adam are
    left out.
    """
    products, weights_before = [], False
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            continue
        x = tf.random.normal((batch, *layer.input.shape[1:]), seed=1)
        kernel = tf.Variable(tf.convert_to_tensor(layer.kernel))
        conv = isinstance(layer, keras.layers.Conv2D)
        products.append((_product_step(conv=conv, kernel=kernel, input_grad=weights_before), x))
        weights_before = True
    return products


def _product_step(*, conv: bool, kernel: tf.Variable, input_grad: bool):
    """A tf.function: a layer's product and the gradients training takes of it, for an input batch.

    The result needs the forward product as well as every gradient: the gradients alone do not need it
    (the output gradient fixed, a product's gradients depend on its input only), so TensorFlow would
    prune it and the floor would leave out a third of the arithmetic.
    """

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME") if conv else tf.matmul(x, kernel)
        sources = [kernel, x] if input_grad else [kernel]
        grads = tape.gradient(y, sources, output_gradients=tf.ones_like(y))
        # One scalar that needs every gradient and the product (one element of it: no extra pass).
        return tf.add_n([tf.reduce_sum(g) for g in grads]) + tf.reshape(y, [-1])[0]

    return step


def _best_wall_and_cpu(fn, x, *, repeats: int, tries: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of fn(x), each the best of `tries` runs of `repeats` calls."""
    fn(x).numpy()  # traces on the first use, warms caches after
    wall, cpu = np.inf, np.inf
    for _ in range(tries):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            out = fn(x)
        out.numpy()
        wall = min(wall, (time.perf_counter() - start) / repeats)
        cpu = min(cpu, (time.process_time() - start_cpu) / repeats)
    return wall, cpu


def _device() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else "CPU"


# (problem, head kind, caches, with metadata): what `bench heads --quality` trains.
QUALITY_RUNS = (
    ("linear", "linear", ("A",), False),
    ("linear", "fc", ("A",), False),
    ("nonlinear", "fc", ("A",), False),
    ("complementary", "fc", ("A",), False),
    ("complementary", "fc", ("B",), False),
    ("complementary", "ensemble", ("A", "B"), False),
    ("metadata", "fc", ("A",), True),
    ("local", "linear", ("A",), False),
    ("local", "fc", ("A",), False),
    ("local", "attention", ("M",), False),
    ("local", "attentive", ("M",), False),
)


def with_heads(heads, *, runs=QUALITY_RUNS) -> tuple:
    """The quality runs, then each of `heads` (one's own, FILE.py:FUNCTION) on every problem's caches
    the built-in heads meet: beside fc on one cache, beside the ensemble on two."""
    cases = list(dict.fromkeys((problem, caches, metadata) for problem, _, caches, metadata in runs))
    return tuple(runs) + tuple((p, head, caches, m) for head in heads for p, caches, m in cases)


def only_problems(runs: tuple, problems) -> tuple:
    """The runs on `problems` (names of PROBLEMS; empty: all of them), so one problem can be rerun alone."""
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown:
        raise InputError(f"--problems: unknown planted problem {unknown[0]!r}; valid: {', '.join(PROBLEMS)}")
    return tuple(r for r in runs if not problems or r[0] in problems)


def bench_quality(
    *, config: Config, rows: int = 112120, dim: int = 2048, workdir: Path, seed: int = 0, runs=QUALITY_RUNS
) -> dict:
    """Each head with the config's settings on planted problems (`seed` draws them): its test mean AUC,
    the ridge probe's on the same rows and features, the difference with its paired interval, its time."""
    results, made = [], {}
    for problem, kind, caches, metadata in runs:
        if problem not in made:
            made[problem] = _planted_problem(
                problem, rows=rows, dim=dim, seed=seed, cache_dir=Path(workdir) / problem
            )
        index, splits = made[problem]
        settings = with_training(config, kind=kind, metadata=metadata)
        results.append(
            _quality_run(
                problem, kind, caches, config=settings, index=index, splits=splits, workdir=Path(workdir)
            )
        )
    return {"rows": rows, "dim": dim, "seed": seed, "runs": results}


def _planted_problem(problem: str, *, rows: int, dim: int, seed: int, cache_dir: Path):
    index, splits = planted_index(rows, seed=seed, metadata_signal=problem == "metadata")
    for name, features in planted_caches(problem, index=index, dim=dim, seed=seed).items():
        write_planted_cache(cache_dir, name, index=index, features=features)
    return index, splits


def _quality_run(problem, kind, caches, *, config: Config, index, splits, workdir: Path) -> dict:
    metadata = config.train.metadata
    head = config.head(kind)
    start = time.perf_counter()
    data = load_head_data(
        cache_dir=workdir / problem, backbones=list(caches), index=index, splits=splits, metadata=metadata
    )
    metrics = train_head(
        run_dir=workdir / "runs" / f"{problem}-{head.kind}-{'+'.join(caches)}",
        data=data,
        head=head,
        train=config.train,
        label_names=LABELS,
        config_snapshot={"bench": "quality", "labels": list(LABELS)},
        force=True,
        progress=False,
    )
    reference = metrics["reference"]
    return {
        "problem": problem,
        "head": head.kind,
        "caches": "+".join(caches) + ("+metadata" if metadata else ""),
        "test_mean_auc": round(metrics["mean_auc"], 4),
        "reference_mean_auc": round(reference["mean_auc"], 4),
        "difference": round(reference["difference"], 4),
        "difference_ci": [None if v is None else round(v, 4) for v in reference["difference_ci"]],
        "best_epoch": metrics["best_epoch"],
        "kept_probe": metrics["kept_probe"],
        "directions": reference["directions"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_quality(result: dict) -> str:
    """bench heads --quality as a table for people."""
    lines = [
        f"planted problems: {result['rows']:,} rows, {result['dim']}-d features (B: {result['dim'] // 2}-d), seed {result['seed']}",
        f"{'problem':<14} {'head':<9} {'caches':<12} {'test AUC':>8} {'probe':>7} {'head - probe [95% CI]':>26} {'time':>7}  kept the probe",
    ]
    for r in result["runs"]:
        low, high = r["difference_ci"]
        interval = "" if low is None else f" [{low:+.3f}, {high:+.3f}]"
        lines.append(
            f"{r['problem']:<14} {r['head']:<9} {r['caches']:<12} {r['test_mean_auc']:>8.3f} "
            f"{r['reference_mean_auc']:>7.3f} {r['difference']:>+10.3f}{interval:>16} {r['seconds']:>6.0f}s"
            f"  {'yes' if r.get('kept_probe') else 'no'}"
        )
    return "\n".join(lines)


def format_bench_heads(result: dict) -> str:
    """bench_heads' figures for people, with units; --json gives them all, unrounded where they are."""
    r = result
    return "\n".join(
        [
            f"bench heads on {r['device']} ({r['cpu_threads']} threads)",
            f"  fc cache         {r['rows']:,} rows x {r['dim']:,} float16, {r['train_rows']:,} for training; "
            f"loaded in {duration(r['load_s'])}",
            f"  fc epoch         {duration(r['epoch_s'])}, batch {r['batch_size']:,}; floor {duration(r['floor_s'])} "
            f"({r['train_gflop_per_epoch']:,.0f} GFLOP): {r['ratio']:.2f}x the floor, {r['cpu_ratio']:.2f}x in CPU "
            f"time; {r['matmul_ratio']:.2f}x the FLOPs at the forward product's {r['matmul_gflops']:,.0f} GFLOP/s",
            f"  fc train-head    {duration(r['train_head_s'])} for {r['train_head_epochs']} epochs, "
            f"test mean AUC {r['train_head_test_mean_auc']:.3f}",
            f"  cnn pixels       {r['cnn_rows']:,} images of {r['cnn_size']} px, {r['cnn_train_rows']:,} for "
            f"training; filters {r['cnn_filters']}, units {r['cnn_units']}",
            f"  cnn epoch        {duration(r['cnn_epoch_s'])} ({r['cnn_steps_per_epoch']} steps of "
            f"{r['cnn_batch_size']}, {r['cnn_step_s'] * 1000:,.0f} ms a step); floor {duration(r['cnn_floor_s'])} "
            f"({r['cnn_train_gflop_per_epoch']:,.0f} GFLOP): {r['cnn_ratio']:.2f}x the floor, "
            f"{r['cnn_cpu_ratio']:.2f}x in CPU time",
            f"  peak memory      {megabytes(r['peak_memory_mb'])}",
        ]
    )
