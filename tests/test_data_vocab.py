"""Tokenisation and the vocabulary: the official SCAN JSON files, encode/decode, build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itmkit.data.vocab import Vocabulary, tokenize
from itmkit.errors import DataError

REFERENCE = Path(__file__).parents[1] / ".." / "shared" / "reference"
OFFICIAL = [("f30k_precomp_vocab.json", 8481), ("coco_precomp_vocab.json", 11353)]


def official(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference file {name} is not available")
    return path


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Two young, White males are outside near many bushes .") == [
        "two", "young", ",", "white", "males", "are", "outside", "near", "many", "bushes", ".",
    ]
    assert tokenize("A man's dog.") == ["a", "man", "'s", "dog", "."]


@pytest.mark.parametrize(("name", "size"), OFFICIAL)
def test_official_file_round_trips_to_an_equal_json_object(name, size, tmp_path):
    path = official(name)
    original = json.loads(path.read_text())
    vocab = Vocabulary.load(path)
    assert len(vocab) == size
    assert vocab.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert vocab.to_json() == original
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == original
    assert Vocabulary.load(tmp_path / "vocab.json").sha256() == vocab.sha256()
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left


def test_encode_against_the_flickr_vocabulary():
    path = official("f30k_precomp_vocab.json")
    word2idx = json.loads(path.read_text())["word2idx"]
    vocab = Vocabulary.load(path)
    caption = "A man in a red shirt rides a horse zzqxv ."
    expected = [1] + [word2idx[w] for w in ["a", "man", "in", "a", "red", "shirt", "rides", "a", "horse"]]
    expected += [3, word2idx["."], 2]  # 'zzqxv' is unknown
    assert vocab.encode(caption) == expected
    assert vocab.decode(expected + [0, 0]) == "a man in a red shirt rides a horse <unk> ."


def test_build_keeps_words_at_the_threshold_in_count_order():
    captions = ["a dog runs", "a dog sits", "a dog barks", "a dog and a cat", "a cat runs", "a cat"]
    vocab = Vocabulary.build(captions, threshold=4)
    assert vocab.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]  # a: 7, dog: 4, cat: 3
    vocab = Vocabulary.build(captions, threshold=2)
    # cat (3) before runs (2); ties in count are alphabetical
    assert vocab.idx2word[4:] == ["a", "dog", "cat", "runs"]
    assert Vocabulary.build(captions, threshold=2).sha256() == vocab.sha256()


def test_add_word_appends_once():
    vocab = Vocabulary.build(["a b c"], threshold=1)
    assert vocab.add_word("<mask>") == 7
    assert vocab.add_word("<mask>") == 7
    assert vocab.add_word("a") == vocab.word2idx["a"]
    assert len(vocab) == 8 and "<mask>" in vocab
    assert vocab.to_json()["idx"] == 8


def test_sha256_changes_with_the_words():
    vocab = Vocabulary.build(["a b c"], threshold=1)
    before = vocab.sha256()
    vocab.add_word("d")
    assert vocab.sha256() != before and len(before) == 64


def test_specials_must_come_first():
    with pytest.raises(DataError, match="must start with"):
        Vocabulary(["<start>", "<pad>", "<end>", "<unk>", "a"])


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json does not exist"):
        Vocabulary.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"idx2word": {')
    with pytest.raises(DataError, match=r"bad.json is not valid JSON.*line 1"):
        Vocabulary.load(bad)


def test_missing_key_suggests_the_misspelt_one(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"idx2words": {}, "word2idx": {}, "idx": 0}))
    with pytest.raises(DataError) as err:
        Vocabulary.load(path)
    assert "typo.json" in str(err.value)
    assert "'idx2word'" in str(err.value) and "did you mean 'idx2words'" in str(err.value)


def test_maps_that_disagree_are_refused(tmp_path):
    obj = Vocabulary.build(["a b"], threshold=1).to_json()
    obj["word2idx"]["a"], obj["word2idx"]["b"] = obj["word2idx"]["b"], obj["word2idx"]["a"]
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=r"swapped.json: idx2word\['4'\] is 'a' but word2idx\['a'\] is 5"):
        Vocabulary.load(path)
    obj = Vocabulary.build(["a b"], threshold=1).to_json()
    obj["idx"] = 7
    with pytest.raises(DataError, match="'idx' is 7 but 'idx2word' has 6 entries"):
        Vocabulary.from_json(obj)
