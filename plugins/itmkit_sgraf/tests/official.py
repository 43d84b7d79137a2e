"""A slow reference of SGRAF's official forward pass, written from Paranioar/SGRAF's algorithm for the tests.

Deliberately the official shape of the computation: plain functions over state dicts with the
official key names, the global image vectors of the whole shard at once, then one caption at a
time, sliced to its length and repeated over the images (``EncoderSimilarity.forward``), with
the attention, the similarity vectors, SGR or SAF and the sigmoid readout on that caption's
(n_image, L + 1, S) graph. Nothing here is shared with the code under test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

BN_EPS, BN_MOMENTUM = 1e-5, 0.1


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def l1norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + 1e-8)


def linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def batch_norm(sd: dict, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
    """nn.BatchNorm1d on (N, C) or (N, C, L): channel axis 1; in training the running stats in ``sd`` move."""
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=training, momentum=BN_MOMENTUM, eps=BN_EPS)


def sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------- encoders


def encode_images(img_sd: dict, images: torch.Tensor, *, no_imgnorm: bool = False) -> torch.Tensor:
    """EncoderImage: fc, then l2norm unless no_imgnorm."""
    feats = linear(img_sd, "fc", images)
    return feats if no_imgnorm else l2norm(feats)


def encode_texts(txt_sd: dict, ids, lengths, *, word_dim, embed_size, num_layers, bi_gru, no_txtnorm=False):
    """EncoderText, eval mode: embed -> GRU over the length-sorted packed batch -> mean of halves -> l2norm."""
    rnn = torch.nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
    rnn = rnn.to(txt_sd["embed.weight"].dtype)
    rnn.load_state_dict(sub(txt_sd, "cap_rnn."))
    order = torch.argsort(lengths, descending=True, stable=True)  # the official collate sorts by length
    words = F.embedding(ids[order], txt_sd["embed.weight"])
    with torch.no_grad():
        out, _ = rnn(pack_padded_sequence(words, lengths[order].tolist(), batch_first=True))
    emb, _ = pad_packed_sequence(out, batch_first=True)
    if bi_gru:
        half = emb.shape[2] // 2
        emb = (emb[:, :, :half] + emb[:, :, half:]) / 2
    if not no_txtnorm:
        emb = l2norm(emb)
    unsorted = torch.empty_like(emb)
    unsorted[order] = emb
    return unsorted


# ------------------------------------------------------------------------ global vectors


def visual_sa(sd: dict, local: torch.Tensor, training: bool = False) -> torch.Tensor:
    """VisualSA(local, mean of local): BatchNorm1d(36) over the region axis of (B, 36, D)."""
    raw_global = local.mean(dim=1)
    l_emb = torch.tanh(batch_norm(sd, "embedding_local.1", linear(sd, "embedding_local.0", local), training))
    g_emb = torch.tanh(batch_norm(sd, "embedding_global.1", linear(sd, "embedding_global.0", raw_global), training))
    g_emb = g_emb.unsqueeze(1).repeat(1, l_emb.shape[1], 1)
    weights = torch.softmax(linear(sd, "embedding_common.0", l_emb * g_emb).squeeze(2), dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(dim=1))


def text_sa(sd: dict, local: torch.Tensor) -> torch.Tensor:
    """TextSA(local, mean of local) for one sliced caption (1, L, D): no BatchNorm."""
    raw_global = local.mean(dim=1)
    l_emb = torch.tanh(linear(sd, "embedding_local.0", local))
    g_emb = torch.tanh(linear(sd, "embedding_global.0", raw_global)).unsqueeze(1).repeat(1, l_emb.shape[1], 1)
    weights = torch.softmax(linear(sd, "embedding_common.0", l_emb * g_emb).squeeze(2), dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(dim=1))


# ------------------------------------------------------------------------------ alignment


def scan_attention(query: torch.Tensor, context: torch.Tensor, smooth: float) -> torch.Tensor:
    """query (n, Lq, d) over context (n, Lc, d): LeakyReLU, l2norm over queries, softmax over context, l2norm."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (n, Lc, Lq)
    attn = l2norm(F.leaky_relu(attn, 0.1), 2)
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)  # (n, Lq, Lc)
    return l2norm(torch.bmm(attn, context))


def graph_step(sd: dict, k: int, sim_emb: torch.Tensor) -> torch.Tensor:
    """GraphReasoning k on (n, L+1, S)."""
    query = linear(sd, f"SGR_module.{k}.graph_query_w", sim_emb)
    key = linear(sd, f"SGR_module.{k}.graph_key_w", sim_emb)
    edge = torch.softmax(torch.bmm(query, key.permute(0, 2, 1)), dim=-1)
    return torch.relu(linear(sd, f"SGR_module.{k}.sim_graph_w", torch.bmm(edge, sim_emb)))


def attention_filtration(sd: dict, sim_emb: torch.Tensor, training: bool = False) -> torch.Tensor:
    """AttentionFiltration on (n, L+1, S): BatchNorm1d(1) on the (n, 1, L+1) logits."""
    logits = linear(sd, "SAF_module.attn_sim_w", sim_emb).permute(0, 2, 1)
    attn = l1norm(torch.sigmoid(batch_norm(sd, "SAF_module.bn", logits, training)), dim=-1)
    return l2norm(torch.matmul(attn, sim_emb).squeeze(1))


def similarity_graph(sd: dict, img_emb, img_glo, cap_i, cap_glo_i, smooth: float = 9.0) -> torch.Tensor:
    """[s_glo; s_loc] (n_image, L+1, S) for one caption cap_i (1, L, D) against every image."""
    cap_i_expand = cap_i.repeat(img_emb.shape[0], 1, 1)
    context = scan_attention(cap_i_expand, img_emb, smooth)
    sim_loc = l2norm(linear(sd, "sim_tranloc_w", (context - cap_i_expand).pow(2)))
    sim_glo = l2norm(linear(sd, "sim_tranglo_w", (img_glo - cap_glo_i).pow(2)))
    return torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)


def forward_sim(sd: dict, img_emb, cap_emb, cap_lens, *, module_name: str, sgr_step: int = 3,
                training: bool = False, smooth: float = 9.0, image_lens=None) -> torch.Tensor:
    """EncoderSimilarity.forward: (n_image, n_caption) scores, one caption at a time.

    ``image_lens`` (not in the official code, whose images all have 36 regions) slices each
    image to its valid regions for the attention and the global vector, one image at a time;
    the BatchNorm of VisualSA then runs on the valid slots only (eval mode only).
    """
    if image_lens is None:
        img_glo = visual_sa(sub(sd, "v_global_w."), img_emb, training)
    else:
        img_glo = torch.cat([visual_sa_sliced(sub(sd, "v_global_w."), img_emb[j : j + 1, : int(image_lens[j])])
                             for j in range(img_emb.shape[0])])
    columns = []
    for i in range(cap_emb.shape[0]):
        cap_i = cap_emb[i, : int(cap_lens[i])].unsqueeze(0)
        cap_glo_i = text_sa(sub(sd, "t_global_w."), cap_i)
        if image_lens is None:
            graphs = similarity_graph(sd, img_emb, img_glo, cap_i, cap_glo_i, smooth)
            columns.append(readout(sd, graphs, module_name, sgr_step, training))
        else:
            per_image = [readout(sd, similarity_graph(sd, img_emb[j : j + 1, : int(image_lens[j])], img_glo[j : j + 1],
                                                      cap_i, cap_glo_i, smooth), module_name, sgr_step, training)
                         for j in range(img_emb.shape[0])]
            columns.append(torch.cat(per_image, 0))
    return torch.cat(columns, 1)


def visual_sa_sliced(sd: dict, local: torch.Tensor) -> torch.Tensor:
    """VisualSA in eval mode on one image (1, n, D) with only its first n region slots (n <= 36)."""
    n = local.shape[1]
    sliced = dict(sd)
    for stat in ("weight", "bias", "running_mean", "running_var"):
        sliced[f"embedding_local.1.{stat}"] = sd[f"embedding_local.1.{stat}"][:n]
    return visual_sa(sliced, local, training=False)


def readout(sd: dict, sim_emb: torch.Tensor, module_name: str, sgr_step: int, training: bool) -> torch.Tensor:
    """SGR (node 0 after the steps) or SAF, then sigmoid(sim_eval_w): (n_image, 1)."""
    if module_name == "SGR":
        for k in range(sgr_step):
            sim_emb = graph_step(sd, k, sim_emb)
        vec = sim_emb[:, 0, :]
    else:
        vec = attention_filtration(sd, sim_emb, training)
    return torch.sigmoid(linear(sd, "sim_eval_w", vec))
