"""`itmkit import dime`: fake official DIME checkpoints (tiny BERT) in, itmkit checkpoints that score like the official code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit_bert.testing import write_tiny_bert
from itmkit_bert.vocab import WordPieceVocabulary
from itmkit_dime.tests import official

EMBED, IMG_DIM, HID, HEADS, MAX_WORDS = 32, 12, 20, 4, 32
CAPTIONS = ["a man riding a horse", "two dogs play with a red ball on the grass next to a car and a cat and a small"
            " blue horse jumping on the green grass next to the water", "a cat", "the woman is wearing a blue shirt",
            "unbelievably, the cat-car jumps!", "a dog", "three horses run in the water", "a red car",
            "the man is riding", "small cat on the street"]


def options(direction: str = "i2t", **overrides) -> argparse.Namespace:
    """The Namespace DIME's train.py pickles as 'opt' (its defaults and the README's run), sized for tests."""
    opt = dict(logger_name="runs/filker_DIME", data_path="/data", data_name="f30k_precomp", bert_path="/bert/",
               max_words=MAX_WORDS, extra_stc=1 if direction == "i2t" else 0, extra_img=0 if direction == "i2t" else 1,
               num_epochs=30, batch_size=32, learning_rate=2e-4, lr_update=15, grad_clip=2.0, drop=0.0, margin=0.2,
               max_violation=True, trade_off=0.5, img_dim=IMG_DIM, embed_size=EMBED, direction=direction, workers=2,
               log_step=10, val_step=2000, resume="", finetune=False, use_restval=False, measure="cosine",
               use_abs=False, no_imgnorm=False, reset_train=False, num_head_IMRC=HEADS, hid_IMRC=HID,
               raw_feature_norm_CMRC="clipped_l2norm", lambda_softmax_CMRC=4.0 if direction == "i2t" else 9.0,
               hid_router=HID, vocab_file="/bert/vocab.txt", bert_config_file="/bert/bert_config.json",
               init_checkpoint="/bert/pytorch_model.bin", do_lower_case=True)
    opt.update(overrides)
    return argparse.Namespace(**opt)


class OfficialModel:
    """The three official modules with random weights, and the frozen BERT of the directory (HF = bert.py's math)."""

    def __init__(self, bert_dir: Path, opt: argparse.Namespace, seed: int = 0):
        from transformers import BertModel

        torch.manual_seed(seed)
        self.opt = opt
        self.image = official.OfficialImage(IMG_DIM, EMBED, opt.direction)
        self.bert = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=True).eval()
        self.head = official.OfficialTextHead(self.bert.config.hidden_size, EMBED)
        self.itr = official.OfficialInteraction(EMBED, opt.direction, hid_router=HID, hid_imrc=HID, heads=HEADS,
                                                lambda_softmax=opt.lambda_softmax_CMRC)
        with torch.no_grad():  # trained BatchNorms
            for bn in (self.image.bn, self.itr.bn):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
                bn.num_batches_tracked.fill_(1000)
        self.vocab = WordPieceVocabulary.load(str(bert_dir))

    def state(self) -> list[dict]:
        txt = {f"bert.{k}": v for k, v in self.bert.state_dict().items()}
        txt.update(self.head.state_dict())
        return [dict(self.image.state_dict()), txt, dict(self.itr.state_dict())]

    def save(self, path: Path, state: list | None = None, opt: argparse.Namespace | None = None) -> Path:
        torch.save({"epoch": 17, "model": self.state() if state is None else state, "best_rsum": 480.2,
                    "best_r1": 70.1, "opt": opt or self.opt, "Eiters": 54321}, path)
        return path

    def features(self, caption: str) -> tuple[list[int], list[int]]:
        """data.convert_to_feature: [CLS] pieces[:30] [SEP], [PAD] to max_words, with the input mask."""
        pieces = self.vocab.encode(caption)[1:-1][: self.opt.max_words - 2]
        ids = [self.vocab.cls_id, *pieces, self.vocab.sep_id]
        mask = [1] * len(ids) + [0] * (self.opt.max_words - len(ids))
        return ids + [0] * (self.opt.max_words - len(ids)), mask

    @torch.no_grad()
    def scores(self, feats: torch.Tensor, captions: list[str]) -> np.ndarray:
        """evaluation.encode_data + calItr (shards of 2 x batch_size), all modules in eval mode."""
        for m in (self.image, self.head, self.itr):
            m.eval()
        ids, mask = map(torch.tensor, zip(*(self.features(c) for c in captions)))
        states = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        (stc, _), wrd = self.head(states)
        img, rgn = self.image(feats)
        return official.cal_itr(self.itr, rgn, img, wrd, stc, mask.sum(1), shard_size=2 * 2)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "uncased_L-12_H-768_A-12", seed=3)


def write_data(folder: Path, seed: int) -> tuple[np.ndarray, list[str]]:
    from itmkit.data import precomp

    rng = np.random.default_rng(seed)
    feats = rng.random((2, 36, IMG_DIM)).astype(np.float32)
    precomp.write_split(folder, "test", features=feats, captions=CAPTIONS)
    return feats, CAPTIONS


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_itmkit_eval_saves_the_official_matrix(tmp_path, bert_dir, direction):
    """`itmkit eval --save-sims` of an imported checkpoint equals calItr's matrix (captions cut at 32 and padded)."""
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
    from cliutil import invoke

    model = OfficialModel(bert_dir, options(direction), seed=1)
    source = model.save(tmp_path / f"Flickr30K_DIME_{'it' if direction == 'i2t' else 'ti'}.pth.tar")
    code, out, err = invoke("import", "dime", str(source), "--vocab", str(bert_dir), "-o", str(tmp_path / "d.safetensors"))
    assert code == 0, err
    feats, captions = write_data(tmp_path / "data", seed=2)
    assert len(model.vocab.encode(captions[1])) > MAX_WORDS  # one caption is cut
    code, _, err = invoke("eval", str(tmp_path / "d.safetensors"), "--data", str(tmp_path / "data"), "--save-sims",
                          str(tmp_path / "s.npy"), "--device", "cpu")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), model.scores(torch.from_numpy(feats), captions), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_the_recipe_records_the_options(tmp_path, bert_dir, direction):
    model = OfficialModel(bert_dir, options(direction), seed=2)
    notes: list[str] = []
    out = import_checkpoint("dime", model.save(tmp_path / "m.pth.tar"), bert_dir, tmp_path / "d.safetensors",
                            get_importers(), note=notes.append)
    loaded = load_checkpoint(out)
    recipe = loaded.model.recipe
    sim = recipe.match[0].similarity.spec
    assert (sim.name, sim.direction, sim.lambda_softmax, sim.heads, sim.hid_imrc, sim.hid_router, sim.path_weight) == (
        "dime.interaction", direction, 4.0 if direction == "i2t" else 9.0, HEADS, HID, HID, 0.5)
    assert recipe.text.encoder.spec.name == "dime.bert" and recipe.text.encoder.spec.max_words == MAX_WORDS
    assert (recipe.image.pool is not None) == (direction == "t2i")
    assert (recipe.train.extra_captions, recipe.train.extra_images) == ((1, 0) if direction == "i2t" else (0, 1))
    assert (recipe.train.batch_size, recipe.train.lr, recipe.train.lr_update, recipe.train.epochs) == (32, 2e-4, 15, 30)
    assert any("pooler" in n for n in notes)
    assert any("img_enc.bn" in n for n in notes) == (direction == "i2t")
    assert not any("differs" in n for n in notes)  # the stored BERT is the directory's


def test_a_stored_bert_unlike_the_directory_is_used_and_reported(tmp_path, bert_dir):
    model = OfficialModel(bert_dir, options(), seed=3)
    state = model.state()
    state[1]["bert.encoder.layer.0.output.dense.weight"] = state[1]["bert.encoder.layer.0.output.dense.weight"] + 0.5
    notes: list[str] = []
    out = import_checkpoint("dime", model.save(tmp_path / "m.pth.tar", state), bert_dir, tmp_path / "d.safetensors",
                            get_importers(), note=notes.append)
    assert any("differs from the weights" in n for n in notes)
    weights = load_checkpoint(out).model.state_dict()["text.encoder.bert.encoder.layer.0.output.dense.weight"]
    torch.testing.assert_close(weights, state[1]["bert.encoder.layer.0.output.dense.weight"])


def test_a_python2_pickle_imports(tmp_path, bert_dir):
    """The README's Python 2.7 / PyTorch 1.0 runs pickle their options as byte strings (legacy format)."""
    from itmkit.testing import save_like_python2

    model = OfficialModel(bert_dir, options("t2i", logger_name="runs/filker_DIME_\xe9t\xe9"), seed=7)
    source = tmp_path / "MSCOCO_DIME_ti.pth.tar"
    save_like_python2({"epoch": 17, "model": model.state(), "best_rsum": 480.2, "best_r1": 70.1, "opt": model.opt,
                       "Eiters": 54321}, source)
    out = import_checkpoint("dime", source, bert_dir, tmp_path / "d.safetensors", get_importers())
    assert load_checkpoint(out).model.recipe.match[0].similarity.spec.direction == "t2i"


def test_gamma_beta_layer_norm_names_import_too(tmp_path, bert_dir):
    model = OfficialModel(bert_dir, options(), seed=4)
    state = model.state()
    state[1] = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in state[1].items()}
    import_checkpoint("dime", model.save(tmp_path / "m.pth.tar", state), bert_dir, tmp_path / "d.safetensors",
                      get_importers())


# ============================================================================ errors


def _broken(kind: str, model: OfficialModel) -> tuple[list, argparse.Namespace]:
    state, opt = model.state(), model.opt
    if kind == "missing key":
        del state[2]["dynamic_itr_l1.cmrc.refine.fc_shift.bias"]
    elif kind == "wrong shape":
        state[2]["dynamic_itr_l2.ric.router.mlp.2.weight"] = torch.zeros(4, HID)
    elif kind == "unexpected key":
        state[1]["mapping2.weight"] = torch.zeros(EMBED, EMBED)
    elif kind == "two modules":
        state = state[:2]
    elif kind == "missing option":
        opt = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "embed_size"})
    elif kind == "bad direction":
        opt = options(direction="i2x")
    elif kind == "l1norm":
        opt = options(raw_feature_norm_CMRC="clipped_l1norm")
    elif kind == "heads":
        opt = options(num_head_IMRC=5)
    elif kind == "another BERT":
        state[1]["bert.embeddings.word_embeddings.weight"] = torch.zeros(100, 32)
    elif kind == "too many words":
        opt = options(max_words=65)
    return state, opt


ERRORS = {
    "missing key": r"model\[2\] \(itr_module\): .*\n  missing: dynamic_itr_l1.cmrc.refine.fc_shift.bias",
    "wrong shape": r"shape of dynamic_itr_l2.ric.router.mlp.2.weight: \(4, 20\), expected \(1, 20\)",
    "unexpected key": r"model\[1\] \(txt_enc\) head: .*\n  unexpected: mapping2.weight",
    "two modules": r"'model' holds 3 state dicts \[img_enc, txt_enc, itr_module\], this one holds 2",
    "missing option": r"the checkpoint's options lack 'embed_size'",
    "bad direction": r"option direction='i2x' is not i2t or t2i",
    "l1norm": r"raw_feature_norm_CMRC='clipped_l1norm' is not supported",
    "heads": r"embed_size=32 is not a multiple of num_head_IMRC=5",
    "another BERT": r"shape of embeddings.word_embeddings.weight: \(100, 32\), expected \(64, 32\)",
    "too many words": r"max_words=65 does not fit the 64 positions",
}


@pytest.mark.parametrize("kind", ERRORS)
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, bert_dir, kind):
    model = OfficialModel(bert_dir, options(), seed=5)
    state, opt = _broken(kind, model)
    source = model.save(tmp_path / "model_best.pth.tar", state, opt)
    with pytest.raises(CheckpointError, match=ERRORS[kind]):
        import_checkpoint("dime", source, bert_dir, tmp_path / "d.safetensors", get_importers())
    assert not (tmp_path / "d.safetensors").exists()


def test_a_vocabulary_file_instead_of_the_bert_directory_is_a_clear_error(tmp_path, bert_dir):
    from itmkit.data.vocab import Vocabulary

    model = OfficialModel(bert_dir, options(), seed=6)
    vocab = tmp_path / "vocab.json"
    Vocabulary([*Vocabulary.SPECIALS, "dog"]).save(vocab)
    with pytest.raises(CheckpointError, match="pass the local directory of the BERT"):
        import_checkpoint("dime", model.save(tmp_path / "m.pth.tar"), vocab, tmp_path / "d.safetensors",
                          get_importers())
