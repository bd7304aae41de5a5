"""The downstream protocol on small synthetic arrays: folds, the skip head, scores, baselines, figures."""
from __future__ import annotations

import re

import numpy as np
import pytest
from astromer import evaluate as ev


def _labelled_objects(n_classes=4, per_class=(60, 40, 12, 5), bands=("g", "r"), seed=0):
    """Rows of (object_id, band, label): every object observed in every band."""
    rng = np.random.default_rng(seed)
    ids, labs, bnds = [], [], []
    for c in range(n_classes):
        for i in range(per_class[c]):
            for b in bands:
                ids.append(f"obj-{c}-{i}")
                labs.append(c)
                bnds.append(b)
    order = rng.permutation(len(ids))
    return np.array(ids)[order], np.array(labs)[order], np.array(bnds)[order]


def test_folds_never_share_objects_between_train_and_test():
    ids, labels, _ = _labelled_objects()
    config = ev.ProtocolConfig(samples_per_class=(4, 10, 30), n_folds=3, test_per_class=20, seed=7)
    folds = ev.make_folds(ids, labels, config)
    assert len(folds) == 9
    for f in folds:
        train, val, test = set(ids[f.train]), set(ids[f.val]), set(ids[f.test])
        assert train and val and test
        assert not train & test, f"fold {f.fold}/{f.samples_per_class}: train and test share objects"
        assert not val & test and not train & val
        # both bands of a test object are in the test set (objects, not rows, are split)
        for obj in test:
            assert set(np.flatnonzero(ids == obj)) <= set(f.test.tolist())
        # every class is trained on exactly samples_per_class objects (with replacement if short)
        train_objs = [ids[i] for i in f.train[::1]]
        per_class = {}
        for obj in dict.fromkeys(train_objs):  # distinct objects, their multiplicity below
            per_class.setdefault(labels[ids == obj][0], 0)
        counts = {c: 0 for c in per_class}
        seen_rows = {}
        for i in f.train:
            seen_rows.setdefault(ids[i], 0)
            seen_rows[ids[i]] += 1
        for obj, n_rows in seen_rows.items():
            counts[labels[ids == obj][0]] += n_rows // 2  # two bands per object
        assert all(n == f.samples_per_class for n in counts.values()), counts
    # the test set is shared by the scenarios of a fold, differs between folds, and is capped per class
    by_fold = {}
    for f in folds:
        by_fold.setdefault(f.fold, set()).add(tuple(sorted(f.test.tolist())))
    assert all(len(s) == 1 for s in by_fold.values())
    assert len({next(iter(s)) for s in by_fold.values()}) == 3
    test_objs = set(ids[folds[0].test])
    largest = sum(1 for o in test_objs if labels[ids == o][0] == 0)
    assert largest == 20  # 60 objects: capped at test_per_class
    smallest = sum(1 for o in test_objs if labels[ids == o][0] == 3)
    assert smallest == 3  # 5 objects: half (2) for training, the remaining 3 for testing


def test_folds_nest_scenarios_and_sample_with_replacement():
    ids, labels, _ = _labelled_objects(bands=("V",))
    folds = ev.make_folds(ids, labels, ev.ProtocolConfig(samples_per_class=(3, 8, 40), test_per_class=10))
    f3, f8, f40 = folds[0], folds[1], folds[2]
    assert set(ids[f3.train]) <= set(ids[f8.train]) <= set(ids[f40.train])
    assert len(f40.train) == 4 * 40
    assert len(set(ids[f40.train])) < len(f40.train)  # short classes repeat objects
    # the fewest distinct objects a class trains on: the 5-object class has one in its training pool
    data = ev.LabelledSet("toy", np.asarray(ids), np.full(len(ids), "V"), np.asarray(labels), ["a", "b", "c", "d"],
                          [None] * len(ids))
    for fold in (f3, f40):
        per_class = [len(set(ids[fold.train][labels[fold.train] == c])) for c in range(4)]
        assert ev.distinct_training_objects(data, fold) == min(per_class) == 1
    assert len(set(ids[f3.train][labels[f3.train] == 0])) == 3 < len(set(ids[f40.train][labels[f40.train] == 0]))


def test_folds_reject_bad_input():
    with pytest.raises(ValueError, match="two labels"):
        ev.make_folds(["a", "a", "b"], [0, 1, 0])
    with pytest.raises(ValueError, match="class 'rare' has 2 objects"):
        ev.make_folds(["a", "b", "c", "d", "e"], ["x", "x", "x", "rare", "rare"])


@pytest.mark.parametrize("make, words", [
    (lambda: ev.ProtocolConfig(n_folds=0), "protocol.n_folds=0: expected a positive whole number"),
    (lambda: ev.ProtocolConfig(n_folds=-1), "protocol.n_folds=-1"),
    (lambda: ev.ProtocolConfig(samples_per_class=(20, 0)), "protocol.samples_per_class=(20, 0)"),
    (lambda: ev.ProtocolConfig(samples_per_class=()), "protocol.samples_per_class=()"),
    (lambda: ev.ProtocolConfig(test_per_class=0), "protocol.test_per_class=0"),
    (lambda: ev.ProtocolConfig(val_fraction=-0.5), "protocol.val_fraction=-0.5: expected a fraction"),
    (lambda: ev.ProtocolConfig(seed=-1), "protocol.seed=-1"),
    (lambda: ev.ProtocolConfig.from_dict({"n_folds": 0}), "protocol.n_folds=0"),
    (lambda: ev.ClassifierConfig(max_epochs=-3), "classifier.max_epochs=-3: expected a positive whole number"),
    (lambda: ev.ClassifierConfig(patience=0), "classifier.patience=0"),
    (lambda: ev.ClassifierConfig(batch_size=0), "classifier.batch_size=0"),
    (lambda: ev.ClassifierConfig.from_dict({"max_epochs": 0}), "classifier.max_epochs=0"),
    (lambda: ev.DatasetSpec("toy", "synthetic", "class", max_per_class=0), "dataset.max_per_class=0"),
    (lambda: ev.DatasetSpec("toy", "synthetic", "class", min_members=-1), "dataset.min_members=-1"),
])
def test_protocol_and_classifier_settings_refuse_values_out_of_range(make, words):
    # a count of 0 or less used to run the default, nothing at all, or fail deep in the protocol
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


@pytest.mark.parametrize("data, words", [
    ({"classifier": {"lr": "fast"}}, "setting classifier.lr='fast' (str): expected a finite number"),
    ({"classifier": {"lr": 0}}, "setting classifier.lr=0.0: expected a positive number"),
    ({"classifier": {"dropout": 1.5}}, "setting classifier.dropout=1.5: expected a fraction in [0, 1)"),
    ({"classifier": {"hidden": [-5]}}, "setting classifier.hidden=(-5,): expected a list of positive whole"),
    ({"classifier": {"hidden": [2.5]}}, "setting classifier.hidden=[2.5] (list): expected a list of whole"),
    ({"classifier": {"gamma_init": "first"}}, "setting classifier.gamma_init='first': expected one of"),
    ({"classifier": {"weight_decay": -1}}, "setting classifier.weight_decay=-1.0"),
    ({"classifier": {"standardize": "no"}}, "setting classifier.standardize='no' (str): expected true or false"),
    ({"classifier": "fast"}, "setting classifier='fast': expected a mapping"),
    ({"protocol": {"samples_per_class": ["many"]}}, "setting protocol.samples_per_class=['many'] (list)"),
    ({"finetune": "false"}, "setting finetune='false' (str): expected true or false"),
    ({"rf_trees": 0}, "setting rf_trees=0: expected a positive whole number"),
    ({"finetune_config": {"lr": "fast"}}, "finetune_config: setting lr='fast' (str)"),
])
def test_run_settings_refuse_values_of_the_wrong_type_or_range(data, words):
    # a settings file has no types: these failed in torch.optim or the model's layers, after the embedding
    with pytest.raises(ValueError, match=re.escape(words)):
        ev.RunSettings.from_dict(data)


def test_run_settings_read_numbers_and_lists_as_their_fields_declare():
    run = ev.RunSettings.from_dict({"classifier": {"lr": "1e-3", "hidden": [64.0, 32], "max_epochs": 5.0},
                                    "protocol": {"samples_per_class": [10, 20]}, "baselines": False})
    assert run.classifier.lr == 1e-3 and run.classifier.hidden == (64, 32) and run.classifier.max_epochs == 5
    assert run.protocol.samples_per_class == (10, 20) and run.baselines is False
    assert ev.ClassifierConfig(hidden=[]).hidden == ()     # no hidden layer: a linear head on the layer means


def _separable_embeddings(labels, n_layers=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    n_classes = int(labels.max()) + 1
    centres = rng.normal(0, 3.0, size=(n_classes, dim))
    x = centres[labels][:, None, :] + rng.normal(0, 1.0, size=(len(labels), n_layers, dim))
    return x.astype(np.float32)


def _protocol_f1(x, ids, labels, n_classes, config, protocol):
    f1 = []
    for f in ev.make_folds(ids, labels, protocol):
        clf = ev.train_skip_classifier(x[f.train], labels[f.train], x[f.val], labels[f.val], n_classes, config)
        f1.append(ev.scores(labels[f.test], clf.predict(x[f.test]), n_classes)["f1"])
    return float(np.mean(f1))


def test_shuffled_labels_fall_to_chance_while_real_labels_separate():
    n_classes = 4
    ids, labels, _ = _labelled_objects(per_class=(70, 70, 70, 70), bands=("V",), seed=1)
    x = _separable_embeddings(labels)
    config = ev.ClassifierConfig(max_epochs=40, patience=8, hidden=(64, 32, 16))
    protocol = ev.ProtocolConfig(samples_per_class=(20,), n_folds=2, test_per_class=40)
    real = _protocol_f1(x, ids, labels, n_classes, config, protocol)
    # shuffle labels across objects: the embeddings no longer carry any information about them
    objs = np.unique(ids)
    perm = dict(zip(objs, np.random.default_rng(3).permutation(
        [labels[ids == o][0] for o in objs])))
    shuffled = np.array([perm[o] for o in ids])
    chance = _protocol_f1(x, ids, shuffled, n_classes, config, protocol)
    assert real > 0.9, real
    assert chance < 1 / n_classes + 0.15, chance


def test_skip_head_gammas_and_early_stopping():
    labels = np.repeat(np.arange(3), 30)
    x = _separable_embeddings(labels, n_layers=4)
    # layer 2 alone carries the signal: the learned gammas should favour it
    x[:, [0, 1, 3], :] = np.random.default_rng(5).normal(0, 3.0, size=(len(labels), 3, x.shape[2]))
    config = ev.ClassifierConfig(max_epochs=400, patience=15, hidden=(32, 16), lr=3e-3)
    clf = ev.train_skip_classifier(x[::2], labels[::2], x[1::2], labels[1::2], 3, config)
    gam = clf.head.gammas()
    assert gam.shape == (4,) and abs(gam.sum() - 1) < 1e-5
    assert gam.argmax() == 2, gam
    assert len(clf.history) < 400 and clf.best_epoch < len(clf.history)
    # uniform initialisation as in the official code
    head = ev.SkipHead(7, 8, 2)
    assert np.allclose(head.gammas(), 1 / 7)
    assert [m.out_features for m in head.mlp if hasattr(m, "out_features")] == [1024, 512, 256]


def test_scores_summary_and_markdown_table():
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = ev.scores(y, y, 3)
    assert perfect == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}
    half = ev.scores(y, np.array([0, 1, 1, 0, 2, 2]), 3)
    assert half["accuracy"] == pytest.approx(4 / 6)
    results = [{"method": "skip", "samples_per_class": 20, **perfect},
               {"method": "skip", "samples_per_class": 20, **half}]
    (row,) = ev.summarise(results)
    assert row["f1_mean"] == pytest.approx((1 + half["f1"]) / 2)
    assert row["f1_std"] == pytest.approx(abs(1 - half["f1"]) / 2)
    table = ev.markdown_table([row], title="toy")
    assert "| skip | 20 | 2 | - |" in table and f"{row['f1_mean']:.3f} ± {row['f1_std']:.3f}" in table
    (row,) = ev.summarise([{**r, "train_objects": k} for r, k in zip(results, (7, 9))])
    assert row["train_objects"] == 8 and "| skip | 20 | 2 | 8 |" in ev.markdown_table([row])
    # the reference row is explained only where there is one (--no-baselines leaves it out)
    assert "reference row" not in ev.markdown_table([row])
    (reference,) = ev.summarise([{**r, "method": ev.METHOD_COMMONEST} for r in results])
    assert "The reference row gives every test curve" in ev.markdown_table([row, reference])


def _synthetic_curves(n_per_class=30, seed=0):
    """Sinusoids (class 0) vs. sawtooth eclipses (class 1) at different periods, irregular sampling."""
    rng = np.random.default_rng(seed)
    curves, labels = [], []
    for c in range(2):
        for _ in range(n_per_class):
            t = np.sort(rng.uniform(0, 300, 150))
            p = rng.uniform(0.3, 0.8) if c == 0 else rng.uniform(5, 20)
            phase = (t / p) % 1
            m = 15 + (0.5 * np.sin(2 * np.pi * phase) if c == 0 else 0.8 * (phase < 0.1))
            e = np.full_like(t, 0.02)
            curves.append((t, m + rng.normal(0, 0.02, t.size), e))
            labels.append(c)
    curves.append((np.array([1.0, 2.0]), np.array([15.0, 15.1]), np.array([0.1, 0.1])))  # too short
    return curves, np.array(labels + [0])


def test_lightcurve_features_and_random_forest():
    curves, labels = _synthetic_curves()
    feats = ev.lightcurve_features(curves)
    assert feats.shape == (len(curves), len(ev.feature_names()))
    assert np.isnan(feats[-1]).all() and np.isfinite(feats[:-1]).mean() > 0.9
    idx = np.random.default_rng(0).permutation(len(curves) - 1)
    train, test = idx[:30], idx[30:]
    rf = ev.train_random_forest(feats[train], labels[train], n_estimators=50)
    pred = ev.predict_random_forest(rf, feats[test])
    assert ev.scores(labels[test], pred, 2)["f1"] > 0.9
    assert ev.predict_random_forest(rf, feats[-1:]).shape == (1,)  # NaN rows still get a prediction


def test_figures_are_png(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    names = ["RRab", "RRc", "EB"]
    paths = [
        ev.plot_confusion(y, rng.integers(0, 3, 60), names, tmp_path / "cm.png", "toy"),
        ev.plot_gammas(np.array([0.2, 0.3, 0.5]), tmp_path / "gammas.png"),
        ev.plot_map(ev.embedding_map(rng.normal(size=(60, 8)) + y[:, None]), y, names, tmp_path / "map.png"),
    ]
    t = np.sort(rng.uniform(0, 100, 50))
    phase, xlabel = ev.fold_phase(t, 0.5)
    assert xlabel == "phase" and phase.min() >= 0 and phase.max() < 1
    assert ev.fold_phase(t, None)[1] == "days"
    paths.append(ev.plot_attention([{"name": n, "x": phase, "mag": rng.normal(size=50),
                                     "attention": rng.random(50), "xlabel": xlabel} for n in names],
                                   tmp_path / "att.png"))
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_draws_become_loss_weights():
    rows, weights = ev.training_rows(np.array([3, 7, 3, 5, 3, 7]), ev.ClassifierConfig())
    assert rows.tolist() == [3, 5, 7] and weights.tolist() == [3, 1, 2]
    rows, weights = ev.training_rows(np.array([3, 3]), ev.ClassifierConfig(weighted_repeats=False))
    assert rows.tolist() == [3, 3] and weights is None
    # a weight of k trains like k copies: a row weighted heavily wins a conflict between two labels
    x = np.zeros((2, 1, 4), np.float32)
    clf = ev.train_skip_classifier(x, np.array([0, 1]), x[:1], np.array([1]), 2,
                                   ev.ClassifierConfig(hidden=(8,), max_epochs=60, patience=100, standardize=False),
                                   sample_weight=np.array([1.0, 9.0], np.float32))
    assert clf.predict(x[:1])[0] == 1


def test_method_names_become_single_dashed_slugs():
    # file and MLflow metric names: one dash for every run of other characters ("features + RF" gave "--")
    assert ev._slug(ev.METHOD_RF) == "light-curve-features-rf"
    assert ev._slug(ev.METHOD_FROZEN) == "astromer-skip-frozen"
    assert ev._slug(ev.METHOD_COMMONEST) == "commonest-test-class-reference"
