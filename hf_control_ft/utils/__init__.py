"""Small helpers with no knowledge of diffusion: image grids and atomically switched version directories."""

from .images import image_grid
from .versioned_dir import VersionedDirectory

__all__ = ["image_grid", "VersionedDirectory"]
