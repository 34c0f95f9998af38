"""The attention head's guided start: before any training it already weighs the token that holds an
image's findings (the probe's evidence), and it is still the probe to the last digit."""

import keras
import numpy as np

from heads.models import build_head, token_attention
from heads.settings import HeadConfig
from heads.start import fit_start
from tests.fixtures import make_index, token_data

TOKENS, CHANNELS, LABELS_HERE = 16, 8, 4
ATTENTION = HeadConfig(kind="attention", units=(16,), dropout=0.0, transition=16)


def planted(n: int, *, seed: int = 0):
    """(index, tokens, site): noise tokens; each image's findings shift one token, at `site`, by 3 along a
    direction per label."""
    index = make_index(n, seed=seed, n_labels=LABELS_HERE)
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, TOKENS, CHANNELS)).astype(np.float32)
    directions = rng.standard_normal((LABELS_HERE, CHANNELS))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    site = rng.integers(0, TOKENS, n)
    tokens[np.arange(n), site] += 3.0 * index.labels @ directions
    return index, tokens.astype(np.float16), site


def test_the_untrained_attention_looks_where_the_findings_are(tmp_path):
    index, tokens, site = planted(900)
    data = token_data(tmp_path / "cache", index, tokens)
    rows = {split: data.rows(split) for split in ("train", "val")}
    start = fit_start(data, rows=rows, max_directions=0, seed=0)
    model = build_head(kind="attention", inputs={"map": (TOKENS, CHANNELS)}, n_labels=LABELS_HERE,
                       head=ATTENTION, seed=0, start=start)  # fmt: skip
    layer = token_attention(model, "map")
    given = keras.Model(model.get_layer("map").output, layer.input)(data.features["map"])
    weights = keras.ops.convert_to_numpy(layer.token_weights(given))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    found = index.labels.sum(axis=1) > 0
    on_site = weights[np.arange(len(site)), site]
    # Uniform weights (mean pooling) would put 1/16 on it; the probe's evidence puts several times that.
    assert on_site[found].mean() > 4 / TOKENS, on_site[found].mean()
    assert (weights.argmax(axis=1) == site)[found].mean() > 0.5
    assert on_site[~found].mean() < on_site[found].mean() / 2  # no finding: no token stands out
    # Its own logits start at zero: the untrained head is the probe on the mean of the tokens.
    x = data.features["map"][:64].astype(np.float32)
    mean, variance = start.moments("map")
    logits = (x.mean(axis=1) - mean) / np.sqrt(variance) @ start.kernel + start.bias
    np.testing.assert_allclose(
        model.predict({"map": x}, verbose=0), 1 / (1 + np.exp(-logits)), rtol=1e-4, atol=1e-5
    )
