"""Convert an official SAEM checkpoint (yiling2018/saem ``model_best.pth.tar``) into an itmkit model.

The file is ``{'epoch', 'model': [img_enc, txt_enc], 'best_rsum', 'opt', 'Eiters'}``, read by
``itmkit.importing.read_official``; ``--vocab`` is the local Hugging Face directory of the BERT
the model was trained with (config.json, vocab.txt). The official ``txt_stru = 'cnn'`` model only:

    img_enc  mapping.weight [E, F], mapping.bias [E]              -> image.encoder.fc.*       (core.precomp)
             layer.attention.self.{query,key,value}.* [E, E]      -> image.reasoners.0.layer.{query,key,value}.*
             layer.attention.output.dense.* [E, E]                -> ...layer.attn_out.*
             layer.attention.output.LayerNorm.{gamma,beta} [E]    -> ...layer.attn_norm.{weight,bias}
             layer.intermediate.dense.* [I, E]                    -> ...layer.ffn_in.*
             layer.output.dense.* [E, I]                          -> ...layer.ffn_out.*
             layer.output.LayerNorm.{gamma,beta} [E]              -> ...layer.ffn_norm.{weight,bias}
    txt_enc  bert.* (the frozen BERT, stored; LayerNorm gamma/beta) -> text.encoder.bert.* (LayerNorm weight/bias)
             bert.pooler.* (unused by the forward: dropped)
             convs1.{0,1,2}.* [C, 1, K, H], K = 1, 2, 3           -> text.pool.cnn.convs.{0,1,2}.*  (saem.cnn)
             mapping.weight [E, 3C], mapping.bias [E]             -> text.pool.cnn.fc.*

The checkpoint does not record the image layer's head count (t_cfg.json, 16 heads): the import
uses 16 and says so. The stored BERT weights are the ones the model scores with; they are
compared with the directory's own weights, when it has some, and a difference is reported (the
directory then probably holds another BERT, whose tokenizer may differ too). Every key is checked
against the layout the options and the directory's config.json imply.
"""

from __future__ import annotations

from typing import Any

import tomli_w
import torch

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import Converted, ModelDirectory, OfficialCheckpoint, check_state, option, training_options
from itmkit_bert.vocab import WordPieceVocabulary
from itmkit_saem.modules import LAYER_KEYS

# train.py's defaults, used when an option is absent.
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": True, "num_epochs": 30, "batch_size": 64, "learning_rate": 1e-4,
                  "lr_update": 10, "grad_clip": 2.0}
HEADS = 16  # t_cfg.json's num_attention_heads: the image layer's heads, not stored in the checkpoint
WIDTHS = (1, 2, 3)  # BertMapping's n-gram widths (hard-coded)


def official_bert_name(name: str) -> str:
    """A Hugging Face BERT parameter name as the official bert.py calls it (LayerNorm gamma / beta)."""
    if ".LayerNorm." in name or name.startswith("LayerNorm."):
        return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    return name


def image_layout(embed: int, img_dim: int, inner: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official TransformerMapping: mapping, then one BERTLayer (gamma/beta LayerNorms)."""
    shapes = {"query": (embed, embed), "key": (embed, embed), "value": (embed, embed), "attn_out": (embed, embed),
              "ffn_in": (inner, embed), "ffn_out": (embed, inner)}
    layout: dict[str, tuple[int, ...]] = {"mapping.weight": (embed, img_dim), "mapping.bias": (embed,)}
    for ours, theirs in LAYER_KEYS.items():
        module, kind = ours.split(".")
        if module in ("attn_norm", "ffn_norm"):
            layout[f"layer.{theirs}"] = (embed,)
        else:
            layout[f"layer.{theirs}"] = shapes[module] if kind == "weight" else (shapes[module][0],)
    return layout


def _bert(path) -> torch.nn.Module:
    from itmkit_bert.stages import load_bert

    return load_bert(str(path), pretrained=False)


def text_layout(bert: torch.nn.Module, embed: int, channels: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official BertMapping ('cnn'): the BERT of the directory's config, its pooler, the head."""
    hidden = bert.config.hidden_size
    layout = {f"bert.{official_bert_name(k)}": tuple(v.shape) for k, v in bert.state_dict().items()
              if not k.endswith(("position_ids", "token_type_ids"))}
    layout.update({"bert.pooler.dense.weight": (hidden, hidden), "bert.pooler.dense.bias": (hidden,),
                   "mapping.weight": (embed, len(WIDTHS) * channels), "mapping.bias": (embed,)})
    for i, k in enumerate(WIDTHS):
        layout.update({f"convs1.{i}.weight": (channels, 1, k, hidden), f"convs1.{i}.bias": (channels,)})
    return layout


def _official_names(txt: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """txt_enc with Hugging Face LayerNorm names (weight / bias) renamed to bert.py's, and BERT's id buffers checked."""
    out = {}
    for key, value in txt.items():
        if key.startswith("bert.") and key.endswith(("position_ids", "token_type_ids")):
            if key.endswith("position_ids") and not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise CheckpointError(f"{where}: {key} is not 0, 1, 2, ...; not a BERT this importer knows")
            continue  # buffers of newer BERT code: no weights
        out["bert." + official_bert_name(key[len("bert."):]) if key.startswith("bert.") else key] = value
    return out


def _compare_with_directory(txt: dict[str, torch.Tensor], bert: torch.nn.Module, folder, where: str) -> tuple[str, ...]:
    """A note when the stored frozen BERT differs from the directory's weights (or the directory has none)."""
    from itmkit_bert.stages import load_bert

    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return (f"{where}: {folder} holds no BERT weights to compare with; the checkpoint's stored BERT is used",)
    try:
        pretrained = load_bert(str(folder), pretrained=True).state_dict()
    except Exception as exc:  # the comparison is advice: a directory whose weights do not load is reported, not fatal
        return (f"{where}: the BERT weights in {folder} could not be read for comparison ({exc}); the checkpoint's"
                " stored BERT is used",)
    worst, name = 0.0, ""
    for key, value in pretrained.items():
        stored = txt.get(f"bert.{official_bert_name(key)}")
        if stored is None or stored.shape != value.shape or not value.is_floating_point():
            continue
        diff = float((stored.float() - value.float()).abs().max()) if value.numel() else 0.0
        if diff > worst:
            worst, name = diff, key
    if worst > 1e-6:
        return (f"{where}: the checkpoint's frozen BERT differs from the weights in {folder} (largest difference"
                f" {worst:.3g}, in {name}); the stored weights are used, but check that --vocab names the BERT the"
                " model was trained with: its tokenizer encodes the captions",)
    return ()


def convert(official: OfficialCheckpoint, vocab: Vocabulary | ModelDirectory) -> Converted:
    """Map SAEM's options to a recipe and its img_enc / txt_enc weights to the saem stages."""
    where = f"{official.path} (SAEM options)"
    opts = official.options
    if not isinstance(vocab, ModelDirectory):
        raise CheckpointError(f"{official.path}: SAEM tokenises with BERT's WordPiece: pass the local directory of"
                              " the BERT it was trained with (config.json, vocab.txt; bert-base-uncased) as --vocab")
    if len(official.modules) != 2:
        raise CheckpointError(f"{official.path}: a SAEM checkpoint's 'model' holds 2 state dicts [img_enc, txt_enc],"
                              f" this one holds {len(official.modules)}")
    structure = option(opts, "txt_stru", where, str, "cnn")
    if structure != "cnn":
        raise CheckpointError(f"{where}: txt_stru={structure!r}; only the paper's CNN text head ('cnn') imports")
    embed = option(opts, "final_dims", where, int)
    img_dim = option(opts, "img_dim", where, int)
    max_words = option(opts, "max_words", where, int, 32)
    img, txt = dict(official.modules[0]), dict(official.modules[1])

    inner_key = "layer.intermediate.dense.weight"
    inner = img[inner_key].shape[0] if inner_key in img and img[inner_key].dim() == 2 else 2048
    check_state(img, image_layout(embed, img_dim, inner), f"{official.path}: model[0] (img_enc)")
    if embed % HEADS:
        raise CheckpointError(f"{where}: final_dims={embed} is not a multiple of the {HEADS} heads of t_cfg.json")

    bert = _bert(vocab.path)
    txt = _official_names(txt, f"{official.path}: model[1] (txt_enc)")
    conv = txt.get("convs1.0.weight")
    channels = conv.shape[0] if conv is not None and conv.dim() == 4 else 512
    check_state(txt, text_layout(bert, embed, channels), f"{official.path}: model[1] (txt_enc)")
    positions = bert.config.max_position_embeddings
    if not 2 <= max_words <= positions:
        raise CheckpointError(f"{where}: max_words={max_words} does not fit the {positions} positions of the BERT"
                              f" in {vocab.path}")

    state = {"image.encoder.fc.weight": img["mapping.weight"], "image.encoder.fc.bias": img["mapping.bias"]}
    state.update({f"image.reasoners.0.layer.{ours}": img[f"layer.{theirs}"] for ours, theirs in LAYER_KEYS.items()})
    state.update({f"text.encoder.bert.{k}": txt[f"bert.{official_bert_name(k)}"] for k in bert.state_dict()
                  if not k.endswith(("position_ids", "token_type_ids"))})
    for i in range(len(WIDTHS)):
        state.update({f"text.pool.cnn.convs.{i}.{p}": txt[f"convs1.{i}.{p}"] for p in ("weight", "bias")})
    state.update({"text.pool.cnn.fc.weight": txt["mapping.weight"], "text.pool.cnn.fc.bias": txt["mapping.bias"]})
    state = {k: v.detach().float().contiguous() for k, v in state.items()}

    notes = [f"{where}: the image layer's head count is not stored in the checkpoint; the import uses t_cfg.json's"
             f" {HEADS} heads"]
    notes += _compare_with_directory(txt, bert, vocab.path.expanduser(), f"{official.path}: model[1] (txt_enc)")
    training = training_options(opts, TRAIN_DEFAULTS, where)
    notes += training.notes
    train = dict(training.train)
    if train.get("grad_clip", 0) > 0:
        notes.append(f"{where}: grad_clip={train['grad_clip']} is never applied by the official code (clip_grad_norm"
                     " receives the parameter iterator Adam has already consumed); the recipe has grad_clip = 0")
        train["grad_clip"] = 0.0
    dropout = float(getattr(bert.config, "hidden_dropout_prob", 0.1))
    encoder = {"stage": "saem.bert", "path": str(vocab.path.expanduser().resolve()), "max_words": max_words,
               "pad_fragments": True, "freeze": True}
    recipe = _recipe(official, encoder, embed, inner, channels, dropout, training.loss, train, where)
    data = DataPorts(feature_dim=img_dim, vocab_size=len(WordPieceVocabulary.load(str(vocab.path))))
    return Converted(tomli_w.dumps(recipe), state, data, tuple(notes))


def _recipe(official: OfficialCheckpoint, encoder: dict[str, Any], embed: int, inner: int, channels: int,
            dropout: float, loss: dict[str, Any], train: dict[str, Any], where: str) -> dict[str, Any]:
    data_name = option(official.options, "data_name", where, str, "f30k_precomp")
    coco = "coco" in data_name
    short = "coco" if coco else "f30k"
    return {
        "recipe": {"name": f"saem-{short}-imported", "embed_dim": embed,
                   "description": f"official SAEM checkpoint {official.path} (epoch {official.epoch}, best dev rsum"
                                  f" {official.best_rsum}), converted by itmkit import saem"},
        "image": {"encoder": {"stage": "core.precomp", "normalize": False},
                  "reasoners": [{"stage": "saem.transformer", "heads": HEADS, "intermediate": inner}],
                  "pool": {"stage": "core.mean", "normalize": True}},
        "text": {"encoder": encoder,
                 "pool": {"stage": "saem.cnn", "channels": channels, "widths": list(WIDTHS), "dropout": dropout,
                          "normalize": True}},
        "match": [{"similarity": {"stage": "core.cosine"}}],
        "loss": {"stage": "core.triplet", **loss},
        "objective": [{"stage": "saem.angular", "weight": 1.0}, {"stage": "saem.param_norm", "weight": 0.01}],
        "data": {"path": f"data/{short}_precomp", "protocol": "coco-1k-5fold" if coco else "f30k-1k",
                 "test_split": "testall" if coco else "test"},
        "train": {**train, "optimizer": "adam"},
    }
