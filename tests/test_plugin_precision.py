"""Mixed precision in the plugins: under bf16 autocast every plugin's sensitive steps run in float32.

Issue 15's rule (``itmkit.precision``): LogSumExp, softmax, norms, exp-based aggregations and the losses run
in float32 even where a matrix product upstream left bf16 or fp16, through ``itmkit.ops.float32``. Here each
of the plugins' built-in recipes (one of each structurally distinct kind, see RECIPES) is built at a tiny
size and run on a small block under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as ``itmkit.precision``
does: scoring (no autograd: the scoring engine's in-place paths) and one training step (the losses, the
objectives, the training-only statistics). The check watches the calls themselves: every softmax,
LogSumExp, exp, log, norm, square root, normalisation and loss called from a plugin's code must receive
float32 (or float64); the core's own calls are tests/test_precision.py's. A sigmoid is not watched (the GRU
and fusion gates are ordinary activations): a plugin's score sigmoid runs in float32, which the check of the
score's dtype covers. Fused attention kernels (``F.scaled_dot_product_attention``: DIME's IMRC, BERT) keep
their softmax inside and are not watched. The bf16 scores must agree with the float32 ones within
SCORE_TOLERANCE (0.03 absolute; see there).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit.testing import recipe_plugins
from itmkit.types import Regions, Tokens, lengths_to_mask

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "recipes"
# One recipe of each kind that runs different plugin code; the COCO twin of an F30K recipe differs in its
# numbers only. test_every_plugin_with_a_recipe_is_covered keeps the list from missing a plugin.
RECIPES = [
    "bfan_f30k_equal", "bfan_f30k_prob", "caan_f30k", "dime_f30k_i2t", "dime_f30k_t2i", "dime_sgraf",
    "dprnn_f30k_word", "dprnn_f30k_object", "dprnn_shapes_macm", "dprnn_scan", "gpo_f30k_bert", "gpo_f30k_bigru",
    "imram_f30k_full", "imram_bfan", "mmca_f30k", "mtfn_f30k", "pfan_f30k_t2i", "pfan_f30k_i2t", "ramen_f30k",
    "ramen_scan", "saem_f30k", "scan_f30k_t2i_lse", "scan_f30k_i2t_avg", "sgraf_sgr_f30k", "sgraf_saf_f30k",
    "shan_f30k_full", "shan_f30k_i2t", "shan_f30k_t2i", "shan_gpo", "vsrn_coco", "vsrn_f30k",
]
# Recipes whose score is a bare matrix product (core.cosine / core.dot of pooled vectors, RAMEN's MLP readout):
# it may be bf16 under autocast; the scoring engine stores the matrix in float32 and the loss casts it
# (ITMModel.training_step). Every other score must end in a float32 step (a norm, LogSumExp, a float32 sigmoid).
PRODUCT_SCORES = {"gpo_f30k_bert", "gpo_f30k_bigru", "saem_f30k", "vsrn_coco", "vsrn_f30k", "ramen_f30k",
                  "ramen_scan"}
# bf16 keeps 8 bits of mantissa. On these random tiny models (scores from -1.5 to 1.4: cosines, sums of
# cosines over steps or terms, sigmoids) the largest |bf16 - float32| difference seen was 0.013 (imram_bfan;
# BFAN prob 0.009, IMRAM 0.007, SHAN and PFAN t-i 0.006, DP-RNN 0.005, the others 0.004 or less): 0.03 leaves
# a margin of two and more.
SCORE_TOLERANCE = 0.03

# Sizes small enough for a test (a recipe's own sizes are a paper's), set on whichever table has them.
SMALL = {"embed_dim": 16, "word_dim": 8, "sim_dim": 8, "heads": 2, "intermediate": 16, "hid_imrc": 8,
         "hid_router": 8, "path_hid": 8, "channels": 8, "d_pe": 8, "d_hidden": 8, "dim_hv": 16, "dim_ht": 16,
         "dim_mm": 16, "hidden_dim": 16, "aggregator_dim": 16, "position_dim": 8, "width": 16,
         "mmc_sizes": "[16,16]", "readout_sizes": "[16]"}

WATCHED = {
    torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax,
    torch.logsumexp, torch.Tensor.logsumexp, torch.logaddexp, torch.exp, torch.Tensor.exp, torch.Tensor.exp_,
    torch.log, torch.Tensor.log, torch.Tensor.log_, torch.sqrt, torch.Tensor.sqrt, torch.rsqrt, torch.Tensor.rsqrt,
    torch.linalg.vector_norm, torch.norm, torch.Tensor.norm, F.normalize, F.cosine_similarity, F.softplus,
    F.cross_entropy, F.nll_loss,
}
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
WATCHED_CODE = (str(ROOT / "plugins"), str(ROOT / "itmkit"))


class SensitiveCalls(TorchFunctionMode):
    """Records the input dtype of every watched call made from a plugin's own code or itmkit's core."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in WATCHED:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):  # F.normalize & co.
                frame = frame.f_back
            where = frame.f_code.co_filename if frame is not None else ""
            x = args[0] if args else next(iter(kwargs.values()), None)
            if where.startswith(WATCHED_CODE) and torch.is_tensor(x):
                site = f"{Path(where).relative_to(ROOT)}:{frame.f_lineno} {getattr(func, '__name__', func)}"
                self.seen.setdefault(site, set()).add(x.dtype)
        return func(*args, **kwargs)

    def low_precision(self) -> dict[str, list[str]]:
        return {site: sorted(str(d) for d in dtypes) for site, dtypes in self.seen.items()
                if dtypes - {torch.float32, torch.float64}}


def small_overrides(path: Path) -> list[str]:
    """--set items that shrink every size the recipe sets, and point a BERT recipe at the tiny random BERT."""
    raw = tomllib.loads(path.read_text())
    out: list[str] = []

    def walk(node, keys: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*keys, str(key)])
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, value in enumerate(node):
                walk(value, [*keys, str(i)])
        elif keys[-1] in SMALL and not isinstance(node, bool):
            out.append(f"{'.'.join(keys)}={SMALL[keys[-1]]}")
        elif keys[:2] == ["text", "encoder"] and keys[-1] == "path":
            from itmkit_bert.stages import TINY

            out.extend([f"text.encoder.path={TINY}", "text.encoder.pretrained=false"])

    for table in ("recipe", "image", "text", "match", "objective", "loss"):
        if table in raw:
            walk(raw[table], [table])
    return out


def tiny_block(n: int = 4, regions: int = 6, features: int = 12, vocab: int = 64):
    """n images (one with 2 padded regions; boxes and sizes for PFAN / DP-RNN) and n captions of 3 to 8 tokens."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (n,), generator=g)
    lengths[0] = 8
    ids = torch.randint(5, vocab, (n, 8), generator=g).masked_fill(~lengths_to_mask(lengths, 8), 0)
    counts = torch.full((n,), regions)
    counts[1] = regions - 2
    feats = torch.rand(n, regions, features, generator=g) * lengths_to_mask(counts, regions)[..., None]
    corner = torch.rand(n, regions, 2, generator=g) * 50
    boxes = torch.cat([corner, corner + 10 + torch.rand(n, regions, 2, generator=g) * 40], dim=-1)
    return Regions(feats, counts, boxes, torch.full((n, 2), 100.0)), Tokens(ids, lengths)


def tiny_model(name: str):
    path = RECIPE_DIR / f"{name}.toml"
    recipe = load_recipe(path, small_overrides(path))
    return build_model(recipe, DataPorts(feature_dim=12, vocab_size=64, num_regions=6, mask_id=4), seed=0)


def test_every_plugin_with_a_recipe_is_covered():
    every = set().union(*(recipe_plugins(p) for p in RECIPE_DIR.glob("*.toml")))
    covered = set().union(*(recipe_plugins(RECIPE_DIR / f"{name}.toml") for name in RECIPES))
    assert every - covered == set(), f"add a recipe of {sorted(every - covered)} to RECIPES"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN: CPU bf16 unavailable")
@pytest.mark.parametrize("name", RECIPES)
def test_sensitive_steps_run_in_float32_and_bf16_scores_agree(name):
    model = tiny_model(name).eval()
    regions, tokens = tiny_block()
    with torch.no_grad():
        full = model.score(model.encode_images(regions), model.encode_texts(tokens))
        calls = SensitiveCalls()
        with calls, torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.score(model.encode_images(regions), model.encode_texts(tokens))
    assert full.dtype == torch.float32
    assert half.dtype == torch.float32 or name in PRODUCT_SCORES, half.dtype
    assert torch.isfinite(half).all()
    difference = (half.float() - full).abs().max().item()
    assert 0 < difference <= SCORE_TOLERANCE, difference  # not zero: bf16 really ran

    model.train()  # the losses, the objectives and the training-only paths (batch statistics, path terms)
    training = SensitiveCalls()
    with training, torch.autocast("cpu", dtype=torch.bfloat16):
        step = model.training_step(regions, tokens, torch.arange(4), epoch=1)
    assert step.loss.dtype == torch.float32 and torch.isfinite(step.loss)
    assert {**calls.low_precision(), **training.low_precision()} == {}
