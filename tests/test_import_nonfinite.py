"""Corrupted official checkpoints through `itmkit import`: each ends in exit 1 and one clear line.

Non-finite weights are refused naming the tensor (in the official file, or made by a converter's
arithmetic), and malformed 'model' / 'opt' / 'epoch' / 'best_rsum' entries name the file and the
entry. All checks live in ``itmkit.importing.read_official`` / ``import_checkpoint``, so every
importer gets them; the SCAN fixtures stand in for all.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from cliutil import invoke
from itmkit.data.vocab import Vocabulary
from itmkit.plugins import get_registry

pytestmark = pytest.mark.skipif("scan" not in get_registry().importers, reason="the scan plugin is not loaded")


def container(**changes) -> dict:
    from itmkit_scan.tests.test_importer import official_weights, options

    opt = options(**changes.pop("options", {}))
    return {"epoch": 11, "model": official_weights(opt), "best_rsum": 431.25, "opt": opt, "Eiters": 25000, **changes}


def _with(model: list, index: int, key: str, value) -> list:
    model = [dict(m) for m in model]
    model[index][key] = value
    return model


def _nan_in(model: list, index: int, key: str, position: tuple[int, ...], value: float = float("nan")) -> list:
    tensor = model[index][key].clone()
    tensor[position] = value
    return _with(model, index, key, tensor)


class RunsACommand:
    """What a malicious checkpoint holds: unpickling it would call os.system."""

    def __reduce__(self):
        return os.system, ("touch /nonexistent/itmkit-was-here",)


def _zero_direction() -> dict:
    """A weight-norm encoder whose direction is zero: folding it (g * v / ||v||) divides by zero."""
    raw = container(options={"precomp_enc_type": "weight_norm"})
    raw["model"] = _with(raw["model"], 0, "fc.weight_v", torch.zeros_like(raw["model"][0]["fc.weight_v"]))
    return raw


# name -> (build the saved object, what the one error line must say)
CASES = {
    "NaN weight": (lambda: {**container(), "model": _nan_in(container()["model"], 0, "fc.weight", (2, 3))},
                   "entry 'model'[0]: tensor 'fc.weight' holds 1 non-finite value(s) (NaN or inf) of 96,"
                   " the first at index (2, 3)"),
    "infinite embedding": (lambda: {**container(), "model": _nan_in(container()["model"], 1, "embed.weight", (5, 1),
                                                                    float("inf"))},
                           "entry 'model'[1]: tensor 'embed.weight' holds 1 non-finite value(s)"),
    "NaN made by the converter": (_zero_direction,
                                  "-> scan: tensor 'image.encoder.fc.weight' holds 96 non-finite value(s)"),
    "model is a string": (lambda: container(model="img_enc,txt_enc"),
                          "entry 'model' is a str; expected a list of state dicts [img_enc, txt_enc, ...]"),
    "model is empty": (lambda: container(model=[]), "entry 'model' is empty; expected a list of state dicts"),
    "a module is a list": (lambda: {**container(), "model": [container()["model"][0], [torch.zeros(3)]]},
                           "entry 'model'[1] is a list; expected a state dict (parameter name -> tensor)"),
    "a weight is a number": (lambda: {**container(), "model": _with(container()["model"], 0, "fc.bias", 0.5)},
                             "entry 'model'[0] key 'fc.bias' holds a float; expected a tensor"),
    "a weight is a string": (lambda: {**container(), "model": _with(container()["model"], 1, "embed.weight", "x")},
                             "entry 'model'[1] key 'embed.weight' holds a str; expected a tensor"),
    "a parameter name is a number": (lambda: {**container(), "model": _with(container()["model"], 0, 7,
                                                                             torch.zeros(1))},
                                     "entry 'model'[0] has the key 7 (int); parameter names are strings"),
    "opt is a list": (lambda: container(opt=["--embed_size", "1024"]),
                      "entry 'opt' is a list; expected the training options (an argparse.Namespace or a dict)"),
    "opt is a string": (lambda: container(opt="Namespace(embed_size=1024)"), "entry 'opt' is a str; expected"),
    "epoch is text": (lambda: container(epoch="eleven"), "entry 'epoch' is a str ('eleven'); expected a number"),
    "best_rsum is a list": (lambda: container(best_rsum=[431.25]), "entry 'best_rsum' is a list ([431.25]);"
                                                                  " expected a number"),
    "epoch is a bool": (lambda: container(epoch=True), "entry 'epoch' is a bool (True); expected a number"),
    "half a DataParallel prefix": (
        lambda: {**container(), "model": [{("module." + k if k == "fc.bias" else k): v
                                           for k, v in container()["model"][0].items()}, container()["model"][1]]},
        "entry 'model'[0]: some keys have the nn.DataParallel prefix 'module.' and some do not"),
    "not a dict": (lambda: [container()["model"]], "expected a dict with a 'model' entry (official layout), found list"),
    "a numpy scalar": (lambda: container(best_rsum=np.float64(431.25)),
                       "refused to unpickle: it references the global numpy._core.multiarray.scalar, outside the"
                       " allow-list (only argparse.Namespace is allowed); nothing was run"),
    "a command": (lambda: container(Eiters=RunsACommand()), "refused to unpickle: it references the global posix.system"),
    "garbage bytes": (lambda: b"this is no checkpoint", "not a readable PyTorch checkpoint"),
    # tensors the model cannot hold exactly: refused in read_official before any use (tensor_problem)
    "a sparse weight": (lambda: _as(0, "fc.weight", lambda t: t.to_sparse()),
                        "entry 'model'[0]: tensor 'fc.weight' is a sparse_coo tensor; weights are dense tensors"),
    "a meta weight": (lambda: _as(1, "embed.weight", lambda t: torch.empty(t.shape, device="meta")),
                      "entry 'model'[1]: tensor 'embed.weight' is on the meta device: a placeholder without values"),
    "a complex weight": (lambda: _as(0, "fc.weight", lambda t: t.to(torch.complex64)),
                         "entry 'model'[0]: tensor 'fc.weight' is complex64: weights are real numbers, and its"
                         " imaginary part would be dropped"),
    "an integer weight": (lambda: _as(0, "fc.bias", lambda t: (t * 10).long()),
                          "entry 'model'[0]: tensor 'fc.bias' is int64: a weight holds real floating-point numbers"),
    "a bool weight": (lambda: _as(0, "fc.bias", lambda t: t > 0), "tensor 'fc.bias' is bool: a weight holds real"),
}


def _as(index: int, key: str, change) -> dict:
    raw = container()
    return {**raw, "model": _with(raw["model"], index, key, change(raw["model"][index][key]))}


@pytest.fixture
def vocab(tmp_path):
    from itmkit_scan.tests.test_importer import WORDS

    path = tmp_path / "vocab.json"
    Vocabulary([*Vocabulary.SPECIALS, *WORDS]).save(path)
    return path


@pytest.mark.parametrize("case", CASES)
def test_a_corrupted_official_checkpoint_is_one_clear_line(tmp_path, vocab, case):
    build, expected = CASES[case]
    source, target = tmp_path / "model_best.pth.tar", tmp_path / "out.safetensors"
    built = build()
    if isinstance(built, bytes):
        source.write_bytes(built)
    else:
        torch.save(built, source)
    code, out, err = invoke("import", "scan", str(source), "--vocab", str(vocab), "-o", str(target))
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {source}"), lines[0]
    assert expected in lines[0]
    assert not target.exists()


def test_the_clean_checkpoint_the_cases_start_from_imports(tmp_path, vocab):
    source, target = tmp_path / "model_best.pth.tar", tmp_path / "out.safetensors"
    torch.save(container(), source)
    code, out, err = invoke("import", "scan", str(source), "--vocab", str(vocab), "-o", str(target))
    assert code == 0, err
    assert target.exists()


def test_a_zero_dim_tensor_best_rsum_is_a_number(tmp_path):
    from itmkit.importing import read_official

    source = tmp_path / "model_best.pth.tar"
    torch.save(container(best_rsum=torch.tensor(431.25), epoch=torch.tensor(11)), source)
    official = read_official(source)
    assert official.best_rsum == 431.25 and official.epoch == 11


def test_an_options_namespace_reads_as_its_dict(tmp_path):
    from itmkit.importing import read_official

    source = tmp_path / "model_best.pth.tar"
    torch.save(container(opt=argparse.Namespace(embed_size=8)), source)
    assert read_official(source).options == {"embed_size": 8}


def test_integer_buffers_and_every_float_width_are_weights():
    from itmkit.importing import tensor_problem

    assert tensor_problem("sim_eval_w.bn.num_batches_tracked", torch.tensor(7)) is None  # BatchNorm's step count
    assert tensor_problem("bert.embeddings.position_ids", torch.arange(4)[None]) is None
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert tensor_problem("fc.weight", torch.zeros(2, dtype=dtype)) is None
    assert "is int32" in tensor_problem("fc.weight", torch.zeros(2, dtype=torch.int32))
    assert "is bool" in tensor_problem("bn.num_batches_tracked", torch.tensor(True))


def test_the_other_top_level_entries_are_kept_as_read(tmp_path):
    """MTFN stores its model options as a nested dict 'options' beside the 'opt' Namespace."""
    from itmkit.importing import read_official

    source = tmp_path / "model_best.pth.tar"
    options = {"model": {"fusion": {"R": 20, "activation_v": "tanh"}}, "optim": {"lr": 1e-4}}
    torch.save({**container(opt=argparse.Namespace(embed_size=8)), "options": options, "arch": "baseline"}, source)
    official = read_official(source)
    assert official.entries["options"] == options and official.entries["arch"] == "baseline"
    assert "model" not in official.entries and "opt" not in official.entries
