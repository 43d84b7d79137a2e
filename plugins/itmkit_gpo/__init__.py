"""itmkit-gpo: GPO / VSE-infinity (Chen et al., CVPR 2021): generalized pooling, its encoders and importer."""

import itmkit

from itmkit_gpo.importer import convert
from itmkit_gpo.stages import Bert, BiGRU, Pool, Precomp


@itmkit.hookimpl
def register_stages():
    return [Pool, Precomp, BiGRU, Bert]


@itmkit.hookimpl
def register_importers():
    return {"gpo": convert}
