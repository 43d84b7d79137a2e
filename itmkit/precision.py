"""Mixed precision for training and evaluation: ``--precision fp32 | bf16 | fp16``.

bf16 and fp16 run the towers' and branches' matrix products under ``torch.autocast`` (CUDA, or a
CPU with bf16 instructions: AVX512-BF16 or AMX), where they are two to several times faster and
half the memory. What loses accuracy in 8 (bf16) or 11 (fp16) bits of mantissa runs in float32
whatever autocast would do: every norm (``ops.l2norm``, ``l1norm``, ``cosine``), SCAN's raw-affinity
normalisation and the attention softmax (``itmkit.attention``), LogSumExp pooling, and the loss
(the score matrix is cast to float32 before it), through ``ops.float32``. Encodings are stored in
float32 in the scoring galleries, and the score matrix is float32.

fp16's small range needs the loss scaled before the backward pass so that small gradients do not
flush to zero (``torch.amp.GradScaler``): a step whose scaled gradients overflow is skipped and the
scale lowered. bf16 has float32's range and needs no scaler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from itmkit.errors import ItmkitError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """A clear error for a precision this device cannot run."""
    if precision not in PRECISIONS:
        raise ItmkitError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ItmkitError("--precision bf16: this GPU has no bfloat16 support (before Ampere); use fp16")


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Autocast for ``precision`` on ``device``'s type; nothing for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision]):
        yield


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """The loss scaler: active for fp16 only (for fp32 and bf16 its calls pass through unchanged)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
