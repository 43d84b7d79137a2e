"""Import the papers' official checkpoints (pickled ``model_best.pth.tar``) safely.

They are read with ``torch.load(weights_only=True)`` and an allow-list of exactly one class,
``argparse.Namespace`` (the pickled options), never with a full unpickler; Python-2 pickles
are retried with ``encoding='latin1'``. Each plugin contributes a converter through the
``register_importers`` hook that maps the options to a recipe and the weights to its stages;
the key sets and shapes are checked explicitly, so no key is ever dropped silently.
"""

from __future__ import annotations

import argparse
import pickle
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import save_checkpoint
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.recipe import parse_recipe

ALLOWED_GLOBALS = [argparse.Namespace]


@attrs.frozen
class OfficialCheckpoint:
    """An official checkpoint's contents: the per-module state dicts and the options."""

    path: str
    modules: list[dict[str, torch.Tensor]]  # the 'model' list: [img_enc, txt_enc, (sim_enc)]
    options: dict[str, Any]  # vars(opt)
    epoch: int | None
    best_rsum: float | None


@attrs.frozen
class Converted:
    """What a converter returns: a recipe (TOML text) and the model's state dict."""

    recipe: str
    state: dict[str, torch.Tensor]
    data: DataPorts


@attrs.frozen
class ModelDirectory:
    """``--vocab`` naming a directory: a pretrained text encoder's files (BERT: config.json, vocab.txt).

    Only a converter whose ``vocab`` parameter is annotated to accept it receives one.
    """

    path: Path


Converter = Callable[[OfficialCheckpoint, Vocabulary], Converted]


def _reads_model_directory(converter: Converter) -> bool:
    try:
        hint = typing.get_type_hints(converter).get("vocab")
    except Exception:  # unresolvable annotations: treat as a plain vocabulary reader
        return False
    return hint is ModelDirectory or ModelDirectory in typing.get_args(hint)


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Load an official ``.pth.tar`` with the minimal allow-list (Python 2 pickles included)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = None
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        for kwargs in ({}, {"encoding": "latin1"}):
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
                break
            except UnicodeDecodeError:
                continue
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{path}: refused to unpickle: it holds objects outside the allow-list"
                    f" (only argparse.Namespace is allowed): {exc}"
                ) from None
            except Exception as exc:  # the weights-only unpickler fails on junk with many error types
                raise CheckpointError(
                    f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
                ) from None
    if raw is None:
        raise CheckpointError(f"{path}: cannot decode the pickle, neither as UTF-8 nor as latin1")
    if not isinstance(raw, Mapping) or "model" not in raw:
        keys = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry (official layout), found {keys}")
    modules = raw["model"]
    if isinstance(modules, Mapping):  # a single state dict (IMRAM, MTFN)
        modules = [modules]
    opt = raw.get("opt")
    options = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    return OfficialCheckpoint(str(path), [dict(m) for m in modules], options, raw.get("epoch"), raw.get("best_rsum"))


def check_state(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f"{where}: the weights do not match the official layout"]
        lines += [f"  missing: {k} {tuple(expected[k])}" for k in missing]
        lines += [f"  unexpected: {k} {tuple(found[k].shape)}" for k in unexpected]
        lines += [f"  shape of {k}: {tuple(found[k].shape)}, expected {tuple(expected[k])}" for k in wrong]
        raise CheckpointError("\n".join(lines))


def check_vocabulary_size(official: OfficialCheckpoint, text_state: Mapping[str, torch.Tensor], words: int,
                          which: str) -> None:
    """Refuse a vocabulary of ``words`` words unless the checkpoint's word embedding and vocab_size agree.

    ``which`` finishes "pass the vocabulary ...": the files the paper ships.
    """
    embedding = text_state.get("embed.weight")
    if embedding is not None and embedding.dim() == 2 and embedding.shape[0] != words:
        raise CheckpointError(
            f"{official.path}: the vocabulary has {words} words but the checkpoint's word embedding"
            f" (txt_enc embed.weight) has {embedding.shape[0]} rows; pass the vocabulary {which}")
    options = official.options
    if "vocab_size" in options and int(options["vocab_size"]) != words:
        raise CheckpointError(f"{official.path}: the options say vocab_size={options['vocab_size']}, the vocabulary"
                              f" has {words} words; pass the vocabulary the model was trained with")


def weight_norm_layout(prefix: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``weight_norm(nn.Linear, dim=None)``: one scalar gain, the direction, the bias."""
    return {f"{prefix}.weight_g": (), f"{prefix}.weight_v": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def scalar_gain(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """``state`` with a one-element weight-norm gain as a 0-d tensor.

    PyTorch 0.3 saved the gain of ``weight_norm(dim=None)`` with shape (1,), 0.4 and later as a
    0-d tensor: checkpoints of both ages exist (SCAN was trained on 0.3, BFAN on 0.4).
    """
    gain = state.get(key)
    if gain is not None and gain.numel() == 1:
        state = {**state, key: gain.reshape(())}
    return state


def fold_weight_norm(gain: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The weight a dim=None weight-norm layer uses: direction * gain / ||direction|| (Frobenius)."""
    return direction * (gain.reshape(()) / direction.norm())


def gru_text_layout(vocab_size: int, word_dim: int, embed: int, layers: int, bidirectional: bool) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the SCAN-lineage official text encoder (``embed`` + ``nn.GRU``, gates r, z, n)."""
    out: dict[str, tuple[int, ...]] = {"embed.weight": (vocab_size, word_dim)}
    directions = ("", "_reverse") if bidirectional else ("",)
    for layer in range(layers):
        width = word_dim if layer == 0 else embed * len(directions)  # a stacked layer reads every direction
        for suffix in directions:
            out[f"rnn.weight_ih_l{layer}{suffix}"] = (3 * embed, width)
            out[f"rnn.weight_hh_l{layer}{suffix}"] = (3 * embed, embed)
            out[f"rnn.bias_ih_l{layer}{suffix}"] = (3 * embed,)
            out[f"rnn.bias_hh_l{layer}{suffix}"] = (3 * embed,)
    return out


def option(options: Mapping[str, Any], name: str, where: str) -> Any:
    """An option the converter needs, or a clear error naming it."""
    if name not in options:
        raise CheckpointError(f"{where}: the checkpoint's options lack {name!r}" + did_you_mean(name, options))
    return options[name]


def import_checkpoint(name: str, path: str | Path, vocab_path: str | Path, out: str | Path, importers: Mapping[str, Converter]) -> Path:
    """Convert an official checkpoint with the named importer and write an itmkit checkpoint."""
    if name not in importers:
        raise CheckpointError(f"no importer {name!r}" + did_you_mean(name, importers))
    official = read_official(path)
    source = Path(vocab_path)
    if source.is_dir():
        if not _reads_model_directory(importers[name]):
            raise CheckpointError(f"--vocab {source} is a directory; `itmkit import {name}` reads the official"
                                  " vocabulary JSON")
        words: Vocabulary | ModelDirectory = ModelDirectory(source)
    else:
        words = Vocabulary.load(source)
    converted = importers[name](official, words)
    recipe = parse_recipe(converted.recipe, f"{path} [converted options]")
    # What the model reads captions with, as its text encoder takes the words (GPO appends <mask>).
    vocab = recipe.text.encoder.spec.vocabulary(lambda: words)
    if isinstance(vocab, ModelDirectory):
        raise CheckpointError(f"{path}: the converted text encoder {recipe.text.encoder.spec.name} does not read"
                              f" a model directory; pass the official vocabulary JSON as --vocab")
    data = attrs.evolve(converted.data, vocab_size=len(vocab), mask_id=getattr(vocab, "mask_id", None))
    model = build_model(recipe, data)
    check_state(converted.state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, f"{path} -> {name}")
    model.load_state_dict(converted.state, strict=True)
    save_checkpoint(out, model, vocab, imported_from=str(path), epoch=str(official.epoch),
                    official_best_rsum=str(official.best_rsum), protocol=recipe.data.protocol)
    return Path(out)


def get_importers() -> dict[str, Converter]:
    """Every converter the loaded plugins contribute."""
    from itmkit.plugins import get_registry

    return get_registry().importers
