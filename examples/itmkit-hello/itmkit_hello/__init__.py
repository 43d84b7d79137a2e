"""itmkit-hello: a minimal third-party itmkit plugin contributing one stage, ``hello.gated_mean``."""

import itmkit

from itmkit_hello.stages import GatedMean

__version__ = "0.1.0"


@itmkit.hookimpl
def register_stages():
    return [GatedMean]
