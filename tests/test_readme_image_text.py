"""The README's image-text commands run as written (see tests/test_readme.py),
at configs/clip.py's tiny shapes: CLIP on emoji, `fmjax eval`, LiT with a
locked pretrained BERT (the tiny one standing in for all-MiniLM-L6-v2), and a
user's CSV of image-caption pairs."""

import json

import jax
import numpy as np
from conftest import run_readme_commands
from test_readme import PARTS

from fmjax.convert.hf import load_hf_model
from fmjax.export import load_export


def test_image_text_commands_run(
    minilm_dir, tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
    run_readme_commands(
        PARTS["image-text"], tiny_bert_dir, data_dir, tmp_path, monkeypatch
    )
    runs = tmp_path / "runs"
    for run in ("emoji_clip", "emoji_lit", "my_clip"):
        summary = json.loads((runs / run / "summary.json").read_text())
        assert summary["steps"] == 4, run
        assert 0 <= summary["retrieval"]["t2i_r@1"] <= 1, run
    # The csv run's retrieval covered its 24 pictures and their captions.
    assert (
        json.loads((runs / "my_clip" / "summary.json").read_text())["retrieval"][
            "images"
        ]
        == 16
    )  # retrieval.limit in the test
    # LiT: the pretrained tower's weights came through training bit-identical.
    params, config = load_export(str(runs / "emoji_lit"))
    assert config["model"]["text"]["d_model"] == 32
    _, minilm, _ = load_hf_model(str(tiny_bert_dir))
    for path, value in jax.tree_util.tree_flatten_with_path(params["text"])[0]:
        keys = [k.key for k in path]
        want = minilm
        for key in keys:
            want = want[key]
        np.testing.assert_array_equal(value, want, err_msg="/".join(keys))
