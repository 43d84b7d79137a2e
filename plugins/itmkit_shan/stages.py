"""SHAN (Ji, Chen & Wang, IJCAI 2021): step-wise hierarchical alignment, as two scoring stages.

A SHAN model in a recipe is one matching branch over plain fragment towers:

    [image] encoder = core.precomp              v_i = W_v o_i + b_v        (k, D)  eq. 1
    [text]  encoder = core.bigru                t_j = (h->_j + h<-_j) / 2  (n, D)  eq. 2
    [[match]] similarity = shan.hierarchy       S_L2L + S_G2L + S_G2G             eq. 3-16

``shan.hierarchy`` is pair-dependent at every level (the context vectors v_c, t_c are fused from
cross-attended fragments); it scores a whole Ni x Nt block at once (``itmkit_shan.hierarchy``).
``shan.global_to_local`` runs steps 2 and 3 alone with a tower's pooled vectors (GPO's, say) as
v_c and t_c, for recipes that borrow SHAN's context-level alignment; both call the same
``global_alignment``. Every open choice of the paper is a parameter (docs/plugins/shan.md).
"""

from __future__ import annotations

import attrs
from torch import nn

from itmkit.ops import EPS
from itmkit.stage import PortError, Stage, param
from itmkit.types import GlobalPort, LocalPort, Port, ScorePort
from itmkit_shan.hierarchy import GATES, GLOBAL_STEPS, L2L_POOLS, STEPS, VARIANTS, GlobalToLocal as GlobalToLocalModule
from itmkit_shan.hierarchy import StepwiseHierarchy

FLOAT = 4  # bytes of a float32

VARIANT_HELP = ("which directions run the hierarchy (paper Sec. 4.2): 'full' both; 't2i' words query the regions"
                " (L2L keeps sum_j R_t, G2L cos(t_c, v*_c), G2G cos(mean of regions, t_c + v*_c)); 'i2t' the mirror")


def _same_width(stage: str, **ports: LocalPort | GlobalPort) -> int:
    dims = {name: port.dim for name, port in ports.items()}
    if len(set(dims.values())) != 1:
        listed = ", ".join(f"{name} {dim}" for name, dim in dims.items())
        raise PortError(f"{stage}: its inputs must share one width (cosines and sums of regions and words), got"
                        f" {listed}; give both towers the same embed_dim")
    return next(iter(dims.values()))


def _width(ports: dict[str, Port] | None) -> int:
    """D from the wired ports (the engine passes them), SHAN's 1024 when a caller gives none."""
    return ports["image"].dim if ports and "image" in ports else 1024


@attrs.frozen(kw_only=True)
class Hierarchy(Stage):
    """SHAN: fragment-level L2L, context-level G2L and G2G alignment of each pair, summed (S_L2L + S_G2L + S_G2G)."""

    name = "shan.hierarchy"
    kind = "similarity"
    paper = "Ji, Chen & Wang 2021 (SHAN), Sec. 3.2 eq. 3-15 and eq. 16; variants of Sec. 4.2"

    variant: str = param("full", VARIANT_HELP, choices=VARIANTS)
    steps: str = param("l2l+g2l+g2g", "alignment steps kept (Table 3 ablations: 'l2l', 'l2l+g2l'; the model: all"
                                      " three)", choices=STEPS)
    lambda_softmax: float = param(15.0, "inverse temperature lambda of both L2L softmaxes, eq. 4-5 (SHAN: 15)",
                                  gt=0.0)
    mu1: float = param(0.3, "weight of the region-queried L2L term, 1 - mu1 on the word-queried one, eq. 7 (SHAN:"
                            " 0.3)", ge=0.0, le=1.0)
    mu2: float = param(0.5, "weight of the image-global G2L term, 1 - mu2 on the text-global one, eq. 13 (SHAN:"
                            " 0.5)", ge=0.0, le=1.0)
    l2l_pool: str = param("sum", "eq. 7 over the fragments' cosines: 'sum' as printed or 'mean' as the text says"
                                 " ('taking average')", choices=L2L_POOLS)
    normalize_affinity: bool = param(True, "l2-normalise the projections W~_v v, W~_t t before eq. 3, so A is a"
                                           " cosine (ASSUMPTION: lambda 15 on raw bilinear scores saturates;"
                                           " false = eq. 3 as printed)")
    g2l_temperature: float = param(1.0, "G2L softmaxes over cos / temperature, eq. 10-11 (printed: none, i.e. 1)",
                                   gt=0.0)
    gate: str = param("scalar", "the eq. 8 gate g: one value per fragment ('g in [0, 1] is a gate value', the"
                                " paper's words) or one per dimension ('vector', as IMRAM's gate; 25x the scoring"
                                " cost); separate weights per modality either way (ASSUMPTION)", choices=GATES)
    eps: float = param(EPS, "floor of the norm products of every cosine (SCAN: 1e-8)", gt=0.0)

    def ports(self, image: LocalPort, text: LocalPort) -> ScorePort:
        _same_width(self.name, image=image, text=text)
        return ScorePort()

    def build(self, image: LocalPort, text: LocalPort) -> nn.Module:
        return StepwiseHierarchy(dim=image.dim, variant=self.variant, steps=self.steps,
                                 lambda_softmax=self.lambda_softmax, mu1=self.mu1, mu2=self.mu2, l2l_pool=self.l2l_pool,
                                 normalize_affinity=self.normalize_affinity, g2l_temperature=self.g2l_temperature,
                                 gate=self.gate, eps=self.eps)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict[str, Port] | None = None) -> int:
        # float32 numbers per pair at the peak of a no-grad forward. Scalar gate (or L2L alone): the
        # affinity logits and a softmax of them, and for one direction at a time its dots, the weights
        # times the dots or the Gram matrix and a layout copy of the weights (6 k x n in all), a few
        # numbers per fragment and a few D-vectors per pair (the pooled contexts and steps 2-3). Vector
        # gate: the logits, their masked copy and a softmax (3 k x n), then one side's attended vectors
        # and gate (2 max(k, n) x D; the fusion runs in place).
        k, n, d = image_len, text_len, _width(ports)
        if self.gate == "vector" and self.steps != "l2l":
            return FLOAT * (3 * k * n + 2 * max(k, n) * d + 4 * (k + n) + 8 * d)
        return FLOAT * (6 * k * n + 8 * (k + n) + 8 * d)


@attrs.frozen(kw_only=True)
class GlobalToLocalStage(Stage):
    """SHAN's context-level G2L and G2G with the towers' pooled vectors as the global contexts v_c, t_c."""

    name = "shan.global_to_local"
    kind = "similarity"
    paper = ("Ji, Chen & Wang 2021 (SHAN), Sec. 3.2 eq. 10-15 (G2L, G2G), with v_c, t_c taken from the towers'"
             " pools instead of eq. 8-9")

    variant: str = param("full", "which global vectors query the other side's fragments: 'full' both; 't2i' only"
                                 " t_c (G2L cos(t_c, v*_c), G2G cos(v_c, t_c + v*_c)); 'i2t' only v_c",
                         choices=VARIANTS)
    steps: str = param("g2l+g2g", "which context-level steps score: both (SHAN's steps 2 and 3) or one",
                       choices=GLOBAL_STEPS)
    mu2: float = param(0.5, "weight of the image-global G2L term, 1 - mu2 on the text-global one, eq. 13 (SHAN:"
                            " 0.5)", ge=0.0, le=1.0)
    g2l_temperature: float = param(1.0, "G2L softmaxes over cos / temperature, eq. 10-11 (printed: none, i.e. 1)",
                                   gt=0.0)
    eps: float = param(EPS, "floor of the norm products of every cosine (SCAN: 1e-8)", gt=0.0)

    def ports(self, image: LocalPort, text: LocalPort, image_global: GlobalPort, text_global: GlobalPort) -> ScorePort:
        _same_width(self.name, image=image, text=text, image_global=image_global, text_global=text_global)
        return ScorePort()

    def build(self, image: LocalPort, text: LocalPort, image_global: GlobalPort, text_global: GlobalPort) -> nn.Module:
        return GlobalToLocalModule(variant=self.variant, steps=self.steps, mu2=self.mu2,
                                   g2l_temperature=self.g2l_temperature, eps=self.eps)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict[str, Port] | None = None) -> int:
        # per pair: cosine logits and weights over the words and the regions, and the expanded,
        # attended and summed global vectors (a few D each).
        return FLOAT * (3 * (text_len + image_len) + 8 * _width(ports))
