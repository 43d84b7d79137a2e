"""Import the papers' official checkpoints (pickled ``model_best.pth.tar``) safely.

They are read with ``torch.load(weights_only=True)`` and an allow-list of exactly one class,
``argparse.Namespace`` (the pickled options), never with a full unpickler; Python-2 pickles
are retried with ``encoding='latin1'``. Every entry is checked here, once for every importer:
'model' is a list of state dicts of dense, real, finite CPU tensors (``tensor_problem``;
nn.DataParallel's ``module.`` prefix removed), 'opt' a Namespace or dict, 'epoch' and 'best_rsum'
numbers. Each plugin contributes
a converter through the ``register_importers`` hook that maps the options to a recipe and the weights to its stages;
the key sets and shapes are checked explicitly, so no key is ever dropped silently.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
import torch

from itmkit.build import DataPorts, build_model
from itmkit.checkpoint import save_checkpoint
from itmkit.core_stages import Triplet
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.inputs import input_file
from itmkit.recipe import TrainSpec, parse_recipe
from itmkit.runs import name_problem
from itmkit.stage import stage_params
from itmkit.structure import Problem, check_param, show_number

ALLOWED_GLOBALS = [argparse.Namespace]
DATA_PARALLEL = "module."  # the prefix nn.DataParallel gives every key of the model it wraps


@attrs.frozen
class OfficialCheckpoint:
    """An official checkpoint's contents: the per-module state dicts and the options."""

    path: str
    modules: list[dict[str, torch.Tensor]]  # the 'model' list: [img_enc, txt_enc, (sim_enc)]
    options: dict[str, Any]  # vars(opt)
    epoch: int | None
    best_rsum: float | None
    notes: tuple[str, ...] = ()  # what reading changed (a data_name given as a path), one line each
    # The other top-level entries as read (plain values: the weights-only unpickler builds no class),
    # e.g. MTFN's nested 'options' dict and 'arch' beside its 'opt' Namespace.
    entries: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Converted:
    """What a converter returns: a recipe (TOML text) and the model's state dict."""

    recipe: str
    state: dict[str, torch.Tensor]
    data: DataPorts
    notes: tuple[str, ...] = ()  # what the import left out or replaced, one line each (training_options)
    vocab: Vocabulary | None = None  # the words, when the converter read the --vocab file itself (VocabularyFile)


@attrs.frozen
class ModelDirectory:
    """``--vocab`` naming a directory: a pretrained text encoder's files (BERT: config.json, vocab.txt).

    Only a converter whose ``vocab`` parameter is annotated to accept it receives one.
    """

    path: Path


@attrs.frozen
class VocabularyFile:
    """``--vocab`` handed over unread, for a paper whose vocabulary file is not in the SCAN layout
    (MTFN's skip-thoughts word ids start at 1 and have no <pad>/<start>/<end>).

    Only a converter whose ``vocab`` parameter is annotated ``VocabularyFile`` receives one; it reads
    the file and returns the words in ``Converted.vocab``.
    """

    path: Path


Converter = Callable[[OfficialCheckpoint, Vocabulary], Converted]


def _accepts(converter: Converter, kind: type) -> bool:
    """Whether the converter's ``vocab`` annotation names ``kind`` (alone or in a union)."""
    try:
        hint = typing.get_type_hints(converter).get("vocab")
    except Exception:  # unresolvable annotations: treat as a plain vocabulary reader
        return False
    return hint is kind or kind in typing.get_args(hint)


def read_official(path: str | Path) -> OfficialCheckpoint:
    """Load an official ``.pth.tar`` with the minimal allow-list (Python 2 pickles included)."""
    path = input_file(path, "checkpoint", error=CheckpointError, missing="checkpoint not found: {path}")
    _check_container(path)
    raw = None
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        for kwargs in ({}, {"encoding": "latin1"}):
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
                break
            except UnicodeDecodeError:
                continue
            except pickle.UnpicklingError as exc:
                refused = re.search(r"GLOBAL (\S+)", str(exc))
                if not refused:  # junk the weights-only unpickler cannot parse: no class was involved
                    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: the pickle is damaged"
                                          f" ({_detail(exc)})") from None
                raise CheckpointError(
                    f"{path}: refused to unpickle: it references the global {refused.group(1)}, outside the"
                    " allow-list (only argparse.Namespace is allowed); nothing was run"
                ) from None
            except Exception as exc:  # the weights-only unpickler fails on junk with many error types
                raise CheckpointError(
                    f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})"
                ) from None
    if raw is None:
        raise CheckpointError(f"{path}: cannot decode the pickle, neither as UTF-8 nor as latin1")
    if not isinstance(raw, Mapping) or "model" not in raw:
        keys = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry (official layout), found {keys}")
    modules = raw["model"]
    if isinstance(modules, Mapping):  # a single state dict (IMRAM, MTFN)
        modules = [modules]
    if not isinstance(modules, (list, tuple)) or not modules:
        raise CheckpointError(f"{path}: entry 'model' is {_described(modules)}; expected a list of state dicts"
                              " [img_enc, txt_enc, ...] (or one state dict)")
    states = [_state_dict(path, i, m) for i, m in enumerate(modules)]
    options, notes = _plain_data_name(path, _options(path, raw.get("opt")))
    entries = {str(k): v for k, v in raw.items() if k not in ("model", "opt")}
    return OfficialCheckpoint(str(path), states, options, _number(path, raw, "epoch"),
                              _number(path, raw, "best_rsum"), notes, entries)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6: a zip archive
PICKLE_PROTO = b"\x80"  # the legacy format (PyTorch 0.3 / 0.4: SCAN, BFAN, ...): pickles, protocol 2 or later


def _check_container(path: Path) -> None:
    """Refuse a file that is neither of torch.save's formats before torch reads it.

    torch's own errors for these say "Weights only load failed" or "legacy .tar format", which
    reads like a refused class or a version problem; an empty or zero-filled file (a failed copy,
    an unfinished download) is neither.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a PyTorch checkpoint; was the download or"
                              " copy interrupted?")
    if not head.strip(b"\0"):
        zeros = "holds only zero bytes" if len(head) == path.stat().st_size else f"starts with {len(head)} zero bytes"
        raise CheckpointError(f"{path}: the file {zeros}, not a PyTorch checkpoint; was the download or copy"
                              " interrupted?")
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: it starts with {head[:8]!r}, where"
                              " torch.save writes a zip archive (PK..) or a pickle (\\x80..)")


def _detail(exc: BaseException) -> str:
    """An unpickling error's own words, without torch's page of weights_only advice."""
    text = _first_line(exc)
    return type(exc).__name__ if text.startswith("Weights only load failed") else text


def _first_line(exc: BaseException) -> str:
    """An exception's message up to its first line break: torch's load errors run to a page of advice."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _described(value: Any) -> str:
    return "empty" if isinstance(value, (list, tuple, Mapping)) and not value else f"a {type(value).__name__}"


def _state_dict(path: Path, index: int, module: Any) -> dict[str, torch.Tensor]:
    """One entry of 'model' as a state dict of tensors, finite, with nn.DataParallel's prefix removed."""
    where = f"{path}: entry 'model'[{index}]"
    if not isinstance(module, Mapping):
        raise CheckpointError(f"{where} is a {type(module).__name__}; expected a state dict (parameter name -> tensor)")
    for key, value in module.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where} has the key {key!r} ({type(key).__name__}); parameter names are strings")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where} key {key!r} holds a {type(value).__name__}; expected a tensor")
        problem = tensor_problem(key, value)
        if problem:
            raise CheckpointError(f"{where}: tensor {key!r} {problem}")
    state = strip_data_parallel(dict(module), where)
    check_finite(state, where)
    return state


def strip_data_parallel(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Remove nn.DataParallel's ``module.`` prefix when every key has it.

    The official repositories save ``model.state_dict()`` of whatever they trained, and a model
    wrapped in nn.DataParallel (multi-GPU runs, VSE-infinity's BERT branch always) names every
    parameter ``module.<name>``. Removing it here, once, serves every importer, present and future.
    """
    prefixed = [k.startswith(DATA_PARALLEL) for k in state]
    if state and all(prefixed):
        return {k[len(DATA_PARALLEL):]: v for k, v in state.items()}
    if any(prefixed):
        some = next(k for k in state if k.startswith(DATA_PARALLEL))
        other = next(k for k in state if not k.startswith(DATA_PARALLEL))
        raise CheckpointError(f"{where}: some keys have the nn.DataParallel prefix {DATA_PARALLEL!r} and some do not"
                              f" (e.g. {some!r} and {other!r}); a state dict of one model has one or the other")
    return state


# Buffers that PyTorch layers keep as integers (BatchNorm's step count, BERT's position and token
# type ids); every other tensor of an official checkpoint is a real floating-point weight.
INTEGER_BUFFERS = ("num_batches_tracked", "position_ids", "token_type_ids")


def tensor_problem(key: str, value: torch.Tensor) -> str | None:
    """Why ``value`` cannot be imported as the weight ``key``, or None.

    Checked before any use: a sparse or meta tensor makes every later operation fail with an internal
    error, and a converter's ``.float()`` would drop a complex tensor's imaginary part or cast
    integers or booleans into weights without a word. A weight is a dense (strided) real
    floating-point tensor on the CPU; only the buffers PyTorch keeps as integers may be integers.
    """
    if value.layout != torch.strided:
        return (f"is a {str(value.layout).removeprefix('torch.')} tensor; weights are dense tensors"
                " (save the .to_dense() of it)")
    if value.is_meta:
        return "is on the meta device: a placeholder without values (saved from a model never materialised?)"
    if value.device.type != "cpu":  # torch.load maps storages to the CPU; a tensor subclass may not follow
        return f"is on the {value.device.type} device; weights are read on the CPU"
    if value.is_quantized:
        return f"is a quantized {value.dtype} tensor; import the float model it was quantized from"
    dtype = str(value.dtype).removeprefix("torch.")
    if value.is_floating_point():
        return None
    if value.is_complex():
        return f"is {dtype}: weights are real numbers, and its imaginary part would be dropped"
    if value.dtype != torch.bool and key.rsplit(".", 1)[-1] in INTEGER_BUFFERS:
        return None  # an integer buffer
    return (f"is {dtype}: a weight holds real floating-point numbers (only the buffers"
            f" {', '.join(INTEGER_BUFFERS)} are integers); the checkpoint is damaged or not an official one")


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or infinite weights, naming the tensor: they would score every pair as NaN, silently."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            if bad.any():
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise CheckpointError(
                    f"{where}: tensor {key!r} holds {int(bad.sum())} non-finite value(s) (NaN or inf) of"
                    f" {value.numel()}, the first at index {first}; the checkpoint is damaged or its training diverged")


def _options(path: Path, opt: Any) -> dict[str, Any]:
    if opt is None:
        return {}
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, Mapping):
        raise CheckpointError(f"{path}: entry 'opt' is a {type(opt).__name__}; expected the training options"
                              " (an argparse.Namespace or a dict)")
    odd = next((k for k in opt if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: entry 'opt' has the option name {odd!r} ({type(odd).__name__});"
                              " option names are strings")
    return dict(opt)


def _plain_data_name(path: Path, options: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The options with ``data_name`` as a plain dataset folder name, and a note if it was a path.

    The official code joins ``data_name`` to ``data_path`` (and to ``vocab/``), so it names a dataset
    folder; every importer turns it into the recipe's name and data path hint. A path
    (``../../x_precomp``, ``/data/f30k_precomp``) is reduced here, once for every importer, to the
    folder it names; one that names no folder (``..``) is refused naming the option.
    """
    value = options.get("data_name")
    if not isinstance(value, str) or name_problem(value, "data_name") is None:
        return options, ()
    name = PurePosixPath(value.replace("\\", "/")).name
    if name_problem(name, "data_name"):  # '..', '/', control characters
        raise CheckpointError(f"{path}: option data_name = {value!r} in the checkpoint's 'opt' names no dataset"
                              " folder; expected a folder name such as 'f30k_precomp'")
    return {**options, "data_name": name}, (
        f"{path}: option data_name = {value!r} in the checkpoint's 'opt' is a path; the recipe's name and data"
        f" path use the folder it names, {name!r}",)


def _number(path: Path, raw: Mapping, key: str) -> int | float | None:
    value = raw.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # some forks save best_rsum as a 0-d tensor
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise CheckpointError(f"{path}: entry {key!r} is {_described(value)} ({value!r:.40}); expected a number")


def check_state(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key, and the likely cause."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f"{where}: the weights do not match the official layout"]
        lines += [f"  missing: {k} {tuple(expected[k])}" for k in missing]
        lines += [f"  unexpected: {k} {tuple(found[k].shape)}" for k in unexpected]
        lines += [f"  shape of {k}: {tuple(found[k].shape)}, expected {tuple(expected[k])}" for k in wrong]
        lines.append(f"  likely cause: {likely_cause(found, expected, missing, unexpected, wrong)}")
        raise CheckpointError("\n".join(lines))


def likely_cause(found: Mapping[str, Any], expected: Mapping[str, Any], missing: list[str], unexpected: list[str],
                 wrong: list[str]) -> str:
    """Why a state dict and the layout the options imply disagree, in the words a user can act on."""
    if not found:
        return "the state dict is empty"
    if len(missing) == len(expected) and len(unexpected) == len(found):
        heads = {k.split(".")[0] for k in found}
        if len(heads) == 1 and {k.split(".", 1)[-1] for k in found} & set(expected):
            return (f"every key starts with {next(iter(heads)) + '.'!r}, which the official model's names lack:"
                    " the weights were saved from a wrapper around it")
        return ("no key matches: the checkpoint is of another model (or another variant of it) than this importer"
                " reads; check the importer name")
    if wrong and not missing and not unexpected:
        return ("the options disagree with the weights: the shapes follow from options such as embed_size, img_dim,"
                " word_dim and the vocabulary size")
    return ("the options disagree with the weights (options such as bi_gru, num_layers or precomp_enc_type choose"
            " the layers), or the checkpoint is another variant of the model than the options say")


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
    if option(options, "vocab_size", f"{official.path} (options)", int, None) not in (None, words):
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


KINDS = {int: "an integer", float: "a finite number", bool: "a flag: True or False (or 0 or 1)", str: "text"}
REQUIRED: Any = object()  # option()'s default: the checkpoint must hold the option


def option(options: Mapping[str, Any], name: str, where: str, kind: type | None = None,
           default: Any = REQUIRED) -> Any:
    """An option the converter needs, as ``kind``, or one clear error naming the file, the option and its value.

    Strict, because the options decide the model's layers and its scores and a coercion guesses:
    ``int("16.7")`` would import a wrong width, ``bool("False")`` is True. ``int`` takes an integer
    or a float with an integral value (16.0: some forks store sizes as floats); ``float`` any finite
    number; ``bool`` a real bool, or the integers 0 and 1 (flags that forks declare with type=int);
    ``str`` text. ``kind=None`` returns the value unchecked (the caller compares it with choices).
    An absent option is ``default``, or an error when there is none.
    """
    if name not in options:
        if default is not REQUIRED:
            return default
        raise CheckpointError(f"{where}: the checkpoint's options lack {name!r}" + did_you_mean(name, options))
    value = options[name]
    if kind is None:
        return value
    typed = typed_value(value, kind)
    if typed is None:
        raise CheckpointError(f"{where}: option {name}={_shown(value)} is not {KINDS[kind]}; found {_kind_of(value)}")
    return typed[0]


def typed_value(value: Any, kind: type) -> tuple[Any] | None:
    """``(value as kind,)`` when it is one (see ``option``), else None."""
    if kind is bool:
        if isinstance(value, bool):
            return (value,)
        return (bool(value),) if isinstance(value, int) and value in (0, 1) else None
    if isinstance(value, bool) or kind not in KINDS:  # True is an int to Python, never a size or a rate
        return None
    if kind is str:
        return (value,) if isinstance(value, str) else None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if kind is float:
        try:
            return (float(value),)
        except OverflowError:  # an integer beyond any float
            return None
    if isinstance(value, float):
        return (int(value),) if value.is_integer() else None
    return (value,)


def _shown(value: Any) -> str:
    text = show_number(value) if isinstance(value, int) else repr(value)  # 10**5000 has no repr
    return text if len(text) <= 40 else text[:37] + "..."


def _kind_of(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite float"
    if isinstance(value, float) and not value.is_integer():
        return "a float with a fraction"
    return f"a {type(value).__name__}"


# Official training options -> (recipe table, field, the spec that validates it). They change neither the
# model nor its scores, only how the converted recipe would train a model anew.
TRAINING_FIELDS: dict[str, tuple[str, str, type]] = {
    "margin": ("loss", "margin", Triplet),
    "max_violation": ("loss", "max_violation", Triplet),
    "vse_mean_warmup_epochs": ("loss", "warmup_epochs", Triplet),
    "num_epochs": ("train", "epochs", TrainSpec),
    "batch_size": ("train", "batch_size", TrainSpec),
    "learning_rate": ("train", "lr", TrainSpec),
    "lr_update": ("train", "lr_update", TrainSpec),
    "grad_clip": ("train", "grad_clip", TrainSpec),
}


@attrs.frozen
class Training:
    """The recipe's training settings carried over from the options: loss and train fields, and what was not."""

    loss: dict[str, Any]
    train: dict[str, Any]
    notes: tuple[str, ...]


def training_options(options: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Training:
    """The official training options named in ``defaults`` (official name -> the paper's default) as recipe fields.

    They never refuse an import: the model and its scores do not depend on them. An absent option is
    the paper's default; one the recipe would refuse (``batch_size=1``, ``learning_rate=-1``, a string)
    is the paper's default too, with a note saying so.
    """
    tables: dict[str, dict[str, Any]] = {"loss": {}, "train": {}}
    notes = []
    for name, fallback in defaults.items():
        table, field, spec = TRAINING_FIELDS[name]
        info = next(p for p in stage_params(spec) if p.name == field)
        value = options.get(name, fallback)
        typed = typed_value(value, type(fallback))
        problems = ([Problem("", f"not {KINDS[type(fallback)]}, found {_kind_of(value)}")] if typed is None
                    else check_param(info, typed[0], "")[1])
        if problems:
            notes.append(f"{where}: training option {name}={_shown(value)} is not a valid {table}.{field}"
                         f" ({problems[0].message}); the recipe has the default {fallback!r} instead")
            typed = (fallback,)
        tables[table][field] = typed[0]
    return Training(tables["loss"], tables["train"], tuple(notes))


def import_checkpoint(name: str, path: str | Path, vocab_path: str | Path, out: str | Path, importers: Mapping[str, Converter],
                      note: Callable[[str], None] = lambda line: None) -> Path:
    """Convert an official checkpoint with the named importer and write an itmkit checkpoint.

    ``note`` receives each line of what the converter left out or replaced (``Converted.notes``);
    the lines are also kept in the checkpoint's metadata (``import_notes``).
    """
    if name not in importers:
        raise CheckpointError(f"no importer {name!r}" + did_you_mean(name, importers))
    official = read_official(path)
    source = Path(vocab_path)
    words: Vocabulary | ModelDirectory | VocabularyFile
    if source.is_dir():
        if not _accepts(importers[name], ModelDirectory):
            raise CheckpointError(f"--vocab {source} is a directory; `itmkit import {name}` reads the official"
                                  " vocabulary file (JSON, or VSE++'s .pkl)")
        words = ModelDirectory(source)
    elif _accepts(importers[name], VocabularyFile):
        words = VocabularyFile(source)
    else:
        words = Vocabulary.load(source)
    converted = importers[name](official, words)
    if isinstance(words, VocabularyFile):
        if converted.vocab is None:
            raise TypeError(f"importer {name!r} takes the vocabulary file but returned no Converted.vocab")
        words = converted.vocab
    recipe = parse_recipe(converted.recipe, f"{path} [converted options]")
    # What the model reads captions with, as its text encoder takes the words (GPO appends <mask>).
    vocab = recipe.text.encoder.spec.vocabulary(lambda: words)
    if isinstance(vocab, ModelDirectory):
        raise CheckpointError(f"{path}: the converted text encoder {recipe.text.encoder.spec.name} does not read"
                              f" a model directory; pass the official vocabulary JSON as --vocab")
    data = attrs.evolve(converted.data, vocab_size=len(vocab), mask_id=getattr(vocab, "mask_id", None))
    check_finite(converted.state, f"{path} -> {name}")  # a converter's arithmetic (weight norm) can make them
    model = build_model(recipe, data)
    check_state(converted.state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, f"{path} -> {name}")
    model.load_state_dict(converted.state, strict=True)
    lines = (*official.notes, *converted.notes)
    notes = {"import_notes": "\n".join(lines)} if lines else {}
    save_checkpoint(out, model, vocab, imported_from=str(path), epoch=str(official.epoch),
                    official_best_rsum=str(official.best_rsum), protocol=recipe.data.protocol, **notes)
    for line in lines:
        note(line)
    return Path(out)


def get_importers() -> dict[str, Converter]:
    """Every converter the loaded plugins contribute."""
    from itmkit.plugins import get_registry

    return get_registry().importers
