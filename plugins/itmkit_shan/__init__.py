"""itmkit-shan: SHAN (Ji, Chen & Wang, IJCAI 2021), step-wise hierarchical alignment as scoring stages."""

import itmkit

from itmkit_shan.stages import GlobalToLocalStage, Hierarchy


@itmkit.hookimpl
def register_stages():
    return [Hierarchy, GlobalToLocalStage]
