"""A ViT trained with labels: the supervised baseline for the self-supervised
vision objectives (configs/vit_mae.py, vit_simclr.py, vit_dino.py).

fmjax train --config configs/vit_supervised.py:small --workdir runs/fmnist_vit

Default data: Fashion-MNIST (`fashion_mnist`, built from Debian's
dataset-fashion-mnist: sudo apt-get install dataset-fashion-mnist); any TFDS
image dataset with `image` and `label` features by name. Variants:
  tiny   a 2-layer ViT on 28x28 images in 7x7 patches (tests)
  small  a 4-layer d=128 ViT in 4x4 patches (the CPU study)
  base   ViT-B/16 shapes (224x224 RGB, 16x16 patches; e.g. imagenet2012)
"""

from fmjax.config import base_config

VARIANTS = ("tiny", "small", "base")


def get_config(variant: str = "small"):
    c = base_config()
    c.name = "vit_supervised"
    c.objective = dict(name="image_classify")
    model = dict(
        kind="vit",
        image_size=28,
        patch_size=7,
        channels=1,
        d_model=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
        position="sincos2d",
        pool="cls",
        num_classes=10,
        dropout_rate=0.0,
        dtype="float32",
        param_dtype="float32",
        remat="none",
    )
    c.data.update(
        name="fashion_mnist",
        eval_split="test",
        batch_size=64,
        augment=("random_resized_crop(scale=(0.6, 1.0))", "flip"),
        mean=(0.286,),  # Fashion-MNIST's pixel mean and std
        std=(0.353,),
    )
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.05)
    c.train.update(steps=2000, eval_every=500)
    # After training and in `fmjax eval`: the encoder's frozen features on the
    # labels (k-NN, few-shot ridge per shot count over seeds, linear probe).
    c.features = dict(
        evaluate=True, train_examples=10_000, test_examples=0,
        shots=(1, 5, 10, 25), seeds=(0, 1, 2),
    )  # fmt: skip
    if variant == "tiny":
        c.data.update(batch_size=16)
        c.train.update(steps=20, eval_every=10, eval_batches=2)
        c.optimizer.update(warmup_steps=2)
    elif variant == "small":
        model.update(patch_size=4, d_model=128, num_layers=4, num_heads=4,
                     head_dim=32, mlp_dim=512)  # fmt: skip
    elif variant == "base":
        model.update(
            image_size=224, patch_size=16, channels=3, d_model=768, num_layers=12,
            num_heads=12, head_dim=64, mlp_dim=3072, num_classes=1000,
            dtype="bfloat16",
        )  # fmt: skip
        c.data.update(
            name="imagenet2012", eval_split="validation", batch_size=4096,
            augment=("random_resized_crop", "flip"), num_shards=64,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        )  # fmt: skip
        c.optimizer.update(learning_rate=3e-3, warmup_steps=10_000, weight_decay=0.1)
        c.train.update(steps=90_000, eval_every=5000)
        c.mesh.update(data=1, fsdp=-1)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    c.model = model
    return c
