"""Every file a user names as input is checked before it is opened (``itmkit.inputs``), and no command
writes over its own inputs, the dataset it reads included (``itmkit.outputs``).

A FIFO used to block the reader forever and ``/dev/zero`` to grow it by gigabytes; vocabularies with
words of the wrong type ended in internal errors. Each is now one clear line and exit 1.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from cliutil import assert_clean_failure, invoke
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError
from itmkit.inputs import MAX_TEXT_BYTES
from tinydata import write_recipe, write_tiny

CPU = ("--device", "cpu")
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]


# Run in a process of its own: a reader blocked inside a call that holds the GIL (safetensors' open)
# would stop a thread of this process too.
RELEASE = """
import errno, os, stat, sys, time
while True:
    for path in (os.path.join(d, n) for d, _, names in os.walk(sys.argv[1]) for n in names):
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
    time.sleep(0.02)
"""


@pytest.fixture
def fifo(tmp_path):
    """make(NAME): a FIFO in tmp_path. A guard process opens each one for writing and closes it as soon
    as something opens it for reading, so a reader that does open it sees end-of-file and the test
    fails on its message instead of hanging."""
    guard = subprocess.Popen([sys.executable, "-c", RELEASE, str(tmp_path)])

    def make(name):
        path = tmp_path / name
        os.mkfifo(path)
        return path

    yield make
    guard.kill()
    guard.wait()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    data = write_tiny(root / "data")
    recipe = write_recipe(root / "tiny.toml", data)
    assert invoke("train", str(recipe), "--out", str(root / "run"), *CPU).returncode == 0
    h5 = root / "h5" / "data.h5"
    assert invoke("data", "convert", str(data), str(h5)).returncode == 0
    return data, h5, root / "run" / "model_best.safetensors", recipe


def sparse(path, size=MAX_TEXT_BYTES + 1):
    """A file of ``size`` bytes that takes no disk space."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------- outputs never replace the data read


@pytest.mark.parametrize("target", ["test_ims.npy", "test_caps.txt"])
def test_eval_save_sims_refuses_a_file_of_the_dataset(trained, target):
    data, _, model, _ = trained
    before = (data / target).read_bytes()
    message = assert_clean_failure(invoke("eval", str(model), "--data", str(data), "--save-sims", str(data / target),
                                          *CPU))
    assert f"--save-sims {data / target} is a file of {data}, an input of this command" in message
    assert (data / target).read_bytes() == before


def test_eval_save_sims_refuses_the_hdf5_file_it_scores(trained):
    _, h5, model, _ = trained
    before = h5.read_bytes()
    message = assert_clean_failure(invoke("eval", str(model), "--data", str(h5), "--save-sims", str(h5), *CPU))
    assert f"--save-sims {h5} is also an input of this command" in message
    assert h5.read_bytes() == before


@pytest.mark.parametrize("target", ["train_caps.txt", "train_ims.npy"])
def test_data_vocab_refuses_a_file_of_the_dataset(trained, target):
    data = trained[0]
    before = (data / target).read_bytes()
    message = assert_clean_failure(invoke("data", "vocab", str(data), "-o", str(data / target)))
    assert f"-o {data / target} is a file of {data}" in message
    assert (data / target).read_bytes() == before


def test_data_vocab_may_write_a_new_file_into_the_dataset(tmp_path):
    data = write_tiny(tmp_path / "data")
    result = invoke("data", "vocab", str(data), "-o", str(data / "vocab.json"), "--threshold", "1")
    assert result.returncode == 0, result.stderr
    assert len(Vocabulary.load(data / "vocab.json")) > 4


def _npz_folder(folder, n=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        np.savez(folder / f"{i}.npz", features=rng.random((2, 4), dtype=np.float32))
    return folder


def test_data_convert_refuses_to_write_into_its_source_folder(tmp_path):
    source = _npz_folder(tmp_path / "nz")
    for dst, where in ((source, "is"), (source / "sub", "is inside")):
        message = assert_clean_failure(invoke("data", "convert", str(source), str(dst), "--split", "test"))
        assert f"DST {dst} {where} {source}, an input of this command" in message
    assert sorted(p.name for p in source.iterdir()) == ["0.npz", "1.npz", "2.npz"]


def test_data_convert_refuses_to_replace_an_input_file_with_an_output(tmp_path):
    source = _npz_folder(tmp_path / "nz")
    out = tmp_path / "out"
    out.mkdir()
    ids = out / "test_ids.txt"  # the converter writes test_ids.txt into DST
    ids.write_text("0\n1\n")
    message = assert_clean_failure(invoke("data", "convert", str(source), str(out), "--split", "test",
                                          "--ids", str(ids)))
    assert f"writing test_ids.txt there would replace the input {ids}" in message
    assert ids.read_text() == "0\n1\n"


# ------------------------------------------------------------ FIFOs, devices, huge files: never opened


def test_a_fifo_recipe_is_refused(fifo):
    path = fifo("fr.toml")
    message = assert_clean_failure(invoke("build", str(path)))
    assert f"recipe {path} is a FIFO (named pipe); expected a regular file" in message


def test_a_device_recipe_is_refused():
    message = assert_clean_failure(invoke("build", "/dev/zero"))
    assert "recipe /dev/zero is a device; expected a regular file" in message


def test_a_huge_recipe_is_refused_unread(tmp_path):
    path = sparse(tmp_path / "big.toml")
    message = assert_clean_failure(invoke("build", str(path)))
    assert f"recipe {path} is 64 MiB; a recipe is at most 64 MiB" in message


def test_a_fifo_checkpoint_is_refused(fifo, tmp_path):
    path = fifo("m.safetensors")
    message = assert_clean_failure(invoke("eval", str(path), "--data", str(tmp_path), *CPU))
    assert f"checkpoint {path} is a FIFO (named pipe)" in message


@pytest.mark.parametrize("vocab", ["ff.pkl", "ff.json", "/dev/zero", "big.json", "big.pkl"])
def test_vocabulary_files_that_are_not_regular_files_are_refused(fifo, tmp_path, trained, vocab):
    if vocab.startswith("ff"):
        path, expected = fifo(vocab), "is a FIFO (named pipe); expected a regular file"
    elif vocab.startswith("big"):
        path, expected = sparse(tmp_path / vocab), "a vocabulary file is at most 64 MiB"
    else:
        path, expected = vocab, "is a device; expected a regular file"
    _, _, _, recipe = trained
    message = assert_clean_failure(invoke("build", str(recipe), "--set", f"data.vocab={path}"))
    assert f"vocabulary file {path} {expected}" in message or expected in message


def test_import_refuses_a_fifo_vocabulary(fifo, tmp_path, monkeypatch):
    from test_import_vsepp import official_weights, options

    opt = options()
    source = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "model": official_weights(opt), "best_rsum": 1.0, "opt": opt}, source)
    vocab = fifo("ff.pkl")
    message = assert_clean_failure(invoke("import", "vsepp", str(source), "--vocab", str(vocab),
                                          "-o", str(tmp_path / "y.safetensors")))
    assert f"vocabulary file {vocab} is a FIFO (named pipe)" in message


def test_import_refuses_a_fifo_or_device_checkpoint(fifo, tmp_path):
    vocab = tmp_path / "v.json"
    Vocabulary(WORDS).save(vocab)
    for source in (fifo("x.pth.tar"), "/dev/zero"):
        message = assert_clean_failure(invoke("import", "vsepp", str(source), "--vocab", str(vocab),
                                              "-o", str(tmp_path / "y.safetensors")))
        assert f"checkpoint {source} is a " in message


def test_data_convert_refuses_a_fifo_source(fifo, tmp_path):
    path = fifo("feats.tsv")
    message = assert_clean_failure(invoke("data", "convert", str(path), str(tmp_path / "out"), "--split", "test"))
    assert f"source {path} is a FIFO (named pipe)" in message


def test_data_convert_refuses_a_fifo_among_per_image_files(fifo, tmp_path):
    source = _npz_folder(tmp_path / "nz")
    fifo("nz/9.npz")
    message = assert_clean_failure(invoke("data", "convert", str(source), str(tmp_path / "out"), "--split", "test"))
    assert f"per-image file {source / '9.npz'} is a FIFO" in message


def test_a_fifo_stage_file_is_refused(fifo, trained):
    path = fifo("mine.py")
    message = assert_clean_failure(invoke("--stages", str(path), "build", str(trained[3])))
    assert f"stage file {path} is a FIFO (named pipe)" in message


# -------------------------------------------------------------- vocabulary contents: types, once


def vocab_json(**changes):
    obj = Vocabulary(WORDS).to_json()
    for key, value in changes.items():
        obj[key] = value
    return obj


BAD_JSON = {
    "a list word": (lambda o: o["idx2word"].update({"4": ["x"]}), "idx2word['4'] is ['x']; every word must be a string"),
    "a dict word": (lambda o: o["idx2word"].update({"4": {"x": 1}}), "idx2word['4'] is {'x': 1}; every word must"),
    "a string index": (lambda o: o["word2idx"].update({"a": "4"}), "word2idx['a'] is '4'; expected an index 0..5"),
    "a bool idx": (lambda o: o.update(idx=True), "'idx' is True but 'idx2word' has 6 entries"),
    "a huge idx": (lambda o: o.update(idx=10**400), "'idx' is an integer of about 401 digits"),
}


@pytest.mark.parametrize("case", BAD_JSON)
def test_vocabulary_json_of_wrong_types_is_one_line(tmp_path, trained, case):
    change, expected = BAD_JSON[case]
    obj = vocab_json()
    change(obj)
    data = write_tiny(tmp_path / "data")
    (data / "vocab.json").write_text(json.dumps(obj))
    for args in (("data", "check", str(data)), ("build", str(trained[3]), "--set", f"data.vocab={data / 'vocab.json'}")):
        result = invoke(*args)
        if args[0] == "data":  # data check reports the problem in its table and exits 1
            assert result.returncode == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr
            assert expected in " ".join((result.stdout + result.stderr).split())
        else:
            assert expected in assert_clean_failure(result)
        assert "0" * 50 not in result.stdout + result.stderr


def test_deeply_nested_vocabulary_json_is_refused(tmp_path):
    path = tmp_path / "v.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="nested too deeply"):
        Vocabulary.load(path)


@pytest.fixture
def pickled(tmp_path, monkeypatch):
    """write(words, idx): a VSE++ pickled vocabulary with idx2word as given."""
    module = types.ModuleType("vocab")
    cls = type("Vocabulary", (), {"__module__": "vocab"})
    module.Vocabulary = cls
    monkeypatch.setitem(sys.modules, "vocab", module)

    def write(words, idx=None):
        record = cls()
        record.idx2word = dict(enumerate(words))
        record.word2idx = {w: i for i, w in enumerate(words) if not isinstance(w, list)}
        record.idx = len(words) if idx is None else idx
        path = tmp_path / "v.pkl"
        path.write_bytes(pickle.dumps(record, 2))
        return path

    return write


@pytest.mark.parametrize("word, idx, expected", [
    (["x"], None, "idx2word['4'] is ['x']; every word must be a string"),
    (7, None, "idx2word['4'] is 7; every word must be a string"),
    ("a", 10**400, "'idx' is an integer of about 401 digits"),
], ids=["a list word", "an int word", "idx 10**400"])
def test_pickled_vocabulary_of_wrong_types_is_one_line(pickled, trained, word, idx, expected):
    path = pickled([*WORDS[:4], word, "dog"], idx)
    message = assert_clean_failure(invoke("build", str(trained[3]), "--set", f"data.vocab={path}"))
    assert expected in message
    assert "0" * 50 not in message
