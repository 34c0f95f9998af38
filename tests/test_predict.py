"""inference/predict.py: new PNGs through the run's backbone(s) and head, errors per file."""

import csv
import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import run
from cache.store import cache_path, read_features
from cxr14.errors import InputError
from dataset.image_loader import load_image
from dataset.settings import LABELS
from extract.backbones import load_backbone
from extract.extraction import extract_features
from extract.inputs import PngInput
from extract.settings import BackboneConfig, ExtractConfig
from inference.predict import format_predictions, list_images, predict_images
from inference.trained import as_cached, cached_features, load_run
from tests.fixtures import PIXELS, REAL_CXR, TINY, TINY_STD, add_decisions, make_config, make_run, write_png


def expected_probabilities(run_dir: Path, path: Path, backbones: list[BackboneConfig]) -> np.ndarray:
    """Computed by hand: pipeline image -> backbone -> numpy rounding as the cache does -> head."""
    head = keras.saving.load_model(run_dir / "model.keras", compile=False)
    dtypes = json.loads((run_dir / "config.json").read_text())["feature_dtypes"]
    features = {}
    for cfg in backbones:
        backbone = load_backbone(cfg)
        out = np.asarray(backbone.fn(load_image(path, backbone.spec)[None])).astype(np.float32)
        if dtypes[cfg.name] == "uint8":
            out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        else:
            out = out.astype(dtypes[cfg.name])
        features[cfg.name] = out.astype(np.float32)
    # As the model was built: a dict of named inputs, or (one backbone, built without a dict) one tensor.
    inputs = features if isinstance(head.input, dict) else next(iter(features.values()))
    return np.asarray(head(inputs, training=False))[0]


@pytest.fixture(scope="module")
def fc_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "fc-tiny", [TINY])


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [
        write_png(folder / "a.png", seed=0),
        write_png(folder / "b.png", seed=1, bits=16),
        write_png(folder / "c.png", seed=2, channels=4, size=50),
    ]


def _probs(result: dict) -> np.ndarray:
    return np.array([result["probabilities"][label] for label in LABELS])


@pytest.mark.skipif(not REAL_CXR.is_dir(), reason="../shared/real-cxr not beside the clone")
def test_real_xrays_give_14_probabilities_and_json_parses(fc_run, tmp_path):
    paths = sorted(REAL_CXR.glob("*.png"))
    assert len(paths) == 2
    results = predict_images(run_dir=fc_run, inputs=paths, extract=make_config(tmp_path).extract)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for r in results:
        assert r["error"] is None
        assert list(r["probabilities"]) == list(LABELS)
        assert all(0.0 <= p <= 1.0 for p in r["probabilities"].values())
    assert np.abs(_probs(results[0]) - _probs(results[1])).max() > 1e-3  # two different X-rays
    parsed = json.loads(format_predictions(results, fmt="json"))
    assert [p["image"] for p in parsed] == [str(p) for p in paths]
    np.testing.assert_allclose(_probs(parsed[0]), _probs(results[0]))


def test_matches_hand_computation_with_float16_rounding(fc_run, images, tmp_path):
    results = predict_images(run_dir=fc_run, inputs=images, extract=make_config(tmp_path).extract)
    for path, r in zip(images, results, strict=True):
        np.testing.assert_allclose(_probs(r), expected_probabilities(fc_run, path, [TINY]), atol=1e-6)


def test_broken_files_are_reported_and_the_rest_answered(fc_run, images, tmp_path):
    good = images[0].read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    inputs = [truncated, images[0], garbage, empty, missing, images[1]]
    results = predict_images(
        run_dir=fc_run, inputs=inputs, extract=make_config(tmp_path, batch_size=2).extract
    )
    assert [r["image"] for r in results] == [str(p) for p in inputs]
    errors = [r["error"] for r in results]
    assert errors[1] is None and errors[5] is None
    assert (
        "IEND" in errors[0] and "not a PNG" in errors[2] and "empty" in errors[3] and "not found" in errors[4]
    )
    assert all(str(p) in e for p, e in zip(inputs, errors, strict=True) if e)
    alone = predict_images(
        run_dir=fc_run, inputs=[images[0], images[1]], extract=make_config(tmp_path).extract
    )
    np.testing.assert_allclose(_probs(results[1]), _probs(alone[0]), atol=1e-6)
    np.testing.assert_allclose(_probs(results[5]), _probs(alone[1]), atol=1e-6)


def test_batches_do_not_change_results(fc_run, images, tmp_path):
    one = predict_images(run_dir=fc_run, inputs=images, extract=make_config(tmp_path, batch_size=1).extract)
    many = predict_images(run_dir=fc_run, inputs=images, extract=make_config(tmp_path, batch_size=64).extract)
    np.testing.assert_allclose([_probs(r) for r in one], [_probs(r) for r in many], atol=1e-6)


def test_folders_expand_to_sorted_pngs(images, tmp_path):
    folder = images[0].parent
    (folder / "notes.txt").write_text("not an image")
    (folder / "more").mkdir()
    paths, left_out = list_images([folder, images[1]])
    assert paths == sorted(images) + [images[1]]
    assert left_out == [
        (folder / "more", "left out: a folder (only the files directly inside a named folder are read)"),
        (folder / "notes.txt", "left out: not a .png or .dcm file"),
    ]
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(InputError, match="no .png or .dcm files"):
        list_images([empty])


def test_ensemble_and_pixels_runs(tmp_path, images):
    ensemble = make_run(tmp_path / "ensemble", [TINY, TINY_STD], dtype="float32")
    pixels = make_run(tmp_path / "cnn", [PIXELS])
    config = make_config(tmp_path)
    for run_dir, backbones in ((ensemble, [TINY, TINY_STD]), (pixels, [PIXELS])):
        results = predict_images(run_dir=run_dir, inputs=images[:2], extract=config.extract)
        for path, r in zip(images[:2], results, strict=True):
            np.testing.assert_allclose(_probs(r), expected_probabilities(run_dir, path, backbones), atol=1e-6)


@pytest.mark.parametrize("backbones", [[TINY], [TINY, TINY_STD], [PIXELS]], ids=["fc", "ensemble", "cnn"])
def test_heads_built_by_heads_models(tmp_path, images, backbones):
    run_dir = make_run(tmp_path / "run", backbones, project_head=True)
    results = predict_images(run_dir=run_dir, inputs=images[:2], extract=make_config(tmp_path).extract)
    for path, r in zip(images[:2], results, strict=True):
        np.testing.assert_allclose(_probs(r), expected_probabilities(run_dir, path, backbones), atol=1e-6)


def test_backbone_order_follows_the_model_inputs(tmp_path, images):
    run_dir = make_run(tmp_path / "ensemble", [TINY, TINY_STD])
    plan = json.loads((run_dir / "config.json").read_text())
    plan["backbones"] = dict(reversed(plan["backbones"].items()))
    (run_dir / "config.json").write_text(json.dumps(plan))
    result = predict_images(run_dir=run_dir, inputs=images[:1], extract=make_config(tmp_path).extract)[0]
    np.testing.assert_allclose(
        _probs(result), expected_probabilities(run_dir, images[0], [TINY, TINY_STD]), atol=1e-6
    )


def test_features_equal_the_extracted_cache(tmp_path, images):
    """Prediction sees an image exactly as extraction stored it: same pipeline, same rounding."""
    run_dir = make_run(tmp_path / "ensemble", [TINY, PIXELS])
    run = load_run(run_dir)
    names = [p.name for p in images]
    for name, backbone in run.backbones.items():
        extract_features(
            backbones=[backbone],
            names=names,
            images=PngInput([str(p) for p in images]),
            cache_dir=tmp_path / "features",
            batch_size=2,
            shard_size=2,
            dtype="float16",
            progress=False,
        )
        stored = read_features(cache_path(tmp_path / "features", name), names=names).features
        for path, row in zip(images, stored, strict=True):
            got = cached_features(run, {k: load_image(path, b.spec)[None] for k, b in run.backbones.items()})
            np.testing.assert_array_equal(got[name].numpy()[0], row.astype(np.float32))


def test_as_cached_rounds_like_numpy():
    values = np.array([[0.1, 1 / 3, 1234.5678, -2.5, 255.7, 0.5, 1.5, 300.0]], dtype=np.float32)
    f16 = as_cached(tf.constant(values), "float16").numpy()
    np.testing.assert_array_equal(f16, values.astype(np.float16).astype(np.float32))
    assert not np.array_equal(f16, values)
    u8 = as_cached(tf.constant(values), "uint8").numpy()
    np.testing.assert_array_equal(u8, np.clip(np.rint(values), 0, 255))
    np.testing.assert_array_equal(as_cached(tf.constant(values), "float32").numpy(), values)


def test_metadata_run_is_refused(tmp_path, images):
    run_dir = make_run(tmp_path / "meta", [TINY], metadata=True)
    with pytest.raises(InputError, match="metadata"):
        predict_images(run_dir=run_dir, inputs=images, extract=make_config(tmp_path).extract)


def test_inconsistent_run_folders_are_refused(tmp_path, fc_run):
    with pytest.raises(InputError, match="not a run folder"):
        load_run(tmp_path)
    other = make_run(tmp_path / "other", [TINY])
    plan = json.loads((other / "config.json").read_text())
    plan["backbones"] = {"renamed": plan["backbones"]["tiny"]}
    plan["feature_dtypes"] = {"renamed": "float16"}
    (other / "config.json").write_text(json.dumps(plan))
    with pytest.raises(InputError, match="takes inputs"):
        load_run(other)
    (other / "model.keras").unlink()
    with pytest.raises(InputError, match="no model.keras"):
        load_run(other)


def test_output_formats(fc_run, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    results = predict_images(run_dir=fc_run, inputs=[*images, broken], extract=make_config(tmp_path).extract)
    table = format_predictions(results, fmt="table").splitlines()
    assert table[0].split()[0] == "image" and table[0].split()[1:] == list(LABELS)
    assert len(table) == 1 + 4 + 1
    assert table[1].split()[1] == f"{results[0]['probabilities'][LABELS[0]]:.3f}"
    assert "error:" in table[4] and "3 images predicted, 1 could not be read" in table[5]
    out = tmp_path / "predictions.csv"
    note = format_predictions(results, fmt="table", csv_path=out)
    assert str(out) in note
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", *LABELS, *(f"{label} call" for label in LABELS), "error"]
    assert float(rows[2][LABELS[3]]) == pytest.approx(results[2]["probabilities"][LABELS[3]])
    assert rows[3]["error"] and rows[3][LABELS[0]] == ""
    with pytest.raises(InputError, match="table, json"):
        format_predictions(results, fmt="xml")


def test_unreadable_and_oversized_images_are_reported_and_the_rest_answered(
    fc_run, images, tmp_path, monkeypatch
):
    import builtins

    from dataset import image_loader

    def deny(name, *args, **kwargs):  # tests run as root, so chmod cannot make a file unreadable
        if str(name) == str(images[1]):
            raise PermissionError(13, "Permission denied", str(name))
        return builtins.open(name, *args, **kwargs)

    monkeypatch.setattr(image_loader, "open", deny, raising=False)
    config = dataclasses.replace(make_config(tmp_path), extract=ExtractConfig(max_pixels=45 * 45))
    results = predict_images(run_dir=fc_run, inputs=images, extract=config.extract)
    errors = [r["error"] for r in results]
    assert errors[0] is None  # 40 x 40
    assert "cannot be read (Permission denied)" in errors[1]
    assert "50x50 pixels is more than the limit of 2,025" in errors[2]


@keras.saving.register_keras_serializable(package="cxr14_test")
class Twice(keras.layers.Layer):
    def call(self, x):
        return x * 2


def _lambda_head(x):
    return keras.layers.Lambda(lambda t: t * 2)(x)  # refused when loading safely


def _unknown_layer_head(x):
    return Twice()(x)  # unregistered below: a class the loading process does not know


@pytest.mark.parametrize("layer", [_lambda_head, _unknown_layer_head])
def test_a_model_that_fails_to_load_is_one_line(tmp_path, images, capsys, layer):
    run_dir = make_run(tmp_path / "broken", [TINY])
    x = keras.Input((load_backbone(TINY).dim,), name="tiny")
    keras.Model(x, keras.layers.Dense(len(LABELS), activation="sigmoid")(layer(x))).save(
        run_dir / "model.keras"
    )
    registered = keras.saving.get_custom_objects()
    registered.pop("cxr14_test>Twice", None)
    try:
        with pytest.raises(InputError) as err:
            load_run(run_dir)
        message = str(err.value)
        assert "model.keras: cannot be loaded (" in message and "\n" not in message and len(message) < 500
        assert "Lambda" in message or "Could not locate class 'Twice'" in message
        assert run.main(["predict", "--run", str(run_dir), str(images[0])]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    finally:
        registered["cxr14_test>Twice"] = Twice


def test_a_head_of_another_input_shape_is_refused(tmp_path, images):
    run_dir = make_run(tmp_path / "mixed", [TINY])
    x = keras.Input((7,), name="tiny")  # tiny gives 32 features
    keras.Model(x, keras.layers.Dense(len(LABELS), activation="sigmoid")(x)).save(run_dir / "model.keras")
    with pytest.raises(
        InputError, match=r"takes inputs of shape \(7,\) for backbone 'tiny', but that backbone gives \(32,\)"
    ):
        predict_images(run_dir=run_dir, inputs=images, extract=make_config(tmp_path).extract)


def test_an_unreadable_folder_of_images_is_one_line(images, monkeypatch):
    iterdir = Path.iterdir

    def deny(self):  # tests run as root, so chmod cannot make a folder unreadable
        if self == images[0].parent:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", deny)
    with pytest.raises(InputError, match="images: cannot list the folder \\(Permission denied\\)"):
        list_images([images[0].parent])


def test_calibrated_probabilities_and_calls_at_the_runs_operating_points(tmp_path, images):
    from results.calibration import apply_calibration

    run_dir = make_run(tmp_path / "fc", [TINY])
    raw = predict_images(run_dir=run_dir, inputs=images, extract=make_config(tmp_path).extract)
    decisions = add_decisions(run_dir)
    results = predict_images(run_dir=run_dir, inputs=images, extract=make_config(tmp_path).extract)
    for before, after in zip(raw, results, strict=True):
        np.testing.assert_array_equal(_probs({"probabilities": after["uncalibrated"]}), _probs(before))
        expected = apply_calibration(decisions["calibration"], _probs(before)[None], label_names=LABELS)[0]
        np.testing.assert_allclose(_probs(after), expected, atol=1e-6)
        assert not np.allclose(_probs(after), _probs(before), atol=1e-3)
        assert after["probabilities"][LABELS[-1]] == before["probabilities"][LABELS[-1]]  # identity label
        for label in LABELS:
            threshold = decisions["thresholds"]["labels"][label]["threshold"]
            call = (
                None
                if threshold is None
                else "positive"
                if after["probabilities"][label] >= threshold
                else "negative"
            )
            assert after["calls"][label] == call
    assert {c for r in results for c in r["calls"].values()} == {"positive", "negative", None}
    parsed = json.loads(format_predictions(results, fmt="json"))
    assert parsed[0]["calls"] == results[0]["calls"] and "uncalibrated" in parsed[0]
    table = format_predictions(results, fmt="table")
    assert "+" in table and "positive call at the run's operating point" in table


def test_random_weight_or_synthetic_runs_warn_once(tmp_path, images, capsys):
    import run
    from inference.trained import run_warning

    run_dir = make_run(tmp_path / "fc", [TINY])
    warning = run_warning(run_dir)
    assert warning.startswith("not a medical model") and "random-weight backbone(s) tiny" in warning
    results = predict_images(run_dir=run_dir, inputs=images[:1], extract=make_config(tmp_path).extract)
    assert results[0]["warning"] == warning
    config = tmp_path / "cxr14.toml"
    config.write_text("", encoding="utf-8")
    assert (
        run.main(["predict", "--config", str(config), "--run", str(run_dir), "--json", str(images[0])]) == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["warning"] == warning
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [f"warning: {warning}"]

    plan = json.loads((run_dir / "config.json").read_text())
    plan["backbones"]["tiny"] = {**plan["backbones"]["tiny"], "source": "keras", "weights": "imagenet"}
    (run_dir / "config.json").write_text(json.dumps(plan))
    assert run_warning(run_dir) == ""
    plan["data"] = {"synthetic": True}
    (run_dir / "config.json").write_text(json.dumps(plan))
    assert "synthetic sample" in run_warning(run_dir)
    plan["backbones"]["tiny"]["weights"] = "none"
    (run_dir / "config.json").write_text(json.dumps(plan))
    assert "random-weight backbone(s) tiny" in run_warning(run_dir)
    plan["backbones"]["tiny"] = TINY.as_dict()
    (run_dir / "config.json").write_text(json.dumps(plan))
    assert load_run(run_dir).notice.startswith("synthetic sample — not comparable")  # for export's model.json
