"""Optimizer classes."""

from .adam import Adam, AdamW
from .base import Optimizer
from .loss_scale import LossScaler
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LossScaler"]
