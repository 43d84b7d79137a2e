"""Every named output is checked before the work: a folder where a file is meant, a parent folder that
is missing or cannot be written, an output that is one of the command's inputs (``itmkit.outputs``).

Each refusal is one clear line (exit 1), and nothing is written or created: in particular no parent
folder of an output (``--save-sims /nonexist/x.npy`` used to create /nonexist).
"""

from __future__ import annotations


import pytest

from cliutil import assert_clean_failure, invoke
from itmkit.outputs import OutputPathError, check_output_file, check_output_folder
from tinydata import write_recipe, write_tiny

CPU = ("--device", "cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset and the best checkpoint of a one-epoch run on it."""
    root = tmp_path_factory.mktemp("outputs")
    data = write_tiny(root / "data")
    recipe = write_recipe(root / "tiny.toml", data)
    assert invoke("train", str(recipe), "--out", str(root / "run"), *CPU).returncode == 0
    return data, root / "run" / "model_best.safetensors"


@pytest.mark.parametrize("target, expected", [
    ("{data}", "--save-sims {data} is a folder; name the file to write (e.g. {data}/sims.npy)"),
    ("/proc/x.npy", "--save-sims /proc/x.npy: cannot write into the folder /proc"),
    ("{tmp}/nonexist/x.npy", "--save-sims {tmp}/nonexist/x.npy: the folder {tmp}/nonexist does not exist"),
    ("{model}", "--save-sims {model} is also an input of this command"),
])
def test_eval_save_sims_is_checked_before_scoring(trained, tmp_path, target, expected):
    data, model = trained
    fill = {"data": data, "tmp": tmp_path, "model": model}
    result = invoke("eval", str(model), "--data", str(data), "--save-sims", target.format(**fill), *CPU)
    assert expected.format(**fill) in assert_clean_failure(result)
    assert "scored" not in result.stderr  # refused before the work
    assert not (tmp_path / "nonexist").exists()


def test_eval_save_sims_into_an_existing_folder_still_works(trained, tmp_path):
    data, model = trained
    result = invoke("eval", str(model), "--data", str(data), "--save-sims", str(tmp_path / "sims.npy"), *CPU)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sims.npy").stat().st_size > 0


@pytest.mark.parametrize("target, expected", [
    ("{data}", "-o {data} is a folder; name the file to write (e.g. {data}/vocab.json)"),
    ("/proc/x.json", "-o /proc/x.json: cannot write into the folder /proc"),
    ("{tmp}/nonexist/v.json", "the folder {tmp}/nonexist does not exist"),
])
def test_data_vocab_output_is_checked_first(trained, tmp_path, target, expected):
    data, _ = trained
    fill = {"data": data, "tmp": tmp_path}
    assert expected.format(**fill) in assert_clean_failure(invoke("data", "vocab", str(data), "-o", target.format(**fill)))
    assert not (tmp_path / "nonexist").exists()


def test_import_output_is_checked_before_the_checkpoint_is_read(tmp_path):
    checkpoint, vocab = tmp_path / "model_best.pth.tar", tmp_path / "vocab.json"
    checkpoint.write_bytes(b"not read before the output is checked")
    vocab.write_text("{}")
    message = assert_clean_failure(invoke("import", "vsepp", str(checkpoint), "--vocab", str(vocab), "-o", "/proc/x"))
    assert "-o /proc/x: cannot write into the folder /proc" in message
    message = assert_clean_failure(invoke("import", "vsepp", str(checkpoint), "--vocab", str(vocab), "-o", str(vocab)))
    assert f"-o {vocab} is also an input of this command" in message


def test_data_convert_destination_is_checked_before_converting(trained, tmp_path):
    data, _ = trained
    tsv = tmp_path / "ok.tsv"
    tsv.write_text("not read before the destination is checked\n")
    message = assert_clean_failure(invoke("data", "convert", str(tsv), "/proc/x", "--split", "test"))
    assert "DST /proc/x: cannot write into the folder /proc" in message
    # A new dataset's folders may be made (as a run folder's are), but not under a file.
    message = assert_clean_failure(invoke("data", "convert", str(tsv), str(tsv / "x"), "--split", "test"))
    assert f"DST {tsv / 'x'}: {tsv} is not a folder" in message
    # A precomp folder converts into an HDF5 file: its own folder is not one.
    message = assert_clean_failure(invoke("data", "convert", str(data), str(data)))
    assert f"DST {data} is a folder; name the file to write (e.g. {data}/data.h5)" in message
    message = assert_clean_failure(invoke("data", "convert", str(data), "/proc/d.h5"))
    assert "DST /proc/d.h5: cannot write into the folder /proc" in message


def test_train_out_is_checked_before_training(trained, tmp_path):
    data, _ = trained
    recipe = write_recipe(tmp_path / "tiny.toml", data)
    message = assert_clean_failure(invoke("train", str(recipe), "--out", "/proc/x/run", *CPU))
    assert "--out /proc/x/run: cannot write into the folder /proc" in message
    (tmp_path / "file").write_text("x")
    message = assert_clean_failure(invoke("train", str(recipe), "--out", str(tmp_path / "file"), *CPU))
    assert f"--out {tmp_path / 'file'} exists and is not a folder" in message


def test_the_checks_leave_no_probe_behind(tmp_path):
    assert check_output_file(tmp_path / "x.npy", "-o") == tmp_path / "x.npy"
    assert check_output_folder(tmp_path / "a" / "b", "--out", create_parents=True) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_folder(tmp_path / "a" / "b", "DST")
    (tmp_path / "x.npy").write_text("old")
    assert check_output_file(tmp_path / "x.npy", "-o") == tmp_path / "x.npy"  # replacing a file is fine
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
