"""itmkit-shan: SHAN (Ji, Chen & Wang, IJCAI 2021), step-wise hierarchical alignment (work in progress)."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
