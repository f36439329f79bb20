"""A ViT trained with labels: the supervised baseline for the self-supervised
vision objectives (configs/vit_mae.py, vit_simclr.py, vit_dino.py).

fmjax train --config configs/vit_supervised.py:small --workdir runs/fmnist_vit

Default data: Fashion-MNIST (`fashion_mnist`, built from Debian's
dataset-fashion-mnist: sudo apt-get install dataset-fashion-mnist); any TFDS
image dataset with `image` and `label` features by name. Variants (shapes in
`fmjax.config.vit_config`):
  tiny   a 2-layer ViT on 28x28 images in 7x7 patches (tests)
  small  a 4-layer d=128 ViT in 4x4 patches (the CPU study)
  base   ViT-B/16 shapes (224x224 RGB, 16x16 patches; e.g. imagenet2012)
"""

from fmjax.config import VIT_VARIANTS, vit_config

VARIANTS = VIT_VARIANTS


def get_config(variant: str = "small"):
    c = vit_config(variant)
    c.name = "vit_supervised"
    c.objective = dict(name="image_classify")
    # num_classes comes from the data's label feature.
    c.model.update(num_classes=10, dropout_rate=0.0)
    c.data.augment = ("random_resized_crop(scale=(0.6, 1.0))", "flip")
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.05)
    if variant == "tiny":
        c.optimizer.update(warmup_steps=2)
    elif variant == "base":
        c.model.update(num_classes=1000)
        c.data.augment = ("random_resized_crop", "flip")
        c.optimizer.update(learning_rate=3e-3, warmup_steps=10_000, weight_decay=0.1)
        c.train.update(steps=90_000, eval_every=5000)
    return c
