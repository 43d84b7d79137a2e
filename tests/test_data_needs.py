"""What a stage declares it needs from the data (Stage.data_needs) is checked before the work.

PFAN's position encoder reads region boxes (raw xyxy with image sizes, or its 30-column block
layout with indices bounded by the grid); SGRAF's visual pool has a fixed number of region slots.
``itmkit train``, ``itmkit eval`` and ``itmkit data check --recipe`` check every split they use
against what the model's stages declare, one line each naming the file, the slot and the need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cliutil import assert_clean_failure, flat, invoke
from itmkit.preflight import model_needs
from itmkit.recipe import load_recipe
from itmkit.stage import BoxLayout, DataNeeds
from itmkit.train import train
from tinydata import RECIPE, SIZES, captions, write_recipe, write_tiny

from itmkit.data.precomp import write_split

pytest.importorskip("itmkit_pfan")

PFAN_ENCODER = 'encoder = { stage = "pfan.position", grid = 4, position_dim = 4 }'
SLOT = "(image.encoder: pfan.position)"


def write_boxed(folder: Path, kind: str, *, block: float | None = None) -> Path:
    """Tiny splits with 3 regions: no boxes, xyxy boxes with or without image sizes, or PFAN's layout."""
    rng = np.random.default_rng(0)
    for name, n in SIZES.items():
        extra = {}
        if kind.startswith("xyxy"):
            corner = rng.uniform(0, 50, (n, 3, 2))
            extra["boxes"] = np.concatenate([corner, corner + 10], -1).astype(np.float32)
            if kind == "xyxy":
                extra["image_sizes"] = np.full((n, 2), 100, np.float32)
        elif kind == "pfan":
            layout = np.zeros((n, 3, 30), np.float32)
            layout[..., :15] = 16  # the padding block of a 4 x 4 grid
            layout[..., 15] = 1.0
            if block is not None and name == "test":
                layout[1, 2, 0] = block
            extra["boxes"] = layout
        write_split(folder, name, features=rng.standard_normal((n, 3, 8)).astype(np.float32),
                    captions=captions(n, rng), **extra)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("needs")
    out = {kind: write_boxed(root / kind, kind) for kind in ("none", "xyxy", "xyxy_nosizes", "pfan")}
    out["pfan_block300"] = write_boxed(root / "pfan_block300", "pfan", block=300)
    return out


def pfan_recipe(path: Path, data: Path) -> Path:
    path.write_text(RECIPE.replace('encoder = { stage = "core.precomp" }', PFAN_ENCODER).replace("DATA", str(data)))
    return path


@pytest.fixture(scope="module")
def pfan_checkpoint(folders, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pfan_run")
    train(load_recipe(pfan_recipe(folder / "pfan.toml", folders["xyxy"])), out_dir=folder / "run", log=lambda *a: None)
    return folder / "run" / "model_best.safetensors"


# (data folder, the file the message names, what it says) for each unmet need
CASES = {
    "no boxes": ("none", "test_boxes.npy", f"does not exist, but {{model}} {SLOT} needs region boxes per image and"
                                           " region: 4 columns (x1, y1, x2, y2 in pixels) or 30 columns"),
    "xyxy without sizes": ("xyxy_nosizes", "test_sizes.npy", f"does not exist, but {{model}} {SLOT} needs each"
                                                            " image's width and height to read the 4-column boxes"),
    "block index 300": ("pfan_block300", "test_boxes.npy", "has index 300 in column 0 of region 2 of image 1, but"
                                                           f" {{model}} {SLOT} takes indices 0 .. 16 in the first"
                                                           " 15 columns"),
}


@pytest.mark.parametrize("case", CASES)
def test_train_and_data_check_refuse_data_without_what_pfan_needs(case, folders, tmp_path):
    kind, file, says = CASES[case]
    recipe = pfan_recipe(tmp_path / "pfan.toml", folders[kind])
    expected = f"{folders[kind] / file} {says.format(model='the model of tiny')}"

    result = invoke("train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu")
    message = assert_clean_failure(result)
    assert expected in message and "before training" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    checked = invoke("data", "check", str(folders[kind]), "--recipe", str(recipe))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert expected in flat(checked.stderr)


@pytest.mark.parametrize("case", CASES)
def test_eval_refuses_data_without_what_the_checkpoint_needs(case, folders, pfan_checkpoint):
    kind, file, says = CASES[case]
    result = invoke("eval", str(pfan_checkpoint), "--data", str(folders[kind]), "--device", "cpu")
    message = assert_clean_failure(result)
    assert f"{folders[kind] / file} {says.format(model=pfan_checkpoint)}" in message
    assert "before scoring" in message


def test_data_with_what_pfan_needs_passes(folders, tmp_path):
    for kind in ("xyxy", "pfan"):
        result = invoke("data", "check", str(folders[kind]), "--recipe", str(pfan_recipe(tmp_path / "p.toml", folders[kind])))
        assert result.returncode == 0, result.stderr


def test_data_check_recipe_runs_the_region_bound_train_runs(tmp_path):
    """SGRAF's pool built for 2 region slots, data with 3 regions: data check --recipe says so, as train does."""
    pytest.importorskip("itmkit_sgraf")
    data = write_tiny(tmp_path / "data")
    recipe = write_recipe(tmp_path / "sgraf.toml", data)
    recipe.write_text(recipe.read_text().replace('pool = { stage = "core.mean" }\n\n[text]',
                                                 'pool = { stage = "sgraf.visual_sa", num_regions = 2 }\n\n[text]'))
    checked = invoke("data", "check", str(data), "--recipe", str(recipe))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert (f"{data / 'train_ims.npy'} has images with 3 regions, but the model of tiny (image.pool: sgraf.visual_sa)"
            " was built for at most 2.") in flat(checked.stderr)


def test_needs_are_read_from_the_recipe_specs_without_building_a_model(tmp_path, folders):
    needs = model_needs(load_recipe(pfan_recipe(tmp_path / "p.toml", folders["pfan"])), "m")
    assert [(n.slot, n.stage) for n in needs] == [("image.encoder", "pfan.position")]
    xyxy, blocks = needs[0].needs.boxes
    assert xyxy == BoxLayout(4, "x1, y1, x2, y2 in pixels", needs_sizes=True)
    assert (blocks.columns, blocks.index_columns, blocks.index_max) == (30, 15, 16)
    assert model_needs(load_recipe(write_recipe(tmp_path / "t.toml", folders["pfan"])), "m") == ()  # core stages
    assert DataNeeds() == DataNeeds(boxes=(), max_regions=None)
