"""itmkit-imram: IMRAM (Chen et al., CVPR 2020), iterative matching with recurrent attention memory (work in progress)."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
