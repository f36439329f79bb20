"""Masked autoencoder (MAE) pre-training of a ViT, no labels.

fmjax train --config configs/vit_mae.py:small --workdir runs/fmnist_mae

Each image loses `objective.mask_ratio` of its patches (75%, chosen per
example by argsort of noise); the encoder sees the rest, a light decoder
predicts the pixels of the hidden ones (normalised per patch:
`objective.norm_pix_loss`), and the loss counts hidden patches only. Default
data: Fashion-MNIST (Debian's dataset-fashion-mnist). Variants:
  tiny   2-layer ViT, 7x7 patches (tests)
  small  4-layer d=128 ViT, 4x4 patches, a 2-layer d=64 decoder (CPU study)
  base   ViT-B/16 with MAE's 8-layer d=512 decoder (ImageNet-sized)
"""

from fmjax.config import base_config

VARIANTS = ("tiny", "small", "base")


def get_config(variant: str = "small"):
    c = base_config()
    c.name = "vit_mae"
    c.objective = dict(
        name="mae", mask_ratio=0.75, norm_pix_loss=True, eval_mask_seed=0
    )
    model = dict(
        kind="vit_mae",
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
        decoder_d_model=32,
        decoder_layers=1,
        decoder_heads=2,
        decoder_head_dim=16,
        decoder_mlp_dim=64,
        dtype="float32",
        param_dtype="float32",
        remat="none",
    )
    c.data.update(
        name="fashion_mnist",
        eval_split="test",
        batch_size=64,
        augment=("random_resized_crop(scale=(0.4, 1.0))", "flip"),
        mean=(0.286,),
        std=(0.353,),
    )
    c.optimizer.update(
        learning_rate=1.5e-3, warmup_steps=100, b2=0.95, weight_decay=0.05
    )
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
        model.update(
            patch_size=4, d_model=128, num_layers=4, num_heads=4, head_dim=32,
            mlp_dim=512, decoder_d_model=64, decoder_layers=2, decoder_heads=2,
            decoder_head_dim=32, decoder_mlp_dim=256,
        )  # fmt: skip
    elif variant == "base":
        model.update(
            image_size=224, patch_size=16, channels=3, d_model=768, num_layers=12,
            num_heads=12, head_dim=64, mlp_dim=3072, decoder_d_model=512,
            decoder_layers=8, decoder_heads=16, decoder_head_dim=32,
            decoder_mlp_dim=2048, dtype="bfloat16",
        )  # fmt: skip
        c.data.update(
            name="imagenet2012", eval_split="validation", batch_size=4096,
            augment=("random_resized_crop(scale=(0.2, 1.0))", "flip"), num_shards=64,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        )  # fmt: skip
        c.optimizer.update(learning_rate=2.4e-3, warmup_steps=12_500)
        c.train.update(steps=250_000, eval_every=10_000)
        c.mesh.update(data=1, fsdp=-1)
    c.model = model
    return c
