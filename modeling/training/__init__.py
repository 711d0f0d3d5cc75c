"""Training engine: TensorData, Trainer/fit (a plain loss or a batch-level `Objective`), schedules,
AdamW with discriminative lrs, lr finder, DistributedDataParallel under torchrun (`distributed`),
ensembles of seeds or snapshots (`ensemble`)."""

from modeling.training import callbacks, distributed
from modeling.training.callbacks import Callback, EarlyStopping, History, ProgressBar, Snapshots
from modeling.training.data import TensorData, batches
from modeling.training.lr_finder import LRFinderResult, lr_find
from modeling.training.objectives import Objective
from modeling.training.optim import freeze, make_optimizer, spread_lrs, unfreeze
from modeling.training.schedules import Schedule, make_schedule
from modeling.training.trainer import Trainer, fit

__all__ = [
    "Callback",
    "EarlyStopping",
    "History",
    "LRFinderResult",
    "Objective",
    "ProgressBar",
    "Schedule",
    "Snapshots",
    "TensorData",
    "Trainer",
    "batches",
    "callbacks",
    "distributed",
    "fit",
    "freeze",
    "lr_find",
    "make_optimizer",
    "make_schedule",
    "spread_lrs",
    "unfreeze",
]
