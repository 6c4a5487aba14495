"""Benchmark: mixed precision and several processes for the lesson CNN, as ratios measured in one run.

1. bfloat16 against float32 on the CPU: training batches of the lesson CNN (batch 256) through `TrainLearner`, with
   and without `MixedPrecision()`, in lockstep: one batch of each in turn (one-batch fits, each learner on its own
   copy of the same initial model), `--rounds` rounds, so that a machine whose speed drifts slows both alike.
   Prints the median time per batch of each, the ratio of their total times and the median per-round ratio.
2. Where a CUDA GPU is present: the same for float16 (with the gradient scaler) and bfloat16 against float32 on the
   GPU, at `--batch-size` and at `--big-batch-size` (the small CNN at batch 256 is bound by kernel launches, not by
   arithmetic, so the larger batch shows what the 16-bit units give).
3. Two processes against one: `examples/train_cnn.py` for `--epochs` epochs, started with plain `python` and with
   `torchrun --nproc-per-node 2`, on the CPU (each run given the same total number of threads), and on two GPUs
   when there are two; prints the ratio of the fastest training epoch of each.

    uv run python bench/bench_precision.py [--rounds 20] [--skip-procs]
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from miniai.accel import MixedPrecision
from miniai.datasets import DataLoaders, fashion_dls
from miniai.learner import TrainLearner, set_seed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT/'examples'/'train_cnn.py'


def lesson_cnn() -> nn.Sequential:
    "Stride-2 3x3 convs 1->8->16->32->64 with ReLU, then a conv to the 10 classes."
    def conv(ni, nf): return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2, padding=1), nn.ReLU())
    return nn.Sequential(conv(1, 8), conv(8, 16), conv(16, 32), conv(32, 64), nn.Conv2d(64, 10, 3, 2, 1), nn.Flatten())


def sync(device: torch.device) -> None:
    if device.type == 'cuda': torch.cuda.synchronize(device)


def lockstep(model0, batches, device, dtype, rounds: int) -> tuple[list[float], list[float]]:
    "Seconds per training batch, float32 and under MixedPrecision(dtype), alternating batch by batch."
    learners = {}
    for dt in (None, dtype):
        cbs = [] if dt is None else [MixedPrecision(dt)]
        learners[dt] = TrainLearner(copy.deepcopy(model0), DataLoaders(batches[:1], batches[:1]), F.cross_entropy,
                                    lr=0.1, cbs=cbs)
    times = {None: [], dtype: []}
    for i in range(rounds + 2):                          # the first two rounds warm up and are not counted
        one = [batches[i % len(batches)]]
        for dt in ((None, dtype) if i % 2 == 0 else (dtype, None)):
            learn = learners[dt]
            learn.dls = DataLoaders(one, one)
            sync(device)
            t0 = time.perf_counter()
            learn.fit(1, valid=False)                    # one batch: forward, loss, backward, step
            sync(device)
            if i >= 2: times[dt].append(time.perf_counter() - t0)
    return times[None], times[dtype]


def compare(device, dtypes, batch_size, n_batches, rounds) -> None:
    "Print, for each 16-bit type, its time per batch against float32's on `device`, measured in lockstep."
    set_seed(0)
    dl = fashion_dls(batch_size, device=device).train
    batches = [b for b, _ in zip(dl, range(n_batches))]
    model0 = lesson_cnn().to(device)
    for dtype in dtypes:
        t32, t16 = lockstep(model0, batches, device, dtype, rounds)
        ratios = [a / b for a, b in zip(t16, t32)]
        name = str(dtype).removeprefix('torch.')
        print(f"{device.type} batch {batch_size}: {name} {statistics.median(t16)*1000:.1f} ms/batch vs float32 "
              f"{statistics.median(t32)*1000:.1f} ms/batch (medians of {rounds}): {sum(t16)/sum(t32):.2f}x the "
              f"time in all, median of the per-round ratios {statistics.median(ratios):.2f}x "
              f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}-{statistics.quantiles(ratios, n=4)[2]:.2f})",
              flush=True)


def run_example(n_procs: int, epochs: int, env: dict) -> dict:
    "Run examples/train_cnn.py on `n_procs` processes; its `result:` line."
    launch = ([sys.executable] if n_procs == 1 else
              [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(n_procs)])
    res = subprocess.run(launch + [str(EXAMPLE), '--epochs', str(epochs)], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"examples/train_cnn.py on {n_procs} processes failed (exit status {res.returncode}):\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1].removeprefix('result: '))


def compare_procs(epochs: int, gpu: bool) -> None:
    "Two processes against one for the example script; each run's fastest training epoch."
    if gpu: env1, env2, where = {}, {}, 'GPU (one per process)'
    else:
        threads = max(2, min(os.cpu_count() or 2, 16)) // 2 * 2
        env1 = {'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': str(threads)}
        env2 = {'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': str(threads // 2)}
        where = f'CPU, {threads} threads in all'
    one, two = run_example(1, epochs, env1), run_example(2, epochs, env2)
    t1, t2 = min(one['train_seconds']), min(two['train_seconds'])
    print(f"{where}: 2 processes {t2:.2f} s/epoch (accuracy {two['accuracy']:.4f}) vs 1 process {t1:.2f} s/epoch "
          f"(accuracy {one['accuracy']:.4f}): {t2/t1:.2f}x the time, {t1/t2:.2f}x the speed", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=20, help='batches of each type per comparison (after 2 warm-up)')
    ap.add_argument('--batches', type=int, default=8, help='distinct batches, used in turn')
    ap.add_argument('--batch-size', type=int, default=256)
    ap.add_argument('--big-batch-size', type=int, default=4096, help='a second batch size, on the GPU only')
    ap.add_argument('--epochs', type=int, default=2, help='epochs per run of the example script')
    ap.add_argument('--skip-procs', action='store_true', help='skip the 2-processes-against-1 runs')
    args = ap.parse_args()
    cpu_name = next((l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines()
                     if l.startswith('model name')), 'unknown CPU') if Path('/proc/cpuinfo').exists() else 'unknown CPU'
    print(f"machine: {cpu_name}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; torch {torch.__version__}",
          flush=True)
    compare(torch.device('cpu'), [torch.bfloat16], args.batch_size, args.batches, args.rounds)
    if torch.cuda.is_available():
        gpu = torch.device('cuda')
        for bs in (args.batch_size, args.big_batch_size):
            compare(gpu, [torch.float16, torch.bfloat16], bs, args.batches, max(args.rounds, 100))
    if not args.skip_procs:
        compare_procs(args.epochs, gpu=False)
        if torch.cuda.device_count() >= 2: compare_procs(args.epochs, gpu=True)
        elif torch.cuda.is_available(): print("GPU: 2 processes against 1 needs two GPUs; this machine has one")


if __name__ == '__main__':
    main()
