"""itmkit-caan: CAAN (Zhang et al., CVPR 2020), context-aware attention (work in progress)."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
