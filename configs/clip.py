"""Image-text dual encoders: CLIP (softmax InfoNCE) or SigLIP
(`--config.objective.loss=sigmoid`) on image-caption pairs.

fmjax train --config configs/clip.py:small --workdir runs/emoji_clip

Default data: emoji pictures and their names (`emoji_captions`, built from
Debian's fonts-noto-color-emoji); held-out emoji are retrieved by their names
after training (`retrieval`). Other data: `--config.data.name=csv:pairs.csv`
(columns `data.image_key`, `data.caption_key`), a TFDS dataset with captions,
or a labelled image dataset with captions from its class names
(`--config.data.name=fashion_mnist --config.data.captions=labels`, optionally
`--config.data.classes=(0,1,2,3,4,5,6)` to hold classes out for zero-shot).

Towers: a ViT (`model.image`) and a causal CLIP-style text transformer
(`model.text`). LiT: `--config.init.text=all-MiniLM-L6-v2
--config.adapt.freeze='("text/.*",)'` (a locked pretrained text tower).

Variants: tiny (tests), small (CPU study), base (CLIP ViT-B/16 shapes).
"""

import math

from fmjax.config import base_config

VARIANTS = ("tiny", "small", "base")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(variant: str = "small"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    c = base_config()
    c.name = "clip"
    c.objective = dict(
        name="clip",
        loss="softmax",  # softmax (CLIP) | sigmoid (SigLIP)
        per_device=True,  # losses per device when a mesh splits the batch
        max_logit_scale=math.log(100.0),
    )
    c.model = dict(
        kind="dual_encoder",
        embed_dim=128,
        text_pool="auto",  # last (causal tower: EOS) | mean | cls; auto: by tower
        logit_scale_init=None,  # None: log(1/0.07) (softmax) or log(10) (sigmoid)
        logit_bias_init=None,  # None: -10 with the sigmoid loss, else no bias
        image=dict(
            image_size=64, patch_size=8, channels=3, d_model=128, num_layers=4,
            num_heads=4, head_dim=32, mlp_dim=512, position="learned", pool="cls",
            pre_norm=True, layer_norm_eps=1e-5, dtype="float32", remat="none",
            patch_init="normal",  # HF CLIP's: normal(init_std)
        ),
        text=dict(
            kind="decoder", vocab_size=1000, d_model=128, num_layers=4, num_heads=4,
            head_dim=32, mlp_dim=512, max_len=16, layer_norm_eps=1e-5,
            dtype="float32", remat="none",
        ),
    )  # fmt: skip
    c.data.update(
        name="emoji_captions",
        eval_split="validation",
        batch_size=128,
        vocab_size=1000,  # SentencePiece on the train captions (no init.text)
        text_len=16,  # tokens per caption, BOS and EOS included
        image_key="image",  # csv: / jsonl: columns
        caption_key="caption",
        captions="record",  # record (the data's) | labels (from class names)
        templates=(),  # captions=labels: () uses fmjax.data.captions's
        classes=(),  # train on these label ids only (zero-shot on the rest)
        mean=CLIP_MEAN,
        std=CLIP_STD,
        augment=("random_resized_crop(scale=(0.7, 1.0))",),
    )
    c.init.update(text="", image="")
    c.retrieval = dict(evaluate=True, split="test", ks=(1, 5, 10), limit=0)
    c.zero_shot = dict(
        evaluate=True, split="", class_names=(), templates=(), template_set="simple",
        limit=0,
    )  # fmt: skip
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=1000, eval_every=250)
    if variant == "small":
        # One XLA device of a CPU host: two took 1.03-1.07x its step's time
        # since kernel gradients are oriented (bench/host_devices_ab.py;
        # fmjax.host_devices). bench/clip_study.py's runs were on one device.
        c.mesh.update(host_devices=1)
    if variant == "tiny":
        c.model.embed_dim = 32
        c.model.image.update(
            image_size=32, patch_size=8, d_model=32, num_layers=1, num_heads=2,
            head_dim=16, mlp_dim=64,
        )  # fmt: skip
        c.model.text.update(
            d_model=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64
        )
        c.data.update(batch_size=16, vocab_size=400, augment=())
        c.optimizer.update(warmup_steps=2)
        c.train.update(steps=10, eval_every=5, eval_batches=2)
        c.checkpoint.every = 5
        c.retrieval.limit = 32
    elif variant == "base":
        c.model.embed_dim = 512
        c.model.image.update(
            image_size=224, patch_size=16, d_model=768, num_layers=12, num_heads=12,
            head_dim=64, mlp_dim=3072, dtype="bfloat16", activation="quick_gelu",
        )  # fmt: skip
        c.model.text.update(
            vocab_size=49408, d_model=512, num_layers=12, num_heads=8, head_dim=64,
            mlp_dim=2048, max_len=77, dtype="bfloat16", activation="quick_gelu",
        )  # fmt: skip
        c.data.update(batch_size=32768, text_len=77, vocab_size=49408, num_shards=64)
        c.objective.loss = "sigmoid"
        c.optimizer.update(learning_rate=5e-4, warmup_steps=2000, weight_decay=0.2)
        c.train.update(steps=100_000, eval_every=10_000)
        c.mesh.update(data=1, fsdp=-1)
    return c
