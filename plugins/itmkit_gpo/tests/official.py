"""Slow references of VSE-infinity's forward pass, written from the paper and woodfrog/vse_infty's algorithm.

Two forms of GPO: ``gpo_loop`` is the obviously correct one (one set at a time, cut to its size,
eq. 2-5 literally), and ``gpo_batched`` follows the shape of the official batched module
(pack the positional encodings, fill padding with -10000 before the softmax and the sort, zero
it after) so that the tests show the two agree. The encoders take the official state dicts
(``fc``, ``mlp.layers`` / ``mlp.bns``, ``gpool``, ``embed`` / ``rnn`` or ``bert`` / ``linear``).
Nothing here is shared with the code under test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def sinusoid(n: int, d: int) -> torch.Tensor:
    """Eq. 4: channel 2j of position k is sin(k / 10000^(2j/d)), channel 2j+1 its cos; positions 0..n-1."""
    pe = torch.zeros(n, d)
    for k in range(n):
        for j in range(d // 2):
            angle = k / (10000.0 ** (2 * j / d))
            pe[k, 2 * j] = math.sin(angle)
            pe[k, 2 * j + 1] = math.cos(angle)
    return pe


def _gru(sd: dict[str, torch.Tensor], prefix: str, input_size: int, hidden: int, layers: int = 1) -> torch.nn.GRU:
    gru = torch.nn.GRU(input_size, hidden, layers, batch_first=True, bidirectional=True)
    gru.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return gru


def gpo_loop(sd: dict[str, torch.Tensor], feats: torch.Tensor, lengths: torch.Tensor, temperature: float = 0.1,
             d_pe: int = 32, d_hidden: int = 32, prefix: str = "gpool.") -> torch.Tensor:
    """(B, N, D) sets of sizes ``lengths`` -> (B, D): for each set alone, theta from its size, sorted channels."""
    gru = _gru(sd, f"{prefix}gru.", d_pe, d_hidden)
    w = sd[f"{prefix}linear.weight"]  # (1, d_hidden)
    out = []
    with torch.no_grad():
        for i in range(feats.shape[0]):
            n = int(lengths[i])
            h, _ = gru(sinusoid(n, d_pe)[None])  # (1, n, 2 d_hidden)
            h = (h[0, :, :d_hidden] + h[0, :, d_hidden:]) / 2
            theta = torch.softmax((h @ w.T)[:, 0] / temperature, dim=0)  # (n,)
            ranked = feats[i, :n].sort(dim=0, descending=True).values  # max_k per channel
            out.append((theta[:, None].to(ranked.dtype) * ranked).sum(0))
    return torch.stack(out)


def gpo_batched(sd: dict[str, torch.Tensor], feats: torch.Tensor, lengths: torch.Tensor, prefix: str = "gpool.",
                d_pe: int = 32, d_hidden: int = 32) -> torch.Tensor:
    """The official batched form: packed encodings, -10000 on padding before softmax and sort, 0 after."""
    gru = _gru(sd, f"{prefix}gru.", d_pe, d_hidden)
    n = int(lengths.max())
    mask = (torch.arange(n)[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, n, 1)
    pes = sinusoid(n, d_pe)[None].repeat(len(lengths), 1, 1).masked_fill(~mask, 0)
    with torch.no_grad():
        out, _ = gru(pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True)
    out = (out[:, :, : out.shape[2] // 2] + out[:, :, out.shape[2] // 2 :]) / 2
    scores = out @ sd[f"{prefix}linear.weight"].T  # (B, n, 1)
    scores[~mask] = -10000
    weights = torch.softmax(scores / 0.1, 1)
    feats = feats[:, :n].masked_fill(~mask, -10000).sort(dim=1, descending=True).values.masked_fill(~mask, 0)
    return (feats * weights).sum(1)


def mlp_branch(sd: dict[str, torch.Tensor], x: torch.Tensor, *, training: bool = False) -> torch.Tensor:
    """MLP(img_dim, E/2, E, 2 layers): Linear -> BatchNorm (bns.0) -> ReLU -> Linear over all B x N rows."""
    b, n, f = x.shape
    rows = F.linear(x.reshape(b * n, f), sd["mlp.layers.0.weight"], sd["mlp.layers.0.bias"])
    rows = F.batch_norm(rows, sd["mlp.bns.0.running_mean"].clone(), sd["mlp.bns.0.running_var"].clone(),
                        sd["mlp.bns.0.weight"], sd["mlp.bns.0.bias"], training=training)
    rows = F.linear(F.relu(rows), sd["mlp.layers.1.weight"], sd["mlp.layers.1.bias"])
    return rows.view(b, n, -1)


def encode_images(img_sd: dict[str, torch.Tensor], images: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """EncoderImageAggr (basic) in eval mode: fc + MLP, GPO, l2norm: (B, N, F) -> (B, E)."""
    feats = F.linear(images, img_sd["fc.weight"], img_sd["fc.bias"]) + mlp_branch(img_sd, images)
    return l2norm(gpo_loop(img_sd, feats, lengths))


def region_features_training(img_sd: dict[str, torch.Tensor], sets: list[torch.Tensor]) -> torch.Tensor:
    """The training-mode region features of sets already cut: zero-padded to the longest (as the official
    collate does), BatchNorm on batch statistics of every row, padding included: (B, n_max, E)."""
    n = max(len(s) for s in sets)
    padded = torch.zeros(len(sets), n, sets[0].shape[1])
    for i, s in enumerate(sets):
        padded[i, : len(s)] = s
    return F.linear(padded, img_sd["fc.weight"], img_sd["fc.bias"]) + mlp_branch(img_sd, padded, training=True)


def encode_texts_bigru(txt_sd: dict[str, torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor, *, word_dim: int,
                       embed: int, layers: int = 1) -> torch.Tensor:
    """bigru branch EncoderText: embed, bi-GRU over each caption alone, halves averaged, GPO, l2norm."""
    rnn = _gru(txt_sd, "rnn.", word_dim, embed, layers)
    rows = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(lengths[i])
            out, _ = rnn(F.embedding(ids[i : i + 1, :n], txt_sd["embed.weight"]))
            rows.append((out[0, :, :embed] + out[0, :, embed:]) / 2)
    width = int(lengths.max())
    words = torch.stack([torch.cat([r, torch.zeros(width - len(r), embed)]) for r in rows])
    return l2norm(gpo_loop(txt_sd, words, lengths))


def encode_texts_bert(txt_sd: dict[str, torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor, config) -> torch.Tensor:
    """master branch EncoderText: BertModel (with its pooler, unused) on each caption alone, Linear, GPO, l2norm."""
    from transformers import BertModel

    bert = BertModel(config, add_pooling_layer=True).eval()
    bert.load_state_dict({k[len("bert."):]: v for k, v in txt_sd.items()
                          if k.startswith("bert.") and not k.endswith("position_ids")})  # a buffer in old transformers
    rows = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(lengths[i])
            hidden = bert(ids[i : i + 1, :n], torch.ones(1, n, dtype=torch.long))[0][0]  # (n, H)
            rows.append(F.linear(hidden, txt_sd["linear.weight"], txt_sd["linear.bias"]))
    width, embed = int(lengths.max()), txt_sd["linear.weight"].shape[0]
    words = torch.stack([torch.cat([r, torch.zeros(width - len(r), embed)]) for r in rows])
    return l2norm(gpo_loop(txt_sd, words, lengths))


def scores(img_embs: torch.Tensor, cap_embs: torch.Tensor) -> torch.Tensor:
    """compute_sim: the dot product of the l2-normalised embeddings, (n_image, n_caption)."""
    return img_embs @ cap_embs.T
