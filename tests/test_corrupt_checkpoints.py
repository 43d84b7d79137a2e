"""Damaged and edited itmkit checkpoints through `itmkit eval` and `itmkit train --resume`.

One tiny run (one epoch) writes a real ``last.safetensors`` and ``model_best.safetensors``; each case
below damages a copy of one of them (metadata edited, tensors removed, bytes cut off, another file
put in its place) and runs the command in-process through ``cli.run``, exactly what the console
script calls. Every case must end in exit 1 and one `error:` line naming the file, never a
traceback. Metadata damage matters to both commands; trainer-state damage only to --resume.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cliutil import assert_clean_failure, invoke
from conftest import TINY_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data) -> Path:
    """A one-epoch run of a tiny recipe: tiny.toml, out/last.safetensors, out/model_best.safetensors."""
    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.replace("DATA", str(tiny_data)).replace("epochs = 3", "epochs = 1"))
    result = invoke("train", str(recipe), "--out", str(folder / "out"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return folder


# --------------------------------------------------------------------------------- the damage


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def edit(change: Callable[[dict[str, torch.Tensor], dict[str, str]], None], source: str = "last") -> Callable[[Path, Path], None]:
    """A damage that rewrites a proper safetensors file with edited tensors or metadata."""

    def damage(run: Path, target: Path) -> None:
        tensors, meta = read(run / "out" / f"{source}.safetensors")
        change(tensors, meta)
        save_file(tensors, str(target), metadata=meta)

    return damage


def set_meta(key: str, value: str | None, source: str = "last"):
    def change(tensors, meta):
        if value is None:
            del meta[key]
        else:
            meta[key] = value

    return edit(change, source)


def drop_tensors(prefix: str):
    def change(tensors, meta):
        for key in [k for k in tensors if k.startswith(prefix)]:
            del tensors[key]

    return edit(change)


def retype_rng(tensors, meta):
    tensors["rng.torch"] = tensors["rng.torch"].to(torch.float32)


def reshape_moment(tensors, meta):
    key = next(k for k in tensors if k.startswith("optimizer.") and k.endswith(".exp_avg") and tensors[k].dim() == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()


def bytes_of(make: Callable[[bytes], bytes]):
    def damage(run: Path, target: Path) -> None:
        target.write_bytes(make((run / "out" / "last.safetensors").read_bytes()))

    return damage


def a_folder(run: Path, target: Path) -> None:
    target.mkdir()


def copy_best(run: Path, target: Path) -> None:
    shutil.copyfile(run / "out" / "model_best.safetensors", target)


def stage_in_recipe(tensors, meta):
    meta["recipe"] = meta["recipe"].replace('stage = "core.triplet"', 'stage = ["core.triplet"]')


BOTH, RESUME = ("eval", "resume"), ("resume",)

# name: (damage, commands that must refuse it, fragment of the message)
CASES: dict[str, tuple[Callable[[Path, Path], None], tuple[str, ...], str]] = {
    "vocab_bad_json": (set_meta("vocab", '{"idx2word": {"0": "<pad>"'), BOTH, "metadata 'vocab' must be the vocabulary"),
    "vocab_a_list": (set_meta("vocab", "[1, 2, 3]"), BOTH, "metadata 'vocab' must be the vocabulary as a JSON object"),
    "vocab_wrong_keys": (set_meta("vocab", '{"words": []}'), BOTH, "metadata 'vocab': missing key(s)"),
    "vocab_words_not_strings": (set_meta("vocab", '{"idx2word": {"0": [1]}, "word2idx": {"x": 0}, "idx": 1}'), BOTH, "metadata 'vocab': idx2word['0'] is [1]; every word must be a string"),
    "feature_dim_text": (set_meta("feature_dim", "wide"), BOTH, "metadata 'feature_dim' must be a whole number"),
    "feature_dim_huge": (set_meta("feature_dim", "999999999999"), BOTH, "metadata 'feature_dim' must be a whole number from 1 to 65536"),
    "feature_dim_float": (set_meta("feature_dim", "256.0"), BOTH, "metadata 'feature_dim' must be a whole number"),
    "vocab_size_negative": (set_meta("vocab_size", "-3"), BOTH, "metadata 'vocab_size' must be a whole number"),
    "num_regions_text": (set_meta("num_regions", "many"), BOTH, "metadata 'num_regions' must be a whole number"),
    "feature_dim_missing": (set_meta("feature_dim", None), BOTH, "not an itmkit checkpoint (metadata lacks feature_dim)"),
    "recipe_stage_a_list": (edit(stage_in_recipe), BOTH, "[recipe metadata]"),
    "recipe_not_toml": (set_meta("recipe", "[recipe\nname ="), BOTH, "[recipe metadata]: invalid TOML"),
    "weight_missing": (drop_tensors("image."), BOTH, "weights do not match the recipe's model"),
    "truncated": (bytes_of(lambda b: b[: len(b) // 2]), BOTH, "not a readable safetensors file"),
    "header_only": (bytes_of(lambda b: b[: 8 + int.from_bytes(b[:8], "little")]), BOTH, "not a readable safetensors file"),
    "not_safetensors": (bytes_of(lambda b: b"# just some text, not a checkpoint\n" * 4), BOTH, "not a readable safetensors file"),
    "empty": (bytes_of(lambda b: b""), BOTH, "not a readable safetensors file"),
    "a_pickle": (bytes_of(lambda b: b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."), BOTH, "not a readable safetensors file"),
    "a_folder": (a_folder, BOTH, "is a folder, not a checkpoint file"),
    "model_best_as_last": (copy_best, RESUME, "holds a model only, without the optimizer and RNG state --resume needs"),
    "epoch_text": (set_meta("epoch", "one"), RESUME, "metadata 'epoch' must be a whole number"),
    "epoch_missing": (set_meta("epoch", None), RESUME, "metadata lacks 'epoch'"),
    "best_epoch_after_epoch": (set_meta("best_epoch", "7"), RESUME, "metadata 'best_epoch' must be a whole number from -1 to 0"),
    "best_rsum_text": (set_meta("best_rsum", "good"), RESUME, "metadata 'best_rsum' must be a number"),
    "best_rsum_nan": (set_meta("best_rsum", "nan"), RESUME, "metadata 'best_rsum' must be a number"),
    "optimizer_meta_missing": (set_meta("optimizer", None), RESUME, "metadata lacks 'optimizer'"),
    "optimizer_meta_bad_json": (set_meta("optimizer", "{'param_groups': []"), RESUME, "metadata 'optimizer' must be"),
    "optimizer_meta_wrong_shape": (set_meta("optimizer", '{"param_groups": [{"params": ["a"]}], "scalars": {}}'), RESUME,
                                   "metadata 'optimizer' must be"),
    "optimizer_tensors_missing": (drop_tensors("optimizer."), RESUME, "holds no optimizer state tensors"),
    "optimizer_moment_missing": (drop_tensors("optimizer.0.exp_avg_sq"), RESUME, "lacks the optimizer tensor optimizer.0.exp_avg_sq"),
    "optimizer_moment_reshaped": (edit(reshape_moment), RESUME, "the optimizer state belongs to another model"),
    "rng_missing": (drop_tensors("rng."), RESUME, "lacks the tensor 'rng.torch'"),
    "rng_wrong_dtype": (edit(retype_rng), RESUME, "'rng.torch' is torch.float32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_checkpoint_is_one_clear_error(tmp_path, run, case):
    damage, commands, fragment = CASES[case]
    if "eval" in commands:
        target = tmp_path / "model.safetensors"
        damage(run, target)
        message = assert_clean_failure(invoke("eval", str(target), "--device", "cpu"))
        assert str(target) in message and fragment in message, message
    if "resume" in commands:
        out = tmp_path / "resumed"
        out.mkdir()
        damage(run, out / "last.safetensors")
        result = invoke("train", str(run / "tiny.toml"), "--out", str(out), "--resume", "--device", "cpu")
        message = assert_clean_failure(result)
        assert str(out / "last.safetensors") in message, message
        # Damaged metadata may be reported by the data checks that run first (a width that does not fit).
        assert fragment in message or "eval" in commands, message
        assert not (out / "model_best.safetensors").exists()  # refused before any epoch ran


def test_the_undamaged_run_resumes_and_evaluates(tmp_path, run):
    """So every failure above is the damage's doing."""
    target = tmp_path / "model.safetensors"
    edit(lambda tensors, meta: None, "model_best")(run, target)
    result = invoke("eval", str(target), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    assert "rsum" in json.loads(result.stdout)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copyfile(run / "out" / "last.safetensors", out / "last.safetensors")
    # Resuming after the last epoch trains nothing, only re-evaluates the best model: quick.
    shutil.copyfile(run / "out" / "model_best.safetensors", out / "model_best.safetensors")
    result = invoke("train", str(run / "tiny.toml"), "--out", str(out), "--resume", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr


def test_checkpoints_and_recipe_follow_the_umask(run):
    """Written through atomic_write_bytes with the user's umask (022 here: 0644), not mkstemp's 0600."""
    from itmkit.checkpoint import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(run / "probe.bin", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((run / "probe.bin").stat().st_mode) == 0o644
    previous = os.umask(0o077)
    try:
        atomic_write_bytes(run / "private.bin", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((run / "private.bin").stat().st_mode) == 0o600
    assert not list(run.glob(".*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("last.safetensors", "model_best.safetensors", "recipe.toml"):  # what the run wrote
        assert stat.S_IMODE((run / "out" / name).stat().st_mode) == 0o666 & ~umask, name
