"""Train the lesson CNN on Fashion-MNIST with miniai's Learner and AccelerateCB.

The same file runs unchanged on one process or several:

    uv run python examples/train_cnn.py                                            # one CPU, or one GPU
    uv run torchrun --standalone --nproc-per-node 2 examples/train_cnn.py          # 2 processes: CPUs (gloo) or 2 GPUs
    uv run accelerate launch --multi_gpu --num_processes 2 examples/train_cnn.py   # the same, started by Accelerate

`--batch-size` is the global batch: with N processes each one takes batch_size/N items of every batch and the
gradients are averaged, so each step is the one a single process would take on the same global batch, whatever N
(up to the order of float additions; with `--bn`, BatchNorm normalises each process's share on its own). The
shuffled order is drawn differently by one process and by several. Only the main process prints and writes
`--save`.
The last line printed is `result: {...}` (JSON: accuracy, loss, seconds of each training epoch...), for scripts
that compare runs (bench/bench_precision.py).
"""
import argparse
import json
import os
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn, optim

# torcheval still calls the deprecated torch.jit.script when it is imported
warnings.filterwarnings('ignore', message=r'`torch.jit.script` is deprecated', category=FutureWarning)
from torcheval.metrics import MulticlassAccuracy  # noqa: E402

from miniai.accel import AccelerateCB
from miniai.datasets import DataLoaders, fashion_dls, inplace, load_fashion_mnist
from miniai.learner import Learner, MetricsCB, ProgressCB, set_seed


def lesson_cnn(bn: bool = False) -> nn.Sequential:
    "Stride-2 3x3 convs 1->8->16->32->64, each followed by ReLU (and BatchNorm with `bn`), then a conv to 10 classes."
    def conv(ni, nf):
        layers = [nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=not bn)] + ([nn.BatchNorm2d(nf)] if bn else [])
        return nn.Sequential(*layers, nn.ReLU())
    return nn.Sequential(conv(1, 8), conv(8, 16), conv(16, 32), conv(32, 64),   # (B, 64, 2, 2)
                         nn.Conv2d(64, 10, 3, stride=2, padding=1), nn.Flatten())  # (B, 10)


def dd_loaders(batch_size: int) -> DataLoaders:
    "The per-item path: PyTorch DataLoaders over the DatasetDict, each image normalised like `fashion_dls` does."
    tl = fashion_dls(batch_size).train   # for the training set's mean and standard deviation only
    mean, std = tl.mean, tl.std
    def to_tensor(b): b['image'] = [(TF.to_tensor(o) - mean) / std for o in b['image']]   # (1, 28, 28) each
    return DataLoaders.from_dd(load_fashion_mnist().with_transform(inplace(to_tensor)), batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--batch-size', type=int, default=256, help='global batch, split between the processes')
    ap.add_argument('--lr', type=float, default=0.2)
    ap.add_argument('--mixed-precision', choices=['no', 'bf16', 'fp16'],
                    default=os.environ.get('ACCELERATE_MIXED_PRECISION', 'no'),
                    help="default: what `accelerate launch --mixed_precision` asked for, else 'no'")
    ap.add_argument('--data', choices=['tensor', 'dd'], default='tensor',
                    help='tensor: in-memory TensorLoaders (fashion_dls); dd: PyTorch DataLoaders from the DatasetDict')
    ap.add_argument('--bn', action='store_true', help='BatchNorm after each conv')
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--save', type=Path, help="write the trained model's state_dict here (main process only)")
    args = ap.parse_args()

    cb = AccelerateCB(mixed_precision=args.mixed_precision)
    acc = cb.acc
    n = acc.num_processes
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {n} processes")
    set_seed(args.seed)
    dls = fashion_dls(args.batch_size, device=acc.device) if args.data == 'tensor' else dd_loaders(args.batch_size)
    metrics = MetricsCB(accuracy=MulticlassAccuracy(num_classes=10))
    learn = Learner(lesson_cnn(args.bn), dls, F.cross_entropy, lr=args.lr, cbs=[cb, metrics, ProgressCB()],
                    opt_func=partial(optim.SGD, momentum=0.9))
    if cb.is_main_process:
        print(f"{n} process{'es' if n > 1 else ''} ({acc.distributed_type.value}) on {acc.device.type}, "
              f"mixed precision {args.mixed_precision}, global batch {args.batch_size} = {n} x {args.batch_size // n}, "
              f"data {args.data}", flush=True)
    t0 = time.perf_counter()
    learn.fit(args.epochs)
    seconds = time.perf_counter() - t0
    if not cb.is_main_process: return
    valid = [r for r in metrics.history if not r['train']][-1]
    train_times = [r['time'] for r in metrics.history if r['train']]
    if args.save is not None:   # written whole or not at all: to a temporary name, then renamed
        tmp = args.save.with_name(args.save.name + '.tmp')
        torch.save(learn.model.state_dict(), tmp)
        os.replace(tmp, args.save)
    result = {'processes': n, 'device': acc.device.type, 'mixed_precision': args.mixed_precision,
              'data': args.data, 'epochs': args.epochs, 'accuracy': round(valid['accuracy'], 4),
              'loss': round(valid['loss'], 4), 'train_seconds': [round(t, 2) for t in train_times],
              'fit_seconds': round(seconds, 2)}
    print(f"test accuracy {valid['accuracy']:.4f}, {sum(train_times)/len(train_times):.1f} s per training epoch")
    print('result: ' + json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
