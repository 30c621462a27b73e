"""The algorithms: ELEGANT (:class:`ElegantTrainer`) and SEIKO (:class:`SeikoTrainer`) over a controlled
process, with their validated configs; both share :class:`BaseTrainer`."""

from .base import BaseTrainer
from .elegant import ElegantTrainer
from .elegant_config import ElegantConfig
from .seiko import SeikoTrainer
from .seiko_config import SeikoConfig

__all__ = ["BaseTrainer", "ElegantTrainer", "ElegantConfig", "SeikoTrainer", "SeikoConfig"]
