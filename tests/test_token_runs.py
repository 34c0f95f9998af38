"""A token-head run end to end: a random backbone's map extracted from PNGs (or two backbones' maps,
fused), an attention head trained on it, then predict, export (matching predict to 1e-5) and heatmaps,
its attention among them."""

import dataclasses

import numpy as np
import pytest

from cxr14.errors import InputError
from dataset.image_loader import read_gray01
from dataset.settings import LABELS
from extract.backbones import load_backbone
from extract.settings import BackboneConfig
from heads.data import load_head_data
from heads.settings import HeadConfig
from heads.train import train_head
from inference.export import export_run
from inference.heatmap import _attention, explain, heatmap_method
from inference.predict import predict_images
from inference.trained import load_run
from tests.fixtures import FAST, TINY, extract, make_config, make_index, make_run, make_splits, write_png

MAP = BackboneConfig(
    name="tiny_map", source="random", image_size=32, preprocess="unit", seed=1, width=8, grid=4, output="map"
)
# A second map of another grid and width, for a head that fuses two backbones' tokens.
COARSE = BackboneConfig(
    name="coarse_map",
    source="random",
    image_size=24,
    preprocess="unit",
    seed=2,
    width=6,
    grid=2,
    output="map",
)


@pytest.fixture(scope="module", params=[(MAP,), (MAP, COARSE)], ids=["one map", "two maps fused"])
def token_run(tmp_path_factory, request):
    """(run folder, two films): an attention head trained on the 16 tokens of tiny_map (and the 4 of
    coarse_map) of 90 PNGs."""
    backbones = request.param
    root = tmp_path_factory.mktemp("token_run")
    index = make_index(90)
    (root / "images").mkdir()
    (root / "films").mkdir()
    paths = [str(write_png(root / "images" / name, size=40, seed=i)) for i, name in enumerate(index.names)]
    for backbone in backbones:
        extract(
            index.names, paths, root / "cache", backbone=load_backbone(backbone), batch_size=16, shard_size=32
        )
    names = [b.name for b in backbones]
    data = load_head_data(
        cache_dir=root / "cache", backbones=names, index=index, splits=make_splits(index), metadata=False
    )
    head = HeadConfig(kind="attention", units=(8,), dropout=0.0, transition=8)
    snapshot = {
        "labels": list(LABELS),
        "head": dataclasses.asdict(head),
        "train": dataclasses.asdict(FAST),
        "backbones": {b.name: b.as_dict() for b in backbones},
        "feature_dtypes": dict.fromkeys(names, "float16"),
        "config": {},
    }
    run_dir = root / "runs" / "attention"
    train_head(run_dir=run_dir, data=data, head=head, train=FAST, label_names=LABELS,
               config_snapshot=snapshot, progress=False, plots=False)  # fmt: skip
    films = [
        write_png(root / "films" / f"{name}.png", size=size, seed=50 + size)
        for name, size in (("a", 40), ("b", 56))
    ]
    return run_dir, films


def test_predict_and_export_of_a_token_run_agree(token_run, tmp_path):
    run_dir, films = token_run
    predicted = predict_images(run_dir=run_dir, inputs=films, extract=make_config(tmp_path).extract)
    assert all(not r.get("error") for r in predicted) and len(predicted) == 2
    # export_run checks the SavedModel against predict itself, to inference.export.TOLERANCE (1e-5).
    out = export_run(run_dir=run_dir, out_dir=tmp_path / "export")
    assert (out / "saved_model.pb").exists()


def test_the_attention_heatmap_is_the_heads_weight_on_each_token(token_run):
    run_dir, films = token_run
    run = load_run(run_dir)
    assert heatmap_method(run, "attention") == "attention" and heatmap_method(run, "auto") == "gradcam"
    gray = read_gray01(films[1])
    per_map = dict(zip(run.backbones, _attention(run, gray), strict=True))  # each map its own attention
    grids = {MAP.name: (4, 4), COARSE.name: (2, 2)}
    assert {name: w.shape for name, w in per_map.items()} == {name: grids[name] for name in run.backbones}
    assert all(np.isclose(w.sum(), 1.0, atol=1e-5) for w in per_map.values())
    explanation = explain(run, gray, labels=list(LABELS[:2]), method="attention")
    assert explanation.maps.shape == (2, 56, 56) and explanation.maps.max() == pytest.approx(1.0)
    assert explain(run, gray, labels=[LABELS[0]], method="gradcam").maps.shape == (1, 56, 56)
    if len(run.backbones) > 1:
        return
    weights = per_map[MAP.name]
    # Upsampled to the film: the hottest film region lies in the hottest token's cell.
    row, col = np.unravel_index(np.argmax(explanation.maps[0]), (56, 56))
    assert weights[row * 4 // 56, col * 4 // 56] == pytest.approx(weights.max(), rel=0.2)


def test_the_attention_method_is_refused_for_a_head_without_attention(tmp_path):
    run = load_run(make_run(tmp_path / "fc", [TINY]))
    with pytest.raises(InputError, match="attention needs a head that weighs tokens.*'tiny'.*gradcam"):
        heatmap_method(run, "attention")
