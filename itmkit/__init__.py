"""itmkit: image-text matching models as typed, interchangeable stages declared in TOML recipes."""

__version__ = "0.1.0"

from itmkit.hookspecs import hookimpl  # noqa: E402
from itmkit.stage import PortError, Stage, param  # noqa: E402

__all__ = ["__version__", "hookimpl", "Stage", "PortError", "param"]
