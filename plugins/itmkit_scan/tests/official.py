"""A slow reference of SCAN's official forward pass, written from kuanghuei/SCAN's algorithm for the tests.

Deliberately the official shape of the computation: one caption at a time, sliced to its length,
repeated over the images, attention by batched matmuls, cosine with max(||a|| ||b||, 1e-8),
then the aggregation over the query fragments. Nothing here is shared with the code under test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def l2norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def l1norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + 1e-8)


def func_attention(query: torch.Tensor, context: torch.Tensor, raw_norm: str, smooth: float) -> torch.Tensor:
    """query (B, Lq, d) attends over context (B, Lc, d): the attended context (B, Lq, d)."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (B, Lc, Lq)
    if raw_norm == "softmax":
        attn = torch.softmax(attn, dim=2)  # over the query axis (the official implicit dim=1 of a 2-D view)
    elif raw_norm.startswith("clipped"):
        attn = F.leaky_relu(attn, 0.1)
    if raw_norm.endswith("l2norm"):
        attn = l2norm(attn, 2)
    elif raw_norm.endswith("l1norm"):  # the official l1norm_d is undefined; l1 over the same axis
        attn = l1norm(attn, 2)
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)  # (B, Lq, Lc), over the context
    return torch.bmm(attn, context)


def cosine(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return (x1 * x2).sum(2) / (x1.norm(dim=2) * x2.norm(dim=2)).clamp(min=1e-8)


def aggregate(rows: torch.Tensor, agg: str, lambda_lse: float = 6.0) -> torch.Tensor:
    """(n_image, n_query) relevances -> (n_image, 1), as xattn_score_* does it."""
    if agg == "LogSumExp":
        return torch.log(torch.exp(rows * lambda_lse).sum(dim=1, keepdim=True)) / lambda_lse
    if agg == "Max":
        return rows.max(dim=1, keepdim=True)[0]
    if agg == "Sum":
        return rows.sum(dim=1, keepdim=True)
    if agg == "Mean":
        return rows.mean(dim=1, keepdim=True)
    raise ValueError(agg)


def xattn_scores(images, captions, cap_lens, *, cross_attn, agg_func, lambda_softmax, lambda_lse=6.0,
                 raw_norm="clipped_l2norm", image_lens=None) -> torch.Tensor:
    """(n_image, n_caption) scores: the official per-caption loop (xattn_score_t2i / _i2t).

    ``image_lens`` (not in the official code, whose images all have 36 regions) additionally
    slices each image to its valid regions, one image at a time.
    """
    columns = []
    for i in range(captions.shape[0]):
        cap = captions[i, : int(cap_lens[i])].unsqueeze(0)
        if image_lens is None:
            rows = _rows(images, cap.repeat(images.shape[0], 1, 1), cross_attn, raw_norm, lambda_softmax)
            columns.append(aggregate(rows, agg_func, lambda_lse))
        else:
            per_image = []
            for j in range(images.shape[0]):
                img = images[j : j + 1, : int(image_lens[j])]
                per_image.append(aggregate(_rows(img, cap, cross_attn, raw_norm, lambda_softmax), agg_func, lambda_lse))
            columns.append(torch.cat(per_image, 0))
    return torch.cat(columns, 1)


def _rows(images, caps, cross_attn, raw_norm, smooth):
    if cross_attn == "t2i":
        return cosine(caps, func_attention(caps, images, raw_norm, smooth))  # (n_image, n_word)
    return cosine(images, func_attention(images, caps, raw_norm, smooth))  # (n_image, n_region)


def encode_images(img_sd, images, *, no_imgnorm=False, weight_norm=False):
    """EncoderImagePrecomp / EncoderImageWeightNormPrecomp: fc, then l2norm unless no_imgnorm."""
    if weight_norm:
        v, g = img_sd["fc.weight_v"], img_sd["fc.weight_g"]
        weight = v * (g / v.norm())  # weight_norm(dim=None): one gain for the whole matrix
    else:
        weight = img_sd["fc.weight"]
    feats = images @ weight.T + img_sd["fc.bias"]
    return feats if no_imgnorm else l2norm(feats, -1)


def encode_texts(txt_sd, ids, lengths, *, word_dim, embed_size, num_layers, bi_gru, no_txtnorm=False):
    """EncoderText: embed -> GRU over the packed (length-sorted) batch -> average halves -> l2norm."""
    rnn = torch.nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
    rnn.load_state_dict({k[len("rnn."):]: v for k, v in txt_sd.items() if k.startswith("rnn.")})
    order = torch.argsort(lengths, descending=True, stable=True)  # the official collate sorts by length
    words = F.embedding(ids[order], txt_sd["embed.weight"])
    packed = pack_padded_sequence(words, lengths[order].tolist(), batch_first=True)
    with torch.no_grad():
        out, _ = rnn(packed)
    emb, _ = pad_packed_sequence(out, batch_first=True)
    if bi_gru:
        half = emb.shape[2] // 2
        emb = (emb[:, :, :half] + emb[:, :, half:]) / 2
    if not no_txtnorm:
        emb = l2norm(emb, -1)
    unsorted = torch.empty_like(emb)
    unsorted[order] = emb
    return unsorted
