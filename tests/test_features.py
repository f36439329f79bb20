"""Evaluation of frozen features (`fmjax.eval.features`): k-NN, few-shot
ridge, the linear probe, stratified label subsets and PCA, against NumPy
references on synthetic features."""

import numpy as np
import pytest


def test_knn_is_a_temperature_weighted_vote_of_the_nearest_neighbours():
    from fmjax.eval.features import knn_accuracy

    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 200)
    test = rng.normal(size=(50, 8)).astype(np.float32)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(test) @ unit(train).T
    want = []
    for row in sims:
        top = np.argsort(-row)[:20]
        votes = np.zeros(3)
        np.add.at(votes, labels[top], np.exp(row[top] / 0.07))
        want.append(np.argmax(votes))
    truth = rng.integers(0, 3, 50)
    got = knn_accuracy(train, labels, test, truth, 3)
    assert got == pytest.approx(np.mean(np.asarray(want) == truth))


def test_fewshot_ridge_and_linear_probe_read_separable_classes():
    from fmjax.eval.features import (
        feature_report,
        fewshot_accuracy,
        linear_probe_accuracy,
    )

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 4
    labels = rng.integers(0, 4, 400)
    feats = centres[labels] + rng.normal(size=(400, 16))
    test_labels = rng.integers(0, 4, 100)
    test = centres[test_labels] + rng.normal(size=(100, 16))
    assert fewshot_accuracy(feats, labels, test, test_labels, shots=5) > 0.95
    assert linear_probe_accuracy(feats, labels, test, test_labels, 4) > 0.95
    noise = rng.normal(size=(400, 16))  # features that know nothing
    assert fewshot_accuracy(noise, labels, test, test_labels, shots=5) < 0.5
    # Different seeds draw different shots: the spread is reported.
    report = feature_report(feats, labels, test, test_labels, 4, shots=(1,))
    assert set(report) == {"knn_accuracy", "linear_probe_accuracy",
                           "fewshot_1_accuracy", "fewshot_1_std"}  # fmt: skip
    with pytest.raises(ValueError, match="class 3 has"):
        fewshot_accuracy(feats[labels != 3][:5], labels[labels != 3][:5] * 0 + 3,
                         test, test_labels, shots=10)  # fmt: skip
    # k-NN with a stratified 5% of the labels: a key of its own.
    report = feature_report(feats, labels, test, test_labels, 4, (), (),
                            knn_fractions=(0.05,))  # fmt: skip
    assert report["knn_5pct_accuracy"] > 0.9


def test_label_subsets_are_stratified_and_pca_keeps_the_top_components():
    from fmjax.eval.features import label_subset, pca_features

    labels = np.repeat(np.arange(3), [100, 200, 7])
    subset = label_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[subset]).tolist() == [10, 20, 1]  # >= 1 per class
    assert not np.array_equal(subset, label_subset(labels, 0.1, seed=1))
    rng = np.random.default_rng(0)
    # Variance 100 along one direction, 1 along the others.
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    train = rng.normal(size=(500, 8)) + rng.normal(size=(500, 1)) * 10 * direction
    projected, test = pca_features(train, train[:5], 1)
    assert projected.shape == (500, 1) and test.shape == (5, 1)
    assert projected.var() > 80 and np.allclose(test, projected[:5], atol=1e-5)
