"""Speedrun: the capstone lesson's final recipes (notebooks/09_capstone.ipynb), outside the notebook.

For each training budget in `miniai.capstone.BUDGETS` ('5min', '20min': seconds of training per run on a quiet 2-core
CPU), trains the recipe once per seed on all 60,000 training images and scores it **once** on the test set; prints
the accuracy of each seed, their mean and the training seconds. The recipes were chosen on a validation split held
out from the training images (the lesson shows how); `--valid` scores that split instead of the test set, for trying
changes without looking at the test set.

    uv run python bench/speedrun.py                          # both budgets, seeds 0 and 1
    uv run python bench/speedrun.py --budget 5min --seeds 0  # one seed, for a quick look
    uv run python bench/speedrun.py --budget 20min --epochs 5 --valid   # a shorter run, on the held-out split
"""
import argparse
import dataclasses
import time

import torch

from miniai.capstone import BUDGETS, holdout_dls, run_recipe
from miniai.device import def_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--budget', nargs='+', choices=sorted(BUDGETS), default=sorted(BUDGETS), help='which recipes')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1], help='one run per seed')
    p.add_argument('--epochs', type=int, default=None, help="override the recipe's epochs")
    p.add_argument('--valid', action='store_true', help='train on 50,000 images and score the 10,000 held out')
    a = p.parse_args()
    print(f"device {def_device}, {torch.get_num_threads()} threads; "
          f"scored on {'the held-out validation split' if a.valid else 'the test set'}", flush=True)
    for name in a.budget:
        r = BUDGETS[name]
        if a.epochs: r = dataclasses.replace(r, epochs=a.epochs)
        dls = holdout_dls(r.batch_size, test=not a.valid)
        t0 = time.perf_counter()
        row = run_recipe(r, dls, seeds=a.seeds, quiet=True)
        wall = time.perf_counter() - t0
        per_seed = ', '.join(f"seed {s}: {acc:.4f}" for s, acc in zip(row['seeds'], row['accuracies']))
        print(f"[{name}] {r.name}, {r.epochs} epochs")
        print(f"  {per_seed}")
        print(f"  mean {row['accuracy']:.4f} ± {row['spread']:.4f}; training {row['train_seconds']:.1f} s per run "
              f"({row['epoch_time']:.2f} s per epoch); wall {wall:.0f} s for {len(a.seeds)} run(s)", flush=True)


if __name__ == '__main__':
    main()
