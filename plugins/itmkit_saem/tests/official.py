"""A slow reference of SAEM's official forward pass (yiling2018/saem), written for the tests.

Plain functions over state dicts with the official key names: the BERT layer of the image
branch (``image_net.TransformerMapping``: its ``bert.BERTLayer`` with gamma/beta LayerNorms, the
TF-style epsilon inside the square root, an additive -10000 mask), the CNN text head
(``text_net.BertMapping``, ``txt_stru = 'cnn'``) with an explicit loop over the windows, and the
official losses (``loss.AngularLoss``, the L2 term of ``model.SAEM.forward_loss``) with loops
over the anchors. Nothing here is shared with the code under test.
"""

from __future__ import annotations

import math

import torch


def linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(sd: dict, name: str, x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """BERTLayerNorm: gamma (x - mean) / sqrt(var + eps) + beta, biased variance."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return sd[f"{name}.gamma"] * (x - u) / torch.sqrt(s + eps) + sd[f"{name}.beta"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bert_layer(sd: dict, x: torch.Tensor, mask: torch.Tensor | None, heads: int, act=gelu,
               eps: float = 1e-12) -> torch.Tensor:
    """BERTLayer in eval mode, one item and one head at a time; mask (B, N) of valid keys (None: all)."""
    b, n, d = x.shape
    dh = d // heads
    q, k, v = (linear(sd, f"attention.self.{w}", x) for w in ("query", "key", "value"))
    context = torch.zeros_like(x)
    for i in range(b):
        add = torch.zeros(n, dtype=x.dtype) if mask is None else (1.0 - mask[i].to(x.dtype)) * -10000.0
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = q[i, :, cols] @ k[i, :, cols].T / math.sqrt(dh) + add[None, :]
            context[i, :, cols] = torch.softmax(scores, dim=-1) @ v[i, :, cols]
    attn = layer_norm(sd, "attention.output.LayerNorm", linear(sd, "attention.output.dense", context) + x, eps)
    inner = act(linear(sd, "intermediate.dense", attn))
    return layer_norm(sd, "output.LayerNorm", linear(sd, "output.dense", inner) + attn, eps)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, p=2, dim=1)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def transformer_mapping(sd: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """TransformerMapping: mapping -> BERTLayer (no mask: all 36 regions) -> mean over regions -> normalize."""
    x = linear(sd, "mapping", images)
    return normalize(bert_layer(sub(sd, "layer."), x, None, heads).mean(dim=1))


def cnn_pool(sd: dict, hidden: torch.Tensor, widths=(1, 2, 3)) -> torch.Tensor:
    """The 'cnn' head up to the concatenation: per width K, max over t of ReLU(conv over rows t..t+K-1)."""
    b, n, _ = hidden.shape
    out = []
    for j, k in enumerate(widths):
        w, bias = sd[f"convs1.{j}.weight"][:, 0], sd[f"convs1.{j}.bias"]  # (C, K, D), (C,)
        best = torch.full((b, w.shape[0]), -math.inf, dtype=hidden.dtype)
        for t in range(n - k + 1):
            window = hidden[:, t:t + k]  # (B, K, D)
            value = torch.relu(torch.einsum("bkd,ckd->bc", window, w) + bias)
            best = torch.maximum(best, value)
        out.append(best)
    return torch.cat(out, dim=1)


def bert_mapping_cnn(sd: dict, hidden: torch.Tensor, widths=(1, 2, 3)) -> torch.Tensor:
    """BertMapping ('cnn') after BERT, eval mode: the head, mapping, normalize."""
    return normalize(linear(sd, "mapping", cnn_pool(sd, hidden, widths)))


def convert_to_feature(pieces: list[int], seq_length: int, cls_id: int, sep_id: int) -> tuple[list[int], list[int]]:
    """data.convert_to_feature on WordPiece ids: [CLS] + at most seq_length - 2 pieces + [SEP], 0-padded; the mask."""
    pieces = pieces[:seq_length - 2]
    ids = [cls_id, *pieces, sep_id]
    mask = [1] * len(ids)
    while len(ids) < seq_length:
        ids.append(0)
        mask.append(0)
    return ids, mask


def bert_model(sd: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """bert.BertModel in eval mode, token_type_ids 0: the last of all_encoder_layers (B, L, H)."""
    n = input_ids.shape[1]
    x = (sd["embeddings.word_embeddings.weight"][input_ids] + sd["embeddings.position_embeddings.weight"][:n][None]
         + sd["embeddings.token_type_embeddings.weight"][0][None, None])
    x = layer_norm(sd, "embeddings.LayerNorm", x)
    i = 0
    while f"encoder.layer.{i}.output.dense.weight" in sd:
        x = bert_layer(sub(sd, f"encoder.layer.{i}."), x, attention_mask, heads)
        i += 1
    return x


def text_forward(sd: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor, heads: int,
                 widths=(1, 2, 3)) -> torch.Tensor:
    """BertMapping.forward ('cnn'), eval mode, on the official txt_enc state dict (bert.*, convs1.*, mapping.*)."""
    hidden = bert_model(sub(sd, "bert."), input_ids, attention_mask, heads)
    return bert_mapping_cnn(sd, hidden, widths)


def pdist_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1)[:, None]
    b = b / b.norm(dim=1)[:, None]
    res = a @ b.T
    return torch.where(torch.isnan(res), torch.zeros_like(res), res)


def contrastive_loss(im: torch.Tensor, s: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """ContrastiveLoss with max_violation: per image its hardest caption, per caption its hardest image."""
    scores = pdist_cos(im, s)
    n = scores.shape[0]
    total = scores.new_zeros(())
    for i in range(n):
        total = total + max((margin + scores[i, j] - scores[i, i]).clamp(min=0) for j in range(n) if j != i)
        total = total + max((margin + scores[j, i] - scores[i, i]).clamp(min=0) for j in range(n) if j != i)
    return total


def angular_loss(im: torch.Tensor, s: torch.Tensor, angle_bound: float = 1.0) -> torch.Tensor:
    """AngularLoss (max_violation): both directions, each anchor against every other item of the batch."""
    def one_side(anchors, positives):
        total = anchors.new_zeros(())
        n = anchors.shape[0]
        for i in range(n):
            worst = -math.inf
            for j in range(n):
                if j == i:
                    continue
                x = (4.0 * angle_bound * torch.dot(anchors[i] + positives[i], positives[j])
                     - 2.0 * (1.0 + angle_bound) * torch.dot(anchors[i], positives[i]))
                worst = x if worst == -math.inf else torch.maximum(worst, x)
            total = total + torch.log(1 + torch.exp(worst))
        return total

    return one_side(im, s) + one_side(s, im)


def angular_loss_sum(im: torch.Tensor, s: torch.Tensor, angle_bound: float = 1.0) -> torch.Tensor:
    """AngularLoss with max_violation False: mean over anchors of t + log(exp(-t) + sum_j exp(x_j - t))."""
    def one_side(anchors, positives):
        n = anchors.shape[0]
        values = []
        for i in range(n):
            xs = torch.stack([4.0 * angle_bound * torch.dot(anchors[i] + positives[i], positives[j])
                              - 2.0 * (1.0 + angle_bound) * torch.dot(anchors[i], positives[i])
                              for j in range(n) if j != i])
            t = xs.max()
            values.append(t + torch.log(torch.exp(-t) + torch.exp(xs - t).sum()))
        return torch.stack(values).mean()

    return one_side(im, s) + one_side(s, im)


def angular_weight(epoch: int) -> float:
    """alpha of SAEM.forward_loss."""
    return 0.0 if epoch > 20 else 0.5 * (0.1 ** (epoch // 5))


def l2_reg(named: dict) -> torch.Tensor:
    """0.01 x the sum of the (unsquared) norms of every img_enc parameter not named bias, gamma or beta."""
    total = torch.zeros(())
    for name, p in named.items():
        if name.split(".")[-1] not in ("bias", "gamma", "beta"):
            total = total + torch.norm(p)
    return 0.01 * total


def from_hugging_face(sd: dict) -> dict:
    """A Hugging Face BertModel state dict under the names of the official bert.py (LayerNorm gamma / beta)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("position_ids", "token_type_ids")):
            continue
        out[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = v
    return out


def sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
