"""Self-supervised vision tasks on views of the same image: SimCLR (`simclr`,
configs/vit_simclr.py) and DINO (`dino`, configs/vit_dino.py).

Both read several augmented views per image (`data.views`, groups of
`fmjax.data.images`) and put a projection head on the ViT's pooled features
(`model.proj_*`); the features evaluated and exported are those before the
head. Losses are written over the global batch: under `jax.jit` with the
batch sharded over devices, each device's rows meet every device's columns
(XLA gathers them), and sums are divided by global counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.config import ConfigError
from fmjax.models.projection import PROTOTYPES
from fmjax.tasks.vision import ImageTask, apply_to_images


def _normalise(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def nt_xent_sums(z_BVF, weights_B, temperature: float) -> dict:
    """NT-Xent (SimCLR) sums over the global batch: every view of every real
    row is an anchor; its positives are the other views of its image, its
    negatives every view of every other real image. With V views per image the
    loss of an anchor is the mean over its V - 1 positives of
    -log softmax(cos / T) (V = 2: SimCLR's loss). Returns loss_sum, count (real
    anchors) and correct (anchors whose nearest candidate is a positive)."""
    batch, views, _ = z_BVF.shape
    z_NF = _normalise(z_BVF.astype(jnp.float32)).reshape(batch * views, -1)
    image_N = jnp.repeat(jnp.arange(batch), views)
    real_N = jnp.repeat(weights_B > 0, views)
    logits_NN = z_NF @ z_NF.T / temperature
    same_NN = image_N[:, None] == image_N[None, :]
    self_NN = jnp.eye(batch * views, dtype=bool)
    candidate_NN = ~self_NN & real_N[None, :]
    # A large finite negative rather than -inf: no inf * 0 in padding rows.
    logits_NN = jnp.where(candidate_NN, logits_NN, -1e9)
    log_probs_NN = jax.nn.log_softmax(logits_NN, axis=-1)
    positive_NN = same_NN & candidate_NN
    loss_N = -jnp.sum(jnp.where(positive_NN, log_probs_NN, 0.0), axis=-1) / (views - 1)
    nearest_N = jnp.argmax(logits_NN, axis=-1)
    correct_N = jnp.take_along_axis(positive_NN, nearest_N[:, None], axis=1)[:, 0]
    return {
        "loss_sum": jnp.sum(jnp.where(real_N, loss_N, 0.0)),
        "count": jnp.sum(real_N.astype(jnp.float32)),
        "correct": jnp.sum(jnp.where(real_N, correct_N, False).astype(jnp.float32)),
    }


def _flat_views(images_BVHWC):
    """[B*V, H, W, C] in view-major order (all rows' view 0, then view 1...)."""
    return jnp.swapaxes(images_BVHWC, 0, 1).reshape(-1, *images_BVHWC.shape[2:])


def _unflat_views(x_NF, batch: int):
    return jnp.swapaxes(x_NF.reshape(-1, batch, x_NF.shape[-1]), 0, 1)


class _ViewTask(ImageTask):
    """A ViT with a projection head, trained on groups of views."""

    view_groups: tuple[tuple[str, int], ...] = ()  # (batch key, fewest views)

    @classmethod
    def validate(cls, config) -> None:
        views = config.data.get("views", {})
        for key, fewest in cls.view_groups:
            count = views.get(key, {}).get("count", 0)
            if count < fewest:
                raise ConfigError(
                    f"data.views.{key}.count={count}: {config.objective.name} "
                    f"needs at least {fewest} views in data.views.{key}"
                )
        patch = config.model.patch_size
        for key, group in views.items():
            size = group.get("size", 0) or config.model.image_size
            if size % patch:
                raise ConfigError(
                    f"data.views.{key}.size={size}: expected a multiple of "
                    f"patch_size={patch} (the ViT cuts views into patches)"
                )
        if not config.model.get("proj_layers", 0):
            raise ConfigError(
                f"model.proj_layers=0: {config.objective.name} trains a "
                "projection head (model.proj_layers >= 1)"
            )

    def _project(self, adaptation, model, params, frozen, rng, train, images_BVHWC):
        """The head's outputs [B, V, F] for every view of a group."""
        out = apply_to_images(
            adaptation, model, params, frozen, rng, train, _flat_views(images_BVHWC)
        )
        return _unflat_views(out["projection"], images_BVHWC.shape[0])


class SimclrTask(_ViewTask):
    """SimCLR (Chen et al., 2020): two augmented views of each image, a
    projection head, NT-Xent over the global batch (`objective.temperature`)."""

    objectives = ("simclr",)
    view_groups = (("views", 2),)

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        temperature = config.objective.get("temperature", 0.2)
        if temperature <= 0:
            raise ConfigError(f"objective.temperature={temperature}: expected > 0")

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation
        temperature = self.config.objective.get("temperature", 0.2)

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            del extra  # no state beside the params
            z_BVF = self._project(
                adaptation, model, params, frozen, rng, train, batch["views"]
            )
            return nt_xent_sums(z_BVF, batch["weights"], temperature)

        return loss_fn

    def summarize(self, sums) -> dict[str, float]:
        count = max(float(sums["count"]), 1e-8)
        return {
            "loss": float(sums["loss_sum"]) / count,
            # How often an anchor's nearest view is its own image's.
            "contrastive_accuracy": float(sums["correct"]) / count,
            "count": float(sums["count"]),
        }


def dino_sums(
    student_BSK, teacher_BGK, center_K, weights_B, student_temp, teacher_temp
) -> dict:
    """DINO's loss sums: cross-entropy from each teacher view's centred,
    sharpened distribution (no gradient) to every student view but the same
    one (the first G student views are the teacher's G global views), averaged
    over those pairs per image. Also the teacher's output sum (for the centre)
    and the entropy of its distribution (low: collapse to one prototype)."""
    views_t, views_s = teacher_BGK.shape[1], student_BSK.shape[1]
    teacher_BGK = jax.lax.stop_gradient(teacher_BGK)
    centred_BGK = teacher_BGK - center_K[None, None, :]
    probs_BGK = jax.nn.softmax(centred_BGK / teacher_temp, axis=-1)
    log_probs_BSK = jax.nn.log_softmax(student_BSK / student_temp, axis=-1)
    ce_BGS = -jnp.einsum("BGK,BSK->BGS", probs_BGK, log_probs_BSK)
    pair_GS = ~np.eye(views_t, views_s, dtype=bool)
    loss_B = jnp.sum(jnp.where(pair_GS, ce_BGS, 0.0), axis=(1, 2)) / pair_GS.sum()
    entropy_B = -jnp.sum(probs_BGK * jnp.log(probs_BGK + 1e-12), axis=(1, 2))
    return {
        "loss_sum": jnp.sum(loss_B * weights_B),
        "count": jnp.sum(weights_B),
        "teacher_entropy_sum": jnp.sum(entropy_B * weights_B) / views_t,
        "teacher_output_sum": jnp.einsum("BGK,B->K", teacher_BGK, weights_B),
        "teacher_output_count": jnp.sum(weights_B) * views_t,
    }


def teacher_momentum(step, total_steps: int, start: float):
    """DINO's EMA momentum at `step`: cosine from `start` to 1."""
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - start) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def teacher_temperature(step, warmup_steps: int, start: float, end: float):
    """Linear warm-up from `start` to `end` over `warmup_steps`, then `end`."""
    if warmup_steps <= 0:
        return jnp.float32(end)
    progress = jnp.minimum(step / warmup_steps, 1.0)
    return jnp.float32(start + (end - start) * progress)


class DinoTask(_ViewTask):
    """DINO (Caron et al., 2021): a student and its EMA teacher (momentum
    cosine `teacher_momentum` -> 1), the teacher's outputs centred (an EMA of
    its batch means, `center_momentum`) and sharpened (`teacher_temp` after a
    warm-up from `warmup_teacher_temp`); the student at `student_temp` sees 2
    global crops (`data.views.global_views`) and N local ones
    (`data.views.local_views`), the teacher the global ones. The prototypes
    layer stays frozen for the first `freeze_last_layer_steps` steps.

    The teacher, the centre and the current teacher temperature are the
    task's extra state (`TrainState.extra`): checkpointed, so a resumed run is
    the run that never stopped."""

    objectives = ("dino",)
    view_groups = (("global_views", 2), ("local_views", 0))

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        if not config.model.get("prototypes", 0):
            raise ConfigError("model.prototypes=0: DINO scores views on prototypes")
        objective = config.objective
        for key, low, high in (
            ("teacher_momentum", 0.0, 1.0),
            ("center_momentum", 0.0, 1.0),
        ):
            value = objective[key]
            if not low <= value < high:
                raise ConfigError(f"objective.{key}={value}: expected in [0, 1)")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if objective[key] <= 0:
                raise ConfigError(f"objective.{key}={objective[key]}: expected > 0")

    def _schedules(self, step):
        objective = self.config.objective
        temp = teacher_temperature(
            step,
            objective.warmup_teacher_temp_steps,
            objective.warmup_teacher_temp,
            objective.teacher_temp,
        )
        trainable = (step >= objective.freeze_last_layer_steps).astype(jnp.float32)
        return {"teacher_temp": temp, "last_layer_trainable": trainable}

    def init_extra(self, params):
        return {
            "teacher": jax.tree.map(jnp.copy, params),
            "center": jnp.zeros((self.model_config.prototypes,), jnp.float32),
            **self._schedules(jnp.zeros((), jnp.int32)),
        }

    def update_extra(self, extra, params, sums, step):
        objective = self.config.objective
        m = teacher_momentum(step, self.config.train.steps, objective.teacher_momentum)
        teacher = jax.tree.map(
            lambda t, s: (m * t + (1 - m) * s).astype(t.dtype),
            extra["teacher"],
            params,
        )
        sums = dict(sums)
        mean_K = sums.pop("teacher_output_sum") / jnp.maximum(
            sums.pop("teacher_output_count"), 1.0
        )
        c = objective.center_momentum
        extra = {
            "teacher": teacher,
            "center": c * extra["center"] + (1 - c) * mean_K,
            **self._schedules(step + 1),
        }
        return extra, sums

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation
        student_temp = self.config.objective.student_temp
        has_local = self.views.get("local_views") is not None

        def gate_prototypes(params, trainable):
            def gate(path, p):
                if any(getattr(k, "key", None) == PROTOTYPES for k in path):
                    return trainable * p + (1 - trainable) * jax.lax.stop_gradient(p)
                return p

            return jax.tree_util.tree_map_with_path(gate, params)

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            student = gate_prototypes(params, extra["last_layer_trainable"])
            rngs = jax.random.split(rng, 3)
            project = lambda p, r, t, key: self._project(  # noqa: E731
                adaptation, model, p, frozen, r, t, batch[key]
            )
            teacher_BGK = project(extra["teacher"], rngs[0], False, "global_views")
            student_BSK = project(student, rngs[1], train, "global_views")
            if has_local:
                local_BLK = project(student, rngs[2], train, "local_views")
                student_BSK = jnp.concatenate([student_BSK, local_BLK], axis=1)
            return dino_sums(
                student_BSK,
                teacher_BGK,
                extra["center"],
                batch["weights"],
                student_temp,
                extra["teacher_temp"],
            )

        return loss_fn

    def summarize(self, sums) -> dict[str, float]:
        count = max(float(sums["count"]), 1e-8)
        return {
            "loss": float(sums["loss_sum"]) / count,
            "teacher_entropy": float(sums["teacher_entropy_sum"]) / count,
            "count": float(sums["count"]),
        }
