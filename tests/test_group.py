"""heads.group: heads trained together in one pass match the same heads trained alone, each with its own
learning rate, dropout and early stop."""

import dataclasses

import numpy as np
import pytest

from dataset.settings import LABELS
from heads.group import Member, batch_key, fit_together
from heads.settings import HeadConfig, TrainConfig
from heads.start import fit_start
from heads.train import fit_head, prepare_training
from tests.fixtures import FAST, FC, make_index, signal_data


@pytest.fixture(scope="module")
def index():
    return make_index(360)


@pytest.fixture(scope="module")
def data(tmp_path_factory, index):
    return signal_data(tmp_path_factory.mktemp("cache"), index, metadata=True)


# Three trials that differ in every setting a head of a group has its own of.
MEMBERS = [
    Member(FC, FAST),
    Member(dataclasses.replace(FC, dropout=0.4, units=(8,)), dataclasses.replace(FAST, lr=3e-3)),
    Member(dataclasses.replace(FC, dropout=0.0), dataclasses.replace(FAST, lr=3e-2, patience=1)),
]


def _alone_and_together(data, members, *, start_kind="probe"):
    members = [dataclasses.replace(m, train=dataclasses.replace(m.train, start=start_kind)) for m in members]
    rows, _ = prepare_training(data, train=members[0].train, label_names=LABELS)
    start = fit_start(data, rows=rows, max_directions=FC.directions if start_kind == "probe" else 0, seed=0)
    alone = [
        fit_head(
            data, rows=rows, head=m.head, train=m.train, n_labels=len(LABELS), progress=False, start=start
        )
        for m in members
    ]
    together = fit_together(data, rows=rows, members=members, n_labels=len(LABELS), start=start)
    return alone, together


@pytest.mark.parametrize("start_kind", ["probe", "none"])
def test_heads_trained_together_take_the_steps_they_take_alone(data, start_kind):
    alone, together = _alone_and_together(data, MEMBERS, start_kind=start_kind)
    for (model, history), fitted in zip(alone, together, strict=True):
        grouped = fitted.history
        # The same epochs (so the same early stop), the same validation AUC each epoch and the same kept one.
        assert len(grouped) == len(history)
        np.testing.assert_allclose(grouped["val_mean_auc"], history["val_mean_auc"], atol=1e-4)
        np.testing.assert_allclose(grouped["loss"], history["loss"], rtol=1e-4)
        np.testing.assert_allclose(grouped["learning_rate"], history["learning_rate"], rtol=1e-6)
        assert (grouped["chosen"] == history["chosen"]).all()
        for a, b in zip(model.get_weights(), fitted.model.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)
    # The trials really differ: their own lr, dropout and units made other heads.
    curves = [tuple(f.history["loss"].round(6)) for f in together]
    assert len(set(curves)) == len(curves)


def test_a_head_whose_patience_ran_out_stops_while_the_others_train_on(data):
    long = dataclasses.replace(FAST, patience=10, epochs=8, lr=1e-3)
    members = [Member(FC, long), Member(FC, dataclasses.replace(long, patience=1, lr=0.3))]
    _, (patient, impatient) = _alone_and_together(data, members)
    assert len(impatient.history) < len(patient.history) == long.epochs + 1
    # Its stop came from its own patience: no gain beyond min_delta in its last epoch.
    scores = impatient.history["val_mean_auc"].to_numpy()
    assert scores[-1] < scores[:-1].max() + long.min_delta


def test_only_trials_that_see_the_same_batches_share_a_key():
    base = batch_key(FC, FAST)
    assert base is not None
    assert (
        batch_key(dataclasses.replace(FC, dropout=0.5), dataclasses.replace(FAST, lr=0.1, patience=1)) == base
    )
    for change in ({"batch_size": 16}, {"seed": 1}, {"epochs": 3}, {"augment": True}, {"start": "none"}):
        assert batch_key(FC, dataclasses.replace(FAST, **change)) != base, change
    assert batch_key(dataclasses.replace(FC, directions=2), FAST) != base
    assert batch_key(HeadConfig(kind="linear"), FAST) is None  # closed form: nothing to train
    assert batch_key(HeadConfig(kind="cnn"), FAST) is None
    assert batch_key(FC, dataclasses.replace(FAST, tensorboard="logs")) is None
    assert batch_key(HeadConfig(kind="linear"), TrainConfig(start="none")) is not None
