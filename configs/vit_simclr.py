"""SimCLR pre-training of a ViT, no labels: two augmented views of each
image, a projection head, NT-Xent over the global batch.

fmjax train --config configs/vit_simclr.py:small --workdir runs/fmnist_simclr

Each view is a random resized crop, flipped, brightness/contrast-jittered and
sometimes blurred (`data.views.views.augment`; grey images have no hue or
saturation to jitter). The head (`model.proj_*`) is dropped for evaluation:
k-NN, few-shot and linear-probe accuracy read the ViT's pooled features.
`objective.temperature` scales the cosine similarities. Variants (encoder
shapes in `fmjax.config.vit_config`): tiny (tests), small (CPU study), base.
"""

from fmjax.config import VIT_VARIANTS, vit_config

VARIANTS = VIT_VARIANTS


def get_config(variant: str = "small"):
    c = vit_config(variant)
    c.name = "vit_simclr"
    c.objective = dict(name="simclr", temperature=0.2)
    c.model.update(proj_layers=2, proj_hidden_dim=512, proj_dim=128)
    c.data.views = dict(
        views=dict(
            count=2,
            size=0,  # the model's image_size
            augment=(
                "random_resized_crop(scale=(0.2, 1.0))",
                "flip",
                "jitter(brightness=0.4, contrast=0.4, p=0.8)",
                "blur(sigma=(0.1, 1.0), p=0.5)",
            ),
        )
    )
    c.data.batch_size = 128
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.05)
    if variant == "small":
        # The CPU study (bench/vision_study.py): about 15 min on 2 cores.
        c.train.update(steps=800, eval_every=200)
    elif variant == "tiny":
        c.model.update(proj_hidden_dim=64, proj_dim=32)
        c.data.batch_size = 16
        c.optimizer.update(warmup_steps=2)
    elif variant == "base":
        c.model.update(proj_hidden_dim=2048, proj_dim=128)
        c.data.views.views.augment = (
            "random_resized_crop(scale=(0.08, 1.0))",
            "flip",
            "jitter(brightness=0.4, contrast=0.4, p=0.8)",
            "blur(sigma=(0.1, 2.0), p=0.5)",
        )
        c.objective.temperature = 0.1
        c.optimizer.update(learning_rate=2e-3, warmup_steps=10_000, weight_decay=0.1)
        c.train.update(steps=100_000, eval_every=10_000)
    return c
