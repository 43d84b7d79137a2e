"""Issue 11 under a demanding user: the recipe wiring of a tower's pool, IMRAM's feature-file names, and cosines of a zero context."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cliutil import assert_clean_failure, invoke
from itmkit.core_stages import CosineHead
from itmkit.data.precomp import features_path
from itmkit.errors import DataError
from itmkit.types import Local, lengths_to_mask
from tinydata import write_tiny

RECIPES = Path(__file__).parents[1] / "recipes"


def test_a_stage_reading_a_missing_pool_says_to_add_one(tmp_path):
    """shan.global_to_local reads [image].pool: without one the error says which table lacks it and how to add it."""
    text = (RECIPES / "shan_gpo.toml").read_text()
    recipe = tmp_path / "nopool.toml"
    recipe.write_text("\n".join(line for line in text.splitlines() if not line.startswith("pool = ")))
    message = assert_clean_failure(invoke("build", str(recipe)))
    assert "input 'image_global'" in message
    assert "add a `pool` stage to [image]" in message


def _split(folder: Path) -> Path:
    return write_tiny(folder)


def test_a_dangling_link_beside_the_other_feature_name_is_named_as_such(tmp_path):
    """test_ims.npy a dangling link next to a real test_feat.npy: the error is the dangling link, not 'two files'."""
    data = _split(tmp_path / "d")
    (data / "test_ims.npy").rename(data / "test_feat.npy")
    os.symlink(tmp_path / "nowhere.npy", data / "test_ims.npy")
    with pytest.raises(DataError, match=r"test_ims.npy is a symbolic link to .*nowhere.npy, which does not exist"):
        features_path(data, "test")
    result = invoke("data", "check", str(data))
    assert_clean_failure(result)
    assert "which does not exist" in result.stderr and "two feature files" not in result.stderr


def test_both_names_linked_to_one_array_are_one_split(tmp_path):
    data = _split(tmp_path / "d")
    os.symlink("test_ims.npy", data / "test_feat.npy")
    assert features_path(data, "test") == data / "test_ims.npy"
    assert invoke("data", "check", str(data)).returncode == 0


def test_the_aligned_cosine_of_a_zero_context_has_finite_gradients():
    """SCAN/IMRAM's cosine of a query with the attended vector of a context whose only region is zero.

    The official cosine_similarity (torch.norm) has gradient 0 there; NaN would poison every weight."""
    from itmkit.attention import scan_attention

    torch.manual_seed(0)
    image_mask, text_mask = lengths_to_mask(torch.tensor([1, 3]), 3), lengths_to_mask(torch.tensor([2, 3]), 3)
    regions = torch.randn(2, 3, 8)
    regions[0] = 0.0
    regions.requires_grad_()
    words = torch.randn(2, 3, 8, requires_grad=True)
    aligned = scan_attention(Local(words * text_mask[..., None], text_mask),
                             Local(regions * image_mask[..., None], image_mask), query_side="text", lambda_softmax=9.0)
    CosineHead(eps=1e-8).aligned_cosine(aligned).sum().backward()
    assert torch.isfinite(words.grad).all() and torch.isfinite(regions.grad).all()


BAD_SETS = {
    "imram steps 0": ("imram_shapes", "match[0].similarity.steps=0", "expected a value >= 1"),
    "imram fractional steps": ("imram_shapes", "match[1].similarity.steps=2.5", "expected int"),
    "imram lambda 0": ("imram_shapes", "match[0].similarity.lambda_softmax=0", "expected a value > 0.0"),
    "imram unknown focal": ("imram_shapes", "match[0].similarity.focal=focus", "expected one of 'none', 'equal', 'prob'"),
    "imram steps read by a scalar pool": ("imram_shapes", "match[0].aggregate={stage='core.mean'}",
                                          "core.mean pools per-fragment similarities of size 2"),
    "imram mismatched widths": ("imram_shapes", "text.encoder.embed_dim=100",
                                "IMRAM attends and gates in one joint space: image fragments are 256-d, text fragments 100-d"),
    "shan mu1 out of range": ("shan_shapes", "match[0].similarity.mu1=1.5", "expected a value <= 1.0"),
    "shan lambda 0": ("shan_shapes", "match[0].similarity.lambda_softmax=0", "expected a value > 0.0"),
    "shan.global_to_local steps": ("shan_gpo", "match[1].similarity.steps=g2g+g2l", "expected one of"),
    "caan unknown intra": ("caan_shapes", "match[0].similarity.intra_modal=both", "expected one of"),
    "caan nothing left": ("caan_shapes", "match[0].similarity.intra_modal=none", "intra_modal"),
}


@pytest.mark.parametrize("case", BAD_SETS.values(), ids=BAD_SETS.keys())
def test_bad_settings_of_the_new_recipes_are_clean_errors(case):
    recipe, setting, expected = case
    extra = ["--set", "match[0].similarity.inter_modal=false"] if setting.endswith("intra_modal=none") else []
    result = invoke("build", str(RECIPES / f"{recipe}.toml"), "--set", setting, *extra)
    message = assert_clean_failure(result)
    assert expected is None or expected in message, message


@pytest.mark.parametrize("recipe", ["imram_shapes", "imram_bfan", "shan_shapes", "shan_gpo", "caan_shapes"])
def test_the_new_recipes_train_and_score_on_one_region_images_in_imram_layout(tmp_path, recipe):
    """Tiny data with one region per image, features under IMRAM's name only: train one epoch, then the
    engine's matrix equals each caption scored alone."""
    from itmkit.testing import check_scores_match_captions_alone

    # imram_bfan: focal attention keeps the words whose weight is above the mean; with one region,
    # clipped_l2norm over the single query gives every word +-lambda, so the weights tie up to
    # rounding and float32 decisions flip with the block's shape (float64 agrees): 3 regions there
    data = write_tiny(tmp_path / "data", regions=3 if recipe == "imram_bfan" else 1)
    for split in ("train", "dev", "test"):
        (data / f"{split}_ims.npy").rename(data / f"{split}_feat.npy")
    result = invoke("train", str(RECIPES / f"{recipe}.toml"), "--data", str(data), "--out", str(tmp_path / "run"),
                    "--device", "cpu", "--set", "recipe.embed_dim=16", "--set", "text.encoder.word_dim=8",
                    "--set", "train.epochs=1", "--set", "train.batch_size=8")
    assert result.returncode == 0, result.stderr
    check_scores_match_captions_alone(tmp_path / "run" / "model_best.safetensors", data, batch_size=4)


def test_a_run_folder_given_as_checkpoint_names_its_best_checkpoint(tmp_path):
    """`itmkit eval RUN_FOLDER` is what a new user tries first: the error names the file to pass."""
    from itmkit.checkpoint import read_metadata
    from itmkit.errors import CheckpointError

    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file$"):
        read_metadata(tmp_path / "run")
    (tmp_path / "run" / "model_best.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"a run folder's best checkpoint is .*run/model_best.safetensors"):
        read_metadata(tmp_path / "run")
