"""miniai.device: the default device, moving nested batches, seeding every generator."""
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers import toy_dls
from miniai.callback import Callback
from miniai.device import def_device, set_seed, to_cpu, to_device
from miniai.learner import TrainLearner


def test_def_device_is_cuda_then_mps_then_cpu():
    mps = getattr(torch.backends, 'mps', None)
    want = ('cuda' if torch.cuda.is_available() else
            'mps' if mps is not None and mps.is_available() else 'cpu')
    assert isinstance(def_device, torch.device) and def_device.type == want


def test_to_device_and_to_cpu_are_recursive():
    b = {'x': torch.ones(2, dtype=torch.float16), 'y': [torch.zeros(1), (torch.ones(1),)], 'n': 3}
    c = to_cpu(to_device(b, 'cpu'))
    assert c['x'].dtype == torch.float32 and isinstance(c['y'][1], tuple) and c['n'] == 3
    assert isinstance(c['y'], list) and torch.equal(c['y'][1][0], torch.ones(1))


def test_to_cpu_detaches():
    x = torch.ones(3, requires_grad=True) * 2
    y = to_cpu([x])[0]
    assert not y.requires_grad and torch.equal(y, torch.full((3,), 2.))


def test_set_seed_seeds_python_numpy_and_torch():
    set_seed(3)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == random.Random(3).random()
    assert got[1] == np.random.RandomState(3).rand()
    assert torch.equal(got[2], torch.rand(2, generator=torch.Generator().manual_seed(3)))


def test_set_seed_makes_two_fits_identical():
    def run():
        losses = []
        class L(Callback):
            def after_loss(self, learn): losses.append(learn.loss.item())
        set_seed(7)
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        dls = toy_dls(n_train=40, bs=8)
        dls.train.shuffle = True
        TrainLearner(model, dls, F.mse_loss, lr=0.05, cbs=[L()]).fit(2)
        return losses
    a, b = run(), run()
    assert a == b and len(a) == 2*(5 + 1)
