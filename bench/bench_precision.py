"""Benchmark: mixed precision and several processes for the lesson CNN, as ratios measured in one run.

1. bfloat16 against float32 on the CPU: training steps of the lesson CNN (batch 256) through `TrainLearner`, with
   and without `MixedPrecision()`. The two alternate, `--reps` pairs of `--batches` batches each, every run from the
   same weights on the same batches; prints the fastest run of each (noise only ever adds time) and the median of
   the per-pair ratios.
2. Where a CUDA GPU is present: the same for float16 (with the gradient scaler) and bfloat16 against float32 on the
   GPU, at `--batch-size` and at `--big-batch-size` (the small CNN at batch 256 is bound by kernel launches, not by
   arithmetic, so the larger batch shows what the 16-bit units give).
3. Two processes against one: `examples/train_cnn.py` for `--epochs` epochs, started with plain `python` and with
   `torchrun --nproc-per-node 2`, on the CPU (each run given the same total number of threads), and on two GPUs
   when there are two; prints the ratio of the fastest training epoch of each.

    uv run python bench/bench_precision.py [--reps 3] [--batches 8] [--skip-procs]
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


def time_run(model0, batches, device, dtype) -> float:
    "Seconds to train a copy of `model0` on `batches` with TrainLearner, under MixedPrecision(dtype) unless None."
    model = copy.deepcopy(model0)
    cbs = [] if dtype is None else [MixedPrecision(dtype)]
    learn = TrainLearner(model, DataLoaders(batches, batches[:1]), F.cross_entropy, lr=0.1, cbs=cbs)
    sync(device)
    t0 = time.perf_counter()
    learn.fit(1, valid=False)
    sync(device)
    return time.perf_counter() - t0


def compare(device, dtypes, batch_size, n_batches, reps) -> None:
    "Print, for each 16-bit type, its time against float32's on `device`: fastest runs and median of pair ratios."
    set_seed(0)
    dl = fashion_dls(batch_size, device=device).train
    batches = [b for b, _ in zip(dl, range(n_batches))]
    model0 = lesson_cnn().to(device)
    for dtype in (None, *dtypes): time_run(model0, batches[:2], device, dtype)   # warm-up, untimed
    for dtype in dtypes:
        name = str(dtype).removeprefix('torch.')
        t32, t16, ratios = [], [], []
        for i in range(reps):
            order = [(None, t32), (dtype, t16)] if i % 2 == 0 else [(dtype, t16), (None, t32)]
            for dt, out in order: out.append(time_run(model0, batches, device, dt))
            ratios.append(t16[-1] / t32[-1])
        per = 1000 / len(batches)
        print(f"{device.type} batch {batch_size}: {name} {min(t16)*per:.1f} ms/step vs float32 {min(t32)*per:.1f} "
              f"ms/step: fastest {min(t16)/min(t32):.2f}x, median of {reps} pairs {statistics.median(ratios):.2f}x "
              f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)


def run_example(n_procs: int, epochs: int, env: dict) -> dict:
    "Run examples/train_cnn.py on `n_procs` processes; its `result:` line."
    launch = ([sys.executable] if n_procs == 1 else
              [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(n_procs)])
    res = subprocess.run(launch + [str(EXAMPLE), '--epochs', str(epochs)], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=ROOT)
    if res.returncode: raise SystemExit(f"examples/train_cnn.py on {n_procs} processes failed:\n{res.stderr[-3000:]}")
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
    ap.add_argument('--reps', type=int, default=3, help='pairs of runs per comparison')
    ap.add_argument('--batches', type=int, default=8, help='training batches per run')
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
    compare(torch.device('cpu'), [torch.bfloat16], args.batch_size, args.batches, args.reps)
    if torch.cuda.is_available():
        gpu = torch.device('cuda')
        for bs in (args.batch_size, args.big_batch_size):
            compare(gpu, [torch.float16, torch.bfloat16], bs, max(args.batches, 20), args.reps)
    if not args.skip_procs:
        compare_procs(args.epochs, gpu=False)
        if torch.cuda.device_count() >= 2: compare_procs(args.epochs, gpu=True)
        elif torch.cuda.is_available(): print("GPU: 2 processes against 1 needs two GPUs; this machine has one")


if __name__ == '__main__':
    main()
