"""Checkpoints: safetensors files whose metadata carries everything ``itmkit eval`` needs.

Metadata (all strings): the resolved recipe (TOML), the vocabulary (official JSON) and its
sha256, the data dims, itmkit version, seed, protocol, epoch, rsum. The trainer's state for
``--resume`` (optimizer tensors, RNG state, counters) rides in the same file under the
``optimizer.`` and ``rng.`` prefixes, so one atomic write covers a whole epoch. Every write goes
to a temporary file that is fsynced and renamed: a run killed at any moment leaves the last
good file intact.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from itmkit import __version__
from itmkit.build import DataPorts, ITMModel, build_model
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, DataError
from itmkit.inputs import input_file
from itmkit.recipe import Recipe, parse_recipe

TRAINER_PREFIXES = ("optimizer.", "rng.")
# Bounds on the dims a checkpoint's metadata may claim, so that an edited number is refused with a
# message instead of building a model of terabytes: wider than any region feature (2048) or caption
# vocabulary (BERT's 30522, a word list's ~30k) in use.
MAX_FEATURE_DIM, MAX_VOCAB_SIZE, MAX_REGIONS = 2**16, 2**22, 2**16


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a fsynced temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with mode 0o666 lets the user's umask decide the permissions, as for any file they write
    # (mkstemp would make every checkpoint 0600); O_EXCL keeps two writers off one temporary name. The
    # name carries the PID, as split.atomic_path's do, so cleanup spares a live writer's temporary.
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        _test_pause(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_pause_seen = 0


def _test_pause(path: Path) -> None:
    """Fault-injection hook for the kill-during-write test: pause between write and rename.

    With ITMKIT_TEST_PAUSE_BEFORE_RENAME=MARKER set, the (SKIP+1)-th write of a file whose name
    starts with ITMKIT_TEST_PAUSE_FILE writes MARKER and sleeps, so a test can SIGKILL it there.
    """
    global _pause_seen
    marker = os.environ.get("ITMKIT_TEST_PAUSE_BEFORE_RENAME")
    if not marker or not path.name.startswith(os.environ.get("ITMKIT_TEST_PAUSE_FILE", "last")):
        return
    _pause_seen += 1
    if _pause_seen > int(os.environ.get("ITMKIT_TEST_PAUSE_SKIP", "0")):
        Path(marker).write_text(str(path))
        time.sleep(float(os.environ.get("ITMKIT_TEST_PAUSE_SECONDS", "60")))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@attrs.frozen
class Loaded:
    """A checkpoint read back: the model, its vocabulary and the metadata."""

    model: ITMModel
    vocab: Vocabulary
    meta: dict[str, str]
    trainer: dict[str, torch.Tensor]  # optimizer.* / rng.* tensors (empty for model-only files)


def model_metadata(model: ITMModel, vocab: Vocabulary, **extra: Any) -> dict[str, str]:
    vocab_json = json.dumps(vocab.to_json())
    meta = {
        "format": "pt",
        "itmkit_version": __version__,
        "recipe": model.recipe.to_toml(),
        "vocab": vocab_json,
        "vocab_sha256": vocab.sha256(),
        "feature_dim": str(model.data_ports.feature_dim),
        "vocab_size": str(model.data_ports.vocab_size),
        "num_regions": str(model.data_ports.num_regions or ""),
        "torch_version": torch.__version__,
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def save_checkpoint(path: str | Path, model: ITMModel, vocab: Vocabulary, *, trainer: dict[str, torch.Tensor] | None = None, **extra: Any) -> None:
    """Atomically write the model (plus optional trainer tensors) with its metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key, value in (trainer or {}).items():
        if not key.startswith(TRAINER_PREFIXES):
            raise ValueError(f"trainer tensor {key!r} must start with one of {TRAINER_PREFIXES}")
        tensors[key] = value.detach().cpu().contiguous()
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=model_metadata(model, vocab, **extra)))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The raw metadata strings of a safetensors file (``read_checkpoint_meta`` checks them)."""
    if Path(path).is_dir():
        best = Path(path) / "model_best.safetensors"  # a run folder: name its checkpoint rather than guess
        hint = f"; a run folder's best checkpoint is {best}" if best.is_file() else ""
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file{hint}")
    # A FIFO or a device would block safe_open or map endless bytes: refused before it opens (itmkit.inputs).
    input_file(path, "checkpoint", error=CheckpointError, missing="checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); truncated,"
                              " or not a checkpoint") from None


@attrs.frozen
class CheckpointMeta:
    """The metadata every itmkit checkpoint carries, each key read and type-checked once."""

    recipe: str  # the resolved recipe, TOML
    vocab: dict[str, Any]  # the vocabulary, official JSON
    vocab_sha256: str  # "" when absent
    feature_dim: int
    vocab_size: int
    num_regions: int | None
    raw: dict[str, str]


def read_checkpoint_meta(path: str | Path) -> CheckpointMeta:
    """Read and check the metadata of an itmkit checkpoint; one CheckpointError per problem."""
    raw = read_metadata(path)
    missing = [k for k in ("recipe", "vocab", "feature_dim", "vocab_size") if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: not an itmkit checkpoint (metadata lacks {', '.join(missing)})")
    vocab = _meta_json(raw, "vocab", path, dict, "the vocabulary as a JSON object")
    regions = raw.get("num_regions", "")
    return CheckpointMeta(
        recipe=raw["recipe"],
        vocab=vocab,
        vocab_sha256=raw.get("vocab_sha256", ""),
        feature_dim=_meta_int(raw, "feature_dim", path, 1, MAX_FEATURE_DIM),
        vocab_size=_meta_int(raw, "vocab_size", path, 1, MAX_VOCAB_SIZE),
        num_regions=_meta_int(raw, "num_regions", path, 1, MAX_REGIONS) if regions else None,
        raw=raw,
    )


def _meta_fault(path: str | Path, key: str, expected: str, value: str) -> CheckpointError:
    shown = value if len(value) <= 60 else value[:60] + "…"
    return CheckpointError(f"{path}: metadata {key!r} must be {expected}, got {shown!r}"
                           " (the file was edited or damaged)")


def _meta_int(raw: dict[str, str], key: str, path: str | Path, low: int, high: int) -> int:
    value = raw.get(key, "")
    if not (re.fullmatch("-?[0-9]{1,18}", value) and low <= int(value) <= high):
        raise _meta_fault(path, key, f"a whole number from {low} to {high}", value)
    return int(value)


def _meta_float(raw: dict[str, str], key: str, path: str | Path) -> float:
    value = raw.get(key, "")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number) or number == math.inf:
        raise _meta_fault(path, key, "a number", value)
    return number


def _meta_json(raw: dict[str, str], key: str, path: str | Path, kind: type, expected: str) -> Any:
    value = raw.get(key, "")
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        raise _meta_fault(path, key, expected, value) from None
    if not isinstance(parsed, kind):
        raise _meta_fault(path, key, expected, value)
    return parsed


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from the checkpoint's own recipe and load its weights, checking every key."""
    meta = read_checkpoint_meta(path)
    recipe = parse_recipe(meta.recipe, f"{path} [recipe metadata]")

    def words() -> Vocabulary:
        try:
            return Vocabulary.from_json(meta.vocab, source=f"{path}: metadata 'vocab'")
        except DataError as exc:
            raise CheckpointError(str(exc)) from None
        except (TypeError, ValueError) as exc:  # words that are not strings
            raise CheckpointError(f"{path}: metadata 'vocab' is not a vocabulary ({exc})") from None

    # The text encoder decides what the stored vocabulary is (a BERT encoder re-reads its tokenizer).
    vocab = recipe.text.encoder.spec.vocabulary(words)
    if meta.vocab_sha256 and vocab.sha256() != meta.vocab_sha256:
        raise CheckpointError(f"{path}: the caption vocabulary of {recipe.text.encoder.spec.name} differs from the"
                              " one the model was trained with (sha256 mismatch): its tokenizer files changed")
    ports = DataPorts(meta.feature_dim, meta.vocab_size, meta.num_regions, mask_id=getattr(vocab, "mask_id", None))
    model = build_model(recipe, ports)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            model_keys = {k for k in keys if not k.startswith(TRAINER_PREFIXES)}
            state = model.state_dict()
            unexpected, absent = sorted(model_keys - state.keys()), sorted(state.keys() - model_keys)
            if unexpected or absent:
                raise CheckpointError(
                    f"{path}: weights do not match the recipe's model;"
                    f" missing: {absent[:8] or 'none'}; unexpected: {unexpected[:8] or 'none'}"
                )
            tensors = {k: f.get_tensor(k) for k in model_keys}
            trainer = {k: f.get_tensor(k) for k in keys - model_keys}
    except (SafetensorError, OSError) as exc:  # the header read, the tensors did not: damaged since
        raise CheckpointError(f"{path}: cannot read its tensors ({exc})") from None
    for key, value in tensors.items():
        if value.shape != state[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)},"
                                  f" the model expects {tuple(state[key].shape)}")
    model.load_state_dict(tensors, strict=True)
    return Loaded(model.to(device), vocab, meta.raw, trainer)


# ------------------------------------------------------------------------------ resuming a run


@attrs.frozen
class TrainerState:
    """What ``--resume`` continues from, checked: counters, the optimizer's state, the RNG state."""

    epoch: int  # the last finished epoch
    best_rsum: float
    best_epoch: int  # -1 before any
    optimizer_blob: str  # param_groups and scalars, JSON (optimizer_to_tensors)
    optimizer_tensors: dict[str, torch.Tensor]
    rng: torch.Tensor
    rank_rngs: torch.Tensor | None = None  # (ranks, state) of a run on several processes, row r rank r's
    partial: str | None = None  # written within an epoch (--save-every): train.EpochProgress as JSON
    extras_rng: torch.Tensor | None = None  # the extra negatives' generator within that epoch
    scaler: str | None = None  # fp16's loss scaler (torch.amp.GradScaler.state_dict) as JSON


def trainer_state(loaded: Loaded, path: str | Path) -> TrainerState:
    """The trainer state of a ``last.safetensors``, every key and tensor checked; CheckpointError otherwise."""
    meta, tensors = loaded.meta, loaded.trainer
    if "optimizer" not in meta and not tensors:
        raise CheckpointError(f"{path}: holds a model only, without the optimizer and RNG state --resume needs"
                              " (a model_best.safetensors or an imported checkpoint?): --resume continues from the"
                              " last.safetensors a run writes after each epoch; to start afresh, leave out --resume")
    for key in ("epoch", "best_epoch", "best_rsum", "optimizer"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks {key!r}, part of the trainer state --resume needs"
                                  " (the file was edited or damaged)")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{path}: lacks the tensor 'rng.torch' (the RNG state --resume needs)")
    epoch = _meta_int(meta, "epoch", path, -1, 2**31)  # the last finished epoch: -1 within the first
    best_epoch = _meta_int(meta, "best_epoch", path, -1, epoch)
    best_rsum = _meta_float(meta, "best_rsum", path)
    blob = _meta_json(meta, "optimizer", path, dict, "the optimizer's param_groups and scalars as a JSON object")
    groups, scalars = blob.get("param_groups"), blob.get("scalars")
    if (not isinstance(groups, list) or not all(_param_group(g) for g in groups)
            or not isinstance(scalars, dict) or not all(_state_key(k) for k in scalars)):
        raise _meta_fault(path, "optimizer", "a JSON object of 'param_groups' (each with 'params') and 'scalars'",
                          meta["optimizer"])
    optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    odd = [k for k in optimizer_tensors if not _state_key(k.removeprefix("optimizer."))]
    if odd:
        raise CheckpointError(f"{path}: optimizer tensor {odd[0]!r} is not named optimizer.INDEX.KEY")
    rng, expected = tensors["rng.torch"], torch.get_rng_state()
    if rng.dtype != expected.dtype or rng.shape != expected.shape:
        raise CheckpointError(f"{path}: 'rng.torch' is {rng.dtype} {tuple(rng.shape)}, torch's RNG state is"
                              f" {expected.dtype} {tuple(expected.shape)}")
    rank_rngs = tensors.get("rng.torch.ranks")
    if rank_rngs is not None and (rank_rngs.dtype != expected.dtype or rank_rngs.dim() != 2
                                  or rank_rngs.shape[1] != expected.shape[0]):
        raise CheckpointError(f"{path}: 'rng.torch.ranks' is {rank_rngs.dtype} {tuple(rank_rngs.shape)}, expected"
                              f" {expected.dtype} (ranks, {expected.shape[0]})")
    extras = tensors.get("rng.extras")
    if extras is not None and (extras.dtype != torch.uint8 or extras.dim() != 1):
        raise CheckpointError(f"{path}: 'rng.extras' is {extras.dtype} {tuple(extras.shape)}, not a generator state")
    return TrainerState(epoch, best_rsum, best_epoch, meta["optimizer"], optimizer_tensors, rng.cpu(),
                        None if rank_rngs is None else rank_rngs.cpu(), meta.get("partial"),
                        None if extras is None else extras.cpu(), meta.get("scaler"))


def _param_group(group: Any) -> bool:
    """Whether a saved param group names its parameters by index, as torch's state_dict does."""
    params = group.get("params") if isinstance(group, dict) else None
    return isinstance(params, list) and all(type(i) is int for i in params)


def _state_key(name: str) -> bool:
    index, dot, key = name.partition(".")
    return bool(dot and key) and index.isascii() and index.isdigit()


# What a resumed run may change: running more (or fewer) epochs continues the same training, and
# the data may have moved (pre-flight checks that what is there fits the checkpoint's model).
RESUMABLE_CHANGES = ("train.epochs", "data.path")


def _flat(value: Any, key: str = "") -> dict[str, Any]:
    """A recipe dict as {key path: value}, list items as ``match[0].weight``."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}.{name}" if key else name).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}[{i}]").items()}
    return {key: value}


def recipe_changes(started: Recipe, now: Recipe) -> list[str]:
    """``KEY: OLD -> NEW`` for each recipe key that differs between a run's start and now, except
    the ones a resume may change (``RESUMABLE_CHANGES``); [] when the run can go on as it was."""
    old, new = _flat(started.to_dict()), _flat(now.to_dict())

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(none)"  # a stage's parameter, or a match branch

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(old.keys() | new.keys())
            if key not in RESUMABLE_CHANGES and (key not in old or key not in new or old[key] != new[key])]


def check_resumed_recipe(path: str | Path, recipe: Recipe) -> None:
    """Refuse to ``--resume`` the run whose ``last.safetensors`` is ``path`` with another recipe than it was
    started with: a mix of two settings in one run is no result of either. Only ``train.epochs`` and
    ``data.path`` (a dataset that moved) may change."""
    started = parse_recipe(read_checkpoint_meta(path).recipe, f"{path} [recipe metadata]")
    changes = recipe_changes(started, recipe)
    if changes:
        lines = "\n".join(f"  - {change}" for change in changes)
        raise CheckpointError(f"{path}: --resume continues the run with the recipe it was started with; these"
                              f" settings differ from it (only train.epochs and data.path may change on --resume); start a new run"
                              f" (another --out) to change these:\n{lines}")


def resume_training(path: str | Path, model: ITMModel, optimizer: torch.optim.Optimizer,
                    device: str | torch.device = "cpu") -> TrainerState:
    """Load a run's ``last.safetensors`` into ``model`` and ``optimizer`` and restore the RNG, after checking
    that it holds a trainer state and was written by the same model; returns the counters."""
    loaded = load_checkpoint(path, device)
    state = trainer_state(loaded, path)
    theirs, ours = loaded.model.data_ports, model.data_ports
    for what, a, b in (("image features", theirs.feature_dim, ours.feature_dim), ("caption words", theirs.vocab_size, ours.vocab_size)):
        if a != b:
            raise CheckpointError(f"{path}: was written for {a} {what}, the data now gives {b}:"
                                  " resume with the data it was trained on, or start afresh without --resume")
    saved, current = loaded.model.state_dict(), model.state_dict()
    other = sorted(set(saved) ^ set(current)) or [k for k in saved if saved[k].shape != current[k].shape]
    if other:
        raise CheckpointError(f"{path}: was written by another model than this recipe builds (first difference:"
                              f" {other[0]}): resume with the recipe of the run (OUT/recipe.toml), or start afresh")
    model.load_state_dict(saved)
    optimizer_from_tensors(optimizer, state.optimizer_tensors, state.optimizer_blob, str(path))
    torch.set_rng_state(state.rng)
    return state


# ------------------------------------------------------------------ optimizer state <-> tensors


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimizer's state dict: tensors by ``optimizer.{param}.{key}``, the rest as JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], blob: str,
                           source: str = "the checkpoint") -> None:
    """Restore what ``optimizer_to_tensors`` flattened."""
    info = json.loads(blob)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    saved = [len(g["params"]) for g in info["param_groups"]]
    expected = [len(g["params"]) for g in optimizer.param_groups]
    if saved != expected:
        raise CheckpointError(
            f"{source}: its optimizer state holds {saved} trainable parameters per group, this model has {expected};"
            " it was written by a model with other trainable parameters (an older itmkit, or another recipe):"
            " start the run afresh instead of resuming it")
    if not state:
        raise CheckpointError(f"{source}: holds no optimizer state tensors (optimizer.*): the file was edited or damaged")
    # Each parameter Adam or AdamW (train.py's optimizers) has stepped holds these, moments of its shape;
    # without this check torch restarts a lost moment silently or fails at the first step.
    needed = {"step", "exp_avg", "exp_avg_sq"} if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else set()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    indexes = [i for g in info["param_groups"] for i in g["params"]]
    for index, param in zip(indexes, params):
        lacking = sorted(needed - state[index].keys()) if index in state else []
        if lacking:
            raise CheckpointError(f"{source}: lacks the optimizer tensor optimizer.{index}.{lacking[0]}:"
                                  " the file was edited or damaged")
        for key, value in state.get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(f"{source}: optimizer.{index}.{key} has shape {tuple(value.shape)}, its parameter"
                                      f" {tuple(param.shape)}: the optimizer state belongs to another model")
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
