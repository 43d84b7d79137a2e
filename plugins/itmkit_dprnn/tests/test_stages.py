"""DP-RNN's stages against a slow per-pair reference written from the paper's equations, and the kit.

The reference slices each image and caption to its valid fragments and loops over pairs, objects
and words exactly as eq. 4-16 read, so padding, the block layout and the selected-pair layout of
the stages must all reduce to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from itmkit.errors import DataError
from itmkit.plugins import get_registry
from itmkit.stage import PortError
from itmkit.testing import CHECKS, LargestAllocation, check_stage
from itmkit.types import BlockContext, Local, LocalPort, Regions, RegionsPort, ScorePort, lengths_to_mask
from itmkit_dprnn.stages import UNSELECTED, Macm, Objects

STAGES = [Objects, Macm]
TOL = dict(rtol=0, atol=1e-5)
EPS = 1e-8


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_registered_by_the_entry_point(cls):
    check_stage(cls, registry=get_registry())


def local(batch: int, length: int, dim: int, seed: int, *, dtype=torch.float64, full_first: bool = True) -> Local:
    """Random fragments with varied lengths and large noise in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    if full_first:
        lengths[0] = length
    mask = lengths_to_mask(lengths, length)
    feats = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    feats = torch.where(mask[..., None], feats, 100 * torch.randn(feats.shape, generator=g, dtype=dtype))
    return Local(feats, mask)


def build(dim: int = 6, **params):
    torch.manual_seed(params.pop("seed", 0))
    return Macm(**params).build(image=LocalPort(dim), text=LocalPort(dim)).double().eval()


# ------------------------------------------------------------------ the paper, one pair at a time


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / torch.clamp(a.norm() * b.norm(), min=EPS)


def softmax(values: list[torch.Tensor]) -> list[torch.Tensor]:
    e = [torch.exp(v) for v in values]
    total = sum(e)
    return [x / total for x in e]


def clip(x: torch.Tensor, how: str) -> torch.Tensor:
    return torch.clamp(x, min=0) if how == "relu" else torch.where(x > 0, x, 0.1 * x)


def rnn_reference(module, o: torch.Tensor, w: torch.Tensor, aw: list[torch.Tensor]) -> torch.Tensor:
    """eq. 14-15: p_i = argmax_j a^w_j o_i.w_j, objects sorted by (p_i, i), bi-GRU, directions averaged."""
    k, n = o.shape[0], w.shape[0]
    related = [max(range(n), key=lambda j: (float((aw[j] * (o[i] @ w[j])).detach()), -j)) for i in range(k)]
    order = sorted(range(k), key=lambda i: (related[i], i))
    out, _ = module.object_rnn(o[order][None])
    out = out[0]
    if module.bidirectional:
        d = out.shape[-1] // 2
        out = (out[:, :d] + out[:, d:]) / 2
    if module.normalize_rnn:
        out = out / (out.norm(dim=-1, keepdim=True) + EPS)
    return out


def pair_reference(module, o: torch.Tensor, w: torch.Tensor, recurrent: bool) -> torch.Tensor:
    """S_w or S_o of one pair (o (k, h) and w (n, h) without padding), eq. 4-12 and 14-15 as printed."""
    k, n = o.shape[0], w.shape[0]
    aw = softmax([module.beta_word * (module.word_attention.weight[0] @ w[j]) for j in range(n)])
    if recurrent:
        o = rnn_reference(module, o, w, aw)
    c = [[clip(cos(o[i], w[j]), module.clip) for j in range(n)] for i in range(k)]
    if module.orientation == "word":
        total = 0.0
        for j in range(n):
            norms = [torch.sqrt(sum(c[i][jj] ** 2 for jj in range(n))) + EPS for i in range(k)]  # over words
            alpha = softmax([module.lambda_word * c[i][j] / norms[i] for i in range(k)])
            m = sum(alpha[i] * o[i] for i in range(k))
            total = total + aw[j] * cos(w[j], m)
        return total
    ao = softmax([module.beta_object * (module.object_attention.weight[0] @ o[i]) for i in range(k)])
    total = 0.0
    for i in range(k):
        norms = [torch.sqrt(sum(c[ii][j] ** 2 for ii in range(k))) + EPS for j in range(n)]  # over objects
        alpha = softmax([module.lambda_object * c[i][j] / norms[j] for j in range(n)])
        t = sum(alpha[j] * w[j] for j in range(n))
        total = total + ao[i] * cos(o[i], t)
    return total


def reference(module, image: Local, text: Local, recurrent: bool) -> torch.Tensor:
    out = torch.zeros(image.feats.shape[0], text.feats.shape[0], dtype=image.feats.dtype)
    for i in range(image.feats.shape[0]):
        for t in range(text.feats.shape[0]):
            out[i, t] = pair_reference(module, image.feats[i, image.mask[i]], text.feats[t, text.mask[t]], recurrent)
    return out


def early_reference(module, image: Local, text: Local) -> torch.Tensor:
    """S_em(I, T) = sum_i sum_j a^w_j o_i.w_j (eq. 16), one pair at a time."""
    out = torch.zeros(image.feats.shape[0], text.feats.shape[0], dtype=image.feats.dtype)
    for i in range(out.shape[0]):
        o = image.feats[i, image.mask[i]]
        for t in range(out.shape[1]):
            w = text.feats[t, text.mask[t]]
            aw = softmax([module.beta_word * (module.word_attention.weight[0] @ w[j]) for j in range(w.shape[0])])
            out[i, t] = sum(aw[j] * (o[a] @ w[j]) for a in range(o.shape[0]) for j in range(w.shape[0]))
    return out


# ------------------------------------------------------------------ the matcher against the paper


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("recurrent", [True, False], ids=["rnn", "macm-only"])
@pytest.mark.parametrize("orientation", ["word", "object"])
def test_macm_equals_the_paper_pair_by_pair(orientation, recurrent, grad):
    module = build(orientation=orientation, recurrent=recurrent)
    if orientation == "object":  # a non-uniform a^w, so the reorder really depends on W_w
        module.word_attention.weight.data.normal_()
    image, text = local(4, 5, 6, seed=1), local(3, 6, 6, seed=2)
    with torch.set_grad_enabled(grad):
        ours = module(image=image, text=text)
    with torch.no_grad():
        torch.testing.assert_close(ours, reference(module, image, text, recurrent), **TOL)


@pytest.mark.parametrize("params", [dict(clip="leaky_relu"), dict(bidirectional=False, normalize_rnn=False),
                                    dict(orientation="object", beta_object=0.0, lambda_object=3.0),
                                    dict(lambda_word=20.0, beta_word=2.0)], ids=str)
def test_the_options_equal_the_paper_too(params):
    module = build(**params)
    image, text = local(3, 4, 6, seed=3), local(4, 5, 6, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(module(image=image, text=text), reference(module, image, text, True), **TOL)


def test_unnormalised_objects_and_words_are_compared_by_cosine():
    module = build()
    image, text = local(3, 4, 6, seed=5), local(2, 5, 6, seed=6)
    image = Local(image.feats * torch.linspace(0.5, 3, 4, dtype=torch.float64)[None, :, None], image.mask)
    module.normalize_rnn = False
    with torch.no_grad():
        torch.testing.assert_close(module(image=image, text=text), reference(module, image, text, True), **TOL)


@pytest.mark.parametrize("orientation", ["word", "object"])
def test_a_caption_alone_scores_as_in_a_padded_block(orientation):
    module = build(orientation=orientation)
    image, text = local(3, 5, 6, seed=7), local(5, 7, 6, seed=8)
    with torch.no_grad():
        block = module(image=image, text=text)
        for t in range(5):
            alone = module(image=image, text=text.select(slice(t, t + 1)))
            torch.testing.assert_close(block[:, t:t + 1], alone, **TOL)
        for i in range(3):  # and an image alone, cut to its own objects
            torch.testing.assert_close(block[i:i + 1], module(image=image.select(slice(i, i + 1)), text=text), **TOL)


def test_the_switch_is_a_buffer_and_turns_the_rnn_off():
    module = build()
    assert module.state_dict()["recurrent"].dtype == torch.bool and bool(module.recurrent)
    image, text = local(3, 4, 6, seed=9), local(2, 5, 6, seed=10)
    with torch.no_grad():
        module.recurrent.fill_(False)
        torch.testing.assert_close(module(image=image, text=text), reference(module, image, text, False), **TOL)
        module.recurrent.fill_(True)
        torch.testing.assert_close(module(image=image, text=text), reference(module, image, text, True), **TOL)


def test_gradients_equal_the_reference_and_padding_gets_none():
    module = build(orientation="object")
    module.word_attention.weight.data.normal_()
    image, text = local(3, 4, 6, seed=11), local(2, 5, 6, seed=12)
    image.feats.requires_grad_(True)
    text.feats.requires_grad_(True)
    trained = [p for p in module.parameters() if p.requires_grad]
    ours = torch.autograd.grad(module(image=image, text=text).sum(), [image.feats, text.feats, *trained])
    ref = torch.autograd.grad(reference(module, image, text, True).sum(), [image.feats, text.feats, *trained])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    assert not ours[0][~image.mask].any() and not ours[1][~text.mask].any()


def test_model_o_does_not_train_the_word_attention():
    uniform = build(orientation="object").word_attention.weight
    assert not uniform.requires_grad and not uniform.any()  # a^w = 1/n
    random = build(orientation="object", object_word_attention="random").word_attention.weight
    assert not random.requires_grad and random.abs().sum() > 0
    word = build(orientation="word")
    assert word.word_attention.weight.requires_grad and not hasattr(word, "object_attention")


# ------------------------------------------------------------------ pair early-selection (eq. 16)


def training_block(seed: int = 13):
    """A training step's block: B = 7 captions with their images (rows 0 and 1 the same image), positives by id."""
    image, text = local(7, 5, 6, seed=seed), local(7, 6, 6, seed=seed + 1)
    feats, mask = image.feats.clone(), image.mask.clone()
    feats[1], mask[1] = feats[0], mask[0]
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    return Local(feats, mask), text, ids[:, None] == ids[None, :]


def check_selection(scores, full, early, positives, d):
    """Per caption: the positives and d other images with the highest S_em (ties either way) score as the full
    model; every other pair is finite, below -2 (below any MACM score) and ordered by S_em."""
    for t in range(scores.shape[1]):
        chosen = scores[:, t] > -2
        others = ~positives[:, t]
        assert chosen[positives[:, t]].all()
        assert int((chosen & others).sum()) == min(d, int(others.sum()))
        rest = ~chosen
        if rest.any():
            assert float(early[chosen & others, t].min()) >= float(early[rest, t].max()) - 1e-12
            assert torch.isfinite(scores[rest, t]).all() and float(scores[rest, t].min()) > UNSELECTED - 1
            assert float(scores[chosen, t].min()) > float(scores[rest, t].max())
            by_early = early[rest, t].argsort(descending=True)
            assert (scores[rest, t][by_early].diff() <= 0).all()
        torch.testing.assert_close(scores[chosen, t], full[chosen, t], **TOL)


@pytest.mark.parametrize("orientation", ["word", "object"])
def test_training_selects_the_positives_and_the_top_d_by_early_score(orientation):
    module = build(orientation=orientation, preselect_train=3)
    module.word_attention.weight.data.normal_()
    image, text, positives = training_block()
    full, early = reference(module, image, text, True), early_reference(module, image, text).detach()
    with torch.no_grad():
        torch.testing.assert_close(module.early_scores(image, text, module.word_weights(text)), early, **TOL)
        scores = module(image=image, text=text, context=BlockContext(positives))
    check_selection(scores, full, early, positives, 3)


def test_the_hinge_loss_never_picks_an_unselected_pair():
    from itmkit.core_stages import Triplet

    module = build(preselect_train=2)
    image, text, positives = training_block(seed=15)
    scores = module(image=image, text=text, context=BlockContext(positives))
    unselected = scores < -2
    assert unselected.any()
    loss = Triplet(margin=0.2, max_violation=True).build(x=ScorePort())
    live = scores.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(loss(live, positives=positives, epoch=0), live)
    assert not grad[unselected].any()


def test_selection_keeps_every_pair_when_d_covers_the_block():
    module = build(preselect_train=10)
    image, text, positives = training_block(seed=17)
    with torch.no_grad():
        torch.testing.assert_close(module(image=image, text=text, context=BlockContext(positives)),
                                   module(image=image, text=text), **TOL)


def test_selection_in_training_trains_the_rnn_and_the_word_attention():
    module = build(preselect_train=2).train()
    image, text, positives = training_block(seed=19)
    module(image=image, text=text, context=BlockContext(positives)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_test_time_option_ranks_unselected_images_below_by_early_score():
    module = build(preselect=2)
    image, text = local(7, 5, 6, seed=21), local(6, 6, 6, seed=22)
    full, early = reference(module, image, text, True), early_reference(module, image, text).detach()
    with torch.no_grad():
        scores = module(image=image, text=text)  # no context: scoring
    check_selection(scores, full, early, torch.zeros(7, 6, dtype=torch.bool), 2)


def test_preselect_without_rnn_off_scores_every_pair_in_phase_one():
    module = build(preselect_train=1, preselect_without_rnn=False, recurrent=False)
    image, text, positives = training_block(seed=23)
    with torch.no_grad():
        torch.testing.assert_close(module(image=image, text=text, context=BlockContext(positives)),
                                   reference(module, image, text, False), **TOL)


# ------------------------------------------------------------------ object encoder


def test_objects_equal_the_paper():
    torch.manual_seed(1)
    spec = Objects(embed_dim=5)
    enc = spec.build(x=RegionsPort(7)).double()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[[0, 0, 10, 20], [5, 5, 40, 30], [1, 2, 3, 4]], [[10, 10, 60, 50], [0, 0, 1, 1], [0, 0, 0, 0]]],
                         dtype=torch.float64)
    sizes = torch.tensor([[40, 30], [80, 60]])
    out = enc(Regions(feats, torch.tensor([3, 2]), boxes, sizes))
    for b in range(2):
        width, height = (float(v) for v in sizes[b])
        for r in range(3):
            x1, y1, x2, y2 = (float(v) for v in boxes[b, r])
            pos = torch.tensor([(x2 - x1) / width, (y2 - y1) / height, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height],
                               dtype=torch.float64)
            o = enc.fc(feats[b, r]) * torch.sigmoid(enc.position(pos))
            torch.testing.assert_close(out.feats[b, r], o / (o.norm() + EPS), **TOL)
    plain = Objects(embed_dim=5, position=False, normalize=False).build(x=RegionsPort(7)).double()
    torch.testing.assert_close(plain(Regions(feats, torch.tensor([3, 2]))).feats, plain.fc(feats), **TOL)


def test_objects_without_boxes_say_what_the_data_needs():
    enc = Objects(embed_dim=4).build(x=RegionsPort(6))
    with pytest.raises(DataError, match=r"region boxes.*\(B, R, 4\).*_boxes\.npy.*_sizes\.npy.*position = false"):
        enc(Regions(torch.randn(2, 3, 6), torch.tensor([3, 2])))
    with pytest.raises(DataError, match="image sizes"):
        enc(Regions(torch.randn(2, 3, 6), torch.tensor([3, 2]), torch.rand(2, 3, 4)))
    with pytest.raises(DataError, match="30-column"):
        enc(Regions(torch.randn(2, 3, 6), torch.tensor([3, 2]), torch.rand(2, 3, 30), torch.ones(2, 2)))
    needs = Objects().data_needs()
    assert [(b.columns, b.needs_sizes) for b in needs.boxes] == [(4, True)]
    assert Objects(position=False).data_needs().boxes == ()


def test_training_on_data_without_boxes_is_one_clean_error(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests"))
    from cliutil import assert_clean_failure, invoke
    from tinyboxes import write_tiny_boxes

    data = write_tiny_boxes(tmp_path / "data", boxes=False)
    root = Path(__file__).parents[3]
    result = invoke("train", str(root / "recipes" / "dprnn_shapes_word.toml"), "--out", str(tmp_path / "run"),
                    "--set", f"data.path={data}")
    message = assert_clean_failure(result)
    assert "boxes" in message and "dprnn.objects" in message, message


def test_ports_need_equal_widths():
    with pytest.raises(PortError, match="same embed_dim"):
        Macm().ports(image=LocalPort(32), text=LocalPort(16))


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("recurrent", [True, False])
def test_pair_bytes_covers_the_largest_allocation_of_a_block(recurrent):
    spec = Macm(recurrent=recurrent)
    module = spec.build(image=LocalPort(32), text=LocalPort(32)).eval()
    image, text = local(6, 9, 32, seed=25, dtype=torch.float32), local(7, 11, 32, seed=26, dtype=torch.float32)
    with torch.no_grad(), LargestAllocation() as record:
        module(image=image, text=text)
    assert record.largest <= spec.pair_bytes(text_len=11, image_len=9, ports={"image": LocalPort(32)}) * 6 * 7
