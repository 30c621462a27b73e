"""Small helpers with no knowledge of diffusion: image grids and atomically switched version directories."""

from .images import image_grid
from .run_lock import RunLock, RunLockedError
from .validation import check_field, field_checker, is_int
from .versioned_dir import VersionedDirectory

__all__ = ["image_grid", "VersionedDirectory", "RunLock", "RunLockedError", "check_field", "field_checker", "is_int"]
