"""itmkit-dprnn: DP-RNN (Chen & Luo, AAAI 2020), dual-path RNN with a multi-attention cross matching model."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
