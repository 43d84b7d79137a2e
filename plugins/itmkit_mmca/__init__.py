"""itmkit-mmca: MMCA (Wei et al., CVPR 2020) self-attention pools and the pair-dependent cross-attention branch."""

import itmkit

from itmkit_mmca.stages import Cross, SelfAttention


@itmkit.hookimpl
def register_stages():
    return [SelfAttention, Cross]
