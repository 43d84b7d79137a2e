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
import os
import tempfile
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
from itmkit.errors import CheckpointError
from itmkit.recipe import parse_recipe

TRAINER_PREFIXES = ("optimizer.", "rng.")


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a fsynced temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from the checkpoint's own recipe and load its weights, checking every key."""
    meta = read_metadata(path)
    missing = [k for k in ("recipe", "vocab", "feature_dim", "vocab_size") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not an itmkit checkpoint (metadata lacks {', '.join(missing)})")
    recipe = parse_recipe(meta["recipe"], f"{path} [recipe metadata]")
    # The text encoder decides what the stored vocabulary is (a BERT encoder re-reads its tokenizer).
    vocab = recipe.text.encoder.spec.vocabulary(lambda: Vocabulary.from_json(json.loads(meta["vocab"])))
    if meta.get("vocab_sha256") and vocab.sha256() != meta["vocab_sha256"]:
        raise CheckpointError(f"{path}: the caption vocabulary of {recipe.text.encoder.spec.name} differs from the"
                              " one the model was trained with (sha256 mismatch): its tokenizer files changed")
    ports = DataPorts(int(meta["feature_dim"]), int(meta["vocab_size"]), int(meta["num_regions"]) if meta.get("num_regions") else None,
                      mask_id=getattr(vocab, "mask_id", None))
    model = build_model(recipe, ports)
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
    for key, value in tensors.items():
        if value.shape != state[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(state[key].shape)}")
    model.load_state_dict(tensors, strict=True)
    return Loaded(model.to(device), vocab, meta, trainer)


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
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
