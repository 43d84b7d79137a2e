"""Convert an official VSRN checkpoint (KunpengLi1994/VSRN ``model_best.pth.tar``) into an itmkit model.

The file is ``{'epoch', 'model': [img_enc, txt_enc], 'best_rsum', 'opt', 'Eiters'}`` (train.py's
save_checkpoint), read by ``itmkit.importing.read_official`` (Python 2 pickles included). The
caption decoder is not saved by the official code, so the imported recipe has no
``vsrn.caption`` objective: the model scores exactly as the official one, and training it on
would be matching only unless the objective is added (with a new decoder).

    img_enc  fc.weight [E, F], fc.bias [E]                        -> image.encoder.fc.*     (core.precomp)
             Rs_GCN_k.{g,theta,phi,W.0}.weight [E, E, 1], .bias  -> image.reasoners.*      (vsrn.rsgcn; the
             Rs_GCN_k.W.1.* [E] (BatchNorm)                           kernel axis squeezed)
             img_rnn.* (GRU E -> E)                               -> image.pool.rnn.*       (vsrn.gru)
             bn.* [E] (f30k_precomp only)                         -> image.pool.bn.*
    txt_enc  embed.weight [V, word_dim], rnn.* (uni-GRU)          -> text.encoder.*         (core.bigru,
                                                                                             bidirectional=false)

The official image forward has two branches, chosen by ``opt.data_name``: ``f30k_precomp`` (no
norm after fc; BatchNorm ``bn`` on the GRU's final state) and every other dataset (the region-axis
l2norm after fc; no ``bn``). The branch is read from the options and must agree with the weights
(``bn.*`` present exactly on F30K); a checkpoint without ``data_name`` is placed by its weights.
"""

from __future__ import annotations

from typing import Any

import tomli_w
import torch

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import (Converted, OfficialCheckpoint, check_state, check_vocabulary_size, gru_text_layout,
                              option, training_options)

F30K = "f30k_precomp"
GCN_BLOCKS = 4
# train.py's defaults, for options only training reads
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": False, "learning_rate": 2e-4, "num_epochs": 30, "lr_update": 15,
                  "batch_size": 128, "grad_clip": 2.0}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def batchnorm_layout(prefix: str, size: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{k}": (() if k == "num_batches_tracked" else (size,)) for k in BN_KEYS}


def image_layout(embed: int, img_dim: int, f30k: bool) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official EncoderImagePrecompAttn for one branch."""
    e = embed
    out: dict[str, tuple[int, ...]] = {"fc.weight": (e, img_dim), "fc.bias": (e,)}
    for k in range(1, GCN_BLOCKS + 1):
        for conv in ("g", "theta", "phi", "W.0"):
            out[f"Rs_GCN_{k}.{conv}.weight"] = (e, e, 1)
            out[f"Rs_GCN_{k}.{conv}.bias"] = (e,)
        out.update(batchnorm_layout(f"Rs_GCN_{k}.W.1.", e))
    out.update({"img_rnn.weight_ih_l0": (3 * e, e), "img_rnn.weight_hh_l0": (3 * e, e),
                "img_rnn.bias_ih_l0": (3 * e,), "img_rnn.bias_hh_l0": (3 * e,)})
    if f30k:
        out.update(batchnorm_layout("bn.", e))
    return out


def _with_batch_counts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PyTorch 0.4.0 saved BatchNorm without num_batches_tracked (0.4.1 added it): count 0 where it is absent."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".running_mean")]:
        out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
    return out


def _branch(official: OfficialCheckpoint, img: dict[str, torch.Tensor], where: str) -> tuple[bool, str]:
    """(F30K branch?, data_name) from the options, checked against the weights' bn.* keys."""
    has_bn = any(k.startswith("bn.") for k in img)
    data_name = option(official.options, "data_name", where, str, None)
    if data_name is None:
        return has_bn, F30K if has_bn else "coco_precomp"
    if not data_name.endswith("_precomp"):
        raise CheckpointError(f"{where}: data_name={data_name!r} is a full-image model (a CNN on raw pixels), which"
                              " itmkit has no stage for; only the precomp models import (data_name ending in _precomp)")
    f30k = data_name == F30K
    if f30k != has_bn:
        raise CheckpointError(
            f"{official.path}: data_name={data_name!r} says the "
            + ("F30K branch, whose image encoder ends in a BatchNorm (bn.*), but model[0] has no bn.* keys"
               if f30k else "COCO branch (every dataset but f30k_precomp), which has no final BatchNorm, but model[0]"
                            " has bn.* keys")
            + "; the options and the weights come from different models")
    return f30k, data_name


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """Map VSRN's options to a recipe of core and vsrn stages and its img_enc / txt_enc weights to them."""
    where = f"{official.path} (VSRN options)"
    opts = official.options
    if len(official.modules) != 2:
        raise CheckpointError(f"{official.path}: a VSRN checkpoint's 'model' holds 2 state dicts [img_enc, txt_enc],"
                              f" this one holds {len(official.modules)}")
    img, txt = _with_batch_counts(official.modules[0]), official.modules[1]
    f30k, data_name = _branch(official, img, where)
    measure = option(opts, "measure", where, str, "cosine")
    if measure != "cosine":
        raise CheckpointError(f"{where}: measure={measure!r}; VSRN scores with the dot product (measure 'cosine'),"
                              " the only one this importer maps")
    if option(opts, "use_abs", where, bool, False):
        raise CheckpointError(f"{where}: use_abs is set (order embeddings); VSRN's encoders have no stage for it here")
    no_imgnorm = option(opts, "no_imgnorm", where, bool, False)
    embed, word_dim, img_dim = (option(opts, k, where, int) for k in ("embed_size", "word_dim", "img_dim"))
    layers = option(opts, "num_layers", where, int, 1)
    check_vocabulary_size(official, txt, len(vocab),
                          f"file the model was trained with (vocab/{data_name}_vocab.pkl: F30K 8481 words, COCO 10006)")
    check_state(img, image_layout(embed, img_dim, f30k), f"{official.path}: model[0] (img_enc)")
    check_state(txt, gru_text_layout(len(vocab), word_dim, embed, layers, False), f"{official.path}: model[1] (txt_enc)")

    first = 0 if f30k else 1  # the COCO branch's region-axis l2norm is reasoners[0]
    state = {"image.encoder.fc.weight": img["fc.weight"], "image.encoder.fc.bias": img["fc.bias"]}
    for k in range(GCN_BLOCKS):
        prefix = f"Rs_GCN_{k + 1}."
        for key, value in img.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                state[f"image.reasoners.{first + k}.{name}"] = value.squeeze(-1) if value.dim() == 3 else value
    state.update({f"image.pool.rnn.{k[len('img_rnn.'):]}": v for k, v in img.items() if k.startswith("img_rnn.")})
    state.update({f"image.pool.{k}": v for k, v in img.items() if k.startswith("bn.")})
    state.update({f"text.encoder.{k}": v for k, v in txt.items()})
    state = {k: v.detach().long().reshape(()) if k.endswith("num_batches_tracked") else v.detach().float().contiguous()
             for k, v in state.items()}
    training = training_options(opts, TRAIN_DEFAULTS, where)
    notes = (*training.notes,
             f"{official.path}: the official checkpoint holds no caption decoder, so the recipe has no vsrn.caption"
             " objective (recipes/vsrn_f30k.toml and vsrn_coco.toml train with it)")
    recipe = _recipe(official, data_name, f30k, training.loss, training.train, embed=embed, word_dim=word_dim,
                     layers=layers, no_imgnorm=no_imgnorm)
    return Converted(tomli_w.dumps(recipe), state, DataPorts(feature_dim=img_dim, vocab_size=len(vocab)), notes)


def _recipe(official: OfficialCheckpoint, data_name: str, f30k: bool, loss: dict[str, Any], train: dict[str, Any], *,
            embed: int, word_dim: int, layers: int, no_imgnorm: bool) -> dict[str, Any]:
    coco = "coco" in data_name
    region_norm = {"stage": "vsrn.l2norm", "axis": "regions"}
    reasoners = ([] if f30k else [region_norm]) + [{"stage": "vsrn.rsgcn"}] * GCN_BLOCKS + [region_norm]
    return {
        "recipe": {"name": f"vsrn-{data_name.removesuffix('_precomp')}-imported", "embed_dim": embed,
                   "description": f"official VSRN checkpoint {official.path} (epoch {official.epoch}, best dev rsum"
                                  f" {official.best_rsum}), converted by itmkit import vsrn"},
        "image": {"encoder": {"stage": "core.precomp", "normalize": False}, "reasoners": reasoners,
                  "pool": {"stage": "vsrn.gru", "batch_norm": f30k, "normalize": not no_imgnorm}},
        "text": {"encoder": {"stage": "core.bigru", "word_dim": word_dim, "num_layers": layers, "bidirectional": False,
                             "normalize": True},
                 "pool": {"stage": "core.last"}},
        "match": [{"similarity": {"stage": "core.dot"}}],
        "loss": {"stage": "core.triplet", **loss},
        "data": {"path": f"data/{data_name}", "protocol": "coco-1k-5fold" if coco else "f30k-1k",
                 "test_split": "testall" if coco else "test"},
        "train": train,
    }
