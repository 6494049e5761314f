"""Optimizer classes."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .base import Optimizer
from .grouping import group_params
from .lamb import LAMB
from .lbfgs import LBFGS
from .loss_scale import LossScaler
from .lion import Lion
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .sam import SAM
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion", "Adamax", "NAdam",
           "RAdam", "LossScaler"]
__all__ += ["LAMB"]
__all__ += ["SAM"]
__all__ += ["LBFGS"]
__all__ += ["group_params"]
