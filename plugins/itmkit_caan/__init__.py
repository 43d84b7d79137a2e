"""itmkit-caan: CAAN (Zhang et al., CVPR 2020), the pair-dependent context-aware attention score."""

import itmkit

from itmkit_caan.stages import Attention


@itmkit.hookimpl
def register_stages():
    return [Attention]
