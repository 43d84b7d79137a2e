"""itmkit-dime: DIME (Qu et al., SIGIR 2021), dynamic modality interaction modeling, and its importer."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
