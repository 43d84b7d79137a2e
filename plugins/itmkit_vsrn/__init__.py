"""itmkit-vsrn: VSRN (Li et al., ICCV 2019): region reasoning (Rs-GCN), a GRU over regions, caption generation."""

import itmkit

from itmkit_vsrn.importer import convert
from itmkit_vsrn.stages import GRU, Caption, L2Norm, RsGCN


@itmkit.hookimpl
def register_stages():
    return [L2Norm, RsGCN, GRU, Caption]


@itmkit.hookimpl
def register_importers():
    return {"vsrn": convert}
