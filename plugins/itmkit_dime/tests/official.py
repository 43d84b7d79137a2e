"""A slow, literal reference of the official DIME code (github.com/LgQu/DIME), for the tests and benchmarks.

Written from models/{TextNet,VisNet,Cells,Router,SelfAttention,Refinement,DynamicInteraction,
InteractionModule}.py, model.train_emb and evaluation.calItr: the same per-caption loops, the same
layouts, the same parameter NAMES (so an official state dict loads into these modules as is), but
no BERT (the text net starts from BERT's last hidden states) and no data code. Kept deliberately
close to the original's control flow; only the global ``opt`` is replaced by arguments.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

THRESHOLD, EPS = 0.0001, 1e-8


# ---------------------------------------------------------------------------- encoders


class OfficialTextHead(nn.Module):
    """TextNet.EncoderText after BERT: fc, convs1 (K = 1, 2, 3), mapping."""

    def __init__(self, hidden: int, embed: int):
        super().__init__()
        self.fc = nn.Linear(hidden, embed)
        self.convs1 = nn.ModuleList([nn.Conv2d(1, embed, (k, hidden)) for k in (1, 2, 3)])
        self.mapping = nn.Linear(3 * embed, embed)

    def forward(self, last_layer: torch.Tensor):
        """last_layer (B, 32, H) -> (txt_emb, bert_emb), word_emb as in training mode."""
        bert_emb = F.normalize(last_layer.detach().mean(dim=1), dim=-1)
        x = last_layer.unsqueeze(1)
        x_emb = self.fc(last_layer)
        x1 = F.relu(self.convs1[0](x)).squeeze(3)
        x2 = F.relu(self.convs1[1](F.pad(x, (0, 0, 0, 1)))).squeeze(3)
        x3 = F.relu(self.convs1[2](F.pad(x, (0, 0, 1, 1)))).squeeze(3)
        x = torch.cat([x1, x2, x3], dim=1).transpose(1, 2)
        word_emb = self.mapping(x) + x_emb
        pooled = torch.cat([F.max_pool1d(i, i.size(2)).squeeze(2) for i in (x1, x2, x3)], 1)
        txt_emb = F.normalize(self.mapping(pooled) + x_emb.mean(1), p=2, dim=-1)
        return (txt_emb, bert_emb), F.normalize(word_emb, p=2, dim=-1)


class OfficialImage(nn.Module):
    """VisNet.EncoderImagePrecomp: fc, bn (applied in t2i only)."""

    def __init__(self, img_dim: int, embed: int, direction: str):
        super().__init__()
        self.direction = direction
        self.fc = nn.Linear(img_dim, embed)
        self.bn = nn.BatchNorm1d(embed)

    def forward(self, images):
        rgn_emb = self.fc(images)
        img_emb = torch.mean(rgn_emb, dim=1)
        if self.direction == "t2i":
            img_emb = self.bn(img_emb)
        return F.normalize(img_emb, dim=-1), F.normalize(rgn_emb, dim=-1)


# ------------------------------------------------------------------------------- cells


class Router(nn.Module):
    def __init__(self, num_out_path, embed_size, hid):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_size, hid), nn.ReLU(True), nn.Linear(hid, num_out_path))
        self.mlp[2].bias.data.fill_(1.5)

    def forward(self, x):
        return F.relu(torch.tanh(self.mlp(x.mean(-2))))


class AttentionLayer(nn.Module):
    def __init__(self, embed_size, h):
        super().__init__()
        self.h, self.d_k = h, embed_size // h
        self.linears = nn.ModuleList([copy.deepcopy(nn.Linear(embed_size, embed_size)) for _ in range(3)])

    def forward(self, inp):
        nb = inp.size(0)
        q, k, v = [lin(x).view(nb, -1, self.h, self.d_k).transpose(1, 2) for lin, x in zip(self.linears, (inp, inp, inp))]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        x = torch.matmul(F.softmax(scores, dim=-1), v)
        return x.transpose(1, 2).contiguous().view(nb, -1, self.h * self.d_k)


class FeedForward(nn.Module):
    def __init__(self, embed_size, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(embed_size, hidden), nn.Linear(hidden, embed_size)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, embed_size, hid_size, h):
        super().__init__()
        self.att_layer = AttentionLayer(embed_size, h)
        self.feed_forward_layer = FeedForward(embed_size, hid_size)

    def forward(self, local_emb):
        a = local_emb + self.att_layer(local_emb)
        return a + self.feed_forward_layer(a)


def func_attention(query, context, raw_feature_norm, smooth):
    batch_size, source_l = context.size(0), context.size(1)
    query_l = query.size(1)
    attn = torch.bmm(context, query.transpose(1, 2))  # (n, cL, qL)
    if raw_feature_norm == "softmax":
        attn = F.softmax(attn.view(batch_size * source_l, query_l), dim=-1).view(batch_size, source_l, query_l)
    elif raw_feature_norm == "l2norm":
        attn = attn / (attn.pow(2).sum(dim=2, keepdim=True).sqrt() + 1e-8)
    elif raw_feature_norm == "clipped_l2norm":
        attn = F.normalize(nn.LeakyReLU(0.1)(attn), dim=2)
    elif raw_feature_norm == "clipped":
        attn = nn.LeakyReLU(0.1)(attn)
    attn = attn.transpose(1, 2).contiguous().view(batch_size * query_l, source_l)
    attn = F.softmax(attn * smooth, dim=-1).view(batch_size, query_l, source_l)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2))  # (n, d, qL)
    return weighted.transpose(1, 2)


class Refinement(nn.Module):
    def __init__(self, embed_size, raw_feature_norm, lambda_softmax, direction):
        super().__init__()
        self.raw_feature_norm, self.lambda_softmax, self.direction = raw_feature_norm, lambda_softmax, direction
        self.fc_scale = nn.Linear(embed_size, embed_size)
        self.fc_shift = nn.Linear(embed_size, embed_size)
        self.fc_1 = nn.Linear(embed_size, embed_size)
        self.fc_2 = nn.Linear(embed_size, embed_size)

    def refine(self, query, wei):
        modu = self.fc_2(F.relu(self.fc_1(query * torch.tanh(self.fc_scale(wei)) + self.fc_shift(wei))))
        return modu + query

    def forward(self, rgn, img, wrd, stc, stc_lens):
        out = []
        n_image = rgn.size(0)
        if self.direction == "i2t":
            for i in range(wrd.size(0)):
                query = rgn[:, i] if rgn.dim() == 4 else rgn
                cap = wrd[i, :int(stc_lens[i])].unsqueeze(0).repeat(n_image, 1, 1)
                out.append(self.refine(query, func_attention(query, cap, self.raw_feature_norm,
                                                             self.lambda_softmax)).unsqueeze(1))
        else:
            for i in range(len(stc_lens)):
                cap = wrd[:, i] if wrd.dim() == 4 else wrd[i].unsqueeze(0).repeat(n_image, 1, 1)
                out.append(self.refine(cap, func_attention(cap, rgn, self.raw_feature_norm,
                                                           self.lambda_softmax)).unsqueeze(1))
        return torch.cat(out, dim=1)


class RIC(nn.Module):
    def __init__(self, embed, hid_router, num_out_path):
        super().__init__()
        self.router = Router(num_out_path, embed, hid_router)

    def forward(self, x):
        return F.relu(x), self.router(x)


class IMRC(nn.Module):
    def __init__(self, embed, hid_router, num_out_path, hid_imrc, heads):
        super().__init__()
        self.router = Router(num_out_path, embed, hid_router)
        self.sa = SelfAttention(embed, hid_imrc, heads)

    def forward(self, inp):
        path = self.router(inp)
        if inp.dim() == 4:
            a, b, n, d = inp.size()
            return self.sa(inp.reshape(-1, n, d)).view(a, b, n, -1), path
        return self.sa(inp), path


class CMRC(nn.Module):
    def __init__(self, embed, hid_router, num_out_path, raw_feature_norm, lambda_softmax, direction):
        super().__init__()
        self.direction = direction
        self.refine = Refinement(embed, raw_feature_norm, lambda_softmax, direction)
        self.router = Router(num_out_path, embed, hid_router)

    def forward(self, rgn, img, wrd, stc, stc_lens):
        path = self.router(rgn if self.direction == "i2t" else wrd)
        return self.refine(rgn, img, wrd, stc, stc_lens), path


class GLGC(nn.Module):
    def __init__(self, embed, hid_router, num_out_path, direction):
        super().__init__()
        self.direction = direction
        self.router = Router(num_out_path, embed, hid_router)
        self.fc_1 = nn.Linear(embed, embed)
        self.fc_2 = nn.Linear(embed, embed)

    def regulate(self, l_emb, g_emb):
        x = F.normalize(self.fc_1(l_emb) * g_emb, dim=-2)
        return (1 + x) * l_emb

    def forward(self, rgn, img, wrd, stc, stc_lens):
        out = []
        if self.direction == "i2t":
            path = self.router(rgn)
            n_img, n_rgn = rgn.size(0), rgn.size(-2)
            for i in range(stc.size(0)):
                query = rgn[:, i] if rgn.dim() == 4 else rgn
                out.append(self.regulate(query, stc[i][None, None].expand(n_img, n_rgn, -1)).unsqueeze(1))
        else:
            path = self.router(wrd)
            n_img, n_wrd = rgn.size(0), wrd.size(-2)
            for i in range(stc.size(0)):
                w = wrd[:, i] if wrd.dim() == 4 else wrd[i].unsqueeze(0).expand(n_img, -1, -1)
                out.append(self.regulate(w, img.unsqueeze(1).expand(-1, n_wrd, -1)).unsqueeze(1))
        return torch.cat(out, dim=1), path


# ------------------------------------------------------------------------------ layers


class Layer(nn.Module):
    """DynamicInteraction_Layer0 (first=True) and DynamicInteraction_Layer, both directions."""

    def __init__(self, embed, num_out_path, direction, first, *, hid_router, hid_imrc, heads, raw_feature_norm,
                 lambda_softmax):
        super().__init__()
        self.direction, self.first, self.num_out_path = direction, first, num_out_path
        self.ric = RIC(embed, hid_router, num_out_path)
        self.glgc = GLGC(embed, hid_router, num_out_path, direction)
        self.imrc = IMRC(embed, hid_router, num_out_path, hid_imrc, heads)
        self.cmrc = CMRC(embed, hid_router, num_out_path, raw_feature_norm, lambda_softmax, direction)

    def cells(self, ref, rgn, img, wrd, stc, lens):
        if self.first:
            x = rgn if self.direction == "i2t" else wrd
            return [self.ric(x), self.glgc(rgn, img, wrd, stc, lens), self.imrc(x), self.cmrc(rgn, img, wrd, stc, lens)]
        if self.direction == "i2t":
            return [self.ric(ref[0]), self.glgc(ref[1], img, wrd, stc, lens), self.imrc(ref[2]),
                    self.cmrc(ref[3], img, wrd, stc, lens)]
        return [self.ric(ref[0]), self.glgc(rgn, img, ref[1], stc, lens), self.imrc(ref[2]),
                self.cmrc(rgn, img, ref[3], stc, lens)]

    def forward(self, ref, rgn, img, wrd, stc, lens):
        res_cells = self.cells(ref, rgn, img, wrd, stc, lens)
        emb = [e for e, _ in res_cells]
        path_prob = [p for _, p in res_cells]
        if self.first:
            gate = (sum(path_prob) < THRESHOLD).float()
            allp = torch.stack(path_prob, dim=2)
            allp = allp / (allp.sum(dim=-1, keepdim=True) + EPS)
            probs = [allp[:, :, i] for i in range(allp.size(2))]
            out = []
            for i in range(self.num_out_path):
                res = 0
                for j in range(4):
                    e = emb[j]
                    if self.direction == "i2t":
                        cur = probs[j][:, i][:, None, None, None]
                        e = e.unsqueeze(1) if e.dim() == 3 else e
                    else:
                        cur = probs[j][:, i][:, None, None].unsqueeze(0)
                        e = e.unsqueeze(0) if e.dim() == 3 else e
                    res = res + cur * e
                skip = gate[:, i][:, None, None] * emb[0]
                res = res + (skip.unsqueeze(1) if self.direction == "i2t" else skip.unsqueeze(0))
                out.append(res)
            return out, allp
        if self.num_out_path == 1:
            res, gates = 0, []
            for j in range(4):
                g = (path_prob[j] < THRESHOLD / 4).float()
                gates.append(g)
                res = res + path_prob[j].unsqueeze(-1) * emb[j] + g.unsqueeze(-1) * ref[j]
            res = res / (sum(gates) + sum(path_prob)).unsqueeze(-1)
            return [res], torch.stack(path_prob, dim=3)
        gate = (sum(path_prob) < THRESHOLD).float()
        allp = torch.stack(path_prob, dim=3)
        allp = allp / (allp.sum(dim=-1, keepdim=True) + EPS)
        probs = [allp[:, :, :, i] for i in range(allp.size(3))]
        out = []
        for i in range(self.num_out_path):
            res = 0
            for j in range(4):
                res = res + probs[j][:, :, i][..., None, None] * emb[j]
            out.append(res + gate[:, :, i][..., None, None] * emb[0])
        return out, allp


class OfficialInteraction(nn.Module):
    """InteractionModule: dynamic_itr_l0..l2, path_mapping, bn; forward as in training (score, sim_paths)."""

    def __init__(self, embed, direction, *, hid_router=512, hid_imrc=512, heads=16, raw_feature_norm="clipped_l2norm",
                 lambda_softmax=4.0, path_hid=128):
        super().__init__()
        self.direction = direction
        kw = dict(hid_router=hid_router, hid_imrc=hid_imrc, heads=heads, raw_feature_norm=raw_feature_norm,
                  lambda_softmax=lambda_softmax)
        self.dynamic_itr_l0 = Layer(embed, 4, direction, True, **kw)
        self.dynamic_itr_l1 = Layer(embed, 4, direction, False, **kw)
        self.dynamic_itr_l2 = Layer(embed, 1, direction, False, **kw)
        self.path_mapping = nn.Linear(36, path_hid)
        self.bn = nn.BatchNorm1d(embed)

    def refined(self, rgn, img, wrd, stc, lens):
        ref, p0 = self.dynamic_itr_l0(None, rgn, img, wrd, stc, lens)
        ref, p1 = self.dynamic_itr_l1(ref, rgn, img, wrd, stc, lens)
        ref, p2 = self.dynamic_itr_l2(ref, rgn, img, wrd, stc, lens)
        return ref[0], (p0, p1, p2)

    def forward(self, rgn, img, wrd, stc, lens):
        ref, (p0, p1, p2) = self.refined(rgn, img, wrd, stc, lens)
        n_img, n_stc, n, d = ref.size()
        ref = self.bn(ref.reshape(n_img * n_stc * n, d)).view(n_img, n_stc, n, d)
        ref = F.normalize(ref.mean(2) + ref.max(2)[0], dim=-1)
        score = (stc.unsqueeze(0) * ref).sum(-1) if self.direction == "i2t" else (img.unsqueeze(1) * ref).sum(-1)
        if self.direction == "i2t":
            paths = torch.cat([p0.reshape(n_img, -1).unsqueeze(1).expand(-1, n_stc, -1), p1.reshape(n_img, n_stc, -1),
                               p2.reshape(n_img, n_stc, -1)], dim=-1).mean(dim=1)
        else:
            paths = torch.cat([p0.reshape(n_stc, -1).unsqueeze(0).expand(n_img, -1, -1), p1.reshape(n_img, n_stc, -1),
                               p2.reshape(n_img, n_stc, -1)], dim=-1).mean(dim=0)
        paths = F.normalize(self.path_mapping(paths), dim=-1)
        return score, paths.matmul(paths.t())


def train_loss_terms(itr: OfficialInteraction, rgn, img, wrd, stc, lens, bert_emb, batch_size, trade_off=0.5):
    """model.train_emb's forward part: (scores, trade_off x path loss)."""
    if img.size(0) < stc.size(0):
        bert_emb = bert_emb[:img.size(0)]
    score, sim_paths = itr(rgn, img, wrd, stc, lens)
    label = bert_emb.matmul(bert_emb.t())
    return score, trade_off * ((sim_paths - label) ** 2).sum() / batch_size


def cal_itr(itr: OfficialInteraction, rgn, img, wrd, stc, lens, shard_size=64) -> np.ndarray:
    """evaluation.calItr: the (n_img, n_stc) scores in shards of shard_size x shard_size, no grad."""
    n_img, n_stc = len(rgn), len(wrd)
    d = np.zeros((n_img, n_stc))
    for i in range((n_img - 1) // shard_size + 1):
        a, b = shard_size * i, min(shard_size * (i + 1), n_img)
        for j in range((n_stc - 1) // shard_size + 1):
            c, e = shard_size * j, min(shard_size * (j + 1), n_stc)
            with torch.no_grad():
                sim, _ = itr(rgn[a:b], img[a:b], wrd[c:e], stc[c:e], lens[c:e])
            d[a:b, c:e] = sim.double().cpu().numpy()
    return d
