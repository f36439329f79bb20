"""Vision tasks on a ViT (`fmjax.models.vision`): supervised image
classification (`image_classify`, configs/vit_supervised.py) and masked
autoencoding (`mae`, configs/vit_mae.py).

Data: any TFDS image dataset with `image` and `label` features, by name
(`fashion_mnist` ships, built from Debian's dataset-fashion-mnist; `cifar10`
or `imagenet2012` where prepared), or a user's images, `folder:DIR`
(`fmjax.data.folders`: class sub-folders, or none for unlabelled data).
Images are decoded, augmented (`data.augment`, ops of `fmjax.data.images`),
resized to the model's `image_size` and normalised with `data.mean` /
`data.std` in the grain pipeline. Self-supervised tasks on several views of
each image are in `fmjax.tasks.ssl`.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import objectives
from fmjax.config import ConfigError
from fmjax.data import images as image_data
from fmjax.data import sources
from fmjax.eval import features as feature_lib
from fmjax.models.registry import build_model
from fmjax.models.registry import model_config as parse_model_config
from fmjax.models.vision import patchify, unpatchify
from fmjax.tasks.base import (
    Task,
    on_process_zero_first,
    validate_data_shards,
    validate_sizes,
)


def _image_features(name: str, data_dir: str, need_labels: bool) -> int:
    """The dataset's number of classes (0 without labels), after checking that
    it has the features a vision task reads."""
    info = sources.dataset_info(name, data_dir)
    features = info.features
    if "image" not in features:
        raise ConfigError(
            f"data.name={name!r} has features {sorted(features)}; a vision task "
            "reads an 'image' feature"
        )
    if "label" not in features:
        if need_labels:
            raise ConfigError(
                f"data.name={name!r} has no 'label' feature (features: "
                f"{sorted(features)}); image classification needs labels"
            )
        return 0
    return int(features["label"].num_classes)


@dataclasses.dataclass(frozen=True)
class FeatureEvaluator:
    """k-NN, few-shot and linear-probe accuracy of the trained encoder's frozen
    features (`fmjax.eval.features`), reported as "features"."""

    name: str = "features"

    def __call__(self, context) -> dict:
        return context.task.evaluate_features(context.params, context.frozen)


class ImageTask(Task):
    """What the vision tasks share: a ViT config, image data and pipelines,
    and the evaluation of the encoder's frozen features."""

    throughput_unit = "images"
    model_kind = "vit"
    needs_labels = False

    def __init__(self, config, model_config, *, with_data: bool):
        super().__init__(config, model_config)
        data = config.data
        self.data_name = data.name
        self.data_dir = data.data_dir or sources.default_data_dir()
        self.train_split = data.train_split
        self.image_size = model_config.image_size
        self.channels = model_config.channels
        # Several views per image (self-supervised tasks), else one "images".
        self.views = image_data.parse_views(data.get("views", {}))
        self._sources = {}
        if with_data:
            for split in (data.train_split, data.eval_split):
                self._source(split)  # a bad split name fails here, before compute

    @classmethod
    def from_config(cls, config, *, with_data: bool = True) -> ImageTask:
        config = copy.deepcopy(config)
        validate_sizes(config)
        if config.model.get("kind") != cls.model_kind:
            raise ConfigError(
                f"model.kind={config.model.get('kind')!r}: {config.objective.name} "
                f"trains model.kind={cls.model_kind!r}"
            )
        cls.validate(config)
        try:
            for spec in config.data.get("augment", ()):
                image_data.parse_op(spec)
            image_data.parse_views(config.data.get("views", {}))
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"data: {e}") from None
        if with_data:
            validate_data_shards(config)
            data_dir = config.data.data_dir or sources.default_data_dir()
            name = config.data.name
            try:
                sources.check_dataset(name, data_dir)
                if name in sources.SHIPPED:
                    on_process_zero_first(lambda: sources.prepare(name, data_dir))
                classes = _image_features(name, data_dir, cls.needs_labels)
            except (FileNotFoundError, ValueError) as e:  # DatasetNotFoundError too
                raise ConfigError(f"data.name={name!r}: {e}") from None
            if cls.needs_labels:
                config.model.num_classes = classes
        try:
            model_config = parse_model_config(config.model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
        return cls(config, model_config, with_data=with_data)

    @classmethod
    def validate(cls, config) -> None:
        """Checks of the objective's own settings (before any data is read)."""

    # --- data ---------------------------------------------------------------------

    def _source(self, split: str):
        if split not in self._sources:
            try:
                self._sources[split] = sources.load_source(
                    self.data_name, split, self.data_dir
                )
            except ValueError as e:
                raise ConfigError(
                    f"data split {split!r} of {self.data_name!r}: {e}"
                ) from None
        return self._sources[split]

    def abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        def images(size, *views):
            shape = (rows, *views, size, size, self.channels)
            return jax.ShapeDtypeStruct(shape, np.float32)

        batch = {
            key: images(group.size or self.image_size, group.count)
            for key, group in self.views.items()
        } or {"images": images(self.image_size)}
        return {
            **batch,
            "labels": jax.ShapeDtypeStruct((rows,), np.int32),
            "weights": jax.ShapeDtypeStruct((rows,), np.float32),
        }

    def _pipeline(self, **kwargs):
        data = self.config.data
        return dict(
            image_size=self.image_size,
            channels=self.channels,
            mean=tuple(data.mean),
            std=tuple(data.std),
            **kwargs,
        )

    def train_iterator(self):
        source = self._source(self.train_split)
        data = self.config.data

        def shard(index: int, count: int, rows: int):
            return image_data.make_image_iterator(
                source,
                **self._pipeline(
                    batch_size=rows,
                    seed=data.shuffle_seed,
                    augment=tuple(data.get("augment", ())),
                    views=self.views,
                    process_index=index,
                    process_count=count,
                ),
            )

        return self.sharded_iterator(shard)

    def eval_iterator(self, split: str | None = None):
        """This process's slice of `split`, every image once: not augmented, or
        (several views per image) augmented from a fixed seed."""
        return image_data.make_image_iterator(
            self._source(split or self.eval_split),
            **self._pipeline(
                batch_size=self.batch_size // jax.process_count(),
                views=self.views,
                seed=0,
                shuffle=False,
                repeat=False,
                drop_remainder=False,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            ),
        )

    def throughput(self, local_batch) -> int:
        return int(np.count_nonzero(local_batch["weights"]))

    def summary(self) -> dict:
        return {"train_examples": len(self._source(self.train_split))}

    # --- frozen features ------------------------------------------------------------

    @property
    def evaluators(self) -> tuple:
        settings = self.config.get("features", {})
        return (FeatureEvaluator(),) if settings.get("evaluate", True) else ()

    def encoder(self, params, frozen):
        """(ViT module, its params) whose pooled output is the representation."""
        merged, _ = self.adaptation.merged(params, frozen)
        return build_model(self.model_config), merged

    def features(self, params, frozen, split: str, limit: int):
        """(pooled features [N, D], labels [N]) of up to `limit` (0: all)
        un-augmented images of `split`, in the split's order."""
        module, variables = self.encoder(params, frozen)
        apply = jax.jit(
            lambda p, x: module.apply({"params": p}, x, pooled_only=True)["pooled"]
        )
        source = self._source(split)
        if limit:
            source = [source[i] for i in range(min(limit, len(source)))]
        batches = image_data.make_image_iterator(
            source,
            **self._pipeline(
                batch_size=min(self.batch_size, 256),
                seed=0,
                shuffle=False,
                repeat=False,
                drop_remainder=False,
            ),
        )
        feats, labels = [], []
        for batch in batches:
            real = batch["weights"] > 0
            feats.append(np.asarray(apply(variables, batch["images"]))[real])
            labels.append(batch["labels"][real])
        return np.concatenate(feats), np.concatenate(labels)

    def evaluate_features(self, params, frozen) -> dict:
        """`fmjax.eval.features.feature_report` of the train split's features
        (up to `features.train_examples`) against the eval split's; empty
        without labels or with several processes (features are gathered on
        one host)."""
        settings = self.config.get("features", {})
        if jax.process_count() > 1:
            return {}
        classes = _image_features(self.data_name, self.data_dir, need_labels=False)
        if not classes:
            return {}
        train = self.features(
            params, frozen, self.train_split, settings.get("train_examples", 10_000)
        )
        test = self.features(
            params, frozen, self.eval_split, settings.get("test_examples", 0)
        )
        smallest = min(np.bincount(train[1], minlength=classes))
        shots = [s for s in settings.get("shots", (1, 5, 10, 25)) if s <= smallest]
        seeds = tuple(settings.get("seeds", (0, 1, 2)))
        fractions = tuple(settings.get("knn_fractions", ()))
        return feature_lib.feature_report(
            *train, *test, classes, shots, seeds, fractions
        )

    def save_assets(self, directory: str) -> None:
        """No tokenizer: a ViT's input is pixels (the config holds mean/std)."""


def apply_to_images(adaptation, model, params, frozen, rng, train: bool, images):
    """`adaptation.apply` of a ViT on images: dropout and the adapter draw from
    the two halves of `rng`; eval (train=False) is deterministic. Its readout
    only ("pooled" and the heads on it): the last layer computes [cls] alone."""
    dropout_rng, adapter_rng = jax.random.split(rng)
    return adaptation.apply(
        model,
        params,
        frozen,
        adapter_rng,
        train,
        images,
        deterministic=not train,
        pooled_only=True,
        rngs={"dropout": dropout_rng},
    )


class ImageClassifyTask(ImageTask):
    """Cross-entropy on labels over the ViT's pooled features (the supervised
    baseline of the self-supervised objectives)."""

    objectives = ("image_classify",)
    needs_labels = True

    @classmethod
    def validate(cls, config) -> None:
        del config  # num_classes comes from the data's label feature

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            del extra  # no state beside the params
            out = apply_to_images(
                adaptation, model, params, frozen, rng, train, batch["images"]
            )
            _, sums = objectives.classification_loss(
                out["logits"], batch["labels"], batch["weights"]
            )
            return sums

        return loss_fn

    def summarize(self, sums) -> dict[str, float]:
        out = objectives.summarize(sums)
        return {k: float(out[k]) for k in ("loss", "accuracy", "count")}


def mae_loss(
    pred_BPX,
    images_BHWC,
    mask_BP,
    weights_B,
    patch: int,
    norm_pix: bool,
    *,
    ddof: int = 0,
    pred_at_BM=None,
):
    """MAE's loss sums: squared error per patch (against the patch's pixels,
    normalised by their own mean and variance with `norm_pix`), averaged over
    the patch, summed over masked patches of real rows; `count` = those
    patches. `ddof`: the variance's delta degrees of freedom; training uses 0,
    the MAE reference and HF ViTMAE use torch's unbiased `var` (ddof=1).
    `pred_at_BM`: `pred_BPX` holds only these patches, the masked ones
    (`MaskedAutoencoder(masked_only=True)`'s "pred_at")."""
    target_BPX = patchify(images_BHWC.astype(jnp.float32), patch)
    if pred_at_BM is not None:
        target_BPX = jnp.take_along_axis(target_BPX, pred_at_BM[..., None], axis=1)
        mask_BP = jnp.ones(pred_at_BM.shape, jnp.float32)
    if norm_pix:
        mean_BP1 = target_BPX.mean(axis=-1, keepdims=True)
        var_BP1 = target_BPX.var(axis=-1, keepdims=True, ddof=ddof)
        target_BPX = (target_BPX - mean_BP1) / jnp.sqrt(var_BP1 + 1e-6)
    error_BP = jnp.mean((pred_BPX - target_BPX) ** 2, axis=-1)
    weight_BP = mask_BP * weights_B[:, None]
    return {"loss_sum": jnp.sum(error_BP * weight_BP), "count": jnp.sum(weight_BP)}


class MaeTask(ImageTask):
    """Masked autoencoding (configs/vit_mae.py): `objective.mask_ratio` of the
    patches hidden per example (75% by default), the loss on those only,
    normalised-pixel targets by default (`objective.norm_pix_loss`). Eval
    masks are drawn from a fixed seed, so the eval loss is deterministic."""

    objectives = ("mae",)
    model_kind = "vit_mae"

    def encoder(self, params, frozen):
        merged, _ = self.adaptation.merged(params, frozen)
        return build_model(self.model_config.encoder_config()), merged["encoder"]

    @classmethod
    def validate(cls, config) -> None:
        ratio = config.objective.get("mask_ratio", 0.75)
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio={ratio}: expected in (0, 1)")

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation
        cfg, objective = self.model_config, self.config.objective
        ratio = objective.get("mask_ratio", 0.75)
        norm_pix = objective.get("norm_pix_loss", True)
        eval_key = jax.random.key(objective.get("eval_mask_seed", 0))

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            del extra  # no state beside the params
            mask_rng, dropout_rng, adapter_rng = jax.random.split(rng, 3)
            images = batch["images"]
            noise_key = mask_rng if train else eval_key
            noise_BP = jax.random.uniform(noise_key, (images.shape[0], cfg.num_patches))
            out = adaptation.apply(
                model,
                params,
                frozen,
                adapter_rng,
                train,
                images,
                noise_BP=noise_BP,
                mask_ratio=ratio,
                deterministic=not train,
                masked_only=True,
                rngs={"dropout": dropout_rng},
            )
            return mae_loss(
                out["pred"], images, out["mask"], batch["weights"],
                cfg.patch_size, norm_pix, pred_at_BM=out["pred_at"],
            )  # fmt: skip

        return loss_fn


def mae_reconstruct(module, params, images_BHWC, noise_BP, mask_ratio: float):
    """What a trained MAE makes of images (normalised pixels): (the encoder's
    view, visible patches only and the hidden ones at the image's minimum;
    the reconstruction, visible patches pasted back and the hidden ones
    predicted, un-normalised with each patch's own mean and std as the MAE
    paper shows them)."""
    cfg = module.config
    out = module.apply(
        {"params": params}, images_BHWC, noise_BP=noise_BP, mask_ratio=mask_ratio
    )
    target_BPX = patchify(images_BHWC.astype(jnp.float32), cfg.patch_size)
    mean_BP1 = target_BPX.mean(axis=-1, keepdims=True)
    std_BP1 = jnp.sqrt(target_BPX.var(axis=-1, keepdims=True) + 1e-6)
    pred_BPX = out["pred"] * std_BP1 + mean_BP1
    mask_BP1 = out["mask"][..., None]
    hidden = jnp.min(target_BPX)
    seen_BPX = target_BPX * (1 - mask_BP1) + hidden * mask_BP1
    pasted_BPX = target_BPX * (1 - mask_BP1) + pred_BPX * mask_BP1
    return (
        unpatchify(seen_BPX, cfg.patch_size, cfg.channels),
        unpatchify(pasted_BPX, cfg.patch_size, cfg.channels),
    )
