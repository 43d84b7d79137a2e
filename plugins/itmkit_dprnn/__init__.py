"""itmkit-dprnn: DP-RNN (Chen & Luo, AAAI 2020), dual-path RNN with a multi-attention cross matching model."""

import itmkit

from itmkit_dprnn.pair import Recurrent
from itmkit_dprnn.stages import Macm, Objects


@itmkit.hookimpl
def register_stages():
    return [Objects, Macm, Recurrent]
