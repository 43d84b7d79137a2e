"""`itmkit import gpo`: official VSE-infinity checkpoints in, itmkit checkpoints out that score like the official code."""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, gru_text_layout, import_checkpoint
from itmkit.types import Regions, Tokens, lengths_to_mask
from itmkit_bert.testing import write_tiny_bert
from itmkit_bert.vocab import WordPieceVocabulary
from itmkit_gpo.importer import gpo_layout, image_layout
from itmkit_gpo.tests import official

EMBED, IMG_DIM, WORD_DIM = 8, 12, 6
WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "two", "men", "sit"]
V = 4 + len(WORDS) + 1  # SCAN's vocabulary with <mask> appended
CAPTIONS = ["A dog runs on the grass.", "two men sit", "a red ball", "the cat unbelievably jumps on a car!",
            "a woman riding a horse in the street"]


def options(bert: bool = False, **overrides) -> argparse.Namespace:
    """The Namespace vse_infty's train.py pickles as 'opt': arguments.py defaults, train_region.sh flags."""
    opt = dict(data_path="/tmp/data/f30k", data_name="f30k", vocab_path="/tmp/data/vocab", margin=0.2, num_epochs=25,
               batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, learning_rate=5e-4, lr_update=15,
               optim="adam", workers=10, log_step=200, val_step=500, logger_name="runs/f30k_butd_region/log",
               model_name="runs/f30k_butd_region", resume="", max_violation=True, img_dim=IMG_DIM, no_imgnorm=False,
               no_txtnorm=False, precomp_enc_type="basic", backbone_path="", backbone_source="detector",
               vse_mean_warmup_epochs=1, reset_start_epoch=False, backbone_warmup_epochs=5,
               embedding_warmup_epochs=2, backbone_lr_factor=0.01, input_scale_factor=1)
    if bert:
        opt["vocab_size"] = 64
    else:
        opt.update(num_layers=1, drop=True, vocab_size=V)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def _random(layout: dict[str, tuple[int, ...]], g: torch.Generator) -> collections.OrderedDict:
    out = collections.OrderedDict()
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1234)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.4
    return out


def official_weights(opt: argparse.Namespace, seed: int = 0, bert_dir: Path | None = None) -> list[dict]:
    """Random weights in the official layout [img_enc.state_dict(), txt_enc.state_dict()]."""
    g = torch.Generator().manual_seed(seed)
    img = _random(image_layout(opt.embed_size, opt.img_dim), g)
    if bert_dir is None:
        layout = {**gru_text_layout(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, True), **gpo_layout()}
        return [img, _random(layout, g)]
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig.from_pretrained(bert_dir), add_pooling_layer=True)  # bert-base-uncased has a pooler
    txt = collections.OrderedDict((f"bert.{k}", v + torch.randn(v.shape, generator=g) * 0.02) for k, v in bert.state_dict().items())
    txt.update(_random({"linear.weight": (opt.embed_size, bert.config.hidden_size), "linear.bias": (opt.embed_size,),
                        **gpo_layout()}, g))
    # the master branch trains inside nn.DataParallel: every key is saved with 'module.'
    return [collections.OrderedDict((f"module.{k}", v) for k, v in sd.items()) for sd in (img, txt)]


def save_official(path: Path, opt: argparse.Namespace, model: list) -> Path:
    torch.save({"epoch": 19, "model": model, "best_rsum": 498.1, "opt": opt, "Eiters": 45000}, path)
    return path


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "f30k_precomp_vocab.json"
    Vocabulary([*Vocabulary.SPECIALS, *WORDS]).save(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert-base-uncased")


def random_images(seed: int, n: int = 4, regions: int = 36) -> torch.Tensor:
    return torch.rand(n, regions, IMG_DIM, generator=torch.Generator().manual_seed(seed))


def random_captions(seed: int, n: int = 6, words: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, words + 1, (n,), generator=g)
    lengths[0] = words
    ids = torch.randint(1, V, (n, words), generator=g)  # <mask> included, as an augmented caption has it
    return ids.masked_fill(~lengths_to_mask(lengths, words), 0), lengths


def bert_captions(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [WordPieceVocabulary.load(str(folder)).encode(c) for c in CAPTIONS]
    lengths = torch.tensor([len(e) for e in encoded])
    ids = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    return ids, lengths


def strip(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def official_scores(opt, model, images, ids, lengths, bert_dir: Path | None = None) -> torch.Tensor:
    img_sd, txt_sd = strip(model[0]), strip(model[1])
    img = official.encode_images(img_sd, images, torch.full((images.shape[0],), images.shape[1]))
    if bert_dir is None:
        cap = official.encode_texts_bigru(txt_sd, ids, lengths, word_dim=opt.word_dim, embed=opt.embed_size)
    else:
        from transformers import BertConfig

        cap = official.encode_texts_bert(txt_sd, ids, lengths, BertConfig.from_pretrained(bert_dir))
    return official.scores(img, cap)


def our_scores(path: Path, images, ids, lengths) -> torch.Tensor:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        image = model.encode_images(Regions(images, torch.full((images.shape[0],), images.shape[1])))
        text = model.encode_texts(Tokens(ids, lengths))
        return model.score(image, text)


# ======================================================================= bigru branch


@pytest.mark.parametrize("seed", [0, 1])
def test_an_imported_bigru_model_scores_like_the_official_forward_pass(tmp_path, vocab_path, seed):
    opt = options()
    model = official_weights(opt, seed=seed)
    source = save_official(tmp_path / "model_best.pth", opt, model)
    out = import_checkpoint("gpo", source, vocab_path, tmp_path / "gpo.safetensors", get_importers())
    images, (ids, lengths) = random_images(seed), random_captions(seed)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


def test_the_bigru_recipe_records_the_options_and_the_vocabulary_gains_mask(tmp_path, vocab_path):
    opt = options(data_name="coco", num_epochs=20, learning_rate=2e-4, lr_update=10, vse_mean_warmup_epochs=2)
    source = save_official(tmp_path / "model_best.pth", opt, official_weights(opt))
    loaded = load_checkpoint(import_checkpoint("gpo", source, vocab_path, tmp_path / "gpo.safetensors", get_importers()))
    r = loaded.model.recipe
    assert (r.image.encoder.spec.name, r.image.pool.spec.name, r.text.pool.spec.name) == ("gpo.precomp", "gpo.pool", "gpo.pool")
    enc = r.text.encoder.spec
    assert (enc.name, enc.word_dim, enc.num_layers, enc.normalize, r.info.embed_dim) == ("gpo.bigru", WORD_DIM, 1, False, EMBED)
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 2)
    assert (r.data.protocol, r.data.test_split, r.data.path) == ("coco-1k-5fold", "testall", "data/coco_precomp")
    t = r.train
    assert (t.epochs, t.lr, t.lr_update, t.batch_size, t.optimizer, t.weight_decay) == (20, 2e-4, 10, 128, "adamw", 0.01)
    assert loaded.vocab.idx2word == [*Vocabulary.SPECIALS, *WORDS, "<mask>"]
    assert loaded.model.data_ports.mask_id == V - 1
    assert loaded.meta["epoch"] == "19" and loaded.meta["official_best_rsum"] == "498.1"


def test_a_vocabulary_that_already_has_mask_imports_as_it_is(tmp_path):
    path = tmp_path / "vocab_with_mask.json"
    Vocabulary([*Vocabulary.SPECIALS, *WORDS, "<mask>"]).save(path)
    opt = options()
    source = save_official(tmp_path / "model_best.pth", opt, official_weights(opt))
    loaded = load_checkpoint(import_checkpoint("gpo", source, path, tmp_path / "gpo.safetensors", get_importers()))
    assert len(loaded.vocab) == V


# ======================================================================== BERT branch


def test_an_imported_bert_model_scores_like_the_official_forward_pass(tmp_path, bert_dir):
    opt = options(bert=True)
    model = official_weights(opt, seed=3, bert_dir=bert_dir)
    source = save_official(tmp_path / "model_best.pth", opt, model)
    out = import_checkpoint("gpo", source, bert_dir, tmp_path / "gpo.safetensors", get_importers())
    images, (ids, lengths) = random_images(3), bert_captions(bert_dir)
    assert (lengths < ids.shape[1]).any()
    torch.testing.assert_close(our_scores(out, images, ids, lengths),
                               official_scores(opt, model, images, ids, lengths, bert_dir), rtol=0, atol=1e-5)


def test_the_bert_recipe_and_tokenizer_come_from_the_model_directory(tmp_path, bert_dir):
    opt = options(bert=True)
    source = save_official(tmp_path / "model_best.pth", opt, official_weights(opt, bert_dir=bert_dir))
    loaded = load_checkpoint(import_checkpoint("gpo", source, bert_dir, tmp_path / "gpo.safetensors", get_importers()))
    enc = loaded.model.recipe.text.encoder.spec
    assert (enc.name, enc.path, enc.lr_scale, enc.normalize) == ("gpo.bert", str(bert_dir.resolve()), 0.1, False)
    assert loaded.model.recipe.train.weight_decay == 1e-4
    assert isinstance(loaded.vocab, WordPieceVocabulary) and len(loaded.vocab) == 64
    assert loaded.vocab.encode("a dog")[0] == loaded.vocab.cls_id
    assert not any(k.startswith("text.encoder.bert.pooler") for k in loaded.model.state_dict())


def test_an_older_transformers_position_ids_buffer_is_checked_and_dropped(tmp_path, bert_dir):
    opt = options(bert=True)
    model = official_weights(opt, bert_dir=bert_dir)
    model[1]["module.bert.embeddings.position_ids"] = torch.arange(64)[None]
    source = save_official(tmp_path / "model_best.pth", opt, model)
    import_checkpoint("gpo", source, bert_dir, tmp_path / "gpo.safetensors", get_importers())
    model[1]["module.bert.embeddings.position_ids"] = torch.arange(64)[None].flip(1)
    save_official(source, opt, model)
    with pytest.raises(CheckpointError, match="position_ids is not 0, 1, 2"):
        import_checkpoint("gpo", source, bert_dir, tmp_path / "gpo2.safetensors", get_importers())


# ============================================================================ the CLI


ITMKIT = Path(sys.executable).with_name("itmkit")


def test_the_cli_imports_and_the_result_scores_like_the_official_code(tmp_path, vocab_path):
    opt = options()
    model = official_weights(opt, seed=7)
    source = save_official(tmp_path / "model_best.pth", opt, model)
    out = tmp_path / "gpo.safetensors"
    result = subprocess.run([str(ITMKIT), "import", "gpo", str(source), "--vocab", str(vocab_path), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    images, (ids, lengths) = random_images(7), random_captions(7)
    torch.testing.assert_close(our_scores(out, images, ids, lengths), official_scores(opt, model, images, ids, lengths),
                               rtol=0, atol=1e-5)


# ============================================================================ errors


def _broken(kind: str, opt: argparse.Namespace) -> tuple[argparse.Namespace, list]:
    model = official_weights(opt)
    if kind == "missing key":
        del model[1]["rnn.bias_hh_l0_reverse"]
    elif kind == "wrong shape":
        model[0]["mlp.layers.1.weight"] = model[0]["mlp.layers.1.weight"].T.contiguous()
    elif kind == "unexpected key":
        model[0]["mlp.bns.2.weight"] = torch.zeros(EMBED)
    elif kind == "grid model":
        opt = argparse.Namespace(**{**vars(opt), "precomp_enc_type": "backbone"})
    elif kind == "vocabulary size":
        model[1]["embed.weight"] = torch.zeros(8482, WORD_DIM)
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "embed_size"})
    elif kind == "three modules":
        model.append({"fc.weight": torch.zeros(1)})
    elif kind == "half a DataParallel prefix":
        model[0]["module.fc.bias"] = model[0].pop("fc.bias")
    elif kind == "unnormalised embeddings":
        opt = argparse.Namespace(**{**vars(opt), "no_imgnorm": True})
    elif kind == "not a text encoder":
        model[1] = {k.replace("embed.", "word_embed."): v for k, v in model[1].items() if not k.startswith("rnn.")}
    return opt, model


ERRORS = {
    "missing key": r"model\[1\] \(txt_enc\): the weights do not match the official layout\n  missing: rnn.bias_hh_l0_reverse \(24,\)",
    "wrong shape": r"model\[0\] \(img_enc\): .*\n  shape of mlp.layers.1.weight: \(4, 8\), expected \(8, 4\)",
    "unexpected key": r"unexpected: mlp.bns.2.weight \(8,\)",
    "grid model": r"precomp_enc_type='backbone'; only region-feature models",
    "vocabulary size": r"the vocabulary has 16 words, so with <mask> appended 17, but .* has 8482 rows",
    "missing option": r"the checkpoint's options lack 'embed_size'",
    "three modules": r"'model' holds 2 state dicts \[img_enc, txt_enc\], this one holds 3",
    "half a DataParallel prefix": r"some keys have the nn.DataParallel prefix 'module.' and some do not",
    "unnormalised embeddings": r"no_imgnorm set: the official score is then a dot product",
    "not a text encoder": r"neither embed.weight \(bigru branch\) nor bert.\* keys",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, vocab_path, kind):
    opt, model = _broken(kind, options())
    source = save_official(tmp_path / "model_best.pth", opt, model)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("gpo", source, vocab_path, tmp_path / "gpo.safetensors", get_importers())
    assert not (tmp_path / "gpo.safetensors").exists()


def test_the_wrong_kind_of_vocabulary_is_a_clear_error(tmp_path, vocab_path, bert_dir):
    opt = options()
    source = save_official(tmp_path / "bigru.pth", opt, official_weights(opt))
    with pytest.raises(CheckpointError, match="reads the SCAN vocabulary: pass vocab/"):
        import_checkpoint("gpo", source, bert_dir, tmp_path / "out.safetensors", get_importers())
    opt = options(bert=True)
    source = save_official(tmp_path / "bert.pth", opt, official_weights(opt, bert_dir=bert_dir))
    with pytest.raises(CheckpointError, match="pass the local bert-base-uncased directory"):
        import_checkpoint("gpo", source, vocab_path, tmp_path / "out.safetensors", get_importers())
