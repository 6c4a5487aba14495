"""Toy data, models and a recording callback shared by the learner tests (callback, learner, callbacks, lrfind, experiment)."""
import torch
from torch import nn

from miniai.callback import Callback
from miniai.datasets import DataLoaders, TensorLoader

EVENTS = ('before_fit after_fit cleanup_fit before_epoch after_epoch cleanup_epoch before_batch after_predict '
          'after_loss after_backward after_step after_batch cleanup_batch').split()


def toy_dls(n_train=10, n_valid=4, bs=4, n_in=3, seed=0):
    "Regression data: x (N, n_in), y (N, 1), unshuffled, batches of `bs`."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, n_in, generator=g), torch.randn(n_train + n_valid, 1, generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs), TensorLoader(x[n_train:], y[n_train:], bs))


def class_dls(n_train=40, n_valid=22, bs=4, n_classes=5, seed=0):
    "Classification data: x (N, 3), y (N,) in [0, n_classes), unshuffled."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 3, generator=g), torch.randint(0, n_classes, (n_train + n_valid,), generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs), TensorLoader(x[n_train:], y[n_train:], bs))


class Recorder(Callback):
    "Records `(event, learn.training)` for every event."
    def __init__(self): self.events = []
    def __getattribute__(self, name):
        if name in EVENTS: return lambda learn: self.events.append((name, learn.training))
        return super().__getattribute__(name)

    def names(self): return [e for e, _ in self.events]


def bn_model():
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def state_of(model):
    "A copy of the parameters and buffers."
    return {k: v.clone() for k, v in model.state_dict().items()}
