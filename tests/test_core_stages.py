"""Each core stage against a slow reference written from the paper's equations with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from itmkit.core_stages import BiGRU, Cosine, InfoNCE, Last, Max, Mean, Precomp, Raw, Triplet
from itmkit.ops import cosine, l1norm, l2norm, masked_last, masked_max, masked_mean, xavier_linear_
from itmkit.types import (
    Aligned,
    AlignedPort,
    GlobalPort,
    Local,
    LocalPort,
    PairSims,
    PairSimsPort,
    Regions,
    RegionsPort,
    ScorePort,
    Tokens,
    TokensPort,
    lengths_to_mask,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def norm(v: list[float]) -> float:
    return math.sqrt(sum(a * a for a in v))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# ==================================================================================== ops


def test_l2norm_divides_by_norm_plus_eps():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    out = l2norm(x)
    assert out[0].tolist() == pytest.approx([3 / (5 + 1e-8), 4 / (5 + 1e-8)], abs=1e-15)
    assert out[1].tolist() == [0.0, 0.0]  # a zero vector stays zero instead of NaN
    torch.testing.assert_close(l2norm(x, dim=0)[:, 0], torch.tensor([1 / (1 + 1e-8 / 3), 0.0], dtype=torch.float64))


def test_l1norm_divides_by_sum_of_absolute_values():
    out = l1norm(torch.tensor([[1.0, -3.0]], dtype=torch.float64))
    assert out.tolist()[0] == pytest.approx([1 / (4 + 1e-8), -3 / (4 + 1e-8)])


def test_masked_pooling_against_loops():
    x = torch.randn(3, 5, 4, generator=gen(1), dtype=torch.float64) - 2  # mostly negative values
    lengths = torch.tensor([5, 2, 1])
    mask = lengths_to_mask(lengths, 5)
    mean, mx, last = masked_mean(x, mask, 1), masked_max(x, mask, 1), masked_last(x, mask, 1)
    for b in range(3):
        n = int(lengths[b])
        for d in range(4):
            column = [float(x[b, t, d]) for t in range(n)]
            assert float(mean[b, d]) == pytest.approx(sum(column) / n)
            assert float(mx[b, d]) == pytest.approx(max(column))  # negative maxima: padding never wins
            assert float(last[b, d]) == pytest.approx(column[-1])


def test_masked_pooling_of_an_empty_row_is_zero_for_mean_and_max():
    x = torch.randn(2, 3, 4, generator=gen(2))
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_mean(x, mask, 1)[1].abs().max() == 0
    assert masked_max(x, mask, 1)[1].abs().max() == 0


def test_masked_pooling_broadcasts_a_pair_mask_over_the_similarity_axis():
    sims = torch.randn(2, 3, 4, 6, generator=gen(3), dtype=torch.float64)
    mask = lengths_to_mask(torch.tensor([4, 1, 3]), 4)[None].expand(2, 3, 4)
    out = masked_mean(sims, mask, dim=2)
    for i in range(2):
        for j in range(3):
            n = int(mask[i, j].sum())
            torch.testing.assert_close(out[i, j], sims[i, j, :n].mean(0))


def test_cosine_floors_the_norm_product():
    a = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert cosine(a, b).tolist() == pytest.approx([2 / (3 * 2), 0.0])
    tiny = torch.full((1, 2), 1e-5, dtype=torch.float64)
    assert float(cosine(tiny, tiny)) == pytest.approx(2e-10 / 1e-8)  # |a||b| = 2e-10 < eps


def test_xavier_linear_is_uniform_within_the_glorot_bound_with_zero_bias():
    layer = torch.nn.Linear(300, 200).requires_grad_(False)
    xavier_linear_(layer)
    bound = math.sqrt(6 / 500)
    assert float(layer.weight.abs().max()) <= bound
    assert float(layer.weight.abs().max()) > 0.99 * bound  # uses the whole range
    assert float(layer.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert layer.bias.abs().max() == 0


# =============================================================================== encoders


@pytest.mark.parametrize("normalize", [True, False])
def test_precomp_projects_each_region_then_l2_normalises(normalize):
    spec = Precomp(embed_dim=5, normalize=normalize)
    module = spec.build(x=RegionsPort(7)).double()
    feats = torch.rand(2, 4, 7, generator=gen(4), dtype=torch.float64)
    lengths = torch.tensor([4, 2])
    out = module(Regions(feats, lengths))
    assert torch.equal(out.mask, lengths_to_mask(lengths, 4))
    W, b = module.fc.weight.tolist(), module.fc.bias.tolist()
    for i in range(2):
        for r in range(4):
            f = feats[i, r].tolist()
            v = [dot(W[k], f) + b[k] for k in range(5)]
            if normalize:
                n = norm(v)
                v = [a / (n + 1e-8) for a in v]
            assert out.feats[i, r].tolist() == pytest.approx(v, abs=1e-12)


def test_precomp_embed_dim_follows_the_spec_and_boxes_ride_along():
    assert Precomp(embed_dim=12).ports(x=RegionsPort(7)) == LocalPort(12)
    boxes = torch.rand(1, 3, 4)
    out = Precomp(embed_dim=12).build(x=RegionsPort(7))(Regions(torch.rand(1, 3, 7), torch.tensor([3]), boxes))
    assert out.feats.shape == (1, 3, 12) and out.extras["boxes"] is boxes


@pytest.mark.parametrize("normalize", [True, False])
def test_raw_passes_the_regions_through_at_their_own_width(normalize):
    assert Raw(normalize=normalize).ports(x=RegionsPort(7)) == LocalPort(7)
    feats = torch.rand(2, 3, 7, generator=gen(5), dtype=torch.float64)
    boxes = torch.rand(2, 3, 4)
    out = Raw(normalize=normalize).build(x=RegionsPort(7))(Regions(feats, torch.tensor([3, 1]), boxes))
    assert torch.equal(out.mask, lengths_to_mask(torch.tensor([3, 1]), 3)) and out.extras["boxes"] is boxes
    for i in range(2):
        for r in range(3):
            f = feats[i, r].tolist()
            expected = [a / (norm(f) + 1e-8) for a in f] if normalize else f
            assert out.feats[i, r].tolist() == pytest.approx(expected, abs=1e-12)


def gru_direction(x: list[list[float]], weights: dict[str, torch.Tensor], suffix: str,
                  hidden: int) -> list[list[float]]:
    """PyTorch's GRU cell over a sequence: r, z, n gates stacked in that order in each weight."""
    w_ih, w_hh = weights[f"weight_ih{suffix}"].tolist(), weights[f"weight_hh{suffix}"].tolist()
    b_ih, b_hh = weights[f"bias_ih{suffix}"].tolist(), weights[f"bias_hh{suffix}"].tolist()

    def affine(w, b, v, gate, k):
        row = gate * hidden + k
        return dot(w[row], v) + b[row]

    h = [0.0] * hidden
    outputs = []
    for v in x:
        r = [1 / (1 + math.exp(-(affine(w_ih, b_ih, v, 0, k) + affine(w_hh, b_hh, h, 0, k)))) for k in range(hidden)]
        z = [1 / (1 + math.exp(-(affine(w_ih, b_ih, v, 1, k) + affine(w_hh, b_hh, h, 1, k)))) for k in range(hidden)]
        n = [math.tanh(affine(w_ih, b_ih, v, 2, k) + r[k] * affine(w_hh, b_hh, h, 2, k)) for k in range(hidden)]
        h = [(1 - z[k]) * n[k] + z[k] * h[k] for k in range(hidden)]
        outputs.append(h)
    return outputs


def reference_bigru(module, ids: list[int], layers: int, bidirectional: bool, hidden: int) -> list[list[float]]:
    """SCAN eq. 2 over one caption's valid tokens: (forward + backward) / 2, then l2norm."""
    weights = dict(module.rnn.named_parameters())
    seq = [module.embed.weight[t].tolist() for t in ids]
    for layer in range(layers):
        forward = gru_direction(seq, weights, f"_l{layer}", hidden)
        if not bidirectional:
            seq = forward
            continue
        backward = gru_direction(seq[::-1], weights, f"_l{layer}_reverse", hidden)[::-1]
        seq = [f + b for f, b in zip(forward, backward)]  # the next layer reads both directions
    if bidirectional:
        seq = [[(v[k] + v[k + hidden]) / 2 for k in range(hidden)] for v in seq]
    return [[a / (norm(v) + 1e-8) for a in v] for v in seq]


@pytest.mark.parametrize("layers, bidirectional", [(1, True), (1, False), (2, True)])
def test_bigru_matches_a_hand_rolled_gru_over_each_captions_valid_tokens(layers, bidirectional):
    spec = BiGRU(embed_dim=4, word_dim=3, num_layers=layers, bidirectional=bidirectional)
    torch.manual_seed(0)
    module = spec.build(x=TokensPort(20)).double().eval()
    lengths = torch.tensor([5, 2, 3])
    ids = torch.randint(4, 20, (3, 5), generator=gen(5)).masked_fill(~lengths_to_mask(lengths, 5), 0)
    out = module(Tokens(ids, lengths))
    assert out.feats.shape == (3, 5, 4) and torch.equal(out.mask, lengths_to_mask(lengths, 5))
    for b in range(3):
        n = int(lengths[b])
        expected = reference_bigru(module, ids[b, :n].tolist(), layers, bidirectional, hidden=4)
        torch.testing.assert_close(out.feats[b, :n], torch.tensor(expected, dtype=torch.float64), **TOL)


def test_bigru_padding_tokens_do_not_influence_valid_outputs():
    module = BiGRU(embed_dim=6, word_dim=5).build(x=TokensPort(30)).eval()
    lengths = torch.tensor([6, 3, 1, 4])
    mask = lengths_to_mask(lengths, 6)
    ids = torch.randint(4, 30, (4, 6), generator=gen(6))
    padded_with_zero = module(Tokens(ids.masked_fill(~mask, 0), lengths))
    padded_with_words = module(Tokens(torch.where(mask, ids, torch.randint(4, 30, (4, 6), generator=gen(7))), lengths))
    assert torch.equal(padded_with_zero.feats[mask], padded_with_words.feats[mask])


def test_bigru_vocabulary_and_embed_dim_come_from_the_ports():
    module = BiGRU(embed_dim=8, word_dim=3).build(x=TokensPort(11))
    assert module.embed.weight.shape == (11, 3) and module.rnn.hidden_size == 8
    assert BiGRU(embed_dim=8).ports(x=TokensPort(11)) == LocalPort(8)


# ============================================================================ aggregators


POOLS = {"mean": Mean, "max": Max, "last": Last}


def reference_pool(how: str, rows: list[list[float]]) -> list[float]:
    """Pool valid fragment vectors: average, element-wise maximum, or the last one."""
    if how == "mean":
        return [sum(col) / len(rows) for col in zip(*rows)]
    if how == "max":
        return [max(col) for col in zip(*rows)]
    return rows[-1]


@pytest.mark.parametrize("how", POOLS)
@pytest.mark.parametrize("normalize", [False, True])
def test_pools_over_local_fragments_against_loops(how, normalize):
    spec = POOLS[how](normalize=normalize)
    assert spec.ports(x=LocalPort(6)) == GlobalPort(6)
    feats = torch.randn(4, 5, 6, generator=gen(8), dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 2])
    out = spec.build(x=LocalPort(6))(Local(feats, lengths_to_mask(lengths, 5)))
    for b in range(4):
        expected = reference_pool(how, feats[b, : int(lengths[b])].tolist())
        if normalize:
            expected = [a / (norm(expected) + 1e-8) for a in expected]
        assert out[b].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("how", POOLS)
def test_pools_over_pair_similarities_against_loops(how):
    spec = POOLS[how]()
    assert spec.ports(x=PairSimsPort(1)) == ScorePort()
    sims = torch.randn(3, 4, 6, 1, generator=gen(9), dtype=torch.float64)
    lengths = torch.tensor([[6, 2, 4, 1], [3, 6, 1, 5], [2, 2, 6, 3]])  # per image x caption pair
    mask = torch.arange(6)[None, None, :] < lengths[..., None]
    out = spec.build(x=PairSimsPort(1))(PairSims(sims, mask))
    assert out.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            rows = sims[i, j, : int(lengths[i, j])].tolist()
            assert float(out[i, j]) == pytest.approx(reference_pool(how, rows)[0], abs=1e-12)


@pytest.mark.parametrize("how", POOLS)
def test_pools_refuse_vector_pair_similarities(how):
    from itmkit.stage import PortError

    with pytest.raises(PortError, match="dim 1"):
        POOLS[how]().ports(x=PairSimsPort(256))


# ============================================================================ cosine head


def test_cosine_of_global_vectors_against_a_loop_over_pairs():
    image = torch.randn(3, 7, generator=gen(10), dtype=torch.float64)
    text = torch.randn(5, 7, generator=gen(11), dtype=torch.float64)
    assert Cosine().ports(image=GlobalPort(7), text=GlobalPort(7)) == ScorePort()
    out = Cosine().build(image=GlobalPort(7), text=GlobalPort(7))(image=image, text=text)
    for i in range(3):
        for j in range(5):
            a, b = image[i].tolist(), text[j].tolist()
            # l2norm's (|a| + 1e-8) differs from the exact norm by ~1e-9 relative.
            assert float(out[i, j]) == pytest.approx(dot(a, b) / max(norm(a) * norm(b), 1e-8), abs=1e-7)


def test_cosine_refuses_globals_of_different_sizes_and_missing_inputs():
    from itmkit.stage import PortError

    with pytest.raises(PortError, match="image global dim 7 differs from text global dim 8"):
        Cosine().ports(image=GlobalPort(7), text=GlobalPort(8))
    with pytest.raises(PortError, match="add a `pool`"):
        Cosine().ports(image=GlobalPort(7))
    assert Cosine().ports(x=AlignedPort(7)) == PairSimsPort(1)


def aligned_block(query_side: str, dtype=torch.float64) -> Aligned:
    """A (3 images x 4 captions) attention block: SCAN-like softmax over valid context, padded queries zero."""
    g = gen(12)
    image = torch.randn(3, 5, 6, generator=g, dtype=dtype)
    text = torch.randn(4, 7, 6, generator=g, dtype=dtype)
    image_mask = lengths_to_mask(torch.tensor([5, 3, 4]), 5)
    text_mask = lengths_to_mask(torch.tensor([7, 2, 5, 1]), 7)
    text = text * text_mask[..., None]  # padded words are zero vectors, as the GRU emits them
    if query_side == "text":
        query, query_mask, context, context_mask = text[None], text_mask[None], image[:, None], image_mask[:, None]
    else:
        query, query_mask, context, context_mask = image[:, None], image_mask[:, None], text[None], text_mask[None]
    logits = 9.0 * (query @ context.transpose(-1, -2))  # SCAN's lambda * similarities
    weights = logits.masked_fill(~context_mask[..., None, :], float("-inf")).softmax(-1)
    return Aligned(query, weights, context, query_mask, query_side)


@pytest.mark.parametrize("query_side", ["text", "image"])
def test_cosine_of_queries_and_attended_context_against_materialised_loops(query_side):
    x = aligned_block(query_side)
    out = Cosine().build(x=AlignedPort(6))(x=x)
    ni, nt, lq, lc = x.weights.shape
    assert isinstance(out, PairSims) and out.sims.shape == (ni, nt, lq, 1)
    assert torch.equal(out.mask, x.query_mask.expand(ni, nt, lq))
    for i in range(ni):
        for j in range(nt):
            for q in range(lq):
                query = x.query[i if x.query.shape[0] > 1 else 0, j if x.query.shape[1] > 1 else 0, q].tolist()
                context = x.context[i if x.context.shape[0] > 1 else 0, j if x.context.shape[1] > 1 else 0]
                weights = x.weights[i, j, q].tolist()
                attended = [sum(weights[c] * float(context[c, d]) for c in range(lc)) for d in range(6)]
                expected = dot(query, attended) / max(norm(query) * norm(attended), 1e-8)
                assert float(out.sims[i, j, q, 0]) == pytest.approx(expected, abs=1e-10)
    # Masked text queries are zero vectors and score exactly 0 rather than NaN.
    if query_side == "text":
        assert out.sims[:, 3, 1:].abs().max() == 0


def test_fast_aligned_cosine_matches_the_materialised_formula_in_float32():
    x64 = aligned_block("text")
    x32 = Aligned(x64.query.float(), x64.weights.float(), x64.context.float(), x64.query_mask, "text")
    fast = Cosine().build(x=AlignedPort(6))(x=x32).sims[..., 0].double()
    attended = x64.weights @ x64.context
    slow = (x64.query * attended).sum(-1) / (x64.query.norm(dim=-1) * attended.norm(dim=-1)).clamp(min=1e-8)
    torch.testing.assert_close(fast, slow, **TOL)


# ================================================================================= losses


def batch_scores(b: int = 6, seed: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores in [-1, 1] for captions of images [0, 0, 1, 2, 2, 3]; another caption of one's own image scores high."""
    scores = torch.rand(b, b, generator=gen(seed), dtype=torch.float64) * 2 - 1
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])[:b]
    positives = image_ids[:, None] == image_ids[None, :]
    scores = torch.where(positives & ~torch.eye(b, dtype=torch.bool), scores.clamp(min=0.95), scores)
    return scores, positives


def reference_triplet(S, positives, margin: float, hardest: bool, mask_same_image: bool) -> float:
    """VSE++ eq. 3 (sum of hinges) or eq. 5 (hardest negative per query), diagonal positives."""
    n = S.shape[0]
    cost_s = [[0.0] * n for _ in range(n)]  # image i against negative caption j
    cost_im = [[0.0] * n for _ in range(n)]  # caption j against negative image i
    for i in range(n):
        for j in range(n):
            if i == j or (mask_same_image and bool(positives[i, j])):
                continue
            cost_s[i][j] = max(0.0, margin + float(S[i, j]) - float(S[i, i]))
            cost_im[i][j] = max(0.0, margin + float(S[i, j]) - float(S[j, j]))
    if hardest:
        return sum(max(cost_s[i]) for i in range(n)) + sum(max(cost_im[i][j] for i in range(n)) for j in range(n))
    return sum(map(sum, cost_s)) + sum(map(sum, cost_im))


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_triplet_against_loops(max_violation, mask_same_image, margin):
    S, positives = batch_scores()
    spec = Triplet(margin=margin, max_violation=max_violation, mask_same_image=mask_same_image)
    loss = spec.build(x=ScorePort())(S, positives=positives, epoch=0)
    assert loss.shape == ()
    expected = reference_triplet(S, positives, margin, max_violation, mask_same_image)
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_triplet_mask_same_image_changes_the_loss_here():
    # Guards the test above: on these scores, another caption of the same image is a violating negative.
    S, positives = batch_scores()
    plain = reference_triplet(S, positives, 0.2, True, mask_same_image=False)
    masked = reference_triplet(S, positives, 0.2, True, mask_same_image=True)
    assert plain != pytest.approx(masked)


def test_triplet_warmup_sums_before_switching_to_the_hardest_negative():
    S, positives = batch_scores()
    module = Triplet(margin=0.2, max_violation=True, warmup_epochs=2).build(x=ScorePort())
    summed = reference_triplet(S, positives, 0.2, hardest=False, mask_same_image=False)
    hardest = reference_triplet(S, positives, 0.2, hardest=True, mask_same_image=False)
    assert summed > hardest
    for epoch, expected in ((0, summed), (1, summed), (2, hardest), (5, hardest)):
        assert float(module(S, positives=positives, epoch=epoch)) == pytest.approx(expected, abs=1e-12)


def test_triplet_is_zero_when_every_positive_wins_by_the_margin():
    S = torch.full((4, 4), -0.5, dtype=torch.float64).fill_diagonal_(0.9)
    positives = torch.eye(4, dtype=torch.bool)
    assert float(Triplet().build(x=ScorePort())(S, positives=positives)) == 0.0


def reference_infonce(S, positives, temperature: float, mask_same_image: bool) -> float:
    """Mean over rows and over columns of -log softmax(S / tau) at the diagonal, the two averaged."""
    n = S.shape[0]

    def direction(score) -> float:
        total = 0.0
        for a in range(n):
            others = [b for b in range(n) if b == a or not (mask_same_image and bool(positives[a, b]))]
            logits = {b: score(a, b) / temperature for b in others}
            top = max(logits.values())
            log_z = top + math.log(sum(math.exp(v - top) for v in logits.values()))
            total += log_z - logits[a]
        return total / n

    return (direction(lambda a, b: float(S[a, b])) + direction(lambda a, b: float(S[b, a]))) / 2


@pytest.mark.parametrize("mask_same_image", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_infonce_against_a_loop_log_softmax(mask_same_image, temperature):
    S, positives = batch_scores(seed=14)
    module = InfoNCE(temperature=temperature, mask_same_image=mask_same_image).build(x=ScorePort())
    loss = module(S, positives=positives)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(reference_infonce(S, positives, temperature, mask_same_image), rel=1e-10)


def test_infonce_masking_changes_the_loss_here():
    S, positives = batch_scores(seed=14)
    assert reference_infonce(S, positives, 0.05, True) != pytest.approx(reference_infonce(S, positives, 0.05, False))


def test_gram_is_reused_only_while_its_input_is_unchanged():
    from itmkit.ops import gram

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g)
    with torch.no_grad():
        first = gram(x)
        torch.testing.assert_close(first, x @ x.transpose(1, 2), rtol=0, atol=0)
        assert gram(x[:, :]) is first  # a view of the same block: the kept result
        x[0, 0, 0] += 1.0  # an in-place change advances the version counter
        torch.testing.assert_close(gram(x), x @ x.transpose(1, 2), rtol=0, atol=0)
        other = torch.randn(3, 5, 7, generator=g)  # same shape, other content
        torch.testing.assert_close(gram(other), other @ other.transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(gram(x[:2]), x[:2] @ x[:2].transpose(1, 2), rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    gram(leaf).sum().backward()  # under autograd: a product of its own, with a graph
    torch.testing.assert_close(leaf.grad, 2 * leaf.detach().sum(1, keepdim=True).expand_as(leaf), rtol=1e-5, atol=1e-5)
    gram.clear()
    assert gram.source is None
