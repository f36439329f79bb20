"""The vision study's runs (`bench/vision_study.py`): each a config of
configs/ (`small`) and its overrides, one `fmjax train` command each.

    mae          configs/vit_mae.py:small
    simclr       configs/vit_simclr.py:small
    simclr_long  the same for 2,400 steps instead of 800
    simclr_t05, simclr_crop04   the same at temperature 0.5, or with crops
                 of 40-100% of the image instead of 20-100%
    simclr_crop04_long          those crops for 2,400 steps
    simclr_crop04_long_seed1    the same with seed 1 (init, data order, views)
    simclr_crop04_xlong         those crops for 4,800 steps
    dino         configs/vit_dino.py:small
    dino_patch_normal   the same, its patch embedding at normal(0.02) (the old init)
    dino_momentum_099   the same, teacher momentum 0.99 instead of 0.996
    dino_teacher_002    the same, teacher temperature 0.02 instead of 0.04
    dino_k256           the same, 256 prototypes instead of 1,024
    supervised   configs/vit_supervised.py:small      (labels: the reference)
    random       the same ViT, learning rate 0, 1 step (random init)
    pixels, pca  the same evaluators on normalised pixels and on their top 64
                 principal components (computed here)
"""

SIMCLR_MILD_CROPS = repr(
    (
        "random_resized_crop(scale=(0.4, 1.0))",
        "flip",
        "jitter(brightness=0.4, contrast=0.4, p=0.8)",
        "blur(sigma=(0.1, 1.0), p=0.5)",
    )
)
RUNS = {
    "mae": ("vit_mae", {}),
    "simclr": ("vit_simclr", {}),
    # Three times the steps (and the schedule stretched to them).
    "simclr_long": ("vit_simclr", {"train.steps": 2400}),
    # A softer temperature (SimCLR's CIFAR-10 setting), and milder crops
    # (a 28x28 image cut to 20% of its area keeps little of a garment).
    "simclr_t05": ("vit_simclr", {"objective.temperature": 0.5}),
    "simclr_crop04": (
        "vit_simclr",
        {"data.views.views.augment": SIMCLR_MILD_CROPS},
    ),
    "simclr_crop04_long": (
        "vit_simclr",
        {"data.views.views.augment": SIMCLR_MILD_CROPS, "train.steps": 2400},
    ),
    # The same with another seed (initialisation, data order, augmentations).
    "simclr_crop04_long_seed1": (
        "vit_simclr",
        {
            "data.views.views.augment": SIMCLR_MILD_CROPS,
            "train.steps": 2400,
            "train.seed": 1,
            "data.shuffle_seed": 1,
        },
    ),
    # Those crops for twice as long again: 4,800 steps.
    "simclr_crop04_xlong": (
        "vit_simclr",
        {"data.views.views.augment": SIMCLR_MILD_CROPS, "train.steps": 4800},
    ),
    "dino": ("vit_dino", {}),
    # The patch embedding at normal(0.02), as before 2026-12-05 (HF ViT's
    # init): a fresh ViT then gives nearly one vector for every image.
    "dino_patch_normal": ("vit_dino", {"model.patch_init": "normal"}),
    # A faster teacher (the reference's 0.996 is for 100+ epochs).
    "dino_momentum_099": ("vit_dino", {"objective.teacher_momentum": 0.99}),
    # Its teacher drifts towards uniform: sharper teacher outputs (0.02), or
    # fewer prototypes (256 instead of 1,024).
    "dino_teacher_002": (
        "vit_dino",
        {"objective.teacher_temp": 0.02, "objective.warmup_teacher_temp": 0.02},
    ),
    "dino_k256": ("vit_dino", {"model.prototypes": 256}),
    "supervised": ("vit_supervised", {}),
    "random": (
        "vit_supervised",
        {"optimizer.learning_rate": 0.0, "train.steps": 1, "train.eval_every": 0},
    ),
}
LABELS = {
    "mae": "MAE",
    "simclr": "SimCLR",
    "simclr_long": "SimCLR, 2,400 steps",
    "simclr_t05": "SimCLR, temperature 0.5",
    "simclr_crop04": "SimCLR, crops of 40-100% of the image",
    "simclr_crop04_long": "SimCLR, crops of 40-100%, 2,400 steps",
    "simclr_crop04_long_seed1": "SimCLR, crops of 40-100%, 2,400 steps, seed 1",
    "simclr_crop04_xlong": "SimCLR, crops of 40-100%, 4,800 steps",
    "dino": "DINO",
    "dino_patch_normal": "DINO, patch embedding at normal(0.02)",
    "dino_momentum_099": "DINO, teacher momentum 0.99",
    "dino_teacher_002": "DINO, teacher temperature 0.02",
    "dino_k256": "DINO, 256 prototypes",
    "supervised": "supervised (all labels)",
    "random": "random init",
    "pixels": "raw pixels",
    "pca": "PCA of pixels (64)",
}
# The runs without labels whose 10-shot accuracy the target is about: all but
# the supervised reference, random init and the old patch init.
SELF_SUPERVISED = tuple(
    name for name in RUNS if name not in ("supervised", "random", "dino_patch_normal")
)
DINO_RUNS = tuple(name for name in RUNS if name.startswith("dino"))
SIMCLR_RUNS = tuple(name for name in RUNS if name.startswith("simclr"))
BASELINES = ("random", "pixels", "pca")
SHOTS = (1, 5, 10, 25)
SEEDS = (0, 1, 2)
