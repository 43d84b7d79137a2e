"""The text encoder decides what captions are tokenised with; a mask token and learning-rate scales reach the model."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from itmkit.build import DataPorts, build_model, wire
from itmkit.checkpoint import load_checkpoint, save_checkpoint
from itmkit.core_stages import BiGRU
from itmkit.data.vocab import Vocabulary
from itmkit.datasets import data_ports, text_vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import Converted, ModelDirectory, VocabularyFile, _accepts, import_checkpoint
from itmkit.recipe import Slot, parse_recipe
from itmkit.testing import SAMPLE_PORTS
from itmkit.train import make_optimizer, parameter_groups
from itmkit.types import TokensPort

RECIPE = """
[recipe]
name = "v"
embed_dim = 8

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[text]
encoder = { stage = "core.bigru", word_dim = 4 }
pool = { stage = "core.mean" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"
"""

WORDS = Vocabulary([*Vocabulary.SPECIALS, "dog", "cat"])


@attrs.frozen(kw_only=True)
class Shouting(BiGRU):
    """A test text encoder whose vocabulary is the data's words plus one."""

    def vocabulary(self, words: Callable[[], Any]) -> Any:
        extended = Vocabulary(list(words().idx2word))
        extended.add_word("<mask>")
        return extended


def with_text_encoder(recipe, spec):
    return attrs.evolve(recipe, text=attrs.evolve(recipe.text, encoder=Slot(spec, "text.encoder")))


def test_a_tokens_port_carries_an_optional_mask_id():
    assert TokensPort(10).mask_id is None and TokensPort(10, 9).describe() == "Tokens[10]"
    wiring = wire(parse_recipe(RECIPE), DataPorts(12, 30, 36, mask_id=29))
    assert wiring.text[0].inputs["x"] == TokensPort(30, mask_id=29)
    assert wire(parse_recipe(RECIPE), DataPorts(12, 30)).text[0].inputs["x"].mask_id is None
    assert SAMPLE_PORTS[TokensPort][0].mask_id == SAMPLE_PORTS[TokensPort][0].dim - 1


def test_the_vocabulary_knows_its_mask():
    assert WORDS.mask_id is None
    extended = Vocabulary(list(WORDS.idx2word))
    assert extended.add_word(Vocabulary.MASK) == 6 and extended.mask_id == 6


def test_by_default_the_text_encoder_reads_the_data_vocabulary(tmp_path):
    WORDS.save(tmp_path / "vocab.json")
    recipe = parse_recipe(RECIPE)
    assert recipe.text.encoder.spec.vocabulary(lambda: WORDS) is WORDS
    assert text_vocabulary(recipe, tmp_path, train=None) == WORDS


def test_a_text_encoder_can_extend_the_vocabulary_and_its_mask_reaches_the_port(tmp_path):
    WORDS.save(tmp_path / "vocab.json")
    recipe = with_text_encoder(parse_recipe(RECIPE), Shouting(embed_dim=8, word_dim=4))
    vocab = text_vocabulary(recipe, tmp_path, train=None)
    assert len(vocab) == 7 and vocab.mask_id == 6
    split = type("Split", (), {"feature_dim": 12, "num_regions": 36})()
    ports = data_ports(split, vocab)
    assert (ports.vocab_size, ports.mask_id) == (7, 6)
    assert wire(recipe, ports).text[0].inputs["x"] == TokensPort(7, 6)


def test_a_checkpoint_applies_the_encoder_vocabulary_and_refuses_a_changed_one(tmp_path):
    recipe = parse_recipe(RECIPE)
    model = build_model(recipe, DataPorts(12, len(WORDS), 36))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, WORDS)
    assert load_checkpoint(path).vocab == WORDS
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["vocab_sha256"] = "0" * 64
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)


# ----------------------------------------------------------------------- learning-rate scales


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = torch.nn.Linear(2, 2)
        self.slow = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        self.slow.lr_scale = 0.1
        self.slow[1].lr_scale = 0.5  # the innermost scale wins
        self.fixed = torch.nn.Linear(2, 2).requires_grad_(False)


def test_parameters_are_grouped_by_their_modules_lr_scale():
    model = Scaled()
    groups = {g["lr_scale"]: {id(p) for p in g["params"]} for g in parameter_groups(model)}
    assert groups == {1.0: {id(p) for p in model.plain.parameters()},
                      0.1: {id(p) for p in model.slow[0].parameters()},
                      0.5: {id(p) for p in model.slow[1].parameters()}}
    assert [g["lr_scale"] for g in parameter_groups(torch.nn.Linear(2, 2))] == [1.0]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adamax"])
def test_the_optimizer_starts_each_group_at_its_scaled_rate(optimizer):
    recipe = parse_recipe(RECIPE, overrides=["train.lr=0.01", f"train.optimizer={optimizer}"])
    opt = make_optimizer(recipe, Scaled())
    assert sorted((g["lr_scale"], g["lr"]) for g in opt.param_groups) == [(0.1, pytest.approx(0.001)),
                                                                          (0.5, 0.005), (1.0, 0.01)]


# -------------------------------------------------------------------------- importing


def reads_json(official, vocab: Vocabulary) -> Converted:
    raise AssertionError("not reached")


def reads_directory(official, vocab: Vocabulary | ModelDirectory) -> Converted:
    raise AssertionError("not reached")


def test_only_an_importer_annotated_for_it_receives_a_model_directory(tmp_path):
    assert not _accepts(reads_json, ModelDirectory) and _accepts(reads_directory, ModelDirectory)
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"model": [{}], "opt": {}}, checkpoint)
    with pytest.raises(CheckpointError, match=r"is a directory; `itmkit import json` reads the official vocabulary file \(JSON, or VSE\+\+'s \.pkl\)"):
        import_checkpoint("json", checkpoint, tmp_path, tmp_path / "out.safetensors", {"json": reads_json})


def reads_its_own_file(official, vocab: VocabularyFile) -> Converted:
    """An importer of a vocabulary outside the SCAN layout: one word per line, read here."""
    words = Vocabulary([*Vocabulary.SPECIALS, *vocab.path.read_text().split()])
    model = build_model(parse_recipe(RECIPE), DataPorts(12, len(words), 36))
    return Converted(RECIPE, model.state_dict(), DataPorts(12, len(words), 36), vocab=words)


def test_an_importer_annotated_for_it_reads_the_vocabulary_file_itself(tmp_path):
    assert _accepts(reads_its_own_file, VocabularyFile) and not _accepts(reads_json, VocabularyFile)
    checkpoint, words = tmp_path / "model_best.pth.tar", tmp_path / "words.txt"
    torch.save({"model": [{}], "opt": {}}, checkpoint)
    words.write_text("dog\ncat\nbird\n")  # not JSON: Vocabulary.load would refuse it
    out = import_checkpoint("own", checkpoint, words, tmp_path / "out.safetensors", {"own": reads_its_own_file})
    assert load_checkpoint(out).vocab.idx2word == [*Vocabulary.SPECIALS, "dog", "cat", "bird"]


def forgets_the_words(official, vocab: VocabularyFile) -> Converted:
    return attrs.evolve(reads_its_own_file(official, vocab), vocab=None)


def test_an_importer_that_takes_the_file_must_return_the_words(tmp_path):
    checkpoint, words = tmp_path / "model_best.pth.tar", tmp_path / "words.txt"
    torch.save({"model": [{}], "opt": {}}, checkpoint)
    words.write_text("dog\n")
    with pytest.raises(TypeError, match="returned no Converted.vocab"):
        import_checkpoint("own", checkpoint, words, tmp_path / "out.safetensors", {"own": forgets_the_words})


def test_metadata_vocab_is_still_the_official_json_for_word_vocabularies(tmp_path):
    model = build_model(parse_recipe(RECIPE), DataPorts(12, len(WORDS), 36))
    save_checkpoint(tmp_path / "m.safetensors", model, WORDS)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["vocab"]) == WORDS.to_json()
