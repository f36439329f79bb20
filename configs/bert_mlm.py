"""BERT-style masked-language-model pre-training.

fmjax train --config configs/bert_mlm.py:tiny --workdir runs/bert
Variants: tiny (CPU tests), small (CPU benchmark), base (BERT-base shapes, TPU).
"""

from fmjax.config import base_config

VARIANTS = ("tiny", "small", "base")


def get_config(variant: str = "tiny"):
    c = base_config()
    c.name = "bert_mlm"
    c.objective = dict(name="mlm", mask_rate=0.15)
    model = dict(
        kind="encoder",
        vocab_size=8000,
        d_model=128,
        num_layers=2,
        num_heads=2,
        head_dim=64,
        mlp_dim=512,
        max_len=512,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        position="learned",
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        activation="gelu",
        dtype="float32",
        param_dtype="float32",
        remat="none",  # activation checkpointing: none | full | dots
        # Logits per device above which the loss runs over chunks of positions
        # and never holds the whole [B, L, V] (0: never chunk).
        max_logits_elements=2**27,
        # Attention scores per device above which queries go in chunks.
        max_attention_elements=2**27,
    )
    if variant == "tiny":
        c.data.update(seq_len=128, batch_size=32, vocab_size=8000)
        c.train.update(steps=300, eval_every=100)
        c.optimizer.update(learning_rate=2e-3, warmup_steps=30)
    elif variant == "small":
        model.update(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024)
        c.data.update(seq_len=128, batch_size=32)
        c.train.update(steps=2000, eval_every=500)
        c.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    elif variant == "base":
        model.update(
            vocab_size=30522,
            d_model=768,
            num_layers=12,
            num_heads=12,
            mlp_dim=3072,
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            dtype="bfloat16",
        )
        c.data.update(seq_len=512, batch_size=256, vocab_size=30522, num_shards=64)
        c.train.update(steps=100_000, eval_every=5000, log_every=100)
        c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, b2=0.999)
        c.checkpoint.update(every=5000)
    else:
        raise KeyError(f"variant {variant!r}; expected one of {VARIANTS}")
    c.model = model
    return c
