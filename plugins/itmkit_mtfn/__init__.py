"""itmkit-mtfn: MTFN (Wang et al., ACM MM 2019), multi-modal tensor fusion, and its importer."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
