"""MTFN's stages against the official model written out (tests/official.py) and per-pair references, the
conformance kit, the sequential dropout of the GRU and MTFN's tokenisation."""

from __future__ import annotations

import pytest
import torch

from itmkit.data.vocab import Vocabulary
from itmkit.plugins import get_registry
from itmkit.stage import PortError
from itmkit.testing import CHECKS, check_stage
from itmkit.types import GlobalPort, Tokens, TokensPort
from itmkit_mtfn.stages import Fusion, MTFNVocabulary, SkipThoughts, SkipThoughtsGRU, TensorFusion
from itmkit_mtfn.tests import official

STAGES = [SkipThoughts, Fusion]
TOL = dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


# ------------------------------------------------------------------ fusion head


def fusion_pair(head: TensorFusion, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One pair scored from MTFN eq. 3-5, term by term (eval: no dropout)."""
    n = head.names
    act = {k: (lambda x: x) if name == "none" else getattr(torch.nn.functional, name) for k, name in n.items()}
    x_v, x_t = act["v"](head.linear_v(v)), act["t"](head.linear_t(t))
    d = head.dim_mm
    z = 0
    for r in range(head.rank):
        rows = slice(r * d, (r + 1) * d)
        hv = act["hv"](head.linear_hv.weight[rows] @ x_v + head.linear_hv.bias[rows])
        ht = act["ht"](head.linear_ht.weight[rows] @ x_t + head.linear_ht.bias[rows])
        z = z + hv * ht
    z = act["classif"](act["mm"](z))
    return torch.sigmoid(head.linear_classif.weight[0] @ z + head.linear_classif.bias[0])


VARIANTS = {
    "official": {},
    "activations": {"activation_hv": "relu", "activation_ht": "tanh"},
    "general": {"activation_mm": "tanh", "classif_activation": "relu"},
    "plain": {"activation_v": "none", "activation_t": "none"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fusion_equals_the_per_pair_equations(variant):
    torch.manual_seed(0)
    head = TensorFusion(dim_v=11, dim_t=13, dim_hv=6, dim_ht=7, dim_mm=5, rank=4, **VARIANTS[variant]).double().eval()
    with torch.no_grad():
        for p in head.parameters():
            p.uniform_(-0.5, 0.5)
    v, t = torch.randn(5, 11, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    expected = torch.stack([torch.stack([fusion_pair(head, v[i], t[j]) for j in range(7)]) for i in range(5)])
    torch.testing.assert_close(head(v, t), expected, **TOL)


def test_both_bilinear_forms_agree_and_the_cheaper_is_taken():
    torch.manual_seed(1)
    head = TensorFusion(dim_v=9, dim_t=9, dim_hv=4, dim_ht=4, dim_mm=8, rank=6).double().eval()
    v, t = torch.randn(40, 9, dtype=torch.float64), torch.randn(50, 9, dtype=torch.float64)
    x_v, x_t = head.embed(v, t)
    hv = head.linear_hv(x_v).view(40, 6, 8)
    ht = head.linear_ht(x_t).view(50, 6, 8)
    wide = torch.einsum("ird,trd,d->it", hv, ht, head.linear_classif.weight[0])
    torch.testing.assert_close(head.folded_logits(x_v, x_t), wide, rtol=0, atol=1e-10)
    assert head.folded_is_cheaper(40, 50, 4, 4)  # width 48 against a 5 x 5 matrix
    assert not TensorFusion(dim_v=9, dim_t=9, dim_hv=64, dim_ht=64, dim_mm=2, rank=1).folded_is_cheaper(4, 4, 64, 64)


def test_fusion_matches_the_official_core_fusion_and_classifier():
    """Core_Fusion + _classif of model.py on a block, our head with the official weights stacked."""
    options = official.yaml_options(12, 10, 8, 6, 3, activation_hv="relu")
    model = official.random_model(options, 5, 4, seed=2).double()
    head = TensorFusion(dim_v=12, dim_t=10, dim_hv=8, dim_ht=8, dim_mm=6, rank=3, activation_hv="relu").double().eval()
    with torch.no_grad():
        head.linear_v.load_state_dict(model.fusion.linear_v.state_dict())
        head.linear_t.load_state_dict(model.fusion.linear_t.state_dict())
        head.linear_classif.load_state_dict(model.linear_classif.state_dict())
        for side in ("hv", "ht"):
            layers = getattr(model.fusion, f"list_linear_{side}")
            getattr(head, f"linear_{side}").weight.copy_(torch.cat([m.weight for m in layers]))
            getattr(head, f"linear_{side}").bias.copy_(torch.cat([m.bias for m in layers]))
    v, t = torch.randn(7, 12, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(head(v, t), model.score_vectors(v, t), rtol=0, atol=1e-12)


def test_fusion_dropout_in_training_draws_a_mask_per_projection():
    """dropout_hv: the official loop drops x_v anew for each r; with p = 0.5 the R projections see different masks."""
    torch.manual_seed(3)
    head = TensorFusion(dim_v=6, dim_t=6, dim_hv=200, dim_ht=5, dim_mm=1, rank=2, dropout_v=0, dropout_t=0,
                        dropout_hv=0.5, activation_v="none").train()
    with torch.no_grad():
        head.linear_hv.weight.fill_(0)
        head.linear_hv.weight[0, 0] = 1  # projection r = 0 reads x_v[0], r = 1 reads x_v[0] too
        head.linear_hv.weight[1, 0] = 1
        head.linear_hv.bias.zero_()
        head.linear_v.weight.zero_()
        head.linear_v.bias.fill_(1.0)
    x_v, _ = head.embed(torch.zeros(300, 6), torch.zeros(1, 6))
    hv = head.project(x_v, head.linear_hv, 0.5, lambda x: x)  # (300, 2, 1): x_v[0] dropped or doubled, per r
    values = hv[:, :, 0]
    assert set(values.unique().tolist()) <= {0.0, 2.0}
    assert 0.35 < (values == 0).float().mean() < 0.65
    assert (values[:, 0] != values[:, 1]).any()  # independent masks per r


def test_fusion_reads_global_vectors_only():
    assert Fusion().ports(GlobalPort(7), GlobalPort(9)) is not None
    head = Fusion(rank=2, dim_hv=3, dim_ht=4, dim_mm=5).build(GlobalPort(7), GlobalPort(9))
    assert head(torch.randn(2, 7), torch.randn(3, 9)).shape == (2, 3)


def test_pair_bytes_follow_the_path_taken():
    assert Fusion().pair_bytes(text_len=10, image_len=36) == 16
    assert Fusion(activation_mm="tanh").pair_bytes(text_len=10, image_len=36) == 3 * 1024 * 4 + 16


# ------------------------------------------------------------------ skip-thoughts GRU


def official_encoder(enc: SkipThoughtsGRU) -> official.UniSkip:
    """The official BayesianUniSkip holding our encoder's weights (gates r, i, n <- nn.GRU's r, z, n)."""
    h = enc.hidden_dim
    ref = official.UniSkip(enc.embedding.num_embeddings, enc.embedding.embedding_dim, h).double()
    with torch.no_grad():
        ref.embedding.weight.copy_(enc.embedding.weight)
        cell = ref.rnn.gru_cell
        for k, gate in enumerate("rin"):
            getattr(cell, f"weight_i{gate}").weight.copy_(enc.gru.weight_ih_l0[k * h:(k + 1) * h])
            getattr(cell, f"weight_i{gate}").bias.copy_(enc.gru.bias_ih_l0[k * h:(k + 1) * h])
            getattr(cell, f"weight_h{gate}").weight.copy_(enc.gru.weight_hh_l0[k * h:(k + 1) * h])
    return ref


def tokens(seed: int, batch: int = 5, length: int = 7, vocab: int = 30) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    ids = ids.masked_fill(torch.arange(length)[None] >= lengths[:, None], 0)
    return Tokens(ids, lengths)


def encoder(seed: int, dropout: float = 0.25) -> SkipThoughtsGRU:
    torch.manual_seed(seed)
    enc = SkipThoughtsGRU(vocab_size=30, word_dim=6, hidden_dim=5, dropout=dropout).double()
    with torch.no_grad():
        enc.gru.weight_hh_l0.uniform_(-0.8, 0.8)
    return enc


def test_the_encoder_equals_bayesian_uniskip_in_eval():
    enc = encoder(4).eval()
    x = tokens(5)
    ours = enc(x)
    last = ours.feats[torch.arange(5), x.lengths - 1]
    with torch.no_grad():
        torch.testing.assert_close(last, official_encoder(enc)(x.ids), rtol=0, atol=1e-12)
    assert not ours.feats[~ours.mask].any()  # padding positions are zero


def test_each_caption_alone_gives_the_same_states():
    enc = encoder(6).eval()
    x = tokens(7)
    batch = enc(x).feats
    for b in range(5):
        n = int(x.lengths[b])
        alone = enc(Tokens(x.ids[b:b + 1, :n], x.lengths[b:b + 1])).feats[0]
        torch.testing.assert_close(batch[b, :n], alone, rtol=0, atol=1e-12)


def test_training_applies_one_mask_per_sequence_and_gate_at_every_step():
    """The dropped path equals the official cell run step by step with the same six masks, held for the whole
    caption."""
    enc = encoder(8).train()
    x = tokens(9)
    drawn = []
    sample = enc.sample_masks

    def spy(batch, like):
        drawn.append(sample(batch, like))
        return drawn[-1]

    enc.sample_masks = spy
    states = enc(x).feats
    assert len(drawn) == 1  # drawn once for the whole sequence, not per step
    mask_x, mask_h = drawn[0]
    ref = official_encoder(enc)
    masks = {f"x{g}": mask_x[k] for k, g in enumerate("rin")} | {f"h{g}": mask_h[k] for k, g in enumerate("rin")}
    with torch.no_grad():
        expected = ref(x.ids, masks)
    torch.testing.assert_close(states[torch.arange(5), x.lengths - 1].detach(), expected, rtol=0, atol=1e-12)


def test_the_sequential_masks_have_the_official_statistics():
    enc = SkipThoughtsGRU(vocab_size=10, word_dim=300, hidden_dim=400, dropout=0.25)
    mask_x, mask_h = enc.sample_masks(64, torch.zeros(1))
    assert mask_x.shape == (3, 64, 300) and mask_h.shape == (3, 64, 400)
    for mask in (mask_x, mask_h):
        assert torch.allclose(mask.unique(), torch.tensor([0.0, 1 / 0.75]))
        assert abs(float((mask == 0).float().mean()) - 0.25) < 0.01
    assert not torch.equal(mask_x[0], mask_x[1])  # gates draw their own masks
    none = SkipThoughtsGRU(vocab_size=10, word_dim=3, hidden_dim=4, dropout=1.0).sample_masks(2, torch.zeros(1))
    assert not none[0].any() and not none[1].any()


def test_training_without_dropout_takes_the_fused_gru():
    enc = encoder(10, dropout=0.0).train()
    x = tokens(11)
    expected = enc.dropped_states(enc.embedding(x.ids), torch.ones(3, 5, 6, dtype=torch.float64),
                                  torch.ones(3, 5, 5, dtype=torch.float64)) * x.mask[..., None]
    torch.testing.assert_close(enc(x).feats, expected, rtol=0, atol=1e-12)


def test_the_hidden_bias_stays_zero_and_frozen():
    enc = SkipThoughtsGRU(vocab_size=10, word_dim=3, hidden_dim=4)
    assert not enc.gru.bias_hh_l0.requires_grad and not enc.gru.bias_hh_l0.any()
    assert not enc.embedding.weight[0].any()
    frozen = SkipThoughts(freeze_embedding=True).build(TokensPort(10))
    assert not frozen.embedding.weight.requires_grad


def test_a_vocabulary_of_only_specials_is_refused():
    with pytest.raises(PortError, match="no words"):
        SkipThoughts().ports(TokensPort(4))


# ------------------------------------------------------------------ tokenisation


def test_mtfn_tokenisation():
    words = Vocabulary([*Vocabulary.SPECIALS, "a", "man", "rides", "horse", ",", "."])
    vocab = SkipThoughts().vocabulary(lambda: words)
    assert isinstance(vocab, MTFNVocabulary)
    w = words.word2idx
    assert vocab.encode("A man, (rides) a HORSE!") == [w["a"], w["man"], w["rides"], w["a"], w["horse"]]
    assert vocab.encode("a zebra.") == [w["a"], Vocabulary.UNK_ID]  # no <start> / <end>, unknown -> <unk>
    assert vocab.encode("(?!) , .") == [Vocabulary.PAD_ID]  # ASSUMPTION: nothing left -> one step on the padding row
    assert vocab.encode("...") == [Vocabulary.UNK_ID]  # NLTK's '...' is not one of the 16 dropped tokens
    word2idx = {"a": 1, "man": 2, "rides": 3, "horse": 4, "<unk>": 5}
    for caption in ("A man, (rides) a HORSE!", "two [men] & a horse; #1 @ 5 % * $"):
        theirs = official.caption_ids(caption, word2idx)
        ours = vocab.encode(caption)
        assert [words.idx2word[i] for i in ours] == [
            {v: k for k, v in word2idx.items()}[i] for i in theirs]
    assert vocab.to_json() == words.to_json() and vocab.sha256() == words.sha256() and len(vocab) == len(words)
    assert vocab.mask_id is None
    assert SkipThoughts().vocabulary(lambda: vocab) is vocab  # already wrapped: unchanged
