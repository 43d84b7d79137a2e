"""itmkit-pfan: PFAN (Wang et al., IJCAI 2019), position-focused attention over image grid blocks."""

import itmkit

from itmkit_pfan.importer import convert
from itmkit_pfan.stages import CosineMax, Position


@itmkit.hookimpl
def register_stages():
    return [Position, CosineMax]


@itmkit.hookimpl
def register_importers():
    return {"pfan": convert}
