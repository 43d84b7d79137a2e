"""`itmkit import mtfn`: random official-format checkpoints in, itmkit checkpoints that score like the official code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.checkpoint import load_checkpoint
from itmkit.errors import CheckpointError
from itmkit.importing import get_importers, import_checkpoint
from itmkit_mtfn.importer import schedule
from itmkit_mtfn.tests import official

DIM_V, WORD, HIDDEN, DIM_H, DIM_MM, RANK = 12, 8, 10, 9, 7, 3
WORDS = ["a", "man", "riding", "horse", "two", "dogs", "play", "with", "red", "ball", "cat", "the", "<unk>", "on",
         "grass", "woman", "is", "blue", "shirt", "small"]
CAPTIONS = ["a man riding a horse", "Two dogs play with a red ball, on the grass!", "a cat", "the woman is wearing a"
            " blue shirt.", "unbelievably the zebra-car jumps", "a dog", "three horses ... run", "a red car",
            "the man is riding", "small cat on the street"]


def write_vocab(path: Path, words=WORDS) -> tuple[Path, dict[str, int]]:
    """vocab.py's serialize_vocab: word2idx from 1, idx2word with string keys, idx = the next id."""
    word2idx = {w: i + 1 for i, w in enumerate(words)}
    path.write_text(json.dumps({"word2idx": word2idx, "idx2word": {str(i): w for w, i in word2idx.items()},
                                "idx": len(words) + 1}))
    return path, word2idx


def make(tmp_path: Path, seed: int = 0, **fusion) -> tuple[official.FusionNoAtt, Path, dict[str, int]]:
    vocab, word2idx = write_vocab(tmp_path / "flickr30k_splits_vocab.json")
    options = official.yaml_options(DIM_V, HIDDEN, DIM_H, DIM_MM, RANK, **fusion)
    model = official.random_model(options, len(WORDS) + 1, WORD, seed)
    return model, vocab, word2idx


def official_scores(model, feats: torch.Tensor, captions: list[str], word2idx) -> np.ndarray:
    """engine.validate's matrix: the region mean and seq2vec of the padded captions, scored together."""
    ids = official.collate([official.caption_ids(c, word2idx) for c in captions])
    with torch.no_grad():
        return model.double()(feats.double(), ids).numpy()


FUSIONS = {"official": {}, "activations": {"activation_hv": "relu", "activation_ht": "tanh", "activation_mm": "tanh"},
           "plain": {"activation_v": None, "activation_t": None}}


@pytest.mark.parametrize("variant", list(FUSIONS))
def test_the_imported_model_scores_like_the_official_one(tmp_path, variant):
    model, vocab, word2idx = make(tmp_path, seed=1, **FUSIONS[variant])
    if variant == "activations":
        model.opt["classif"]["activation"] = "relu"
    source = official.save(model, tmp_path / "model_best.pth.tar")
    out = import_checkpoint("mtfn", source, vocab, tmp_path / "m.safetensors", get_importers())
    loaded = load_checkpoint(out)
    feats = torch.rand(4, 5, DIM_V)
    captions = CAPTIONS
    expected = official_scores(model, feats, captions, word2idx)
    net = loaded.model.double().eval()
    from itmkit.types import Regions, Tokens
    encoded = [loaded.vocab.encode(c) for c in captions]
    assert encoded[1] == [loaded.vocab.words.word2idx[w] for w in
                          ["two", "dogs", "play", "with", "a", "red", "ball", "on", "the", "grass"]]
    ids = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    with torch.no_grad():
        image = net.encode_images(Regions(feats.double(), torch.full((4,), 5)))
        text = net.encode_texts(Tokens(ids, torch.tensor([len(e) for e in encoded])))
        ours = net.score(image, text).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-10)


def test_itmkit_eval_saves_the_official_matrix(tmp_path):
    """`itmkit import mtfn` then `itmkit eval --save-sims` on a precomp folder equals engine.validate's matrix."""
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
    from cliutil import invoke
    from itmkit.data import precomp

    model, vocab, word2idx = make(tmp_path, seed=2)
    source = official.save(model, tmp_path / "model_best.pth.tar")
    code, out, err = invoke("import", "mtfn", str(source), "--vocab", str(vocab), "-o", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    feats = np.random.default_rng(3).random((2, 36, DIM_V)).astype(np.float32)
    precomp.write_split(tmp_path / "data", "test", features=feats, captions=CAPTIONS)
    code, _, err = invoke("eval", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "data"), "--save-sims",
                          str(tmp_path / "s.npy"), "--device", "cpu")
    assert code == 0, err
    expected = official_scores(model, torch.from_numpy(feats), CAPTIONS, word2idx)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=0, atol=1e-5)


def test_the_recipe_carries_the_options_and_the_schedule(tmp_path):
    model, vocab, _ = make(tmp_path, seed=3, dropout_hv=0.1, activation_mm="relu")
    model.opt["seq2vec"]["fixed_emb"] = True
    out = import_checkpoint("mtfn", official.save(model, tmp_path / "m.pth.tar"), vocab, tmp_path / "m.safetensors",
                            get_importers())
    recipe = load_checkpoint(out).model.recipe
    fusion = recipe.match[0].similarity.spec
    assert (fusion.rank, fusion.dim_hv, fusion.dim_mm, fusion.dropout_hv, fusion.activation_mm,
            fusion.activation_v, fusion.activation_hv) == (RANK, DIM_H, DIM_MM, 0.1, "relu", "tanh", "none")
    text = recipe.text.encoder.spec
    assert (text.word_dim, text.hidden_dim, text.dropout, text.freeze_embedding) == (WORD, HIDDEN, 0.25, True)
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.train.grad_clip) == (120, 128, 0.0)
    lrs = [p.lr for p in recipe.phases]
    assert lrs == pytest.approx([4e-5, 5e-5, 6e-5, 7e-5, 8e-5, 9e-5, 1e-4, 1e-5])


def test_the_schedule_is_adjust_learning_rate():
    def official_lr(epoch, lr=1e-4):
        if epoch < 50:
            return lr / 10 * (epoch // 8 + 4)
        return lr if epoch < 100 else lr / 10

    phases = schedule(1e-4, 120)
    per_epoch = [p["lr"] for p in phases[:-1] for _ in range(p["epochs"])]
    per_epoch += [phases[-1]["lr"]] * (120 - len(per_epoch))
    assert per_epoch == pytest.approx([official_lr(e) for e in range(120)])
    assert [p["lr"] for p in schedule(1e-4, 20)] == pytest.approx([4e-5, 5e-5, 6e-5])


def test_the_embedding_rows_follow_the_words(tmp_path):
    model, vocab, word2idx = make(tmp_path, seed=4)
    out = import_checkpoint("mtfn", official.save(model, tmp_path / "m.pth.tar"), vocab, tmp_path / "m.safetensors",
                            get_importers())
    loaded = load_checkpoint(out)
    ours = loaded.model.text.encoder.embedding.weight
    theirs = model.seq2vec.embedding.weight.float()
    for word, i in word2idx.items():
        assert torch.equal(ours[loaded.vocab.words.word2idx[word]], theirs[i])
    assert not ours[1:3].any() and not ours[0].any()


def _broken(kind: str, model, tmp_path: Path) -> Path:
    state = dict(model.state_dict())
    entries = {}
    if kind == "missing key":
        del state["fusion.list_linear_hv.1.bias"]
    elif kind == "hidden bias":
        state["seq2vec.rnn.gru_cell.weight_hr.bias"] = torch.zeros(HIDDEN)
    elif kind == "rank":
        model.opt["fusion"]["R"] = RANK + 1
    elif kind == "no options":
        entries = {"options": None}
    elif kind == "activation":
        model.opt["fusion"]["activation_mm"] = "softmaxx"
    elif kind == "seq2vec type":
        model.opt["seq2vec"]["type"] = "BiSkip"
    path = official.save(model, tmp_path / "m.pth.tar", state=state, **entries)
    if kind == "no options":
        raw = torch.load(path, weights_only=False)
        del raw["options"]
        torch.save(raw, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing key", "missing: fusion.list_linear_hv.1.bias"),
    ("hidden bias", "unexpected: seq2vec.rnn.gru_cell.weight_hr.bias"),
    ("rank", "missing: fusion.list_linear_hv.3.weight"),
    ("no options", "no 'options' entry"),
    ("activation", "activation_mm='softmaxx'"),
    ("seq2vec type", "BiSkip"),
])
def test_a_broken_checkpoint_is_a_clear_error(tmp_path, kind, message):
    model, vocab, _ = make(tmp_path, seed=5)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace(".", r"\.")):
        import_checkpoint("mtfn", _broken(kind, model, tmp_path), vocab, tmp_path / "m.safetensors", get_importers())


@pytest.mark.parametrize("content, message", [
    ({"word2idx": {"a": 0, "<unk>": 1}}, "1..2"),
    ({"word2idx": {"a": 1, "b": 2}}, "no '<unk>'"),
    ({"words": []}, "'word2idx'"),
    ({"word2idx": {"a": 1, "<unk>": "2"}}, "integer id"),
    ({"word2idx": {"a": 1, "<unk>": 2}, "idx2word": {"1": "b", "2": "<unk>"}}, "inverses"),
    ({"word2idx": {"a": 1, "<start>": 2, "<unk>": 3}}, "never has"),
])
def test_a_bad_vocabulary_is_a_clear_error(tmp_path, content, message):
    model, _, _ = make(tmp_path, seed=6)
    (tmp_path / "v.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=message):
        import_checkpoint("mtfn", official.save(model, tmp_path / "m.pth.tar"), tmp_path / "v.json",
                          tmp_path / "m.safetensors", get_importers())


def test_a_vocabulary_of_another_size_is_refused(tmp_path):
    model, _, _ = make(tmp_path, seed=7)
    vocab, _ = write_vocab(tmp_path / "small.json", WORDS[:-2])
    with pytest.raises(CheckpointError, match="has 18 words but the checkpoint's word embedding"):
        import_checkpoint("mtfn", official.save(model, tmp_path / "m.pth.tar"), vocab, tmp_path / "m.safetensors",
                          get_importers())
