"""itmkit-mtfn: MTFN (Wang et al., ACM MM 2019), multi-modal tensor fusion, and its importer."""

import itmkit

from itmkit_mtfn.importer import convert
from itmkit_mtfn.stages import Fusion, SkipThoughts


@itmkit.hookimpl
def register_stages():
    return [SkipThoughts, Fusion]


@itmkit.hookimpl
def register_importers():
    return {"mtfn": convert}
