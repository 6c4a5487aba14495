"""Benchmark: one epoch of the lesson's BatchNorm CNN at batch 256, three ways, in one run.

1. a plain PyTorch loop over the in-memory batches;
2. our Learner with DeviceCB + MetricsCB + ProgressCB + ActivationStats on the same in-memory batches;
3. the same Learner on the course's per-item `DataLoaders.from_dd` path (PIL -> tensor per item).

Each timed run starts from the same weights. Runs 1 and 2 alternate `--reps` times, so slow drift of a noisy machine
hits both alike. Prints the fastest of each (noise from other processes only ever adds time), its ratio to the plain
loop, and the median of the per-pair ratios (each Learner run against the plain run just before it).

    uv run python bench/bench_learner.py [--reps 3] [--skip-items]
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from miniai.activations import ActivationStats
from miniai.datasets import DataLoaders, fashion_dls, inplace, load_fashion_mnist
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner, def_device, set_seed

BS, LR = 256, 0.1


def conv(ni, nf, act=True):
    layers = [nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=not act)]
    if act: layers += [nn.BatchNorm2d(nf), nn.ReLU()]
    return nn.Sequential(*layers)


def get_model():
    return nn.Sequential(conv(1, 8), conv(8, 16), conv(16, 32), conv(32, 64), conv(64, 10, act=False), nn.Flatten())


def opt_func(params, lr): return optim.SGD(params, lr=lr, momentum=0.9)


def plain_loop(model, dls):
    model.to(def_device).train()
    opt = opt_func(model.parameters(), LR)
    for xb, yb in dls.train:
        xb, yb = xb.to(def_device), yb.to(def_device)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward(); opt.step(); opt.zero_grad()


def with_learner(model, dls):
    cbs = [DeviceCB(), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB(),
           ActivationStats(lambda m: isinstance(m, nn.ReLU))]
    TrainLearner(model, dls, F.cross_entropy, lr=LR, cbs=cbs, opt_func=opt_func).fit(1, valid=False)


def timed(f, *args):
    t0 = time.perf_counter(); f(*args)
    if def_device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--skip-items', action='store_true', help='skip the slow per-item path')
    args = ap.parse_args()
    set_seed(0)
    init = get_model()
    mem = fashion_dls(BS, device=def_device)
    timed(plain_loop, copy.deepcopy(init), mem)          # warm-up: allocator, kernels, page cache
    plain, learner = [], []
    for _ in range(args.reps):
        plain.append(timed(plain_loop, copy.deepcopy(init), mem))
        learner.append(timed(with_learner, copy.deepcopy(init), mem))
    base = min(plain)
    print(f"device {def_device}, torch threads {torch.get_num_threads()}, batch {BS}, {len(mem.train)} batches/epoch")
    print(f"plain PyTorch loop (in-memory)            {base:6.2f} s   1.00x   (runs: {', '.join(f'{t:.2f}' for t in plain)})")
    t = min(learner)
    print(f"Learner + 4 callbacks (in-memory)         {t:6.2f} s   {t/base:.2f}x   (runs: {', '.join(f'{t:.2f}' for t in learner)})")
    pairs = sorted(l / p for p, l in zip(plain, learner))
    print(f"  per-pair ratios Learner/plain: {', '.join(f'{r:.2f}' for r in pairs)}; median {statistics.median(pairs):.2f}x")
    if not args.skip_items:
        def to_tensor(b): b['image'] = [TF.to_tensor(o) for o in b['image']]
        items = DataLoaders.from_dd(load_fashion_mnist().with_transform(inplace(to_tensor)), BS)
        t = timed(with_learner, copy.deepcopy(init), items)
        print(f"Learner + 4 callbacks (per-item from_dd)  {t:6.2f} s   {t/base:.2f}x")


if __name__ == '__main__':
    main()
