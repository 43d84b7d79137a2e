"""``itmkit import pfan``: small checkpoints in the official format, encoded and scored like the official model."""

from __future__ import annotations

import argparse

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit.plugins import get_registry
from itmkit.types import Regions, Tokens, lengths_to_mask

from itmkit_pfan.tests import official
from itmkit_pfan.tests.test_stages import random_layout

pytestmark = pytest.mark.skipif(
    not {"scan.t2i", "scan.i2t"} <= set(get_registry().stages),
    reason="the PFAN recipes need scan.t2i / scan.i2t from the scan plugin",
)

E, F, WORD, WORDS = 16, 24, 8, ["dog", "cat", "runs", "red", "a", "on", "grass", "ball"]


def options(**overrides) -> argparse.Namespace:
    """train_attention.py's options, as pickled in the official checkpoints (small sizes)."""
    opt = dict(data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=30,
               batch_size=128, word_dim=WORD, embed_size=E, grad_clip=2.0, num_layers=1, learning_rate=2e-4,
               lr_update=15, workers=10, log_step=10, val_step=500, logger_name="./runs/x", model_name="./runs/x",
               resume="", max_violation=True, img_dim=F, no_imgnorm=False, no_txtnorm=False,
               raw_feature_norm="clipped_l2norm", agg_func="Mean", cross_attn="t2i", precomp_enc_type="basic",
               bi_gru=True, lambda_lse=6.0, lambda_softmax=9.0, vocab_size=len(WORDS) + 4)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def official_state(opt: argparse.Namespace, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """[img_enc, txt_enc] state dicts with the official names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    e, f = opt.embed_size, opt.img_dim
    img = {"fc.weight": torch.randn(e, f + 200, generator=g) * 0.05, "fc.bias": torch.randn(e, generator=g) * 0.05,
           "fc_att.weight": torch.randn(200, f, generator=g) * 0.1, "fc_att.bias": torch.randn(200, generator=g) * 0.1,
           "position_embedding.weight": torch.randn(257, 200, generator=g)}
    gru = torch.nn.GRU(opt.word_dim, e, opt.num_layers, batch_first=True, bidirectional=opt.bi_gru)
    txt = {"embed.weight": torch.rand(opt.vocab_size, opt.word_dim, generator=g) * 0.2 - 0.1}
    txt.update({f"rnn.{k}": torch.randn(v.shape, generator=g) * 0.2 for k, v in gru.state_dict().items()})
    return [img, txt]


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "vocab.json"
    Vocabulary(list(Vocabulary.SPECIALS) + WORDS).save(path)
    return path


def save_official(path, opt, modules=None):
    torch.save({"epoch": 12, "model": modules if modules is not None else official_state(opt), "best_rsum": 460.7,
                "opt": opt, "Eiters": 1000}, path)
    return path


def sample_batch(ni=3, nt=4, r=5):
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(ni, r, F, generator=g)
    layout = random_layout(ni, r, g).float()
    lengths = torch.tensor([6, 3, 5, 2])[:nt]
    ids = torch.randint(4, len(WORDS) + 4, (nt, 6), generator=g).masked_fill(~lengths_to_mask(lengths, 6), 0)
    return Regions(feats, torch.full((ni,), r), layout), Tokens(ids, lengths)


@pytest.mark.parametrize("cross", ["t2i", "i2t"])
def test_imported_model_encodes_and_scores_as_the_official_one(tmp_path, vocab_path, cross):
    lam = 9.0 if cross == "t2i" else 4.0
    opt = options(cross_attn=cross, lambda_softmax=lam)
    modules = official_state(opt)
    ckpt = save_official(tmp_path / "model_best.pth.tar", opt, modules)
    out = import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "pfan.safetensors", get_importers())
    loaded = load_checkpoint(out)
    model = loaded.model.eval()
    recipe = model.recipe
    assert recipe.image.encoder.spec.name == "pfan.position" and recipe.match[0].cross.spec.name == f"scan.{cross}"
    assert recipe.match[0].similarity.spec.name == ("pfan.cosine_max" if cross == "t2i" else "core.cosine")
    assert recipe.match[0].aggregate.spec.name == "core.mean"
    assert recipe.match[0].cross.spec.lambda_softmax == lam and recipe.train.epochs == 30

    regions, tokens = sample_batch()
    with torch.no_grad():
        images = model.encode_images(regions)
        texts = model.encode_texts(tokens)
        scores = model.score(images, texts)
    expected = official.encode_images(modules[0], regions.feats, regions.boxes.double())
    torch.testing.assert_close(images.local.feats.double(), expected, rtol=1e-5, atol=1e-5)
    reference = official.t2i_scores if cross == "t2i" else official.i2t_scores
    want = reference(expected, texts.local.feats, tokens.lengths, lam)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-5)


def test_a_missing_key_or_a_wrong_shape_is_a_clear_error(tmp_path, vocab_path):
    opt = options()
    modules = official_state(opt)
    del modules[0]["fc_att.bias"]
    modules[0]["position_embedding.weight"] = torch.zeros(101, 200)  # a 10 x 10 grid
    ckpt = save_official(tmp_path / "broken.pth.tar", opt, modules)
    with pytest.raises(CheckpointError) as failure:
        import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())
    message = str(failure.value)
    assert "missing: fc_att.bias (200,)" in message
    assert "shape of position_embedding.weight: (101, 200), expected (257, 200)" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_a_scan_checkpoint_is_not_a_pfan_one(tmp_path, vocab_path):
    opt = options()
    modules = official_state(opt)
    modules[0] = {"fc.weight": torch.zeros(E, F), "fc.bias": torch.zeros(E)}
    ckpt = save_official(tmp_path / "scan.pth.tar", opt, modules)
    with pytest.raises(CheckpointError, match=r"missing: fc_att.weight .*\n.*"):
        import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())


def test_the_wrong_vocabulary_is_named(tmp_path, vocab_path):
    opt = options(vocab_size=20)
    ckpt = save_official(tmp_path / "m.pth.tar", opt)
    with pytest.raises(CheckpointError, match="the vocabulary has 12 words .* 20 rows"):
        import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())


@pytest.mark.parametrize("agg", ["Max", "LogSumExp"])
def test_t2i_with_a_nonlinear_pool_is_refused_with_the_reason(tmp_path, vocab_path, agg):
    ckpt = save_official(tmp_path / "m.pth.tar", options(agg_func=agg))
    with pytest.raises(CheckpointError, match=r"0\.5 \* .*only for Mean and Sum"):
        import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "out.safetensors", get_importers())


@pytest.mark.parametrize(("agg", "stage"), [("LogSumExp", "scan.lse"), ("Max", "core.max"), ("Sum", "scan.sum")])
def test_i2t_pools_map_to_stages(tmp_path, vocab_path, agg, stage):
    ckpt = save_official(tmp_path / "m.pth.tar", options(cross_attn="i2t", agg_func=agg, lambda_lse=5.0, data_name="coco_precomp"))
    loaded = load_checkpoint(import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "o.safetensors", get_importers()))
    recipe = loaded.model.recipe
    assert recipe.match[0].aggregate.spec.name == stage
    assert recipe.data.protocol == "coco-1k-5fold" and recipe.data.test_split == "testall"


def test_missing_options_and_the_weight_norm_encoder_are_refused(tmp_path, vocab_path):
    opt = options()
    del opt.lambda_softmax
    ckpt = save_official(tmp_path / "m.pth.tar", opt, official_state(options()))
    with pytest.raises(CheckpointError, match="lack 'lambda_softmax'"):
        import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "o.safetensors", get_importers())
    ckpt = save_official(tmp_path / "w.pth.tar", options(precomp_enc_type="weight_norm"))
    with pytest.raises(CheckpointError, match="weight_norm"):
        import_checkpoint("pfan", ckpt, vocab_path, tmp_path / "o.safetensors", get_importers())
