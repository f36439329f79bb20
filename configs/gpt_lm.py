"""GPT-style next-token pre-training.

Variants: tiny (CPU tests), small (CPU benchmark), base (GPT-2 124M shapes),
1b and 8b (RoPE decoders for TPU pods).

fmjax train --config configs/gpt_lm.py:tiny --workdir runs/gpt
"""

from fmjax.config import base_config

VARIANTS = ("tiny", "small", "base", "1b", "8b")


def get_config(variant: str = "tiny"):
    c = base_config()
    c.name = "gpt_lm"
    c.objective = dict(name="causal")
    model = dict(
        kind="decoder",
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
        layer_norm_eps=1e-5,
        activation="gelu_tanh",
        dtype="float32",
        param_dtype="float32",
        remat="none",  # activation checkpointing: none | full | dots
        # Logits per device above which the loss runs over chunks of positions
        # and never holds the whole [B, L, V] (0: never chunk).
        max_logits_elements=2**27,
        # Attention scores per device above which queries go in chunks.
        max_attention_elements=2**27,
        tie_embeddings=True,
    )
    if variant == "tiny":
        c.data.update(seq_len=128, batch_size=32, vocab_size=8000)
        c.train.update(steps=300, eval_every=100)
        c.optimizer.update(learning_rate=2e-3, warmup_steps=30)
    elif variant == "small":
        # On a CPU the loss is fastest over chunks of 16 positions (32 x 16 x
        # 8000 logits), even where the whole [B, L, V] would fit: XLA:CPU pays
        # for every large temporary (docs/performance.md). `tiny` stays whole:
        # the tests compile it often, and the loop costs compile time.
        model.update(
            d_model=256, num_layers=4, num_heads=4, mlp_dim=1024,
            max_logits_elements=2**22,
        )  # fmt: skip
        c.data.update(seq_len=128, batch_size=32)
        c.train.update(steps=2000, eval_every=500)
        c.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    elif variant == "base":
        model.update(
            vocab_size=50257,
            d_model=768,
            num_layers=12,
            num_heads=12,
            mlp_dim=3072,
            max_len=1024,
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            dtype="bfloat16",
        )
        c.data.update(seq_len=1024, batch_size=512, vocab_size=50257, num_shards=64)
        c.train.update(steps=100_000, eval_every=5000, log_every=100)
        c.optimizer.update(
            learning_rate=6e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1
        )
        c.checkpoint.update(every=5000)
    elif variant == "1b":
        # A ~1.0B-param decoder (RoPE, GPT-2 vocab padded to a multiple of 128).
        model.update(
            vocab_size=50304,
            d_model=2048,
            num_layers=18,
            num_heads=16,
            head_dim=128,
            mlp_dim=8192,
            max_len=2048,
            position="rope",
            dtype="bfloat16",
            remat="full",
        )
        c.data.update(seq_len=2048, batch_size=256, vocab_size=50257, num_shards=64)
        c.train.update(steps=100_000, eval_every=5000, log_every=100)
        c.optimizer.update(
            learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1
        )
        c.mesh.update(data=1, fsdp=-1)
        c.checkpoint.update(every=2000)
    elif variant == "8b":
        # ~8.0B params: Llama-3-8B's attention (GQA 32/8 heads) and vocabulary with
        # a 2-matrix GELU MLP of the same parameter count as its SwiGLU.
        model.update(
            vocab_size=128256,
            d_model=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            mlp_dim=21504,
            max_len=8192,
            position="rope",
            dtype="bfloat16",
            remat="full",
            tie_embeddings=False,
        )
        c.data.update(seq_len=4096, batch_size=256, vocab_size=128256, num_shards=64)
        c.train.update(steps=100_000, eval_every=5000, log_every=100)
        c.optimizer.update(
            learning_rate=3e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1
        )
        c.mesh.update(data=1, fsdp=-1)
        c.checkpoint.update(every=1000)
    else:
        raise KeyError(f"variant {variant!r}; expected one of {VARIANTS}")
    c.model = model
    return c
