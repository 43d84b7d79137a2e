"""``itmkit explain`` on the plugins that attend inside a stage (DIME, CAAN, SHAN, MMCA, DP-RNN): each reports its
word <-> region attention through note_attention, as (tokens, regions) maps in the image's region order, and the
score explain gives is the one scoring gives without a recording."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.data.loader import pad_tokens
from itmkit.data.vocab import Vocabulary
from itmkit.explain import explain_pair
from itmkit.ops import l2norm
from itmkit.recipe import load_recipe
from itmkit.types import Regions, Tokens

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
R, VALID, FEATURES = 36, 30, 256
CAPTION = "a red circle"  # <start> a red circle <end>: 5 tokens


def tiny_bert() -> list[str]:
    """The recipes' frozen MiniLM replaced by the weightless tiny BERT itmkit_bert ships (random weights)."""
    from itmkit_bert.stages import TINY

    return [f"text.encoder.path={TINY}", "text.encoder.pretrained=false"]


def word_vocab() -> Vocabulary:
    return Vocabulary([*Vocabulary.SPECIALS, "a", "red", "circle"])


def bert_vocab():
    from itmkit_bert.stages import TINY
    from itmkit_bert.vocab import WordPieceVocabulary

    return WordPieceVocabulary.load(str(TINY))


def model_of(recipe: str, vocab, overrides: list[str] = ()):
    return build_model(load_recipe(RECIPES_DIR / f"{recipe}.toml", list(overrides)),
                       DataPorts(FEATURES, len(vocab), R), seed=0).eval()


def random_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (R, F), boxes (R, 4) x1, y1, x2, y2 in pixels, image size (2,))."""
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 300, (R, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(10, 100, (R, 2))], axis=1).astype(np.float32)
    return rng.random((R, FEATURES), dtype=np.float32), boxes, np.array([400, 400], dtype=np.float32)


def encoded(model, vocab, features, boxes, size, caption=CAPTION):
    """The pair's encoded image and caption, as explain_pair encodes them."""
    with torch.no_grad():
        image = model.encode_images(Regions(torch.tensor(features)[None], torch.tensor([VALID]),
                                            torch.tensor(boxes)[None], torch.tensor(size)[None]))
        tokens, lengths = pad_tokens([np.asarray(vocab.encode(caption), dtype=np.int64)])
        text = model.encode_texts(Tokens(tokens, lengths))
    return image, text


def explained(model, vocab, caption=CAPTION, seed=0):
    """explain_pair's result, and the score model.score gives the same pair outside a recording."""
    features, boxes, size = random_image(seed)
    result = explain_pair(model, vocab, features, caption, region_count=VALID, boxes=boxes, image_size=size)
    image, text = encoded(model, vocab, features, boxes, size, caption)
    with torch.no_grad():
        plain = float(model.score(image, text)[0, 0])
    assert result.score == pytest.approx(plain, abs=1e-6)
    tokens = len(vocab.encode(caption))
    for m in result.maps:
        assert m.weights.shape == (tokens, VALID), m.label
        assert np.isfinite(m.weights).all() and (m.weights >= 0).all()
    return result, (image, text)


def sums(m) -> np.ndarray:
    """Each query's total weight: a row's (words query) or a column's (regions query)."""
    return m.weights.sum(axis=1 if m.query_side == "text" else 0)


# ------------------------------------------------------------------------------------------ SHAN


def test_shan_reports_both_l2l_softmaxes():
    vocab = word_vocab()
    model = model_of("shan_shapes", vocab)
    result, (image, text) = explained(model, vocab)
    stage = "match[0].similarity (shan.hierarchy)"
    assert [m.label for m in result.maps] == [f"{stage} L2L region->word", f"{stage} L2L word->region"]
    assert [m.query_side for m in result.maps] == ["image", "text"]
    for m in result.maps:  # eq. 4-5: softmaxes, each region's over the words, each word's over the regions
        np.testing.assert_allclose(sums(m), 1.0, atol=1e-5)
    # eq. 3-5 by hand: lambda * cos(W~_v v_r, W~_t t_j), softmax over the words (alpha) or the valid regions (beta)
    hierarchy = model.branches[0].stages[-1]
    with torch.no_grad():
        v = hierarchy.affinity_image(image.local.feats[0, :VALID])
        t = hierarchy.affinity_text(text.local.feats[0])
        logits = 15.0 * l2norm(v) @ l2norm(t).T  # (regions, words)
    np.testing.assert_allclose(result.maps[0].weights, torch.softmax(logits, dim=1).numpy().T, atol=1e-5)
    np.testing.assert_allclose(result.maps[1].weights, torch.softmax(logits, dim=0).numpy().T, atol=1e-5)


# ------------------------------------------------------------------------------------------ CAAN


def test_caan_reports_its_l2_normalised_inter_modal_attention():
    vocab = word_vocab()
    model = model_of("caan_shapes", vocab)
    result, (image, text) = explained(model, vocab)
    stage = "match[0].similarity (caan.attention)"
    assert [m.label for m in result.maps] == [f"{stage} word->region", f"{stage} region->word"]
    assert [m.query_side for m in result.maps] == ["text", "image"]
    # eq. 12-13 by hand: [tanh(V K U^T)]_+ l2-normalised over the regions (H^uv) or over the words (H^vu);
    # not softmaxes: each word's row (region's column) has unit l2 norm, or is 0 where every product is <= 0
    caan = model.branches[0].stages[-1]
    with torch.no_grad():
        v, u = image.local.feats[0, :VALID], text.local.feats[0]
        h = torch.relu(torch.tanh(caan.k(v) @ u.T))  # (regions, words)
    np.testing.assert_allclose(result.maps[0].weights, l2norm(h, dim=0).numpy().T, atol=1e-5)
    np.testing.assert_allclose(result.maps[1].weights, l2norm(h, dim=1).numpy().T, atol=1e-5)
    for m in result.maps:
        norms = np.linalg.norm(m.weights, axis=1 if m.query_side == "text" else 0)
        assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)) and (norms > 0).any()


# ------------------------------------------------------------------------------------------ MMCA


def test_mmca_reports_the_cross_blocks_of_its_joint_attention_averaged_over_heads():
    vocab = bert_vocab()
    model = model_of("mmca_shapes", vocab, tiny_bert())
    result, (image, text) = explained(model, vocab)
    stage = "match[1].similarity (mmca.cross)"  # match[0] is i0 . c0 (core.dot), no attention
    assert [m.label for m in result.maps] == [f"{stage} region->word head-mean", f"{stage} word->region head-mean"]
    assert [m.query_side for m in result.maps] == ["image", "text"]
    # the joint Transformer unit over [R; E W_p] by hand: softmax over all k + n keys per head, the heads'
    # mean; the reported maps are its two cross-modal blocks, so a row sums to the share of attention a
    # region (word) gives the other side, below 1, not to 1
    cross = model.branches[1].stages[-1]
    layer, heads = cross.layer, cross.heads
    with torch.no_grad():
        joint = torch.cat([image.local.feats[0], cross.text_proj(text.local.feats[0])])  # (k + n, d)
        mask = torch.cat([image.local.mask[0], text.local.mask[0]])
        d = joint.shape[1]

        def split(x):
            return x.view(len(joint), heads, d // heads).transpose(0, 1)  # (h, k + n, dh)

        logits = split(layer.query(joint)) @ split(layer.key(joint)).transpose(1, 2) / math.sqrt(d // heads)
        attention = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).mean(dim=0)  # (k + n, k + n)
    words = slice(R, None)
    np.testing.assert_allclose(result.maps[0].weights, attention[:VALID, words].numpy().T, atol=1e-5)
    np.testing.assert_allclose(result.maps[1].weights, attention[words, :VALID].numpy(), atol=1e-5)
    for m in result.maps:
        assert np.all((sums(m) > 0) & (sums(m) < 1))


# ------------------------------------------------------------------------------------------ DIME


@pytest.mark.parametrize("recipe, side", [("dime_shapes", "image"), ("dime_shapes_t2i", "text")])
def test_dime_reports_each_layers_cross_modal_refinement(recipe, side):
    vocab = bert_vocab()
    model = model_of(recipe, vocab, tiny_bert())
    result, _ = explained(model, vocab)
    # dime.bert reads 32 positions; the maps keep the caption's own ([CLS] .. [SEP]), as explain's tokens
    assert result.tokens[0] == "[CLS]" and result.tokens[-1] == "[SEP]"
    stage = "match[0].similarity (dime.interaction)"
    assert [m.label for m in result.maps] == [f"{stage} CMRC layer {k}" for k in (1, 2, 3)]
    for m in result.maps:  # i-t: each region's softmax over the caption's words; t-i: each word's over the regions
        assert m.query_side == side
        np.testing.assert_allclose(sums(m), 1.0, atol=1e-5)
    assert not np.allclose(result.maps[0].weights, result.maps[1].weights)  # layer 2 reads refined queries


# ---------------------------------------------------------------------------------------- DP-RNN


@pytest.mark.parametrize("recipe, label, side", [("dprnn_shapes_word", "word->object", "text"),
                                                 ("dprnn_shapes_object", "object->word", "image")])
def test_dprnn_reports_macm_attention_in_the_images_object_order(recipe, label, side):
    vocab = word_vocab()
    model = model_of(recipe, vocab)
    match = model.branches[0].stages[-1]
    assert bool(match.recurrent)  # the object RNN runs: each pair's objects are reordered by the caption
    result, (image, text) = explained(model, vocab)
    assert [m.label for m in result.maps] == [f"match[0].similarity (dprnn.macm) {label}"]
    assert result.maps[0].query_side == side
    np.testing.assert_allclose(sums(result.maps[0]), 1.0, atol=1e-5)  # eq. 4-6 / eq. 7-10: softmaxes
    # the weights MACM computed over the reordered o^new (position s holding object order[s] of the image),
    # caught by a spy outside a recording
    import itmkit_dprnn.stages as dprnn

    name = "word_oriented" if side == "text" else "object_oriented"
    original, seen = getattr(dprnn, name), []

    def spy(*args, report, **kwargs):
        assert report is None  # no recording: the stage reports nothing
        return original(*args, report=seen.append, **kwargs)

    with torch.no_grad():
        local, words = image.local, text.local
        weights = match.word_weights(words)
        order = match.reorder(local.mask, local.feats @ words.feats.transpose(1, 2), weights, words.mask)[0]
        setattr(dprnn, name, spy)
        try:
            score = match._pairs(local, words, weights, torch.tensor([0]), torch.tensor([0]), True)
        finally:
            setattr(dprnn, name, original)
    assert float(score[0]) == pytest.approx(result.score, abs=1e-6)
    raw = seen[0][0].numpy()  # (R positions, L words)
    reported = result.maps[0].weights.T  # (regions, words) in the image's order
    valid = order[:VALID].numpy()  # the valid objects come first in the order
    assert sorted(valid) == list(range(VALID)) and not np.array_equal(valid, np.arange(VALID))
    np.testing.assert_allclose(reported[valid], raw[:VALID], atol=1e-6)


def test_attention_over_regions_a_pair_stage_reordered_is_drawn_on_the_images_regions():
    """dprnn_scan: dprnn.recurrent reorders each pair's objects (PairLocal.order) before scan.i2t attends from
    them; the recorded map puts each object row's weights back on the region it was built from."""
    from itmkit.attention import scan_attention
    from itmkit.types import Local

    vocab = word_vocab()
    model = model_of("dprnn_scan", vocab)
    result, (image, text) = explained(model, vocab)
    assert [m.label for m in result.maps] == ["match[0].cross (scan.i2t)"]
    pair_stage = model.branches[0].stages[0]
    with torch.no_grad():
        pair = pair_stage(image=image.local, text=text.local)
        objects = Local(pair.feats[0, 0][None], pair.mask[0])  # pair (0, 0)'s object rows, mask (1, R)
        raw = scan_attention(objects, text.local, query_side="image", lambda_softmax=4.0).weights[0, 0]  # (R, L)
    order = pair.order[0, 0].numpy()
    assert not np.array_equal(order[:VALID], np.arange(VALID))  # the caption did reorder the objects
    for slot in range(VALID):  # region order[slot] carries the weights of the object row at slot
        np.testing.assert_allclose(result.maps[0].weights[:, order[slot]], raw[slot].numpy(), atol=1e-6)
