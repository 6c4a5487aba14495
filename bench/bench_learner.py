"""Benchmark: one epoch of the lesson's BatchNorm CNN at batch 256, three ways, in one run.

1. a plain PyTorch loop over the in-memory batches;
2. our Learner with DeviceCB + MetricsCB + ProgressCB + ActivationStats on the same in-memory batches;
3. the same Learner on the course's per-item `DataLoaders.from_dd` path (PIL -> tensor per item).

Each timed run starts from the same weights. After one untimed run of each, runs 1 and 2 are timed in `--reps` pairs,
each pair in the opposite order to the one before, so slow drift of a noisy machine hits both alike. Prints the
fastest of each (noise from other processes only ever adds time), its ratio to the plain loop, and the median of the
per-pair ratios (each Learner run against the plain run of its pair).

Pairs of whole epochs still see the machine change speed between them (by +-20% on the VMs we use), so a second
measurement runs the two loops in lockstep, one batch of each in turn (see `Lockstep`), and prints the ratio of
their times per epoch.

    uv run python bench/bench_learner.py [--reps 16] [--lockstep-reps 5] [--skip-items]
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
from miniai import experiment
from miniai.callbacks import DeviceCB, MetricsCB, ProgressCB
from miniai.device import def_device, set_seed
from miniai.learner import TrainLearner

BS, LR = 256, 0.1


def get_model():
    "The lessons' CNN with BatchNorm after each convolution (from miniai.experiment)."
    return experiment.get_model(norm=nn.BatchNorm2d)


def opt_func(params, lr): return optim.SGD(params, lr=lr, momentum=0.9)


def plain_step(model, opt, xb, yb):
    xb, yb = xb.to(def_device), yb.to(def_device)
    loss = F.cross_entropy(model(xb), yb)
    loss.backward(); opt.step(); opt.zero_grad()


def plain_loop(model, dls):
    model.to(def_device).train()
    opt = opt_func(model.parameters(), LR)
    for xb, yb in dls.train: plain_step(model, opt, xb, yb)


class Lockstep:
    """A training loader for the Learner that, before handing out each batch, fetches a batch of its own and does one
    plain-loop step on a separate copy of the model, timing that. The two loops then alternate batch by batch, so a
    change in the machine's speed hits both within milliseconds; the Learner's time is the rest of the epoch."""
    def __init__(self, dl, model):
        self.dl, self.model = dl, model.to(def_device).train()
        self.opt, self.plain_time = opt_func(model.parameters(), LR), 0.
    def __len__(self): return len(self.dl)
    def __iter__(self):
        plain_batches = iter(self.dl)                    # the plain loop's own shuffled pass
        for batch in self.dl:
            t0 = time.perf_counter()
            plain_step(self.model, self.opt, *next(plain_batches))
            self.plain_time += time.perf_counter() - t0
            yield batch


def lockstep_times(init, mem):
    "One epoch of the Learner and of the plain loop, interleaved batch by batch: (Learner time, plain time)."
    ls = Lockstep(mem.train, copy.deepcopy(init))
    total = timed(with_learner, copy.deepcopy(init), DataLoaders(ls, mem.valid))
    return total - ls.plain_time, ls.plain_time


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
    ap.add_argument('--reps', type=int, default=16)
    ap.add_argument('--lockstep-reps', type=int, default=5)
    ap.add_argument('--skip-items', action='store_true', help='skip the slow per-item path')
    args = ap.parse_args()
    set_seed(0)
    init = get_model()
    mem = fashion_dls(BS, device=def_device)
    # warm-up, one untimed run of each: the first run of a path pays for kernel set-up and for the allocator
    # growing its heap (hundreds of thousands of page faults here, about a second of system time)
    timed(plain_loop, copy.deepcopy(init), mem); timed(with_learner, copy.deepcopy(init), mem)
    plain, learner = [], []
    for i in range(args.reps):
        # alternate which of the pair runs first, so a machine that speeds up or slows down favours neither
        if i % 2: learner.append(timed(with_learner, copy.deepcopy(init), mem))
        plain.append(timed(plain_loop, copy.deepcopy(init), mem))
        if not i % 2: learner.append(timed(with_learner, copy.deepcopy(init), mem))
    base = min(plain)
    print(f"device {def_device}, torch threads {torch.get_num_threads()}, batch {BS}, {len(mem.train)} batches/epoch")
    print(f"plain PyTorch loop (in-memory)            {base:6.2f} s   1.00x   (runs: {', '.join(f'{t:.2f}' for t in plain)})")
    t = min(learner)
    print(f"Learner + 4 callbacks (in-memory)         {t:6.2f} s   {t/base:.2f}x   (runs: {', '.join(f'{t:.2f}' for t in learner)})")
    pairs = sorted(l / p for p, l in zip(plain, learner))
    print(f"  per-pair ratios Learner/plain: {', '.join(f'{r:.2f}' for r in pairs)}; median {statistics.median(pairs):.2f}x")
    lock = [lockstep_times(init, mem) for _ in range(args.lockstep_reps)]
    ratios = sorted(l / p for l, p in lock)
    print(f"Learner + 4 callbacks in lockstep with the plain loop (batch by batch): Learner/plain per epoch "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    if not args.skip_items:
        def to_tensor(b): b['image'] = [TF.to_tensor(o) for o in b['image']]
        items = DataLoaders.from_dd(load_fashion_mnist().with_transform(inplace(to_tensor)), BS)
        t = timed(with_learner, copy.deepcopy(init), items)
        print(f"Learner + 4 callbacks (per-item from_dd)  {t:6.2f} s   {t/base:.2f}x")


if __name__ == '__main__':
    main()
