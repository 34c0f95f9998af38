"""heads.models: every head kind builds with named inputs and sigmoid outputs, and trains a step."""

import keras
import numpy as np
import pytest

from cxr14.errors import InputError
from heads.models import METADATA_INPUT, ByteDropout, build_head
from heads.settings import HeadConfig

N_LABELS = 14


def _batch(inputs: dict, *, metadata_dim: int = 0, n: int = 8) -> dict:
    rng = np.random.default_rng(0)
    batch = {name: rng.random((n, *shape)).astype(np.float32) for name, shape in inputs.items()}
    if metadata_dim:
        batch[METADATA_INPUT] = rng.random((n, metadata_dim)).astype(np.float32)
    return batch


CASES = {
    "linear": ({"bb": (16,)}, HeadConfig(kind="linear")),
    "fc": ({"bb": (16,)}, HeadConfig(kind="fc", units=(8, 4), dropout=0.5)),
    "ensemble": ({"a": (16,), "b": (6,)}, HeadConfig(kind="ensemble", units=(8,), transition=5)),
    "cnn": ({"pixels": (16, 16)}, HeadConfig(kind="cnn", units=(8,), filters=(4, 8))),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("metadata_dim", [0, 6])
def test_each_kind_builds_and_trains_a_step(kind, metadata_dim):
    inputs, head = CASES[kind]
    model = build_head(
        kind=kind, inputs=inputs, n_labels=N_LABELS, head=head, metadata_dim=metadata_dim, seed=1
    )
    expected_inputs = sorted([*inputs, *([METADATA_INPUT] if metadata_dim else [])])
    assert sorted(t.name for t in model.inputs) == expected_inputs
    assert model.output_shape == (None, N_LABELS)
    batch = _batch(inputs, metadata_dim=metadata_dim)
    before = model.predict_on_batch(batch)
    assert ((before > 0) & (before < 1)).all()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    weights = [w.copy() for w in model.get_weights()]
    model.train_on_batch(batch, np.ones((8, N_LABELS), np.float32))
    assert any(not np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))
    assert model.predict_on_batch(batch).mean() > before.mean()  # stepped toward all-positive targets


def test_fc_has_the_configured_layers():
    model = build_head(kind="fc", inputs={"bb": (16,)}, n_labels=N_LABELS, head=CASES["fc"][1], seed=0)
    # 16->8, 8->4, 4->14 with biases
    assert model.count_params() == (16 * 8 + 8) + (8 * 4 + 4) + (4 * 14 + 14)
    assert [type(layer).__name__ for layer in model.layers].count("Dropout") == 2


def test_linear_is_one_dense_layer_over_concatenated_inputs():
    model = build_head(
        kind="linear",
        inputs={"bb": (16,)},
        n_labels=N_LABELS,
        head=CASES["linear"][1],
        metadata_dim=6,
        seed=0,
    )
    assert model.count_params() == (16 + 6) * 14 + 14


def test_ensemble_add_and_concat_fusion():
    inputs = {"a": (16,), "b": (6,)}
    add = build_head(kind="ensemble", inputs=inputs, n_labels=N_LABELS, head=CASES["ensemble"][1], seed=0)
    concat_head = HeadConfig(kind="ensemble", units=(8,), transition=5, fusion="concat")
    concat = build_head(kind="ensemble", inputs=inputs, n_labels=N_LABELS, head=concat_head, seed=0)
    transitions = (16 * 5 + 5) + (6 * 5 + 5)
    assert add.count_params() == transitions + (5 * 8 + 8) + (8 * 14 + 14)
    assert concat.count_params() == transitions + (10 * 8 + 8) + (8 * 14 + 14)
    assert any(type(layer).__name__ == "Add" for layer in add.layers)


def test_same_seed_same_weights():
    def build(seed):
        return build_head(kind="fc", inputs={"bb": (16,)}, n_labels=N_LABELS, head=CASES["fc"][1], seed=seed)

    first, again, other = build(3).get_weights(), build(3).get_weights(), build(4).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_l2_adds_a_penalty():
    head = HeadConfig(kind="fc", units=(8,), l2=0.1)
    model = build_head(kind="fc", inputs={"bb": (16,)}, n_labels=N_LABELS, head=head, seed=0)
    assert len(model.losses) == 2


@pytest.mark.parametrize(
    ("kind", "inputs", "head", "message"),
    [
        ("mlp", {"bb": (4,)}, HeadConfig(kind="fc"), "head = 'mlp' is not one of: linear, fc"),
        ("ensemble", {"bb": (4,)}, HeadConfig(kind="ensemble"), "takes 2 or more backbone"),
        ("cnn", {"bb": (4,)}, HeadConfig(kind="cnn"), "cached pixel array"),
        ("fc", {"px": (8, 8)}, HeadConfig(kind="fc"), "takes one feature vector per image"),
        ("fc", {"metadata": (4,)}, HeadConfig(kind="fc"), "may not be called 'metadata'"),
        ("fc", {}, HeadConfig(kind="fc"), "at least one backbone"),
    ],
)
def test_bad_head_requests(kind, inputs, head, message):
    with pytest.raises(InputError, match=message):
        build_head(kind=kind, inputs=inputs, n_labels=N_LABELS, head=head, seed=0)


def test_byte_dropout_masks_at_the_rate_and_keeps_the_mean():
    layer = ByteDropout(0.5, seed=0)
    x = np.ones((256, 300), np.float32)
    out = np.asarray(layer(x, training=True))
    assert set(np.unique(out)) == {0.0, 2.0}
    assert abs((out == 0).mean() - 0.5) < 0.01
    assert abs(out.mean() - 1.0) < 0.02
    assert not np.array_equal(out, np.asarray(layer(x, training=True)))  # a new mask each step
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    quarter = np.asarray(ByteDropout(0.25, seed=1)(x, training=True))
    assert abs((quarter == 0).mean() - 0.25) < 0.01 and set(np.unique(quarter)) == {0.0, np.float32(4 / 3)}


def test_byte_dropout_head_hands_its_weights_to_a_stock_head():
    inputs, head = CASES["fc"]
    trained = build_head(kind="fc", inputs=inputs, n_labels=N_LABELS, head=head, seed=2, byte_dropout=True)
    assert any(isinstance(layer, ByteDropout) for layer in trained.layers)
    trained.compile(optimizer="adam", loss="binary_crossentropy")
    batch = _batch(inputs)
    trained.train_on_batch(batch, np.ones((8, N_LABELS), np.float32))
    stock = build_head(kind="fc", inputs=inputs, n_labels=N_LABELS, head=head, seed=2)
    assert not any(isinstance(layer, ByteDropout) for layer in stock.layers)
    stock.set_weights(trained.get_weights())
    np.testing.assert_allclose(stock.predict_on_batch(batch), trained.predict_on_batch(batch), rtol=1e-6)
