"""Reading official checkpoints safely: the Namespace allow-list, Python 2 pickles, refusals, key checks."""

from __future__ import annotations

import argparse
import collections
import os
import pickle

import pytest
import torch

from itmkit.errors import CheckpointError
from itmkit.importing import check_state, option, read_official
from itmkit.testing import save_like_python2


def official_dict(**opt) -> dict:
    """The container kuanghuei/SCAN's train.py saves, with tiny weights."""
    g = torch.Generator().manual_seed(0)
    img = collections.OrderedDict([("fc.weight", torch.randn(4, 6, generator=g)), ("fc.bias", torch.zeros(4))])
    txt = collections.OrderedDict([("embed.weight", torch.randn(9, 3, generator=g))])
    return {"epoch": 7, "model": [img, txt], "best_rsum": 412.5,
            "opt": argparse.Namespace(**({"cross_attn": "t2i", "lambda_lse": 6.0, "bi_gru": True} | opt)), "Eiters": 1234}


def test_reads_a_checkpoint_holding_an_argparse_namespace(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    saved = official_dict()
    torch.save(saved, path)
    official = read_official(path)
    assert official.options == {"cross_attn": "t2i", "lambda_lse": 6.0, "bi_gru": True}
    assert official.epoch == 7 and official.best_rsum == 412.5 and official.path == str(path)
    assert len(official.modules) == 2
    for ours, theirs in zip(official.modules, saved["model"]):
        assert list(ours) == list(theirs)
        for key in theirs:
            assert torch.equal(ours[key], theirs[key])


def test_reads_the_legacy_non_zip_format(tmp_path):
    # PyTorch < 1.6 (SCAN's 0.3 included) wrote the legacy tar-less stream, not a zip archive.
    path = tmp_path / "legacy.pth.tar"
    torch.save(official_dict(), path, _use_new_zipfile_serialization=False)
    official = read_official(path)
    assert official.options["cross_attn"] == "t2i" and official.modules[0]["fc.bias"].shape == (4,)


# ----------------------------------------------------------------------- Python 2 pickles


# torch warns that pickle_load_args need weights_only=False, yet it does pass encoding= on to its
# weights-only unpickler (this test shows the latin1 decoding happens); the warning is misleading.
@pytest.mark.filterwarnings("ignore:pickle_load_args only works")
def test_a_python2_pickle_with_latin1_bytes_is_read_with_latin1(tmp_path):
    path = tmp_path / "py2.pth.tar"
    save_like_python2(official_dict(logger_name="runs/caf\xe9/log", data_name="f30k_precomp"), path)
    raw = path.read_bytes()
    assert pickle.SHORT_BINSTRING + bytes([len("runs/caf\xe9/log")]) + b"runs/caf\xe9/log" in raw  # a real Py2 str
    with torch.serialization.safe_globals([argparse.Namespace]), pytest.raises(UnicodeDecodeError):
        torch.load(path, weights_only=True)  # what a plain torch.load (utf-8) runs into
    official = read_official(path)
    assert official.options["logger_name"] == "runs/caf\xe9/log"
    assert official.options["data_name"] == "f30k_precomp" and official.epoch == 7
    assert set(official.modules[0]) == {"fc.weight", "fc.bias"}  # the Py2 str keys decode to str


def test_an_ascii_python2_pickle_reads_on_the_first_try(tmp_path):
    path = tmp_path / "py2_ascii.pth.tar"
    save_like_python2(official_dict(logger_name="runs/log"), path)
    assert read_official(path).options["logger_name"] == "runs/log"


# ------------------------------------------------------------------------------ refusals


class RunsACommand:
    """What a malicious checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TaggedDict(collections.OrderedDict):
    """An innocent-looking OrderedDict subclass: still a class outside the allow-list."""


@pytest.mark.parametrize("make", [
    lambda marker: RunsACommand(marker),
    lambda marker: TaggedDict(a=torch.zeros(1)),
    lambda marker: argparse.FileType("r"),  # a class from the same module as Namespace
], ids=["os.system", "OrderedDict subclass", "argparse.FileType"])
def test_a_checkpoint_holding_another_class_is_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    saved = official_dict()
    saved["model"][0]["extra"] = make(marker)
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*allow-list.*only argparse\.Namespace"):
        read_official(path)
    assert not marker.exists()  # nothing ran


def test_missing_truncated_and_non_official_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_official(tmp_path / "nope.pth.tar")
    truncated = tmp_path / "truncated.pth.tar"
    torch.save(official_dict(), truncated, _use_new_zipfile_serialization=False)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_official(truncated)
    bare = tmp_path / "bare.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bare)
    with pytest.raises(CheckpointError, match=r"expected a dict with a 'model' entry .*\['fc.weight'\]"):
        read_official(bare)


def test_a_file_of_arbitrary_bytes_is_a_clear_error(tmp_path):
    garbled = tmp_path / "garbled.pth.tar"
    garbled.write_bytes(b"this is not a checkpoint at all")
    # the weights-only unpickler fails on junk with IndexError here (KeyError, ValueError, ... elsewhere)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_official(garbled)


def test_a_single_state_dict_under_model_is_one_module(tmp_path):
    # IMRAM and MTFN save one state dict of the whole (DataParallel) model instead of a list.
    path = tmp_path / "imram.pth.tar"
    torch.save({"model": {"module.fc.weight": torch.zeros(2, 2)}, "opt": {"embed_size": 2}}, path)
    official = read_official(path)
    assert [list(m) for m in official.modules] == [["fc.weight"]]  # the DataParallel prefix removed
    assert official.options == {"embed_size": 2} and official.epoch is None


# ----------------------------------------------------------------------------- key checks


def test_check_state_lists_every_missing_unexpected_and_misshaped_key():
    found = {"fc.weight": torch.zeros(4, 5), "fc.bias": torch.zeros(4), "fc.extra": torch.zeros(1)}
    expected = {"fc.weight": (4, 6), "fc.bias": (4,), "embed.weight": (9, 3)}
    with pytest.raises(CheckpointError) as failure:
        check_state(found, expected, "ckpt: model[0]")
    message = str(failure.value)
    assert message.splitlines() == [
        "ckpt: model[0]: the weights do not match the official layout",
        "  missing: embed.weight (9, 3)",
        "  unexpected: fc.extra (1,)",
        "  shape of fc.weight: (4, 5), expected (4, 6)",
        "  likely cause: the options disagree with the weights (options such as bi_gru, num_layers or"
        " precomp_enc_type choose the layers), or the checkpoint is another variant of the model than the options say",
    ]


def test_check_state_accepts_an_exact_match():
    check_state({"a": torch.zeros(2, 3), "b": torch.zeros(())}, {"a": (2, 3), "b": ()}, "x")


def test_option_names_the_missing_option_with_a_did_you_mean():
    assert option({"lambda_lse": 6.0}, "lambda_lse", "ckpt") == 6.0
    with pytest.raises(CheckpointError, match=r"ckpt: the checkpoint's options lack 'lambda_lse' \(did you mean 'lambda_lse_'\?\)"):
        option({"lambda_lse_": 6.0}, "lambda_lse", "ckpt")


@pytest.mark.parametrize("shape", [(), (1,)], ids=["torch>=0.4", "torch 0.3"])
def test_a_weight_norm_gain_of_either_torch_age_checks_and_folds(shape):
    from itmkit.importing import fold_weight_norm, scalar_gain, weight_norm_layout

    v = torch.randn(3, 5)
    state = scalar_gain({"fc.weight_g": torch.full(shape, 2.0), "fc.weight_v": v, "fc.bias": torch.zeros(3)}, "fc.weight_g")
    check_state(state, weight_norm_layout("fc", 3, 5), "test")  # no CheckpointError
    torch.testing.assert_close(fold_weight_norm(state["fc.weight_g"], v), 2.0 * v / v.norm())
