"""Optimizer classes."""

from .adam import Adam, AdamW
from .base import Optimizer
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]
