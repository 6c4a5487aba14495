"""miniai.accel: MixedPrecision (bfloat16 on the CPU, float16 with a gradient scaler) and AccelerateCB, in one
process and in two real CPU processes over gloo.

The two-process test starts this file as a script twice, with the environment torchrun would give each process
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free port); `worker()` below is what each process runs.
"""
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from torcheval.metrics import MulticlassAccuracy

from miniai.accel import (AccelerateCB, MixedPrecision, ScaledOptimizer, TensorLoaderDataset, amp_dtype,
                          as_dataloader, launched_processes)
from miniai.activations import ActivationStats
from miniai.datasets import DataLoaders, TensorLoader, fashion_dls
from miniai.learner import (BatchSchedCB, Callback, DeviceCB, Learner, MetricsCB, MomentumLearner, ProgressCB,
                            TrainCB, TrainLearner, set_seed)

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
N_TRAIN, N_VALID, N_IN, N_CLS, BS = 64, 50, 16, 3, 16   # 4 global training batches; 50 % 16 = 2: a ragged last batch


def mlp() -> nn.Module:
    "A small model without BatchNorm, so that one process and two compute the same thing."
    return nn.Sequential(nn.Linear(N_IN, 32), nn.ReLU(), nn.Linear(32, N_CLS))


def fixed_data():
    "Training and validation tensors; column 0 of each training input is its index / N_TRAIN (to see who got what)."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_TRAIN + N_VALID, N_IN, generator=g), torch.randint(0, N_CLS, (N_TRAIN + N_VALID,), generator=g)
    x[:N_TRAIN, 0] = torch.arange(N_TRAIN) / N_TRAIN   # exact in binary
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def lesson_cnn(bn: bool = False) -> nn.Sequential:
    "The lesson CNN: stride-2 3x3 convs 1->8->16->32->64 with ReLU (optionally BatchNorm), a conv to 10, Flatten."
    def conv(ni, nf):
        return nn.Sequential(nn.Conv2d(ni, nf, 3, 2, 1), *([nn.BatchNorm2d(nf)] if bn else []), nn.ReLU())
    return nn.Sequential(conv(1, 8), conv(8, 16), conv(16, 32), conv(32, 64), nn.Conv2d(64, 10, 3, 2, 1), nn.Flatten())


def accuracy_metric():
    return MulticlassAccuracy(num_classes=N_CLS)


# ---------------------------------------------------------------------------------------------------------------
# What each of the two processes runs
# ---------------------------------------------------------------------------------------------------------------
class SeenIds(Callback):
    "Record, per training batch, the indices (column 0 of the inputs) this process was given."
    order = -5
    def __init__(self): self.ids = []
    def after_batch(self, learn):
        if learn.training: self.ids.append((learn.batch[0][:, 0] * N_TRAIN).round().long().tolist())


def worker(out: Path) -> None:
    "Train the MLP with AccelerateCB on this process's shards; save what it saw, its weights and its metrics."
    from datasets import Dataset, DatasetDict
    rank = int(os.environ['RANK'])
    x, y, xv, yv = fixed_data()
    res = {'rank': rank}
    sgd = partial(optim.SGD, momentum=0.9)

    # (a) in-memory TensorLoaders, not shuffled: the global batches are known, and the validation set is ragged
    model = mlp(); model.load_state_dict(torch.load(out/'init.pt'))
    seen, metrics = SeenIds(), MetricsCB(accuracy=accuracy_metric())
    cb = AccelerateCB()
    res['processes'] = cb.acc.num_processes
    dls = DataLoaders(TensorLoader(x, y, BS), TensorLoader(xv, yv, BS))
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[cb, seen, metrics, ProgressCB()], opt_func=sgd)
    learn.fit(1)
    res['tensor'] = {'ids': seen.ids, 'history': metrics.history, 'plain_model': learn.model is model,
                     'dls_restored': learn.dls is dls, 'opt': type(learn.opt).__name__}
    torch.save(model.state_dict(), out/f'tensor{rank}.pt')

    # (b) PyTorch DataLoaders from a DatasetDict (DataLoaders.from_dd), the training one shuffled
    dd = DatasetDict({'train': Dataset.from_dict({'x': x.tolist(), 'y': y.tolist()}),
                      'valid': Dataset.from_dict({'x': xv.tolist(), 'y': yv.tolist()})}).with_format('torch')
    torch.manual_seed(rank)   # different generators on purpose: Accelerate must synchronise the shuffle
    model = mlp(); model.load_state_dict(torch.load(out/'init.pt'))
    seen, metrics = SeenIds(), MetricsCB(accuracy=accuracy_metric())
    learn = Learner(model, DataLoaders.from_dd(dd, BS), F.cross_entropy, lr=0.1, cbs=[AccelerateCB(), seen, metrics],
                    opt_func=sgd)
    learn.fit(1)
    res['dd'] = {'ids': seen.ids, 'history': metrics.history}
    torch.save(model.state_dict(), out/f'dd{rank}.pt')

    # (c) what is refused under several processes, with the model left as it was
    refused = {'stats': lambda l: l.fit(1, cbs=[ActivationStats()]), 'lr_find': lambda l: l.lr_find(plot=False),
               'device': lambda l: l.fit(1, cbs=[DeviceCB()])}
    for name, fit in refused.items():
        learn = Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[AccelerateCB()], opt_func=sgd)
        try: fit(learn); res[name] = None
        except (RuntimeError, ValueError) as e: res[name] = str(e)
        assert learn.model is model
    print(f"rank {rank} finished", flush=True)
    (out/f'result{rank}.json').write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------------------------
# Two processes on the CPU
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def reference(ids_per_step, init):
    "One process, a plain loop: SGD with momentum over the given global batches; the loss of each, before its step."
    x, y, _, _ = fixed_data()
    model = mlp(); model.load_state_dict(init)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for ids in ids_per_step:
        loss = F.cross_entropy(model(x[ids]), y[ids])
        losses.append(loss.item())
        loss.backward(); opt.step(); opt.zero_grad()
    return model, losses


@pytest.fixture(scope='module')
def two_procs(tmp_path_factory):
    "Run `worker` in two real processes (gloo on 127.0.0.1, no GPU, no network); their results and outputs."
    out = tmp_path_factory.mktemp('two_procs')
    torch.manual_seed(1); torch.save(mlp().state_dict(), out/'init.pt')
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2',
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'OMP_NUM_THREADS': '1',
               'CUDA_VISIBLE_DEVICES': '', 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
        procs.append(subprocess.Popen([sys.executable, __file__, 'worker', str(out)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try: outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    for rank, (p, (so, se)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{so}\n{se[-3000:]}"
    results = [json.loads((out/f'result{r}.json').read_text()) for r in range(2)]
    return out, results, [so for so, _ in outputs]


def test_two_processes_really_distribute(two_procs):
    _, (r0, r1), _ = two_procs
    assert r0['processes'] == r1['processes'] == 2
    assert r0['tensor']['plain_model'] and r0['tensor']['dls_restored'] and r0['tensor']['opt'] == 'SGD'


@pytest.mark.parametrize('kind', ['tensor', 'dd'])
def test_each_process_takes_its_share_of_every_global_batch(two_procs, kind):
    _, (r0, r1), _ = two_procs
    ids0, ids1 = r0[kind]['ids'], r1[kind]['ids']
    assert len(ids0) == len(ids1) == N_TRAIN // BS
    for a, b in zip(ids0, ids1):
        assert len(a) == len(b) == BS // 2 and not set(a) & set(b)
    assert sorted(i for step in ids0 + ids1 for i in step) == list(range(N_TRAIN))   # every item once per epoch
    if kind == 'tensor':   # not shuffled: global batch j is items [16j, 16j+16), rank 0 the first half
        assert [a + b for a, b in zip(ids0, ids1)] == [list(range(j*BS, (j+1)*BS)) for j in range(N_TRAIN // BS)]


@pytest.mark.parametrize('kind', ['tensor', 'dd'])
def test_two_processes_equal_one_process_over_the_same_global_batches(two_procs, kind):
    out, (r0, r1), _ = two_procs
    steps = [a + b for a, b in zip(r0[kind]['ids'], r1[kind]['ids'])]
    init = torch.load(out/'init.pt')
    ref, ref_losses = reference(steps, init)
    w0, w1 = torch.load(out/f'{kind}0.pt'), torch.load(out/f'{kind}1.pt')
    for name, p in ref.state_dict().items():
        assert torch.equal(w0[name], w1[name])                        # the two copies never drift apart
        torch.testing.assert_close(w0[name], p, atol=1e-5, rtol=0)     # and they took the single-process steps
        assert not torch.equal(p, init[name])
    # the training loss MetricsCB reports is that of the whole global batches, not of one shard
    train = [r for r in r0[kind]['history'] if r['train']][0]
    assert train['loss'] == pytest.approx(sum(ref_losses) / len(ref_losses), abs=1e-5)


@pytest.mark.parametrize('kind', ['tensor', 'dd'])
def test_validation_metrics_are_those_of_the_whole_validation_set(two_procs, kind):
    out, (r0, r1), _ = two_procs
    _, _, xv, yv = fixed_data()
    model = mlp(); model.load_state_dict(torch.load(out/f'{kind}0.pt'))
    with torch.no_grad(): preds = model(xv)
    want_acc, want_loss = (preds.argmax(1) == yv).float().mean().item(), F.cross_entropy(preds, yv).item()
    for r in (r0, r1):
        valid = [row for row in r[kind]['history'] if not row['train']][0]
        assert valid['accuracy'] == pytest.approx(want_acc, abs=1e-6)
        assert valid['loss'] == pytest.approx(want_loss, abs=1e-5)


def test_only_rank_0_prints_the_table(two_procs):
    _, _, (out0, out1) = two_procs
    assert 'epoch' in out0 and 'eval' in out0 and 'rank 0 finished' in out0
    assert out1.strip() == 'rank 1 finished'   # its own print after fit gets through: stdout was given back


def test_lr_find_activation_stats_and_device_cb_refuse_several_processes(two_procs):
    _, (r0, r1), _ = two_procs
    for r in (r0, r1):
        assert r['stats'] is not None and 'ActivationStats under 2 processes is not supported' in r['stats']
        assert r['lr_find'] is not None and 'lr_find under 2 processes is not supported' in r['lr_find']
        assert r['device'] is not None and 'remove DeviceCB' in r['device']


# ---------------------------------------------------------------------------------------------------------------
# Accelerate in one process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate():
    "Accelerate keeps one state per process (its mixed precision cannot change): start and end with none."
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True); GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True); GradientState._reset_state()


def toy_dls():
    x, y, xv, yv = fixed_data()
    return DataLoaders(TensorLoader(x, y, BS), TensorLoader(xv, yv, BS))


def test_tensor_loader_dataset_gives_the_same_batches():
    x, y, _, _ = fixed_data()
    tl = TensorLoader((x * 100).clamp(0, 255).to(torch.uint8)[:, :4].reshape(-1, 2, 2), y, 10, mean=0.5, std=0.25)
    dl = as_dataloader(tl)
    assert isinstance(dl.dataset, TensorLoaderDataset) and len(dl) == len(tl)
    for (a, b), (c, d) in zip(tl, dl, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert as_dataloader(dl) is dl
    with pytest.raises(TypeError, match='cannot shard|can shard'): as_dataloader([1, 2])


def test_accelerate_cb_in_one_process_equals_train_cb(fresh_accelerate):
    torch.manual_seed(0); m1 = mlp(); m2 = mlp(); m2.load_state_dict(m1.state_dict())
    Learner(m1, toy_dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB()]).fit(2)
    learn = Learner(m2, toy_dls(), F.cross_entropy, lr=0.1, cbs=[AccelerateCB()])
    learn.fit(2)
    assert learn.model is m2 and type(learn.opt) is optim.SGD
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)


def test_accelerate_cb_bf16_runs_convs_in_bf16_and_leaves_a_plain_model(fresh_accelerate):
    x = torch.randn(32, 1, 28, 28); y = torch.randint(0, 10, (32,))
    model = lesson_cnn()
    dtypes = []
    h = model[0][0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    learn = Learner(model, DataLoaders(TensorLoader(x, y, 16), TensorLoader(x, y, 16)), F.cross_entropy, lr=0.1,
                    cbs=[AccelerateCB(mixed_precision='bf16')])
    learn.fit(1)
    h.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert learn.model is model and 'forward' not in vars(model)   # the autocast wrapper is gone
    assert model(x[:2]).dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerate_cb_refuses_what_it_cannot_do(fresh_accelerate):
    with pytest.raises(ValueError, match='remove'):
        Learner(mlp(), toy_dls(), F.cross_entropy, lr=0.1, cbs=[AccelerateCB(), TrainCB()]).fit(1)
    with pytest.raises(TypeError, match='base Learner'):
        TrainLearner(mlp(), toy_dls(), F.cross_entropy, lr=0.1, cbs=[AccelerateCB()]).fit(1)
    with pytest.raises(ValueError, match='use one'):
        Learner(mlp(), toy_dls(), F.cross_entropy, lr=0.1, cbs=[AccelerateCB(), MixedPrecision()]).fit(1)


def test_launched_processes_reads_the_launcher(monkeypatch):
    for name in ('WORLD_SIZE', 'PMI_SIZE', 'OMPI_COMM_WORLD_SIZE', 'MV2_COMM_WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4'); assert launched_processes() == 4
    monkeypatch.setenv('WORLD_SIZE', '3'); assert launched_processes() == 3


def test_never_n_silent_copies(fresh_accelerate, monkeypatch):
    """Accelerate's state was set up for one process before the launch was seen (a bare Accelerator() made first,
    say): under a 2-process launch AccelerateCB refuses, rather than train one of two unconnected copies."""
    from accelerate import Accelerator
    for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'ACCELERATE_USE_CPU'): monkeypatch.delenv(k, raising=False)
    assert Accelerator().num_processes == 1
    for k, v in {'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0'}.items(): monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match='full copy') as e: AccelerateCB()
    assert 'torchrun --nproc-per-node 2' in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# MixedPrecision
# ---------------------------------------------------------------------------------------------------------------
class ConvDtypes(Callback):
    "Hook the convs of the model for the fit; record the dtypes of their outputs."
    def before_fit(self, learn):
        self.dtypes = set()
        self.hooks = [m.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))
                      for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    def cleanup_fit(self, learn):
        for h in self.hooks: h.remove()


def test_bf16_on_the_cpu_trains_the_lesson_cnn_like_float32():
    dls = fashion_dls(128, smoke=True)
    accs = {}
    for name, cbs in (('fp32', []), ('bf16', [MixedPrecision()])):
        set_seed(42)
        metrics, dtypes = MetricsCB(accuracy=MulticlassAccuracy(num_classes=10)), ConvDtypes()
        learn = MomentumLearner(lesson_cnn(bn=True), dls, F.cross_entropy, lr=0.1, cbs=[metrics, dtypes, *cbs])
        learn.fit(1)
        assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in learn.model.parameters())
        assert dtypes.dtypes == ({torch.bfloat16} if cbs else {torch.float32})
        accs[name] = metrics.history[-1]['accuracy']
    assert accs['fp32'] > 0.5
    assert abs(accs['bf16'] - accs['fp32']) <= 0.02, accs


def test_amp_dtype_defaults_and_bad_input():
    assert amp_dtype('cpu') == torch.bfloat16 and amp_dtype('cpu', torch.float16) == torch.float16
    with pytest.raises(ValueError, match='bfloat16 or torch.float16'): amp_dtype('cpu', torch.float64)
    with pytest.raises(ValueError, match='CPU or a CUDA'): amp_dtype('meta')


def scaler_reference(model, batches, lr, init_scale, mom=None, device='cpu'):
    "PyTorch's own float16 recipe by hand: autocast, GradScaler; `mom` keeps gradients like MomentumLearner."
    opt = optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    for xb, yb in batches:
        old = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        for p in model.parameters(): p.grad = None
        with torch.autocast(device, dtype=torch.float16): loss = F.cross_entropy(model(xb), yb)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if mom is not None:   # the kept gradients join the new, already unscaled, ones
            for p, g in zip(model.parameters(), old):
                if g is not None: p.grad.add_(g)
        scaler.step(opt); scaler.update()
        if mom is None: opt.zero_grad()
        else:
            for p in model.parameters(): p.grad.mul_(mom)
    return model, scaler.get_scale()


@pytest.mark.parametrize('how', ['TrainLearner', 'TrainCB', 'MomentumLearner'])
def test_float16_with_the_scaler_follows_pytorchs_recipe(how):
    x, y, xv, yv = fixed_data()
    torch.manual_seed(0); m1 = mlp(); m2 = mlp(); m2.load_state_dict(m1.state_dict())
    mp = MixedPrecision(torch.float16, init_scale=2.**10)
    dls = DataLoaders(TensorLoader(x, y, BS), TensorLoader(xv, yv, BS))
    if how == 'TrainCB': learn = Learner(m1, dls, F.cross_entropy, lr=0.1, cbs=[TrainCB(), mp])
    elif how == 'TrainLearner': learn = TrainLearner(m1, dls, F.cross_entropy, lr=0.1, cbs=[mp])
    else: learn = MomentumLearner(m1, dls, F.cross_entropy, lr=0.1, cbs=[mp], mom=0.5)
    learn.fit(2, valid=False)
    ref, scale = scaler_reference(m2, list(TensorLoader(x, y, BS)) * 2, 0.1, 2.**10,
                                  mom=0.5 if how == 'MomentumLearner' else None)
    for a, b in zip(m1.parameters(), ref.parameters()): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert mp.scaler.get_scale() == scale and type(learn.opt) is optim.SGD   # the wrapper is gone after fit


class InjectInf(Callback):
    "Put an inf in one gradient at training batch `at`, after the backward pass and before the step."
    order = -20
    def __init__(self, at): self.at = at
    def after_backward(self, learn):
        if learn.iter == self.at:
            next(learn.model.parameters()).grad.view(-1)[0] = float('inf')

class Snapshot(Callback):
    "The weights before and after each training step."
    def before_fit(self, learn): self.steps = []
    def after_loss(self, learn):
        if learn.training: self.before = [p.detach().clone() for p in learn.model.parameters()]
    def after_step(self, learn):
        self.steps.append((self.before, [p.detach().clone() for p in learn.model.parameters()]))


def _inf_step_is_skipped(device):
    x, y, xv, yv = fixed_data()
    torch.manual_seed(0)
    model = mlp().to(device)
    mp, snap = MixedPrecision(torch.float16, init_scale=2.**10), Snapshot()
    dls = DataLoaders(TensorLoader(x, y, BS, device=device), TensorLoader(xv, yv, BS, device=device))
    learn = MomentumLearner(model, dls, F.cross_entropy, lr=0.1, cbs=[mp, InjectInf(at=1), snap], mom=0.5)
    learn.fit(1, valid=False)   # no FloatingPointError: the NaN guard reads the true (finite) loss
    (b0, a0), (b1, a1), (b2, a2), _ = snap.steps
    assert all(torch.equal(p, q) for p, q in zip(b1, a1))                       # the step with the inf was skipped
    assert not any(torch.equal(p, q) for p, q in zip(b2, a2))                    # and the next one was taken
    assert mp.scaler.get_scale() == 2.**9 and learn.opt is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_inf_gradient_is_skipped_by_the_scaler_on_the_cpu():
    _inf_step_is_skipped('cpu')


def test_a_nan_loss_still_stops_training_and_autocast_is_left():
    x, y, xv, yv = fixed_data()
    class NaNLoss(Callback):
        def after_loss(self, learn):
            if learn.training and learn.iter == 1: learn.loss = learn.loss * float('nan')
    model = mlp()
    learn = TrainLearner(model, toy_dls(), F.cross_entropy, lr=0.1, cbs=[MixedPrecision(torch.float16), NaNLoss()])
    with pytest.raises(FloatingPointError, match='batch 1'): learn.fit(1)
    assert not torch.is_autocast_enabled('cpu') and type(learn.opt) is optim.SGD
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scaled_optimizer_works_with_a_scheduler_and_bad_closures():
    x, y, xv, yv = fixed_data()
    sched = BatchSchedCB(partial(optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=N_TRAIN // BS))
    learn = TrainLearner(mlp(), toy_dls(), F.cross_entropy, lr=0.1, cbs=[MixedPrecision(torch.float16), sched])
    learn.fit(1, valid=False)
    assert isinstance(sched.schedo.optimizer, ScaledOptimizer) and sched.schedo.last_epoch == N_TRAIN // BS
    scaled = ScaledOptimizer(optim.SGD(mlp().parameters(), lr=0.1), torch.amp.GradScaler('cpu'))
    with pytest.raises(ValueError, match='closure'): scaled.step(lambda: 0.)


def test_activation_stats_of_bf16_activations_are_summed_in_float32():
    x = torch.randn(64, 1, 28, 28); y = torch.randint(0, 10, (64,))
    model = lesson_cnn()
    seen = []
    h = model[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    stats = ActivationStats(mods=[model[0]])
    learn = TrainLearner(model, DataLoaders(TensorLoader(x, y, 64), TensorLoader(x, y, 64)), F.cross_entropy,
                         lr=0.1, cbs=[MixedPrecision(), stats])
    learn.fit(1, valid=False)
    h.remove()
    (acts,) = seen
    assert acts.dtype == torch.bfloat16
    s = stats.stats()[0]
    a = acts.double()
    torch.testing.assert_close(s['means'][0].double(), a.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s['stds'][0].double(), a.std(correction=0), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA GPU')
def test_cuda_float16_with_the_scaler_follows_pytorchs_recipe():
    x, y, xv, yv = fixed_data()
    torch.manual_seed(0); m1 = mlp().cuda(); m2 = mlp().cuda(); m2.load_state_dict(m1.state_dict())
    mp = MixedPrecision(torch.float16)
    dls = DataLoaders(TensorLoader(x, y, BS, device='cuda'), TensorLoader(xv, yv, BS, device='cuda'))
    learn = TrainLearner(m1, dls, F.cross_entropy, lr=0.1, cbs=[mp])
    learn.fit(2, valid=False)
    assert mp.amp_dtype == torch.float16 and mp.scaler is not None and mp.scaler.is_enabled()
    ref, scale = scaler_reference(m2, list(TensorLoader(x, y, BS, device='cuda')) * 2, 0.1, 2.**16, device='cuda')
    for a, b in zip(m1.parameters(), ref.parameters()): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert mp.scaler.get_scale() == scale


@pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA GPU')
def test_cuda_an_inf_gradient_is_skipped_by_the_scaler():
    _inf_step_is_skipped('cuda')


@pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA GPU')
def test_cuda_default_dtype_and_bf16_has_no_scaler():
    mp = MixedPrecision()
    learn = TrainLearner(mlp().cuda(), DataLoaders(*[TensorLoader(*fixed_data()[:2], BS, device='cuda')] * 2),
                         F.cross_entropy, lr=0.1, cbs=[mp])
    learn.fit(1)
    want = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert mp.amp_dtype == want and (mp.scaler is None) == (want == torch.bfloat16)


if __name__ == '__main__' and sys.argv[1:2] == ['worker']:
    worker(Path(sys.argv[2]))
