"""Evaluations of frozen features: how much a representation knows about labels
it never saw in training.

    knn_accuracy(train_ND, train_N, test_MD, test_M, num_classes)   # k = 20
    fewshot_accuracy(train_ND, train_N, test_MD, test_M, shots=10, seed=0)
    linear_probe_accuracy(train_ND, train_N, test_MD, test_M, num_classes)

Features are arrays computed once (the encoder is never touched: nothing here
takes its params). k-NN is DINO's weighted vote: cosine similarities of
L2-normalised features, the k nearest training points vote for their class
with weight exp(similarity / 0.07). Few-shot is big_vision's `fewshot_lsr`:
`shots` training examples per class drawn with `seed`, features whitened by
their mean and standard deviation, closed-form ridge regression onto +-1
one-hot targets, argmax on test. The linear probe trains multinomial logistic
regression (AdamW, full batch) on standardised features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

FEWSHOT_L2 = 1.0
KNN_K = 20
KNN_TEMPERATURE = 0.07


def _check(train_ND, train_N, test_MD, test_M) -> None:
    if train_ND.ndim != 2 or test_MD.ndim != 2 or train_ND.shape[1] != test_MD.shape[1]:
        raise ValueError(
            f"features {train_ND.shape} and {test_MD.shape}: expected [N, D] and "
            "[M, D] with the same D"
        )
    if train_N.shape != train_ND.shape[:1] or test_M.shape != test_MD.shape[:1]:
        raise ValueError(
            f"labels {train_N.shape} / {test_M.shape} do not match features "
            f"{train_ND.shape} / {test_MD.shape}"
        )


def knn_accuracy(
    train_ND, train_N, test_MD, test_M, num_classes: int,
    k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024,
) -> float:  # fmt: skip
    """Accuracy of the similarity-weighted vote of the k nearest neighbours."""
    _check(train_ND, train_N, test_MD, test_M)
    train = jnp.asarray(train_ND, jnp.float32)
    train = train / jnp.maximum(jnp.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    onehot_NC = jax.nn.one_hot(jnp.asarray(train_N), num_classes)
    k = min(k, len(train_N))

    @jax.jit
    def predict(test_mD):
        test_mD = test_mD / jnp.maximum(
            jnp.linalg.norm(test_mD, axis=1, keepdims=True), 1e-12
        )
        sims_mN = test_mD @ train.T
        top_mk, idx_mk = jax.lax.top_k(sims_mN, k)
        votes_mkC = onehot_NC[idx_mk] * jnp.exp(top_mk / temperature)[..., None]
        return jnp.argmax(votes_mkC.sum(axis=1), axis=1)

    test = np.asarray(test_MD, np.float32)
    predictions = np.concatenate(
        [np.asarray(predict(test[i : i + chunk])) for i in range(0, len(test), chunk)]
    )
    return float(np.mean(predictions == np.asarray(test_M)))


def fewshot_accuracy(
    train_ND, train_N, test_MD, test_M, shots: int, seed: int = 0,
    l2_reg: float = FEWSHOT_L2,
) -> float:  # fmt: skip
    """Ridge regression on `shots` examples per class (drawn with `seed`)."""
    _check(train_ND, train_N, test_MD, test_M)
    train_N = np.asarray(train_N)
    classes = np.unique(train_N)
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        members = np.flatnonzero(train_N == c)
        if len(members) < shots:
            raise ValueError(
                f"class {c} has {len(members)} training examples; {shots}-shot "
                "needs that many"
            )
        picked.extend(rng.choice(members, shots, replace=False))
    x_ND = np.asarray(train_ND, np.float64)[picked]
    mean_D, std_D = x_ND.mean(axis=0), x_ND.std(axis=0) + 1e-6
    x_ND = (x_ND - mean_D) / std_D
    y_NC = 2.0 * (train_N[picked][:, None] == classes[None]) - 1.0
    dim = x_ND.shape[1]
    w_DC = np.linalg.solve(x_ND.T @ x_ND + l2_reg * np.eye(dim), x_ND.T @ y_NC)
    test = (np.asarray(test_MD, np.float64) - mean_D) / std_D
    predictions = classes[np.argmax(test @ w_DC, axis=1)]
    return float(np.mean(predictions == np.asarray(test_M)))


def linear_probe_accuracy(
    train_ND, train_N, test_MD, test_M, num_classes: int,
    steps: int = 500, learning_rate: float = 0.05, weight_decay: float = 1e-4,
) -> float:  # fmt: skip
    """Logistic regression on standardised frozen features, full batch."""
    _check(train_ND, train_N, test_MD, test_M)
    x_ND = np.asarray(train_ND, np.float32)
    mean_D, std_D = x_ND.mean(axis=0), x_ND.std(axis=0) + 1e-6
    x_ND = jnp.asarray((x_ND - mean_D) / std_D)
    y_N = jnp.asarray(train_N)
    params = {"w": jnp.zeros((x_ND.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(params):
        logits = x_ND @ params["w"] + params["b"][None]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_N).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, steps)
        return params

    params = train(params)
    test = jnp.asarray((np.asarray(test_MD, np.float32) - mean_D) / std_D)
    predictions = np.asarray(jnp.argmax(test @ params["w"] + params["b"][None], axis=1))
    return float(np.mean(predictions == np.asarray(test_M)))


def label_subset(train_N, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a stratified `fraction` of the examples (at least one per
    class), drawn with `seed`: "1% of the labels"."""
    train_N = np.asarray(train_N)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(train_N):
        members = np.flatnonzero(train_N == c)
        count = max(1, int(round(fraction * len(members))))
        picked.extend(rng.choice(members, count, replace=False))
    return np.sort(np.asarray(picked))


def pca_features(train_ND, test_MD, dim: int):
    """(train, test) projected on the top `dim` principal components of train
    (a baseline representation: the evaluators on PCA of pixels)."""
    x_ND = np.asarray(train_ND, np.float64)
    mean_D = x_ND.mean(axis=0)
    _, _, vt_KD = np.linalg.svd(x_ND - mean_D, full_matrices=False)
    basis_DK = vt_KD[:dim].T
    project = lambda x: (np.asarray(x, np.float64) - mean_D) @ basis_DK  # noqa: E731
    return project(train_ND).astype(np.float32), project(test_MD).astype(np.float32)


def feature_report(
    train_ND, train_N, test_MD, test_M, num_classes: int,
    shots=(1, 5, 10, 25), seeds=(0, 1, 2), knn_fractions=(),
) -> dict[str, float]:  # fmt: skip
    """k-NN (all train labels, and a stratified fraction of them for each of
    `knn_fractions`: `knn_1pct_accuracy`), few-shot (mean and std over seeds
    per shot count) and linear-probe accuracies, as one flat dict of numbers."""
    out = {
        "knn_accuracy": knn_accuracy(train_ND, train_N, test_MD, test_M, num_classes),
        "linear_probe_accuracy": linear_probe_accuracy(
            train_ND, train_N, test_MD, test_M, num_classes
        ),
    }
    for fraction in knn_fractions:
        subset = label_subset(train_N, fraction)
        out[f"knn_{fraction * 100:g}pct_accuracy"] = knn_accuracy(
            np.asarray(train_ND)[subset], np.asarray(train_N)[subset],
            test_MD, test_M, num_classes,
        )  # fmt: skip
    for shot in shots:
        accs = [
            fewshot_accuracy(train_ND, train_N, test_MD, test_M, shot, s) for s in seeds
        ]
        out[f"fewshot_{shot}_accuracy"] = float(np.mean(accs))
        out[f"fewshot_{shot}_std"] = float(np.std(accs))
    return out
