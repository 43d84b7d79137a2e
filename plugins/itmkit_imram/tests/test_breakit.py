"""IMRAM under a demanding user: odd but legal official checkpoints, another model's checkpoint, edge-sized blocks."""

from __future__ import annotations

import argparse
import collections

import numpy as np
import pytest
import torch

from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit.testing import save_like_python2
from itmkit.types import Local, LocalPort, lengths_to_mask
from itmkit_imram.stages import ImageToText, Steps, TextToImage
from itmkit.data.vocab import Vocabulary
from itmkit_imram.tests.test_importer import WORDS, official_scores, official_weights, options, our_scores, random_inputs


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "f30k_precomp_vocab.json"
    Vocabulary([*Vocabulary.SPECIALS, *WORDS]).save(path)
    return path


def _import(tmp_path, vocab_path, opt, model=None, *, python2=False):
    path = tmp_path / "model_best.pth.tar"
    checkpoint = {"epoch": 3, "model": model if model is not None else official_weights(opt), "best_rsum": 400.0,
                  "opt": opt}
    if python2:
        save_like_python2(checkpoint, path)
    else:
        torch.save(checkpoint, path)
    return import_checkpoint("imram", path, vocab_path, tmp_path / "imram.safetensors", get_importers()), checkpoint


CHECKPOINTS = {
    "python 2 pickle, weight_norm encoder": (dict(precomp_enc_type="weight_norm"), True),
    "python 2 pickle, full K 1 renormalised": (dict(iteration_step=1, no_IMRAM_norm=False), True),
    "no_norm raw affinities, K 2": (dict(raw_feature_norm="no_norm", iteration_step=2), False),
    "softmax raw affinities, image K 3": (dict(raw_feature_norm="softmax", model_mode="image_IMRAM"), False),
    "no image norm, text K 2": (dict(no_imgnorm=True, model_mode="text_IMRAM", iteration_step=2), False),
    "sizes stored as floats, extra options": (dict(embed_size=8.0, iteration_step=2.0, lambda_softmax=7, extra=1), False),
}


@pytest.mark.parametrize("case", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_odd_but_legal_checkpoints_score_like_the_official_code(tmp_path, vocab_path, case):
    overrides, python2 = case
    opt = options(**overrides)
    weights = official_weights(options(**{k: v for k, v in overrides.items()
                                          if k not in ("embed_size", "iteration_step", "extra")}), seed=4)
    out, checkpoint = _import(tmp_path, vocab_path, opt, weights, python2=python2)
    images, ids, lengths = random_inputs(seed=4)
    reference = argparse.Namespace(**{**vars(opt), "embed_size": int(opt.embed_size),
                                      "iteration_step": int(opt.iteration_step)})
    np.testing.assert_allclose(our_scores(out, images, ids, lengths),
                               official_scores(reference, weights, images, ids, lengths), rtol=0, atol=1e-5)


def test_a_model_without_the_dataparallel_prefix_imports_the_same(tmp_path, vocab_path):
    opt = options(iteration_step=2)
    weights = official_weights(opt, seed=5)
    bare = collections.OrderedDict((k.removeprefix("module."), v) for k, v in weights.items())
    out, _ = _import(tmp_path, vocab_path, opt, bare)
    images, ids, lengths = random_inputs(seed=5)
    np.testing.assert_allclose(our_scores(out, images, ids, lengths),
                               official_scores(opt, weights, images, ids, lengths), rtol=0, atol=1e-5)


def test_the_prefix_on_some_keys_only_is_a_clear_error(tmp_path, vocab_path):
    weights = official_weights(options())
    mixed = collections.OrderedDict((k.removeprefix("module.") if ".txt_enc." in "." + k.removeprefix("module.")
                                     else k, v) for k, v in weights.items())
    with pytest.raises(CheckpointError, match=r"some keys have the nn.DataParallel prefix 'module.' and some do not"):
        _import(tmp_path, vocab_path, options(), mixed)


def test_an_unknown_mode_lists_the_modes_once(tmp_path, vocab_path):
    with pytest.raises(CheckpointError) as info:
        _import(tmp_path, vocab_path, options(model_mode="vse"), official_weights(options()))
    message = str(info.value)
    assert "model_mode='vse' is not an IMRAM mode" in message
    assert message.count("full_IMRAM") == 1, message


def test_a_checkpoint_of_another_model_says_it_is_not_imram(tmp_path, vocab_path):
    """An SGRAF-like checkpoint (three state dicts, no model_mode) is named as not IMRAM, not sent to the SCAN importer."""
    opt = argparse.Namespace(**{k: v for k, v in vars(options()).items() if k != "model_mode"}, module_name="SGR")
    model = [{"fc.weight": torch.zeros(8, 12)}, {"embed.weight": torch.zeros(16, 6)}, {"sim_eval_w.weight": torch.zeros(1, 8)}]
    with pytest.raises(CheckpointError) as info:
        _import(tmp_path, vocab_path, opt, model)
    message = str(info.value)
    assert "holds 3" in message and "no model_mode" in message and "import scan" not in message, message


def test_a_checkpoint_without_options_says_so(tmp_path, vocab_path):
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "model": official_weights(options()), "best_rsum": 400.0}, path)
    with pytest.raises(CheckpointError, match=r"not an IMRAM checkpoint: it has no training options \('opt'\)"):
        import_checkpoint("imram", path, vocab_path, tmp_path / "imram.safetensors", get_importers())


# ------------------------------------------------------------------ edge-sized blocks

D = 6


def _sides(image_lens, caption_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, w = max(image_lens), max(caption_lens)
    image_mask, text_mask = lengths_to_mask(torch.tensor(image_lens), r), lengths_to_mask(torch.tensor(caption_lens), w)
    images = torch.nn.functional.normalize(torch.randn(len(image_lens), r, D, generator=g, dtype=torch.float64), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(len(caption_lens), w, D, generator=g, dtype=torch.float64), dim=-1)
    return Local(images * image_mask[..., None], image_mask), Local(words * text_mask[..., None], text_mask)


def _score(cls, image, text, **kw):
    torch.manual_seed(1)
    module = cls(**kw).build(image=LocalPort(D), text=LocalPort(D)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        return Steps().build(x=None)(module(image=image, text=text))


@pytest.mark.parametrize("cls", [TextToImage, ImageToText], ids=lambda c: c.name)
@pytest.mark.parametrize("kw", [dict(steps=3), dict(steps=3, renormalize=True, focal="prob"),
                                dict(steps=2, raw_feature_norm="softmax", focal="equal")], ids=str)
def test_one_word_captions_one_region_images_and_blocks_of_one(cls, kw):
    """Every pair of a block with one-word captions and one-region images equals the pair scored alone (1 x 1)."""
    image_lens, caption_lens = [1, 4, 2], [1, 3, 1, 5]
    image, text = _sides(image_lens, caption_lens)
    block = _score(cls, image, text, **kw)
    assert torch.isfinite(block).all()
    for i, r in enumerate(image_lens):
        for t, w in enumerate(caption_lens):
            alone = _score(cls, Local(image.feats[i:i + 1, :r], image.mask[i:i + 1, :r]),
                           Local(text.feats[t:t + 1, :w], text.mask[t:t + 1, :w]), **kw)
            assert abs(float(alone[0, 0]) - float(block[i, t])) < 1e-12, (i, t)


@pytest.mark.parametrize("cls", [TextToImage, ImageToText], ids=lambda c: c.name)
def test_gradients_are_finite_with_padding_and_one_fragment_sides(cls):
    image, text = _sides([1, 4, 2], [1, 3, 1, 5])
    feats = [image.feats.float().requires_grad_(), text.feats.float().requires_grad_()]
    torch.manual_seed(2)
    module = cls(steps=3, renormalize=True, focal="prob").build(image=LocalPort(D), text=LocalPort(D))
    Steps().build(x=None)(module(image=Local(feats[0], image.mask), text=Local(feats[1], text.mask))).sum().backward()
    for t in [*feats, *(p.grad for p in module.parameters())]:
        grad = t.grad if t.requires_grad and t.grad is not None else t
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", ["a BFAN checkpoint", "no options", "a damaged file"])
def test_the_cli_names_the_file_and_the_problem_without_a_traceback(tmp_path, vocab_path, kind):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
    from cliutil import assert_clean_failure, invoke

    path = tmp_path / "model_best.pth.tar"
    if kind == "a BFAN checkpoint":
        opt = argparse.Namespace(**{k: v for k, v in vars(options()).items() if k != "model_mode"}, focal_type="equal")
        torch.save({"epoch": 1, "model": [{"fc.weight": torch.zeros(8, 12)}, {"embed.weight": torch.zeros(16, 6)}],
                    "opt": opt}, path)
        expected = "holds 2"
    elif kind == "no options":
        torch.save({"epoch": 1, "model": official_weights(options())}, path)
        expected = "no training options"
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
        expected = "not a readable PyTorch checkpoint"
    message = assert_clean_failure(invoke("import", "imram", str(path), "--vocab", str(vocab_path), "-o",
                                          str(tmp_path / "out.safetensors")))
    assert str(path) in message and expected in message, message
    assert not (tmp_path / "out.safetensors").exists()
