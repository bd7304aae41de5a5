"""The paper's downstream protocol: samples-per-class folds, the ``skip`` classifier, baselines, plots.

Everything here works on plain numpy arrays so it can be tested on small synthetic data; the jobs
(``jobs/classify.py``, ``tune/sweep.py``) only read the lake, load models and wire these stages.

Stages of one evaluation:

1. ``make_folds``: per fold, one shared test set (up to ``test_per_class`` objects per class, or about
   half of a smaller class) and, for each samples-per-class scenario, a training set (sampled with
   replacement when the class is short) and a validation set for early stopping. Folds are built on
   *objects*, so the curves of one object in several bands never sit on both sides.
2. ``train_skip_classifier`` on cached per-layer means ``[N, n_layers + 1, D]`` (the encoder is frozen,
   so the skip head's inputs are fixed: computing them once makes the protocol cheap).
3. ``scores`` / ``summarise`` / ``markdown_table``: macro F1, precision, recall, accuracy, mean ± std.
4. Baselines: ``lightcurve_features`` + ``train_random_forest``; the same skip head on a randomly
   initialised encoder is just another set of cached per-layer means.
5. Figures (PNG, matplotlib Agg): confusion matrix, learned gammas, t-SNE map, attention over a curve.
"""
from __future__ import annotations

import copy
import math
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from astromer.config import check_setting_types, typed_setting
from astromer.model import SkipHead

# ----------------------------------------------------------------------------------------------
# 1. folds


@dataclass
class ProtocolConfig:
    """The paper's protocol: 20/100/500 samples per class, 3 folds, one shared test set per fold."""

    samples_per_class: tuple[int, ...] = (20, 100, 500)
    n_folds: int = 3
    test_per_class: int = 1000
    val_fraction: float = 0.25  # validation objects per scenario, relative to its samples per class
    seed: int = 0

    def __post_init__(self) -> None:
        _check_settings(self, "protocol", {"samples_per_class": _COUNTS, "n_folds": _POSITIVE_INT,
                                         "test_per_class": _POSITIVE_INT, "val_fraction": _FRACTION,
                                         "seed": _NON_NEGATIVE_INT})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProtocolConfig:
        return cls(**_known_fields(cls, data, "protocol"))


#: what a setting may be: a test of its value and the words an error gives
_POSITIVE_INT = (lambda v: v >= 1, "a positive whole number")
_NON_NEGATIVE_INT = (lambda v: v >= 0, "a whole number >= 0")
_POSITIVE = (lambda v: v > 0, "a positive number")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
_COUNTS = (lambda v: len(v) > 0 and all(n >= 1 for n in v), "a list of positive whole numbers")


def _check_settings(config, section: str, ranges: dict[str, tuple[Callable, str]]) -> None:
    """Every setting of ``config`` of the type its field declares (checked and converted as the training
    settings are: a settings file has no types of its own), then in range (:func:`_check_ranges`)."""
    check_setting_types(config, prefix=f"{section}.")
    _check_ranges(config, f"{section}.", ranges)


def _check_ranges(config, prefix: str, ranges: dict[str, tuple[Callable, str]]) -> None:
    """Each setting of ``config`` named in ``ranges`` (name -> (test, what it expects)) passes its test, or a
    ValueError names it (after ``prefix``, its section); None (an optional setting left out) passes."""
    for name, (test, expected) in ranges.items():
        value = getattr(config, name)
        try:
            ok = value is None or bool(test(value))
        except TypeError:   # not even comparable (a name where a number belongs)
            ok = False
        if not ok:
            raise ValueError(f"setting {prefix}{name}={value!r}: expected {expected}")


def _known_fields(cls, data: dict, section: str) -> dict:
    """``data`` checked against the dataclass's fields: a misspelt setting is an error, not a default."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {unknown}; known: {sorted(known)}")
    return dict(data)


@dataclass
class Fold:
    """Row indices (into the labelled set) of one fold and one samples-per-class scenario.

    ``train`` may repeat rows (sampling with replacement for short classes); ``val`` and ``test`` do not.
    """

    fold: int
    samples_per_class: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _objects_by_class(object_ids: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """object id -> row indices, and class -> sorted object ids; an object with two labels is an error."""
    rows: dict[str, list[int]] = {}
    label_of: dict[str, object] = {}
    for i, (obj, lab) in enumerate(zip(object_ids.tolist(), labels.tolist())):
        if obj in label_of and label_of[obj] != lab:
            raise ValueError(f"object {obj!r} has two labels: {label_of[obj]!r} and {lab!r} (row {i})")
        label_of[obj] = lab
        rows.setdefault(obj, []).append(i)
    by_class: dict[object, list[str]] = {}
    for obj, lab in label_of.items():
        by_class.setdefault(lab, []).append(obj)
    return rows, {c: sorted(objs) for c, objs in sorted(by_class.items(), key=lambda kv: str(kv[0]))}


def make_folds(object_ids: Sequence[str], labels: Sequence, config: ProtocolConfig = ProtocolConfig()
               ) -> list[Fold]:
    """Build every (fold, scenario) split of the protocol.

    Per fold and class (objects shuffled with the fold's seed): the first objects form the training
    pool (shared by all scenarios, so the 20-sample training set is inside the 100-sample one), the
    next ones the test set. A class with fewer than ``2 * (largest scenario + its validation)`` objects
    gives half of its objects to the pool and the rest to the test set; training then samples the
    pool with replacement. Every class needs at least 3 objects (train, validation, test).
    """
    object_ids = np.asarray(object_ids).astype(str)
    labels = np.asarray(labels)
    if len(object_ids) != len(labels):
        raise ValueError(f"{len(object_ids)} object ids but {len(labels)} labels")
    rows, by_class = _objects_by_class(object_ids, labels)
    n_max = max(config.samples_per_class)
    n_val_max = max(1, math.ceil(config.val_fraction * n_max))
    for cls, objs in by_class.items():
        if len(objs) < 3:
            raise ValueError(f"class {cls!r} has {len(objs)} objects; the protocol needs at least 3 "
                             "(filter rare classes out of the dataset)")

    def rows_of(objs) -> np.ndarray:
        return np.array([r for o in objs for r in rows[o]], dtype=np.int64)

    folds: list[Fold] = []
    for f in range(config.n_folds):
        rng = np.random.default_rng([config.seed, f])
        pools: dict = {}
        test_objs: list[str] = []
        for cls, objs in by_class.items():
            order = [objs[i] for i in rng.permutation(len(objs))]
            pool_size = min(n_max + n_val_max, len(order) // 2)
            pools[cls] = order[:pool_size]
            test_objs += order[pool_size:pool_size + config.test_per_class]
        test = rows_of(test_objs)
        for n in config.samples_per_class:
            train_objs: list[str] = []
            val_objs: list[str] = []
            for pool in pools.values():
                # a fixed head of the pool is for validation, the rest for training: disjoint objects,
                # and the scenarios stay nested (the 20-sample set is the start of the 100-sample set)
                n_val_pool = min(n_val_max, max(1, len(pool) // 5))
                val_objs += pool[:min(n_val_pool, max(1, math.ceil(config.val_fraction * n)))]
                train_pool = pool[n_val_pool:] if len(pool) > n_val_pool else pool[:1]
                if len(train_pool) >= n:
                    train_objs += train_pool[:n]
                else:  # short class: every pool object once, the rest drawn with replacement
                    extra = rng.choice(len(train_pool), size=n - len(train_pool), replace=True)
                    train_objs += train_pool + [train_pool[i] for i in extra]
            if set(train_objs) & set(val_objs):  # only possible for a 2-object pool; keep val clean
                val_objs = [o for o in val_objs if o not in set(train_objs)]
            folds.append(Fold(fold=f, samples_per_class=n, train=rows_of(train_objs),
                              val=rows_of(val_objs), test=test))
    return folds


# ----------------------------------------------------------------------------------------------
# 2. the skip classifier on cached per-layer means


GAMMA_INITS = ("uniform", "last", "random")


@dataclass
class ClassifierConfig:
    """Training settings of the skip head (defaults: the official ``skip`` classifier)."""

    hidden: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.0
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 500
    patience: int = 40  # epochs without a better validation loss before stopping
    gamma_init: str = "uniform"  # "uniform" (softmax = 1/K each), "last" (favour the last block), "random"
    weight_decay: float = 0.0
    # z-score every (layer, dimension) with training-set statistics before the gamma weighting. Not in the
    # official code; per-curve means of a frozen encoder vary little around a large offset, and without it
    # the MLP often collapses to one class. False reproduces the official head exactly.
    standardize: bool = True
    # a curve drawn k times (sampling with replacement) is one row with weight k in the loss, instead of k
    # identical rows: the same expected loss per epoch at a fraction of the cost (the 500-per-class
    # scenario of a short class is mostly repeats). False trains on the repeated rows as drawn.
    weighted_repeats: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_settings(self, "classifier", {
            "hidden": (lambda v: all(h >= 1 for h in v), "a list of positive whole numbers (layer widths)"),
            "dropout": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"), "lr": _POSITIVE,
            "batch_size": _POSITIVE_INT, "max_epochs": _POSITIVE_INT, "patience": _POSITIVE_INT,
            "gamma_init": (lambda v: v in GAMMA_INITS, f"one of {', '.join(GAMMA_INITS)}"),
            "weight_decay": _NON_NEGATIVE, "seed": _NON_NEGATIVE_INT})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        return cls(**_known_fields(cls, data, "classifier"))


@dataclass
class TrainedClassifier:
    head: SkipHead
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_loss
    best_epoch: int = 0

    @torch.no_grad()
    def predict_proba(self, layer_means: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        self.head.eval()
        out = []
        for i in range(0, len(layer_means), batch_size):
            x = torch.as_tensor(layer_means[i:i + batch_size], dtype=torch.float32)
            out.append(torch.softmax(self.head(x), -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.head.out.out_features), np.float32)

    def predict(self, layer_means: np.ndarray) -> np.ndarray:
        return self.predict_proba(layer_means).argmax(-1)

    @torch.no_grad()
    def pooled(self, layer_means: np.ndarray) -> np.ndarray:
        return self.head.pooled(torch.as_tensor(layer_means, dtype=torch.float32)).numpy()


def _as_layers(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x[:, None, :] if x.ndim == 2 else x  # [N, D] -> [N, 1, D]


def training_rows(train: np.ndarray, config: ClassifierConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows to train on and their loss weights (see ``ClassifierConfig.weighted_repeats``)."""
    if not config.weighted_repeats:
        return np.asarray(train), None
    rows, counts = np.unique(np.asarray(train), return_counts=True)
    return rows, counts.astype(np.float32)


def train_skip_classifier(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                          n_classes: int, config: ClassifierConfig = ClassifierConfig(),
                          on_epoch: Callable[[int, dict], bool | None] | None = None,
                          sample_weight: np.ndarray | None = None) -> TrainedClassifier:
    """Cross-entropy, Adam, early stopping on validation loss; the best epoch's weights are kept.

    ``x_*`` are per-layer means ``[N, K, D]`` (or ``[N, D]``); ``sample_weight`` weights the training loss
    per row; ``on_epoch(epoch, metrics)`` may return True to stop (Ray Tune reports through it).
    """
    x_train, x_val = _as_layers(x_train), _as_layers(x_val)
    if len(x_train) == 0:
        raise ValueError("empty training set")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    head = SkipHead(x_train.shape[1], x_train.shape[2], n_classes, config.hidden, config.dropout,
                    config.gamma_init)
    if config.standardize:
        head.set_standardization(torch.as_tensor(x_train))
    opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()  # validation: every validation curve once
    xt, yt = torch.as_tensor(x_train), torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    wt = torch.as_tensor(sample_weight if sample_weight is not None else np.ones(len(xt)), dtype=torch.float32)
    xv, yv = torch.as_tensor(x_val), torch.as_tensor(np.asarray(y_val), dtype=torch.long)
    has_val = len(xv) > 0
    best, best_state, best_epoch, waited = math.inf, None, 0, 0
    history: list[dict] = []
    for epoch in range(config.max_epochs):
        head.train()
        order = rng.permutation(len(xt))
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            idx = torch.as_tensor(order[i:i + config.batch_size])
            per_row = nn.functional.cross_entropy(head(xt[idx]), yt[idx], reduction="none")
            loss = (per_row * wt[idx]).sum() / wt[idx].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        head.eval()
        with torch.no_grad():
            val_logits = head(xv) if has_val else None
            val_loss = loss_fn(val_logits, yv).item() if has_val else total / len(xt)
            val_acc = (val_logits.argmax(-1) == yv).float().mean().item() if has_val else float("nan")
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at epoch {epoch}")
        metrics = {"train_loss": total / len(xt), "val_loss": val_loss, "val_accuracy": val_acc}
        history.append(metrics)
        if val_loss < best - 1e-6:
            best, best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            waited += 1
        if on_epoch is not None and on_epoch(epoch, metrics):
            break
        if waited >= config.patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return TrainedClassifier(head=head, history=history, best_epoch=best_epoch)


# ----------------------------------------------------------------------------------------------
# 3. scores and the table


METRICS = ("f1", "precision", "recall", "accuracy")


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Macro F1, precision and recall over all classes of the set, and accuracy."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = list(range(n_classes))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro",
                                                 zero_division=0)
    return {"f1": float(f), "precision": float(p), "recall": float(r),
            "accuracy": float(accuracy_score(y_true, y_pred))}


def distinct_training_objects(data: LabelledSet, fold: Fold) -> int:
    """The fewest distinct objects any class trains on in ``fold``: a class shorter than the scenario is
    sampled with replacement, so "500 per class" may be far fewer objects drawn again and again."""
    train_objects, train_labels = data.object_ids[fold.train], data.y[fold.train]
    return int(min(len(set(train_objects[train_labels == c].tolist())) for c in np.unique(train_labels)))


def summarise(results: list[dict]) -> list[dict]:
    """Group per-fold results by (method, samples_per_class): mean and standard deviation (ddof 0), and
    the mean over folds of the fewest distinct training objects in a class."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["samples_per_class"]), []).append(r)
    out = []
    for (method, spc), rs in groups.items():
        row = {"method": method, "samples_per_class": spc, "n_folds": len(rs)}
        if all("train_objects" in r for r in rs):
            row["train_objects"] = float(np.mean([r["train_objects"] for r in rs]))
        for m in METRICS:
            vals = np.array([r[m] for r in rs], dtype=float)
            row[f"{m}_mean"], row[f"{m}_std"] = float(vals.mean()), float(vals.std())
        out.append(row)
    return out


def markdown_table(summary: list[dict], title: str | None = None) -> str:
    """One row per (method, samples per class): the fewest distinct training objects in a class, then
    macro F1, precision, recall, accuracy as mean ± std over the folds."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| method | samples per class | folds | distinct training objects (fewest in a class) | macro F1 "
              "| macro precision | macro recall | accuracy |",
              "| --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for row in summary:
        cells = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS]
        distinct = f"{row['train_objects']:.0f}" if "train_objects" in row else "-"
        lines.append(f"| {row['method']} | {row['samples_per_class']} | {row['n_folds']} | {distinct} | "
                     + " | ".join(cells) + " |")
    lines += ["", "± is the standard deviation over the folds (ddof 0). A class with fewer objects than the "
              "scenario asks is sampled with replacement: the distinct objects column says how many it really "
              "had."]
    if any(row["method"] == METHOD_COMMONEST for row in summary):
        lines[-1] += " The reference row gives every test curve the test set's commonest class."
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# 4. the classical baseline: light-curve features + random forest


def _feature_extractor():
    import light_curve as lc

    return lc.Extractor(
        lc.Amplitude(), lc.AndersonDarlingNormal(), lc.BeyondNStd(1.0), lc.Cusum(), lc.Eta(), lc.EtaE(),
        lc.InterPercentileRange(0.25), lc.Kurtosis(), lc.LinearTrend(), lc.MaximumSlope(), lc.Mean(),
        lc.MedianAbsoluteDeviation(), lc.MedianBufferRangePercentage(0.1), lc.PercentAmplitude(),
        lc.PercentDifferenceMagnitudePercentile(0.1), lc.ReducedChi2(), lc.Skew(), lc.StandardDeviation(),
        lc.StetsonK(), lc.WeightedMean(), lc.Duration(), lc.ObservationCount(),
        lc.Periodogram(peaks=2, resolution=10.0, max_freq_factor=2.0, fast=True),
    )


def feature_names() -> list[str]:
    return list(_feature_extractor().names)


def lightcurve_features(curves: Sequence[tuple], min_obs: int = 10) -> np.ndarray:
    """Classical features of the ``light-curve`` package, one row per curve (NaN where undefined).

    ``curves``: (mjd, mag, err) arrays. Times are deduplicated and sorted; curves shorter than
    ``min_obs`` (where the periodogram is meaningless) get NaN rows instead of failing the job.
    """
    ext = _feature_extractor()
    out = np.full((len(curves), len(ext.names)), np.nan, dtype=np.float64)
    for i, curve in enumerate(curves):
        t, m = np.asarray(curve[0], np.float64), np.asarray(curve[1], np.float64)
        e = np.asarray(curve[2], np.float64) if len(curve) > 2 and curve[2] is not None else np.full_like(m, 0.05)
        ok = np.isfinite(t) & np.isfinite(m) & np.isfinite(e) & (e > 0)
        t, m, e = t[ok], m[ok], e[ok]
        t, first = np.unique(t, return_index=True)
        m, e = m[first], e[first]
        if len(t) < min_obs:
            continue
        try:
            out[i] = ext(t, m, e, fill_value=np.nan)
        except BaseException as exc:  # the Rust extension's panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
    return out


def train_random_forest(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0, n_estimators: int = 300,
                        sample_weight: np.ndarray | None = None):
    """RandomForest on features; NaN replaced by the training medians (kept on the model for predict)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                          RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=2))
    fit_args = {} if sample_weight is None else {"randomforestclassifier__sample_weight": sample_weight}
    model.fit(np.nan_to_num(x_train, nan=np.nan, posinf=np.nan, neginf=np.nan), y_train, **fit_args)
    return model


def predict_random_forest(model, x: np.ndarray) -> np.ndarray:
    return model.predict(np.nan_to_num(x, nan=np.nan, posinf=np.nan, neginf=np.nan))


# ----------------------------------------------------------------------------------------------
# 5. figures (PNG, Agg backend)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrapped(text: str, width: int) -> str:
    """A figure title on lines of at most ``width`` characters (long ones ran off the figure)."""
    return "\n".join(textwrap.wrap(text, width))


def _tick_labels(ax, class_names: Sequence[str]) -> None:
    """Class names on both axes; the predicted ones turned only when they are long enough to collide."""
    n = len(class_names)
    longest = max((len(str(c)) for c in class_names), default=0)
    rotation, align = (0, "center") if longest <= 4 else ((45, "right") if longest <= 14 else (90, "center"))
    ax.set_xticks(range(n), class_names, rotation=rotation, ha=align, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix (each true class's share predicted as each class) with counts, and
    the macro F1 of these predictions under the title."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    n = len(class_names)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(n)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.5, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                share = f"{norm[i, j]:.2f}" if norm[i, j] >= 0.005 else "<0.01"
                ax.text(j, i, f"{share}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    _tick_labels(ax, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    f1 = scores(np.asarray(y_true), np.asarray(y_pred), n)["f1"]
    heading = _wrapped(title, 48)
    ax.set_title(f"{heading}\nmacro F1 {f1:.3f} over these {len(y_true)} predictions".strip(), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="share of the true class")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_gammas(gammas: np.ndarray, path: str | Path, title: str = "", spread: np.ndarray | None = None) -> Path:
    """The learned softmax layer weights (input embedding, then block 1..n), each bar's value printed on it.
    The axis is zoomed around the uniform weight 1/k: weights that moved little from it still show."""
    plt = _pyplot()
    gammas = np.asarray(gammas, dtype=float)
    k = len(gammas)
    names = ["input"] + [f"block {i}" for i in range(1, k)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * k + 2.5), 3.4))
    uniform = 1.0 / k
    ax.bar(range(k), gammas - uniform, bottom=uniform, yerr=spread, color="tab:blue", capsize=3,
           error_kw={"label": "± std over folds"} if spread is not None else {})
    ax.axhline(uniform, color="grey", ls="--", lw=1, label=f"uniform (1/{k})")
    reach = float(np.max(np.abs(gammas - uniform) + (np.asarray(spread) if spread is not None else 0.0)))
    pad = max(reach * 1.35, 0.01)
    ax.set_ylim(max(0.0, uniform - pad), uniform + pad)
    for i, g in enumerate(gammas):
        ax.annotate(f"{g:.3f}", (i, g), xytext=(0, 3 if g >= uniform else -10), textcoords="offset points",
                    ha="center", fontsize=7)
    ax.set_xticks(range(k), names, rotation=30)
    ax.set_ylabel("softmax(gamma)")
    ax.set_title(_wrapped(title, 60), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def embedding_map(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates of embeddings ``[N, D]`` (PCA to 50 dimensions first when D is larger)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    if len(x) < 5:
        raise ValueError(f"a t-SNE map needs at least 5 points, got {len(x)}")
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    from threadpoolctl import threadpool_limits

    # one thread: t-SNE's OpenMP threads slow it down many times over on a busy small machine
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    max_iter=500).fit_transform(x)


def plot_map(coords: np.ndarray, y: np.ndarray, class_names: Sequence[str], path: str | Path,
             title: str = "", bands: np.ndarray | None = None) -> Path:
    """2-D map coloured by class; with ``bands`` of more than one band, one marker shape per band (an
    object observed in two bands is two points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    names = sorted(set(np.asarray(bands).tolist())) if bands is not None else []
    shapes = dict(zip(names, "o^sDvP*X")) if len(names) > 1 else {}
    for c, name in enumerate(class_names):
        for band in shapes or [None]:
            sel = (y == c) if band is None else (y == c) & (np.asarray(bands) == band)
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=8, alpha=0.7, color=cmap(c % cmap.N),
                           marker=shapes.get(band, "o"), label=name if band is None else f"{name} ({band})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_wrapped(title, 60), fontsize=9)
    # beside the map, not over its points
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(class_names) // 25)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_attention(panels: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per class: the light curve coloured by the attention each observation receives.

    ``panels``: dicts with ``name``, ``x`` (phase or time), ``mag``, ``attention`` (same length) and
    ``xlabel``. Attention is the first block's weight received per observation (averaged over heads
    and queries), which is what the paper's figures show over a folded curve.
    """
    plt = _pyplot()
    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    # one colour scale for every panel, so colours compare across classes
    top = max(float(np.max(p["attention"])) for p in panels) if panels else 1.0
    for ax, p in zip(axes.ravel(), panels):
        sc = ax.scatter(p["x"], p["mag"], c=p["attention"], s=8, cmap="viridis", vmin=0.0, vmax=top)
        ax.invert_yaxis()
        ax.set_xlabel(p.get("xlabel", "time"), fontsize=8)
        ax.set_ylabel("magnitude", fontsize=8)
        ax.set_title(_wrapped(p["name"], 40), fontsize=8)
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="attention / uniform")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fold_phase(mjd: np.ndarray, period: float | None) -> tuple[np.ndarray, str]:
    """Phase in [0, 1) when a period is known, else days since the first observation."""
    mjd = np.asarray(mjd, np.float64)
    if period and np.isfinite(period) and period > 0:
        return np.mod(mjd - mjd.min(), period) / period, "phase"
    return mjd - mjd.min(), "days"


# ----------------------------------------------------------------------------------------------
# 6. labelled sets from the lake


@dataclass
class DatasetSpec:
    """A labelled set: survey + band(s) + label set + class filter."""

    name: str
    survey: str
    label_set: str
    bands: tuple[str, ...] | None = None  # None: every band (curves of one object stay together in folds)
    classes: tuple[str, ...] | None = None  # None: every class with at least min_members objects
    min_members: int = 20
    max_per_class: int | None = None  # a random subset of the objects of larger classes (quick runs only)

    def __post_init__(self) -> None:
        _check_settings(self, "dataset", {"min_members": _NON_NEGATIVE_INT, "max_per_class": _POSITIVE_INT})


DATASETS: dict[str, DatasetSpec] = {
    "asas": DatasetSpec("asas", "asas", "class", None, None, 20),
    "stripe82": DatasetSpec("stripe82", "sdss-stripe82", "rrlyrae_type", ("g",), ("ab", "c"), 20),
    "stripe82-r": DatasetSpec("stripe82-r", "sdss-stripe82", "rrlyrae_type", ("r",), ("ab", "c"), 20),
    "ogle-modes": DatasetSpec("ogle-modes", "ogle", "mode", ("I",), None, 20),
    "synthetic": DatasetSpec("synthetic", "synthetic", "class", None, None, 10),
}


def named_dataset(name: str) -> DatasetSpec:
    """The labelled set of :data:`DATASETS` called ``name``, or a LookupError naming those there are."""
    if name not in DATASETS:
        raise LookupError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class LabelledSet:
    """Cleaned curves with integer labels; one row per single-band curve."""

    name: str
    object_ids: np.ndarray  # str [N]
    bands: np.ndarray  # str [N]
    y: np.ndarray  # int [N]
    class_names: list[str]
    curves: list[tuple]  # (mjd float64, mag float32, err float32)
    periods: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # why rows or classes were left out

    def __len__(self) -> int:
        return len(self.y)


def load_labelled_set(lake: str, spec: DatasetSpec, periods: dict[str, float] | None = None,
                      clean: bool = True) -> LabelledSet:
    """Curves and labels of ``spec`` from the lake (DuckDB over the catalog views, parameters bound).

    Observation-level cleaning only (the noise criteria would drop the variable stars themselves);
    classes with fewer than ``spec.min_members`` objects are left out and counted in ``dropped``.
    """
    from astromer.embeddings import usable_curve
    from astromer.lake import connect
    from astromer.lake.paths import validate_band, validate_survey

    validate_survey(spec.survey)
    con = connect(lake)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    missing = {"lightcurves", "labels"} - views
    if missing:
        raise FileNotFoundError(f"lake {lake} has no {sorted(missing)} table(s): ingest the survey first")
    sql = ("SELECT c.object_id, c.band, c.mjd, c.mag, c.err, c.quality, l.label FROM lightcurves c "
           "JOIN labels l ON l.object_id = c.object_id AND l.survey = c.survey "
           "WHERE c.survey = ? AND l.label_set = ?")
    params: list = [spec.survey, spec.label_set]
    if spec.bands:
        sql += " AND c.band IN (SELECT unnest(?::VARCHAR[]))"
        params.append([validate_band(b) for b in spec.bands])
    sql += " ORDER BY c.object_id, c.band"
    table = con.sql(sql, params=params).to_arrow_table()
    if table.num_rows == 0:
        from astromer.data import DataSpec, label_lookup
        from astromer.embeddings import check_selection

        # which part of the selection the lake lacks, and what it has instead (the checks the embed and
        # finetune jobs make): the survey (the lake's surveys), a band (the survey's), the label set (the
        # survey's label sets, or the labelled surveys)
        check_selection(lake, spec.survey, spec.bands)
        label_lookup(DataSpec(lake=lake, surveys=[spec.survey], label_set=spec.label_set))
        raise LookupError(f"no labelled curves for survey {spec.survey!r}, label set {spec.label_set!r}, bands "
                          f"{spec.bands or 'all'} in lake {lake}")
    if periods is None:
        rows = con.execute("SELECT object_id, label FROM labels WHERE survey = ? AND label_set = 'period'",
                           [spec.survey]).fetchall()
        periods = {}
        for oid, value in rows:
            try:
                periods[str(oid)] = float(value)
            except ValueError:
                continue
    dropped: dict[str, int] = {}
    ids, bands, labels, curves = [], [], [], []
    cols = {name: table.column(name) for name in table.schema.names}
    if spec.classes:
        present = set(cols["label"].to_pylist())
        unknown = sorted(set(spec.classes) - present)
        if unknown:
            raise LookupError(f"dataset {spec.name}: no class {unknown} in label set {spec.label_set!r} of survey "
                              f"{spec.survey!r}; it has {sorted(present)}")
    for i in range(table.num_rows):
        label = cols["label"][i].as_py()
        if spec.classes and label not in spec.classes:
            dropped["not a chosen class"] = dropped.get("not a chosen class", 0) + 1
            continue
        curve, reason = usable_curve(cols["mjd"][i].values.to_numpy(zero_copy_only=False),
                                     cols["mag"][i].values.to_numpy(zero_copy_only=False),
                                     cols["err"][i].values.to_numpy(zero_copy_only=False),
                                     cols["quality"][i].values.to_numpy(zero_copy_only=False), clean)
        if curve is None or len(curve[0]) < 5:
            key = reason or "fewer than 5 usable observations"
            dropped[key] = dropped.get(key, 0) + 1
            continue
        ids.append(cols["object_id"][i].as_py())
        bands.append(cols["band"][i].as_py())
        labels.append(label)
        curves.append(curve)
    ids_arr, labels_arr = np.array(ids, dtype=object).astype(str), np.array(labels, dtype=object).astype(str)
    members = {c: len(set(ids_arr[labels_arr == c])) for c in set(labels_arr.tolist())}
    keep_classes = sorted(c for c, n in members.items() if n >= spec.min_members)
    for c, n in members.items():
        if n < spec.min_members:
            dropped[f"class {c!r}: fewer objects than {spec.min_members}"] = n
    if len(keep_classes) < 2:
        raise ValueError(f"dataset {spec.name}: fewer than 2 classes with at least {spec.min_members} objects "
                         f"({members})")
    keep = np.isin(labels_arr, keep_classes)
    if spec.max_per_class:
        rng = np.random.default_rng(0)
        for c in keep_classes:
            objs = sorted(set(ids_arr[labels_arr == c]))
            if len(objs) > spec.max_per_class:
                drop = set(rng.choice(objs, size=len(objs) - spec.max_per_class, replace=False).tolist())
                keep &= ~np.isin(ids_arr, list(drop))
                dropped[f"class {c!r}: beyond max_per_class {spec.max_per_class}"] = len(drop)
    index = {c: k for k, c in enumerate(keep_classes)}
    return LabelledSet(
        name=spec.name, object_ids=ids_arr[keep], bands=np.array(bands, dtype=object).astype(str)[keep],
        y=np.array([index[c] for c in labels_arr[keep]], dtype=np.int64), class_names=keep_classes,
        curves=[c for c, k in zip(curves, keep) if k], periods=dict(periods), dropped=dropped)


def read_periods_csv(path: str | Path) -> dict[str, float]:
    """object id -> period from a CSV whose first column is the id and one column is named like ``per``."""
    import csv

    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader)]
        col = next((i for i, h in enumerate(header) if h in ("per", "period", "p")), None)
        if col is None:
            raise ValueError(f"{path}: no period column (expected one named per, period or p) in {header}")
        out = {}
        for n, row in enumerate(reader, start=2):
            try:
                out[row[0].strip()] = float(row[col])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}, line {n}: cannot read a period from {row}") from exc
    return out


# ----------------------------------------------------------------------------------------------
# 7. the whole protocol on one labelled set


@dataclass
class RunSettings:
    """Everything ``jobs/classify.py --config`` reads (the sweep writes the same structure)."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    finetune: bool = False
    # the official scripts' finetuning (lr 1e-5, batch 16, patience 20 on the validation loss); with lr 1e-4,
    # batch 32 and patience 3 (this default before) finetuning lowered OGLE-IV's macro F1 at every size
    finetune_config: dict = field(default_factory=lambda: {
        "lr": 1e-5, "batch_size": 16, "epochs": 20, "patience": 20, "warmup_steps": 0, "schedule": "constant"})
    baselines: bool = True  # light-curve features + RF, and the skip head on a random encoder
    rf_trees: int = 300
    embed_batch_size: int = 256

    def __post_init__(self) -> None:
        for name, kind in (("finetune", bool), ("baselines", bool), ("rf_trees", int), ("embed_batch_size", int)):
            setattr(self, name, typed_setting(name, getattr(self, name), kind))
        _check_ranges(self, "", {"rf_trees": _POSITIVE_INT, "embed_batch_size": _POSITIVE_INT})

    def to_dict(self) -> dict:
        return {"classifier": self.classifier.to_dict(), "protocol": self.protocol.to_dict(),
                "finetune": self.finetune, "finetune_config": dict(self.finetune_config),
                "baselines": self.baselines, "rf_trees": self.rf_trees, "embed_batch_size": self.embed_batch_size}

    @classmethod
    def from_dict(cls, data: dict) -> RunSettings:
        unknown = set(data) - {"classifier", "protocol", "finetune", "finetune_config", "baselines", "rf_trees",
                               "embed_batch_size", "metric", "trial", "sweep"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        for key in ("classifier", "protocol", "finetune_config"):
            if key in data and not isinstance(data[key], dict):
                raise ValueError(f"setting {key}={data[key]!r}: expected a mapping of settings")
        out = cls(**{key: data[key] for key in ("finetune", "baselines", "rf_trees", "embed_batch_size")
                     if key in data})
        if "classifier" in data:
            out.classifier = ClassifierConfig.from_dict({**out.classifier.to_dict(), **data["classifier"]})
        if "protocol" in data:
            out.protocol = ProtocolConfig.from_dict({**out.protocol.to_dict(), **data["protocol"]})
        if "finetune_config" in data:
            from astromer.train import TrainConfig

            # the checks fit_windows' TrainConfig makes, here before any embedding or training
            _known_fields(TrainConfig, data["finetune_config"], "finetune_config")
            out.finetune_config = {**out.finetune_config, **data["finetune_config"]}
            try:
                TrainConfig.from_dict(out.finetune_config)
            except ValueError as exc:
                raise ValueError(f"finetune_config: {exc}") from None
        return out


METHOD_FROZEN = "astromer skip (frozen)"
METHOD_FINETUNED = "astromer skip (finetuned)"
METHOD_RANDOM = "random encoder skip"
METHOD_RF = "light-curve features + RF"
#: a reference, not a method: every test curve given the test set's commonest class (the accuracy that
#: says nothing was learnt on an imbalanced test set)
METHOD_COMMONEST = "commonest test class (reference)"


def _slug(text: str) -> str:
    """A method's name in file and metric names: ``light-curve features + RF`` -> ``light-curve-features-rf``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def random_encoder(model, seed: int = 0):
    """A freshly initialised encoder of the same architecture (what pretraining adds is the difference)."""
    from astromer.model import Astromer

    torch.manual_seed(seed)
    return Astromer(copy.deepcopy(model.config)).eval()


def _finetuned_layers(model, data: LabelledSet, fold: Fold, settings: RunSettings, seed: int) -> np.ndarray:
    """Finetune a copy of the encoder on the fold's training curves, then embed the fold's rows."""
    from astromer.train import fit_windows

    tuned = copy.deepcopy(model)
    train_rows = np.unique(fold.train)
    fit_windows(tuned, [data.curves[i] for i in train_rows], {**settings.finetune_config, "seed": seed},
                val_curves=[data.curves[i] for i in fold.val] or None)
    rows = np.unique(np.concatenate([fold.train, fold.val, fold.test]))
    layers = np.zeros((len(data),) + (model.config.n_layers + 1, model.config.d_model), np.float32)
    layers[rows] = tuned.embed([data.curves[i] for i in rows], batch_size=settings.embed_batch_size,
                               all_layers=True)
    return layers


def cached_layers(lake: str, model_name: str, version: str, survey: str,
                  data: LabelledSet) -> tuple[np.ndarray | None, str]:
    """Per-layer means of ``data``'s curves from the lake's embeddings of (model, version, survey), as written
    by the embed job with the same cleaning, and ``"used"``; or None and why not: absent, embedded from
    another ingest of the survey than the lake holds now, or a curve missing or with another observation
    count."""
    import json

    import pyarrow.dataset as pads

    from astromer.lake.catalog import published_ingest_id
    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    folder = paths.embeddings(model_name, version, survey)
    if not paths.fs.exists(folder):
        return None, "absent"
    report_path = paths.embedding_report(model_name, version, survey)
    embedded = {}
    if paths.fs.exists(report_path):
        with paths.fs.open(report_path, "r") as handle:
            embedded = json.load(handle).get("bands", {})
    current = published_ingest_id(paths, survey)
    for band in sorted(set(data.bands.tolist())):
        if embedded and band not in embedded:
            return None, f"incomplete (band {band} was not embedded)"
        source = embedded.get(band, {}).get("ingest_id")
        if source != current:
            return None, (f"stale (band {band} was embedded from ingest {source or 'unknown'}, the lake holds "
                          f"ingest {current} now: jobs/embed.py writes them again)")
    table = pads.dataset(folder, filesystem=paths.fs, format="parquet").to_table(
        columns=["object_id", "band", "n_obs", "layer_means"])
    if table.num_rows == 0:
        return None, "absent"
    k = table.schema.field("layer_means").type.list_size
    d = table.schema.field("layer_means").type.value_type.list_size
    values = table.column("layer_means").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    layers = values.reshape(table.num_rows, k, d)
    index = {(o, b): i for i, (o, b) in enumerate(zip(table.column("object_id").to_pylist(),
                                                          table.column("band").to_pylist()))}
    n_obs = table.column("n_obs").to_numpy()
    rows = [index.get((o, b)) for o, b in zip(data.object_ids.tolist(), data.bands.tolist())]
    differ = sum(1 for r, c in zip(rows, data.curves) if r is None or n_obs[r] != len(c[0]))
    if differ:
        return None, f"incomplete ({differ:,} of {len(rows):,} curves missing or with other observation counts)"
    return layers[rows].astype(np.float32), "used"


def run_protocol(data: LabelledSet, model, settings: RunSettings, out_dir: str | Path, *, log_mlflow: bool = True,
                 progress: Callable[[str], None] | None = print, frozen_layers: np.ndarray | None = None) -> dict:
    """The paper's protocol on ``data`` with ``model`` and the baselines, on the same folds.

    Writes ``results.md`` (the table), ``results.json`` (per fold and summary), and PNG figures to
    ``out_dir``; with ``log_mlflow`` (an active parent run) each (method, samples per class) scenario becomes
    a nested run with its per-fold metrics, mean and std, and figures. ``frozen_layers`` are the model's
    per-layer means of ``data`` when already computed (the lake's embeddings, see :func:`cached_layers`).
    """
    import time

    if settings.finetune:   # before the embeddings: what fit_windows would refuse at the first fold
        from astromer.train import TrainConfig, check_model_windows

        check_model_windows(TrainConfig.from_dict(settings.finetune_config).mask, model.config.window_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    n_classes = len(data.class_names)
    folds = make_folds(data.object_ids, data.y, settings.protocol)
    t0 = time.perf_counter()
    say(f"[{data.name}] {len(data)} curves, {len(set(data.object_ids))} objects, {n_classes} classes; "
        f"{len(folds)} fold x scenario splits")
    encoders = {METHOD_FROZEN: model}
    if settings.baselines:
        encoders[METHOD_RANDOM] = random_encoder(model, settings.classifier.seed)
    cached = {}
    for method, encoder in encoders.items():
        if method == METHOD_FROZEN and frozen_layers is not None:
            cached[method] = np.asarray(frozen_layers, np.float32)
            say(f"[{data.name}] {method}: per-layer means from the lake's embeddings {cached[method].shape}")
            continue
        cached[method] = encoder.embed(data.curves, batch_size=settings.embed_batch_size, all_layers=True)
        say(f"[{data.name}] embedded with {method}: {cached[method].shape} ({time.perf_counter() - t0:.0f} s)")
    features = None
    if settings.baselines:
        features = lightcurve_features(data.curves)
        say(f"[{data.name}] light-curve features {features.shape} ({time.perf_counter() - t0:.0f} s)")

    results: list[dict] = []
    predictions: dict[tuple, list] = {}
    gammas: dict[tuple, list] = {}
    maps: dict = {}
    largest = max(settings.protocol.samples_per_class)
    for fold in folds:
        fold_results = len(results)              # where this fold's rows start
        fold_key = {"fold": fold.fold, "samples_per_class": fold.samples_per_class}
        key_base = {**fold_key, "train_objects": distinct_training_objects(data, fold)}
        skip_inputs = dict(cached)
        if settings.finetune:
            skip_inputs[METHOD_FINETUNED] = _finetuned_layers(model, data, fold, settings,
                                                              settings.classifier.seed + fold.fold)
        clf_config = ClassifierConfig.from_dict({**settings.classifier.to_dict(),
                                                 "seed": settings.classifier.seed + fold.fold})
        rows, weights = training_rows(fold.train, clf_config)
        for method, layers in skip_inputs.items():
            clf = train_skip_classifier(layers[rows], data.y[rows], layers[fold.val], data.y[fold.val], n_classes,
                                        clf_config, sample_weight=weights)
            pred = clf.predict(layers[fold.test])
            results.append({"method": method, **key_base, **scores(data.y[fold.test], pred, n_classes),
                            "epochs": len(clf.history), "best_epoch": clf.best_epoch})
            predictions.setdefault((method, fold.samples_per_class), []).append((data.y[fold.test], pred))
            gammas.setdefault((method, fold.samples_per_class), []).append(clf.head.gammas())
            if fold.fold == 0 and fold.samples_per_class == largest and method != METHOD_RANDOM:
                maps[method] = (clf.pooled(layers[fold.test]), data.y[fold.test], fold.test)
        if features is not None:
            rf = train_random_forest(features[rows], data.y[rows], seed=fold.fold, n_estimators=settings.rf_trees,
                                     sample_weight=weights)
            pred = predict_random_forest(rf, features[fold.test])
            results.append({"method": METHOD_RF, **key_base, **scores(data.y[fold.test], pred, n_classes)})
            predictions.setdefault((METHOD_RF, fold.samples_per_class), []).append((data.y[fold.test], pred))
            commonest = np.full(len(fold.test), np.bincount(data.y[fold.test], minlength=n_classes).argmax())
            results.append({"method": METHOD_COMMONEST, **fold_key, **scores(data.y[fold.test], commonest, n_classes)})
        last = {r["method"]: round(r["f1"], 3) for r in results[fold_results:] if r["method"] != METHOD_COMMONEST}
        say(f"[{data.name}] fold {fold.fold} / {fold.samples_per_class} per class: macro F1 {last} "
            f"({time.perf_counter() - t0:.0f} s)")

    summary = summarise(results)
    order = [METHOD_FROZEN, METHOD_FINETUNED, METHOD_RANDOM, METHOD_RF, METHOD_COMMONEST]
    summary.sort(key=lambda r: (order.index(r["method"]), r["samples_per_class"]))
    title = (f"{data.name}: {n_classes} classes, {len(set(data.object_ids))} objects, "
             f"{settings.protocol.n_folds} folds")
    table = markdown_table(summary, title)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(__import__("json").dumps(
        {"dataset": data.name, "classes": data.class_names, "settings": settings.to_dict(), "results": results,
         "summary": summary, "dropped": data.dropped,
         # the learned layer weights, softmax(gamma) per fold: input embedding, then block 1..n
         "gammas": [{"method": method, "samples_per_class": spc, "per_fold": np.stack(g).tolist()}
                    for (method, spc), g in gammas.items()]}, indent=2, default=float))

    figures: dict[tuple, list[Path]] = {}
    for (method, spc), pairs in predictions.items():
        y_true = np.concatenate([p[0] for p in pairs])
        y_pred = np.concatenate([p[1] for p in pairs])
        slug = f"{_slug(method)}-{spc}"
        paths = [plot_confusion(y_true, y_pred, data.class_names, out / f"confusion-{slug}.png",
                                f"{data.name}: {method}, {spc} per class (all folds)")]
        if (method, spc) in gammas:
            g = np.stack(gammas[(method, spc)])
            paths.append(plot_gammas(g.mean(0), out / f"gammas-{slug}.png",
                                     f"{data.name}: {method}, {spc} per class", spread=g.std(0)))
        figures[(method, spc)] = paths
    extra: list[Path] = []
    for method, (pooled, y, test_rows) in maps.items():
        if len(pooled) >= 5:
            keep = _subsample_per_class(y, 150, seed=0)
            extra.append(plot_map(embedding_map(pooled[keep]), y[keep], data.class_names,
                                  out / f"tsne-{_slug(method)}.png",
                                  f"{data.name}: t-SNE of the test curves as the classifier sees them (its "
                                  f"standardised, layer-weighted embedding; {method}, fold 0, {largest} per class)",
                                  bands=data.bands[test_rows[keep]]))
    try:
        extra.append(attention_figure(model, data, out / "attention-first-block.png"))
    except ValueError as exc:  # a model without attention maps, or no curve to show
        say(f"[{data.name}] no attention figure: {exc}")
    say(f"[{data.name}] done in {time.perf_counter() - t0:.0f} s\n{table}")

    if log_mlflow:
        _log_to_mlflow(data, settings, results, summary, figures, extra, out)
    return {"results": results, "summary": summary, "table": table, "figures": figures, "extra": extra}


def _subsample_per_class(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def attention_figure(model, data: LabelledSet, path: str | Path) -> Path:
    """First-block attention received per observation, for one well-sampled curve per class, over the
    phase-folded curve when the object's period is known (else over time). One window per panel: the
    longest curve that fits in one, else the first window of the longest curve, as the panel says."""
    from astromer.embeddings import observation_detail

    length = model.config.window_length
    panels = []
    for c, name in enumerate(data.class_names):
        rows = np.flatnonzero(data.y == c)
        if len(rows) == 0:
            continue
        lengths = np.array([len(data.curves[i][0]) for i in rows])
        fits = lengths <= length
        row = int(rows[fits][np.argmax(lengths[fits])] if fits.any() else rows[np.argmax(lengths)])
        mjd, mag, err = (np.asarray(a)[:length] for a in data.curves[row])
        n_all = len(data.curves[row][0])
        detail = observation_detail(model, mjd, mag, err)
        x, xlabel = fold_phase(mjd, data.periods.get(str(data.object_ids[row])))
        shown = f"first {len(mjd)} of {n_all} observations" if n_all > len(mjd) else f"{n_all} observations"
        panels.append({"name": f"{name}: {data.object_ids[row]} ({data.bands[row]}), {shown}", "x": x, "mag": mag,
                       # relative to uniform attention (1 / the window's observations): 1 means an average share
                       "attention": detail["attention_received"] * len(mjd), "xlabel": xlabel})
    if not panels:
        raise ValueError("no curve to show")
    return plot_attention(panels, path, f"{data.name}: first-block attention received per observation "
                                        "(1 = a uniform share)")


def _log_to_mlflow(data: LabelledSet, settings: RunSettings, results: list[dict], summary: list[dict],
                   figures: dict, extra: list[Path], out: Path) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_params({"dataset": data.name, "classes": ",".join(data.class_names), "n_curves": len(data),
                       "n_objects": len(set(data.object_ids)), "finetune": settings.finetune,
                       **{f"clf.{k}": v for k, v in settings.classifier.to_dict().items()},
                       **{f"protocol.{k}": v for k, v in settings.protocol.to_dict().items()}})
    for row in summary:
        method, spc = row["method"], row["samples_per_class"]
        with mlflow.start_run(run_name=f"{data.name} | {method} | {spc} per class", nested=True,
                              experiment_id=mlflow.active_run().info.experiment_id):
            mlflow.set_tags({"dataset": data.name, "method": method, "samples_per_class": spc})
            mlflow.log_params({"method": method, "samples_per_class": spc, "n_folds": row["n_folds"]})
            for r in results:
                if r["method"] == method and r["samples_per_class"] == spc:
                    mlflow.log_metrics({f"fold_{m}": r[m] for m in METRICS}, step=r["fold"])
            mlflow.log_metrics({k: v for k, v in row.items() if k.endswith("_mean") or k.endswith("_std")})
            for p in figures.get((method, spc), []):
                mlflow.log_artifact(str(p), "figures")
        mlflow.log_metric(f"{_slug(method)}.{spc}.f1_mean", row["f1_mean"])
    for p in extra:
        mlflow.log_artifact(str(p), "figures")
    mlflow.log_artifact(str(out / "results.md"))
    mlflow.log_artifact(str(out / "results.json"))
