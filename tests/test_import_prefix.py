"""Official checkpoints saved under nn.DataParallel (every key ``module.<name>``) import with every importer.

The prefix is removed once, in ``itmkit.importing.read_official``; each paper's own test fixtures
build the official layout, which is then saved with and without the prefix: both must import to
the same weights. A key mismatch names its likely cause.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint, read_official
from itmkit.plugins import get_registry


def _scan():
    from itmkit_scan.tests.test_importer import WORDS, official_weights, options

    opt = options()
    return opt, official_weights(opt), [*Vocabulary.SPECIALS, *WORDS]


def _bfan():
    from itmkit_bfan.tests.test_importer import VOCAB_WORDS, official_model, options

    opt = options()
    return opt, [m.state_dict() for m in official_model(opt)], VOCAB_WORDS


def _pfan():
    from itmkit_pfan.tests.test_importer import WORDS, official_state, options

    opt = options()
    return opt, official_state(opt), [*Vocabulary.SPECIALS, *WORDS]


def _sgraf():
    from itmkit_sgraf.tests.test_importer import WORDS, official_weights, options

    opt = options()
    return opt, official_weights(opt), [*Vocabulary.SPECIALS, *WORDS]


def _gpo():
    from itmkit_gpo.tests.test_importer import WORDS, official_weights, options

    opt = options()
    return opt, official_weights(opt), [*Vocabulary.SPECIALS, *WORDS]


FIXTURES: dict[str, Callable] = {"scan": _scan, "bfan": _bfan, "pfan": _pfan, "sgraf": _sgraf, "gpo": _gpo}


def prefixed(model: list[dict], prefix: str = "module.") -> list[collections.OrderedDict]:
    return [collections.OrderedDict((prefix + k, v) for k, v in sd.items()) for sd in model]


def save(path: Path, opt, model) -> Path:
    torch.save({"epoch": 3, "model": model, "best_rsum": 400.0, "opt": opt, "Eiters": 100}, path)
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


@pytest.mark.parametrize("name", FIXTURES)
def test_a_data_parallel_checkpoint_imports_to_the_same_weights(tmp_path, name):
    if name not in get_importers():
        pytest.skip(f"the {name} plugin is not loaded")
    if name == "pfan" and not {"scan.t2i", "scan.i2t"} <= set(get_registry().stages):
        pytest.skip("the PFAN recipes need scan.t2i / scan.i2t from the scan plugin")
    opt, model, words = FIXTURES[name]()
    vocab = tmp_path / "vocab.json"
    Vocabulary(list(words)).save(vocab)
    plain = import_checkpoint(name, save(tmp_path / "plain.pth.tar", opt, model), vocab, tmp_path / "plain.safetensors",
                              get_importers())
    wrapped = import_checkpoint(name, save(tmp_path / "dp.pth.tar", opt, prefixed(model)), vocab,
                                tmp_path / "dp.safetensors", get_importers())
    ours, theirs = weights(plain), weights(wrapped)
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_read_official_removes_the_prefix_of_each_state_dict_on_its_own(tmp_path):
    # one module trained wrapped, the other not: each state dict is judged by itself
    model = [{"module.fc.weight": torch.zeros(2, 3)}, {"embed.weight": torch.zeros(5, 2)}]
    official = read_official(save(tmp_path / "m.pth.tar", {"embed_size": 2}, model))
    assert [list(m) for m in official.modules] == [["fc.weight"], ["embed.weight"]]


def test_a_half_prefixed_state_dict_is_refused_naming_both_kinds_of_key(tmp_path):
    model = [{"module.fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}]
    with pytest.raises(CheckpointError, match=r"m.pth.tar: entry 'model'\[0\]: some keys have the nn.DataParallel"
                                              r" prefix 'module.' and some do not \(e.g. 'module.fc.weight' and"
                                              r" 'fc.bias'\)"):
        read_official(save(tmp_path / "m.pth.tar", {}, model))


# ------------------------------------------------------------------- the likely cause of a key mismatch


@pytest.fixture
def scan_case(tmp_path):
    if "scan" not in get_importers():
        pytest.skip("the scan plugin is not loaded")
    opt, model, words = _scan()
    vocab = tmp_path / "vocab.json"
    Vocabulary(list(words)).save(vocab)
    return opt, model, vocab


def _import_error(tmp_path, name, opt, model, vocab) -> str:
    with pytest.raises(CheckpointError) as failure:
        import_checkpoint(name, save(tmp_path / "x.pth.tar", opt, model), vocab, tmp_path / "x.safetensors",
                          get_importers())
    assert not (tmp_path / "x.safetensors").exists()
    return str(failure.value)


def test_another_wrappers_prefix_is_named_as_the_cause(tmp_path, scan_case):
    opt, model, vocab = scan_case
    message = _import_error(tmp_path, "scan", opt, prefixed(model, "model."), vocab)
    assert message.splitlines()[-1] == ("  likely cause: every key starts with 'model.', which the official model's"
                                        " names lack: the weights were saved from a wrapper around it")


def test_options_that_disagree_with_the_shapes_are_named_as_the_cause(tmp_path, scan_case):
    import argparse

    opt, model, vocab = scan_case
    opt = argparse.Namespace(**{**vars(opt), "img_dim": opt.img_dim + 1})
    message = _import_error(tmp_path, "scan", opt, model, vocab)
    assert "shape of fc.weight" in message
    assert message.splitlines()[-1].startswith("  likely cause: the options disagree with the weights: the shapes")


def test_another_models_checkpoint_is_named_as_the_cause(tmp_path, scan_case):
    opt, model, vocab = scan_case
    other = {"SAF_module.attn_sim_w.weight": torch.zeros(1, 4), "sim_eval_w.weight": torch.zeros(1, 4)}
    message = _import_error(tmp_path, "scan", opt, [model[0], other], vocab)
    assert "model[1] (txt_enc)" in message and "unexpected: sim_eval_w.weight (1, 4)" in message
    assert message.splitlines()[-1] == ("  likely cause: no key matches: the checkpoint is of another model (or another"
                                        " variant of it) than this importer reads; check the importer name")
