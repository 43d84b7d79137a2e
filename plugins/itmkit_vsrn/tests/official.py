"""The official VSRN forward (KunpengLi1994/VSRN model.py, GCN_lib/Rs_GCN.py, models/*.py, misc/utils.py), as a reference.

Written from the official code in its own layout, on its official state-dict keys: Conv1d
weights (out, in, 1) on (B, D, N) tensors, BatchNorm1d over (B, D, N), ``l2norm`` summing over
dim 1 without an epsilon, one GRU call over all 36 regions, the decoder's per-step loop over
``max_len - 1`` steps with the attention's concatenation, and the caption labels and masks built
per caption as data.py builds them. Every image holds all its regions (the official data has no
padding). Plain and slow on purpose: the tests compare the stages with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """The official l2norm: x / sqrt(sum over dim 1 of x^2)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def batch_norm(x: torch.Tensor, sd: dict, prefix: str, training: bool) -> torch.Tensor:
    """BatchNorm1d as the official module computes it (batch statistics in training, running ones in eval)."""
    if training:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
    else:
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, var = sd[f"{prefix}running_mean"].view(shape), sd[f"{prefix}running_var"].view(shape)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{prefix}weight"].view(shape) + sd[f"{prefix}bias"].view(shape)


def rs_gcn_message(v: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    """Rs_GCN.forward up to W's convolution, before its BatchNorm: W_o (R g(v)) on v (B, D, N)."""
    b = v.shape[0]
    conv = lambda name, x: F.conv1d(x, sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"])  # noqa: E731
    inter = sd[f"{prefix}g.weight"].shape[0]
    g_v = conv("g", v).view(b, inter, -1).permute(0, 2, 1)
    theta_v = conv("theta", v).view(b, inter, -1).permute(0, 2, 1)
    phi_v = conv("phi", v).view(b, inter, -1)
    r = torch.matmul(theta_v, phi_v)
    r = r / r.shape[-1]
    y = torch.matmul(r, g_v).permute(0, 2, 1).contiguous()
    return conv("W.0", y)


def rs_gcn(v: torch.Tensor, sd: dict, prefix: str, training: bool) -> torch.Tensor:
    """Rs_GCN.forward on v (B, D, N): BN(W_o (R g(v))) + v."""
    return batch_norm(rs_gcn_message(v, sd, prefix), sd, f"{prefix}W.1.", training) + v


def gru(x: torch.Tensor, sd: dict, prefix: str, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.GRU (1 layer, batch_first) step by step: outputs (B, T, H) and the final state (B, H)."""
    w_ih, w_hh = sd[f"{prefix}weight_ih_l0"], sd[f"{prefix}weight_hh_l0"]
    b_ih, b_hh = sd[f"{prefix}bias_ih_l0"], sd[f"{prefix}bias_hh_l0"]
    hidden = w_hh.shape[1]
    h = x.new_zeros(x.shape[0], hidden) if h is None else h
    outs = []
    for t in range(x.shape[1]):
        gi = x[:, t] @ w_ih.T + b_ih
        gh = h @ w_hh.T + b_hh
        r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        n = torch.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, dim=1), h


def encode_images(sd: dict, images: torch.Tensor, f30k: bool, training: bool = False,
                  no_imgnorm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """EncoderImagePrecompAttn.forward: (image embeddings (B, D), GCN_img_emd (B, N, D))."""
    fc = images @ sd["fc.weight"].T + sd["fc.bias"]
    if not f30k:
        fc = l2norm(fc)  # over the region axis
    v = fc.permute(0, 2, 1)
    for k in range(1, 5):
        v = rs_gcn(v, sd, f"Rs_GCN_{k}.", training)
    gcn = l2norm(v.permute(0, 2, 1))  # over the region axis again
    _, features = gru(gcn, sd, "img_rnn.")
    if f30k:
        features = batch_norm(features, sd, "bn.", training)
    if not no_imgnorm:
        features = l2norm(features)
    return features, gcn


def encode_texts(sd: dict, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """EncoderText.forward: the GRU output at each caption's last word, l2norm."""
    words = sd["embed.weight"][ids]
    out, _ = gru(words, sd, "rnn.")
    last = torch.stack([out[i, int(n) - 1] for i, n in enumerate(lengths)])
    return l2norm(last)


def caption_label_mask(caption: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PrecompDataset.__getitem__'s caption_label and caption_mask for one caption (<start> words <end> ids)."""
    end = caption[-1]
    cap = list(caption)
    if len(cap) > max_len - 1:
        cap = cap[:max_len]
        cap[-1] = end
    gts = torch.zeros(max_len + 1, dtype=torch.long)
    mask = torch.zeros(max_len + 1)
    for j, w in enumerate(cap):
        gts[j] = w
    first_zero = int((gts == 0).nonzero()[0][0])
    mask[:first_zero + 1] = 1
    return gts, mask


def caption_loss(sd: dict, gcn: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, max_len: int) -> torch.Tensor:
    """S2VTAttModel(mode='train') then LanguageModelCriterion(seq_probs, labels[:, 1:], masks[:, 1:]), dropout off."""
    b = gcn.shape[0]
    feats = gcn @ sd["encoder.vid2hid.weight"].T + sd["encoder.vid2hid.bias"]
    encoder_outputs, hidden = gru(feats, sd, "encoder.rnn.")
    hdim = hidden.shape[1]
    words = sd["decoder.embedding.weight"][labels]
    seq_logprobs = []
    for i in range(max_len - 1):
        n = encoder_outputs.shape[1]
        state = hidden[:, None].repeat(1, n, 1)
        inputs = torch.cat((encoder_outputs, state), 2).view(-1, hdim * 2)
        o = torch.tanh(inputs @ sd["decoder.attention.linear1.weight"].T + sd["decoder.attention.linear1.bias"])
        e = (o @ sd["decoder.attention.linear2.weight"].T).view(b, n)
        alpha = F.softmax(e, dim=1)
        context = torch.bmm(alpha[:, None], encoder_outputs).squeeze(1)
        step = torch.cat([words[:, i], context], dim=1)[:, None]
        out, hidden = gru(step, sd, "decoder.rnn.", hidden)
        logits = out[:, 0] @ sd["decoder.out.weight"].T + sd["decoder.out.bias"]
        seq_logprobs.append(F.log_softmax(logits, dim=1)[:, None])
    logprobs = torch.cat(seq_logprobs, 1)
    target, mask = labels[:, 1:], masks[:, 1:]
    target, mask = target[:, :logprobs.shape[1]], mask[:, :logprobs.shape[1]]
    loss = F.nll_loss(logprobs.reshape(-1, logprobs.shape[2]), target.reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / b
