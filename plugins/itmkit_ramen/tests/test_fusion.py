"""ramen.fusion against a transcription of the official MultiModalCore + RNN + classifier (tests/official.py).

Evaluation: each pair alone through the code's block (its q repeated over the image's valid regions).
Training: the code's block on the batch of all Ni x Nt pairs (BatchNorm statistics over every
(pair, region) row), so the batch statistics, the running statistics and the gradients must match too.
"""

from __future__ import annotations

import pytest
import torch

from itmkit.testing import check_stage
from itmkit.types import Aligned, Local, lengths_to_mask
from itmkit_ramen.fusion import RamenFusion
from itmkit_ramen.stages import Fusion

from . import official

TOL = dict(rtol=0, atol=1e-10)
V, Q, R = 6, 4, 5  # region width, caption vector width, regions


def build(**kw) -> tuple[RamenFusion, official.MultiModalCore, official.Classifier]:
    torch.manual_seed(0)
    args = dict(v_dim=V, q_dim=Q, mmc_sizes=(5, 5, 5), aggregator_dim=3, readout_sizes=(7,), readout_dropout=0.0)
    args.update(kw)
    ours = RamenFusion(**args).double()
    with torch.no_grad():  # BatchNorms away from the identity, so evaluation reads real running statistics
        for bn in (ours.batch_norm_fusion, ours.batch_norm_mmc, ours.batch_norm_before_aggregation):
            if bn is not None:
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    c = official.config(v_dim=args["v_dim"], q_emb_dim=args["q_dim"], mmc_sizes=list(args["mmc_sizes"]),
                        mmc_nonlinearity=args.get("nonlinearity", "swish"),
                        mmc_connection=args.get("connection", "residual"),
                        disable_early_fusion=not args.get("early_fusion", True),
                        disable_late_fusion=not args.get("late_fusion", True),
                        disable_batch_norm_for_late_fusion=not args.get("late_batch_norm", True),
                        input_dropout=args.get("input_dropout", 0.0), mmc_dropout=args.get("mmc_dropout", 0.0),
                        mmc_aggregator_dim=args["aggregator_dim"], mmc_aggregator_layers=args.get("aggregator_layers", 1))
    core = official.MultiModalCore(c).double()
    clf = None
    if args.get("readout", "mlp") == "mlp":
        clf = official.Classifier(2 * args["aggregator_dim"], args["readout_sizes"],
                                  args.get("readout_nonlinearity", "swish"), 0.0, 0.0).double()
    official.load_from(core, clf, ours)
    return ours, core, clf


def head(ours: RamenFusion, clf, a: torch.Tensor) -> torch.Tensor:
    if clf is not None:
        return clf(a)
    return torch.sigmoid(ours.readout.out(a).squeeze(-1))


def inputs(ni=3, nt=4, lengths=(5, 2, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(ni, R, V, generator=g, dtype=torch.float64)
    lengths = torch.tensor(lengths[:ni])
    v = torch.where(lengths_to_mask(lengths, R)[..., None], v, 10.0)  # padding must be read by nothing
    q = torch.randn(nt, Q, generator=g, dtype=torch.float64)
    return Local(v, lengths_to_mask(lengths, R)), q


CONFIGS = {
    "defaults": {},
    "normalized_swish_no_residual": dict(nonlinearity="normalized_swish", connection="none", mmc_sizes=(5, 3, 7)),
    "no_early_fusion": dict(early_fusion=False),
    "no_late_fusion": dict(late_fusion=False),
    "no_late_batch_norm": dict(late_batch_norm=False),
    "two_gru_layers": dict(aggregator_layers=2),
    "linear_sigmoid": dict(readout="linear_sigmoid"),
    "two_readout_layers": dict(readout_sizes=(7, 3), readout_nonlinearity="normalized_swish"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_evaluation_scores_each_pair_as_the_code(name):
    ours, core, clf = build(**CONFIGS[name])
    ours.eval(), core.eval()
    image, q = inputs()
    with torch.no_grad():
        scores = ours(image=image, text=q)
        for i in range(3):
            n = int(image.mask[i].sum())
            for t in range(4):
                expected = head(ours, clf, core(image.feats[i:i + 1, :n], q[t:t + 1]))
                torch.testing.assert_close(scores[i, t], expected[0], **TOL)


@pytest.mark.parametrize("name", ["defaults", "no_early_fusion", "normalized_swish_no_residual", "two_gru_layers"])
def test_training_on_a_full_block_is_the_code_on_the_batch_of_its_pairs(name):
    """Every region valid: the code's batch of the Ni x Nt pairs (row (i, t) = image i with caption t)."""
    ours, core, clf = build(**CONFIGS[name])
    ours.train(), core.train()
    image, q = inputs(lengths=(5, 5, 5))
    scores = ours(image=image, text=q)
    v = image.feats[:, None].expand(3, 4, R, V).reshape(12, R, V)
    expected = head(ours, clf, core(v, q[None].expand(3, 4, Q).reshape(12, Q))).view(3, 4)
    torch.testing.assert_close(scores, expected, **TOL)
    for name_bn in ("batch_norm_fusion", "batch_norm_mmc", "batch_norm_before_aggregation"):
        mine, theirs = getattr(ours, name_bn), getattr(core, name_bn)
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, **TOL)
        torch.testing.assert_close(mine.running_var, theirs.running_var, **TOL)
    weights = torch.randn(3, 4, dtype=torch.float64)
    (scores * weights).sum().backward()
    (expected * weights).sum().backward()
    for i, layer in enumerate(ours.mmc_layers):
        torch.testing.assert_close(layer.weight.grad, core.mmc_layers[2 * i].linear.weight.grad, **TOL)
    torch.testing.assert_close(ours.batch_norm_fusion.weight.grad, core.batch_norm_fusion.weight.grad, **TOL)
    torch.testing.assert_close(ours.aggregator.rnn.weight_ih_l0.grad, core.aggregator.rnn.weight_ih_l0.grad, **TOL)


def test_training_with_padded_regions_normalises_over_the_valid_rows_only():
    """Padded regions are no rows of the code's batch: the reference flattens every pair's valid rows,
    runs the code's BatchNorm / linear layers on those rows, and its RNN on each pair's own rows."""
    ours, core, clf = build()
    ours.train(), core.train()
    image, q = inputs()
    scores = ours(image=image, text=q)
    rows, counts = [], []
    for i in range(3):
        n = int(image.mask[i].sum())
        for t in range(4):
            rows.append(torch.cat([image.feats[i, :n], q[t].expand(n, Q)], dim=1))
            counts.append(n)
    x = core.batch_norm_fusion(torch.cat(rows))
    for k, layer in enumerate(core.mmc_layers):
        x = (x + layer(x) if k > 0 else layer(x)) if isinstance(layer, official.LinearWithDropout) else layer(x)
    x = core.batch_norm_mmc(x)
    qs = torch.cat([q[t].expand(n, Q) for n, t in zip(counts, [t for _ in range(3) for t in range(4)])])
    x = core.batch_norm_before_aggregation(torch.cat([x, qs], dim=1))
    pairs = torch.split(x, counts)
    expected = torch.stack([head(ours, clf, core.aggregator(p[None]))[0] for p in pairs]).view(3, 4)
    torch.testing.assert_close(scores, expected, **TOL)
    for name_bn in ("batch_norm_fusion", "batch_norm_mmc", "batch_norm_before_aggregation"):
        torch.testing.assert_close(getattr(ours, name_bn).running_var, getattr(core, name_bn).running_var, **TOL)


def test_input_and_mmc_dropout_in_training_draw_as_the_code():
    """Input dropout needs the per-pair concatenation; with one seed both draw the same masks."""
    ours, core, clf = build(input_dropout=0.3, mmc_dropout=0.2)
    ours.train(), core.train()
    image, q = inputs(lengths=(5, 5, 5))
    torch.manual_seed(5)
    scores = ours(image=image, text=q)
    v = image.feats[:, None].expand(3, 4, R, V).reshape(12, R, V)
    torch.manual_seed(5)
    expected = head(ours, clf, core(v, q[None].expand(3, 4, Q).reshape(12, Q))).view(3, 4)
    torch.testing.assert_close(scores, expected, **TOL)


@pytest.mark.parametrize("query_side", ["image", "text"])
def test_an_aligned_block_fuses_each_query_with_its_attended_context(query_side):
    """After a cross-attention: fragment k of the query side with the context attended for it (q per region)."""
    ours, core, clf = build(v_dim=Q, q_dim=Q)
    ours.eval(), core.eval()
    g = torch.Generator().manual_seed(2)
    ni, nt, lq, lc = 3, 4, 5, 6
    regions = torch.randn(ni, lq if query_side == "image" else lc, Q, generator=g, dtype=torch.float64)
    words = torch.randn(nt, lc if query_side == "image" else lq, Q, generator=g, dtype=torch.float64)
    q_len = torch.tensor([5, 2, 4, 3][:ni if query_side == "image" else nt])
    if query_side == "image":
        query, context, query_mask = regions[:, None], words[None], lengths_to_mask(q_len, lq)[:, None]
    else:
        query, context, query_mask = words[None], regions[:, None], lengths_to_mask(q_len, lq)[None]
    weights = torch.softmax(torch.randn(ni, nt, lq, lc, generator=g, dtype=torch.float64), dim=-1)
    aligned = Aligned(query, weights, context, query_mask, query_side)
    with torch.no_grad():
        scores = ours(x=aligned)
        for i in range(ni):
            for t in range(nt):
                owner = i if query_side == "image" else t
                n = int(q_len[owner])
                own = (regions[i] if query_side == "image" else words[t])[:n]
                ctx = words[t] if query_side == "image" else regions[i]
                attended = torch.stack([sum(weights[i, t, k, j] * ctx[j] for j in range(lc)) for k in range(n)])
                expected = head(ours, clf, core(own[None], attended[None]))
                torch.testing.assert_close(scores[i, t], expected[0], **TOL)


def test_evaluation_scores_do_not_depend_on_the_block():
    ours, _, _ = build()
    ours.eval()
    image, q = inputs()
    with torch.no_grad():
        whole = ours(image=image, text=q)
        part = ours(image=Local(image.feats[1:2, :2], image.mask[1:2, :2]), text=q[2:3])
    torch.testing.assert_close(part[0, 0], whole[1, 2], **TOL)


def test_conformance():
    check_stage(Fusion)
