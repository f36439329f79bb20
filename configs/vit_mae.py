"""Masked autoencoder (MAE) pre-training of a ViT, no labels.

fmjax train --config configs/vit_mae.py:small --workdir runs/fmnist_mae

Each image loses `objective.mask_ratio` of its patches (75%, chosen per
example by argsort of noise); the encoder sees the rest, a light decoder
predicts the pixels of the hidden ones (normalised per patch:
`objective.norm_pix_loss`), and the loss counts hidden patches only. Default
data: Fashion-MNIST (Debian's dataset-fashion-mnist). Variants (encoder
shapes in `fmjax.config.vit_config`):
  tiny   2-layer ViT, 7x7 patches, a 1-layer d=32 decoder (tests)
  small  4-layer d=128 ViT, 4x4 patches, a 2-layer d=64 decoder (CPU study)
  base   ViT-B/16 with MAE's 8-layer d=512 decoder (ImageNet-sized)
"""

from fmjax.config import VIT_VARIANTS, vit_config

VARIANTS = VIT_VARIANTS


def get_config(variant: str = "small"):
    c = vit_config(variant)
    c.name = "vit_mae"
    c.objective = dict(
        name="mae", mask_ratio=0.75, norm_pix_loss=True, eval_mask_seed=0
    )
    c.model.update(
        kind="vit_mae", decoder_d_model=32, decoder_layers=1, decoder_heads=2,
        decoder_head_dim=16, decoder_mlp_dim=64,
    )  # fmt: skip
    c.data.augment = ("random_resized_crop(scale=(0.4, 1.0))", "flip")
    c.optimizer.update(
        learning_rate=1.5e-3, warmup_steps=100, b2=0.95, weight_decay=0.05
    )
    if variant == "tiny":
        c.optimizer.update(warmup_steps=2)
    elif variant == "small":
        c.train.update(steps=3000)  # the CPU study: about 8 min on 2 cores
        # One XLA device of a CPU host: two took 1.09x its step's time
        # (bench/host_devices_ab.py; fmjax.host_devices).
        c.mesh.update(host_devices=1)
        c.model.update(
            decoder_d_model=64, decoder_layers=2, decoder_heads=2,
            decoder_head_dim=32, decoder_mlp_dim=256,
        )  # fmt: skip
    elif variant == "base":
        c.model.update(
            decoder_d_model=512, decoder_layers=8, decoder_heads=16,
            decoder_head_dim=32, decoder_mlp_dim=2048,
        )  # fmt: skip
        c.data.augment = ("random_resized_crop(scale=(0.2, 1.0))", "flip")
        c.optimizer.update(learning_rate=2.4e-3, warmup_steps=12_500)
        c.train.update(steps=250_000, eval_every=10_000)
    return c
