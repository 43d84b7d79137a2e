"""Convert an official SGRAF checkpoint (Paranioar/SGRAF ``model_best.pth.tar``) into an itmkit model.

The official file is ``{'epoch', 'model': [img_enc, txt_enc, sim_enc], 'best_rsum', 'opt', 'Eiters'}``
(``itmkit.importing.read_official`` unpickles it with an allow-list). The options become a recipe
(encoders, self-attention pools, one SGR or SAF branch, loss, schedule) and the three state dicts
are checked key by key against the layout those options imply before they are renamed:

    img_enc  fc.{weight [E, img_dim], bias}                      -> image.encoder.fc.*
    txt_enc  embed.weight [V, word_dim]                          -> text.encoder.embed.weight
             cap_rnn.{weight,bias}_{ih,hh}_l{k}[_reverse]        -> text.encoder.rnn.*
    sim_enc  v_global_w.embedding_{local,global,common}.*        -> image.pool.*   (VisualSA, BN over 36 regions)
             t_global_w.embedding_{local,global,common}.*        -> text.pool.*    (TextSA)
             sim_tranloc_w.* / sim_tranglo_w.*                   -> branches.0.stages.1.{local_w,global_w}.*
             SGR_module.{k}.{graph_query_w,graph_key_w,sim_graph_w}.*
                                                 -> branches.0.stages.2.steps.{k}.{query_w,key_w,update_w}.*
             SAF_module.{attn_sim_w,bn}.*                        -> branches.0.stages.2.{attn_w,bn}.*
             sim_eval_w.*                                        -> branches.0.stages.2.readout.*

BatchNorm layers saved by PyTorch < 0.4.1 have no ``num_batches_tracked``; it is then set to 0
(it only matters to a BatchNorm whose momentum is None, and SGRAF's is 0.1). Nothing is dropped:
an unexpected key, a missing key or a wrong shape is a CheckpointError.
"""

from __future__ import annotations

from typing import Any

import tomli_w
import torch

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.importing import (Converted, OfficialCheckpoint, check_state, check_vocabulary_size, gru_text_layout,
                              option, training_options)

MODULES = {"SGR": "sgraf.sgr", "SAF": "sgraf.saf"}
# data_name -> (evaluation protocol, test split) of the official evaluation
PROTOCOLS = {"f30k_precomp": ("f30k-1k", "test"), "coco_precomp": ("coco-1k-5fold", "testall")}
# Training-only options: when a checkpoint lacks one, opts.py's default is used.
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": True, "learning_rate": 2e-4, "num_epochs": 40,
                  "lr_update": 30, "batch_size": 128, "grad_clip": 2.0}
# Fixed in the official model.py rather than options: SCAN_attention(smooth=9.0), Dropout(0.4)
# in the text encoder and in VisualSA / TextSA.
LAMBDA_SOFTMAX = 9.0
DROPOUT = 0.4
BRANCH = "branches.0.stages"  # cross = .0 (no weights), similarity = .1, aggregate = .2

# official sim_enc prefix -> ours (SGR steps are renamed key by key below)
SIM_PREFIXES = {
    "v_global_w.": "image.pool.",
    "t_global_w.": "text.pool.",
    "sim_tranloc_w.": f"{BRANCH}.1.local_w.",
    "sim_tranglo_w.": f"{BRANCH}.1.global_w.",
    "sim_eval_w.": f"{BRANCH}.2.readout.",
    "SAF_module.attn_sim_w.": f"{BRANCH}.2.attn_w.",
    "SAF_module.bn.": f"{BRANCH}.2.bn.",
}
SGR_LAYERS = {"graph_query_w": "query_w", "graph_key_w": "key_w", "sim_graph_w": "update_w"}


def _linear(prefix: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def _batch_norm(prefix: str, channels: int, tracked: bool) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")}
    if tracked:
        out[f"{prefix}.num_batches_tracked"] = ()
    return out


def similarity_layout(embed: int, sim_dim: int, regions: int, module: str, steps: int,
                      tracked: bool) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official EncoderSimilarity's state dict (``tracked``: PyTorch >= 0.4.1 BN)."""
    out = {
        **_linear("v_global_w.embedding_local.0", embed, embed),
        **_batch_norm("v_global_w.embedding_local.1", regions, tracked),
        **_linear("v_global_w.embedding_global.0", embed, embed),
        **_batch_norm("v_global_w.embedding_global.1", embed, tracked),
        **_linear("v_global_w.embedding_common.0", 1, embed),
        **_linear("t_global_w.embedding_local.0", embed, embed),
        **_linear("t_global_w.embedding_global.0", embed, embed),
        **_linear("t_global_w.embedding_common.0", 1, embed),
        **_linear("sim_tranloc_w", sim_dim, embed),
        **_linear("sim_tranglo_w", sim_dim, embed),
        **_linear("sim_eval_w", 1, sim_dim),
    }
    if module == "SGR":
        for k in range(steps):
            for layer in SGR_LAYERS:
                out.update(_linear(f"SGR_module.{k}.{layer}", sim_dim, sim_dim))
    else:
        out.update(_linear("SAF_module.attn_sim_w", 1, sim_dim))
        out.update(_batch_norm("SAF_module.bn", 1, tracked))
    return out


def rename_similarity(key: str) -> str:
    """The itmkit name of an official sim_enc key."""
    if key.startswith("SGR_module."):
        _, step, layer, rest = key.split(".", 3)
        return f"{BRANCH}.2.steps.{step}.{SGR_LAYERS[layer]}.{rest}"
    prefix = next(p for p in SIM_PREFIXES if key.startswith(p))
    return SIM_PREFIXES[prefix] + key[len(prefix):]


def _modules(official: OfficialCheckpoint) -> tuple[dict[str, torch.Tensor], ...]:
    if len(official.modules) != 3:
        raise CheckpointError(f"{official.path}: an SGRAF checkpoint's 'model' holds 3 state dicts"
                              f" [img_enc, txt_enc, sim_enc], this one holds {len(official.modules)}")
    return tuple(dict(m) for m in official.modules)


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """Map SGRAF's options to a recipe and its img_enc / txt_enc / sim_enc weights to our stages."""
    where = f"{official.path} (SGRAF options)"
    opts = official.options
    module = option(opts, "module_name", where, str)
    if module not in MODULES:
        raise CheckpointError(f"{where}: option module_name={module!r} is not supported"
                              + did_you_mean(str(module), MODULES))
    steps = option(opts, "sgr_step", where, int) if module == "SGR" else 0
    embed, word_dim, img_dim, sim_dim, layers = (
        option(opts, k, where, int) for k in ("embed_size", "word_dim", "img_dim", "sim_dim", "num_layers"))
    bidirectional, no_imgnorm, no_txtnorm = (option(opts, k, where, bool)
                                             for k in ("bi_gru", "no_imgnorm", "no_txtnorm"))
    data_name = option(opts, "data_name", where, str, "precomp")

    img, txt, sim = _modules(official)
    check_vocabulary_size(official, txt, len(vocab), f"JSON the model was trained with"
                          f" (vocab/{data_name}_vocab.json: F30K 8481 words, COCO 11353)")
    # VisualSA's BatchNorm1d(36) is hard-coded officially; read the region count from its weight.
    region_bn = sim.get("v_global_w.embedding_local.1.weight")
    regions = int(region_bn.shape[0]) if region_bn is not None and region_bn.dim() == 1 else 36
    tracked = any(k.endswith("num_batches_tracked") for k in sim)

    check_state(img, _linear("fc", embed, img_dim), f"{official.path}: model[0] (img_enc)")
    text_layout = {k.replace("rnn.", "cap_rnn.", 1): v
                   for k, v in gru_text_layout(len(vocab), word_dim, embed, layers, bidirectional).items()}
    check_state(txt, text_layout, f"{official.path}: model[1] (txt_enc)")
    check_state(sim, similarity_layout(embed, sim_dim, regions, module, steps, tracked),
                f"{official.path}: model[2] (sim_enc, {module})")

    state = {f"image.encoder.{k}": v for k, v in img.items()}
    state.update({f"text.encoder.{k.replace('cap_rnn.', 'rnn.', 1)}": v for k, v in txt.items()})
    state.update({rename_similarity(k): v for k, v in sim.items()})
    state = {k: v.detach().contiguous() if k.endswith("num_batches_tracked") else v.detach().float().contiguous()
             for k, v in state.items()}
    if not tracked:  # PyTorch < 0.4.1: our BatchNorm layers still carry the counter
        for key in [k for k in state if k.endswith(".running_var")]:
            state[key.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    aggregate: dict[str, Any] = {"stage": MODULES[module]}
    if module == "SGR":
        aggregate["steps"] = steps
    protocol, test_split = PROTOCOLS.get(data_name, ("f30k-1k", "test"))
    training = training_options(opts, TRAIN_DEFAULTS, where)
    recipe = {
        "recipe": {
            "name": f"sgraf-{data_name.removesuffix('_precomp')}-{module.lower()}-imported",
            "description": f"official SGRAF {module} checkpoint {official.path} (epoch {official.epoch},"
                           f" best dev rsum {official.best_rsum}), converted by itmkit import sgraf",
            "embed_dim": embed,
        },
        "image": {"encoder": {"stage": "core.precomp", "normalize": not no_imgnorm},
                  "pool": {"stage": "sgraf.visual_sa", "num_regions": regions, "dropout": DROPOUT}},
        "text": {"encoder": {"stage": "core.bigru", "word_dim": word_dim, "num_layers": layers,
                             "bidirectional": bidirectional, "normalize": not no_txtnorm, "embed_dropout": DROPOUT},
                 "pool": {"stage": "sgraf.text_sa", "dropout": DROPOUT}},
        "match": [{
            "cross": {"stage": "sgraf.t2i", "lambda_softmax": LAMBDA_SOFTMAX},
            "similarity": {"stage": "sgraf.vector", "sim_dim": sim_dim, "normalize_attended": True},
            "aggregate": aggregate,
        }],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{data_name}", "protocol": protocol, "test_split": test_split},
        "train": training.train,
    }
    data = DataPorts(feature_dim=img_dim, vocab_size=len(vocab), num_regions=regions)
    return Converted(tomli_w.dumps(recipe), state, data, training.notes)
