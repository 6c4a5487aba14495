"""miniai.sched: schedules against PyTorch's schedulers over whole runs, the momentum interface, the callbacks."""
import math
from functools import partial

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

matplotlib.use('Agg')

from miniai.datasets import DataLoaders, TensorLoader
from miniai.learner import Callback, TrainLearner
from miniai.optimizer import SGD, Adam
from miniai.sched import (BatchSchedCB, CosineAnnealing, EpochSchedCB, HasLearnCB, OneCycle, RecorderCB, cosine_lr,
                          get_mom, one_cycle, sched_cos, sched_lin, set_mom)


def toy_dls(n_train=12, n_valid=4, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 3, generator=g), torch.randn(n_train + n_valid, 1, generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs), TensorLoader(x[n_train:], y[n_train:], bs))


def two_groups(kind='sgd'):
    "An optimizer with two parameter groups of different learning rates."
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    if kind == 'sgd': return optim.SGD([{'params': [a], 'lr': 0.1}, {'params': [b], 'lr': 0.02}], lr=0.1, momentum=0.9)
    if kind == 'adamw': return optim.AdamW([{'params': [a], 'lr': 0.1}, {'params': [b], 'lr': 0.02}], betas=(0.9, 0.99))
    if kind == 'miniai': return SGD([[a], [b]], lr=[0.1, 0.02], mom=0.9)
    if kind == 'miniai_adam': return Adam([[a], [b]], lr=[0.1, 0.02])
    raise ValueError(kind)


def trajectory(opt, sched, n_steps):
    "(lr, momentum, second beta or None) of each group after construction and after each of `n_steps` steps."
    out = []
    for i in range(n_steps + 1):
        if i: opt.step(); sched.step()
        out.append([(pg['lr'], get_mom(pg), pg['betas'][1] if 'betas' in pg else -1.) for pg in opt.param_groups])
    return torch.tensor(out, dtype=torch.float64)                               # (n_steps+1, groups, 3)


def test_shapes_end_points_and_middle():
    assert sched_lin(2., 1., 0.) == 2. and sched_lin(2., 1., 1.) == 1. and sched_lin(2., 1., 0.25) == 1.75
    assert sched_cos(2., 1., 0.) == 2. and math.isclose(sched_cos(2., 1., 1.), 1.) and sched_cos(2., 1., 0.5) == 1.5
    assert math.isclose(sched_cos(1., 0., 0.25), (1 + math.cos(math.pi/4))/2)
    assert math.isclose(cosine_lr(50, 100, 0.4, 0.1), 0.25)


@pytest.mark.parametrize('kind', ['sgd', 'miniai'])
@pytest.mark.parametrize('T,eta_min', [(100, 0.), (37, 1e-3)])
def test_cosine_matches_torch_over_a_run_and_beyond(kind, T, eta_min):
    ref = two_groups('sgd')
    theirs = trajectory(ref, optim.lr_scheduler.CosineAnnealingLR(ref, T_max=T, eta_min=eta_min), 2*T)
    opt = two_groups(kind)
    ours = trajectory(opt, CosineAnnealing(opt, T_max=T, eta_min=eta_min), 2*T)
    assert (theirs[..., 0] - ours[..., 0]).abs().max() < 1e-6
    assert ours[T, 0, 0] == pytest.approx(eta_min) and ours[2*T, 0, 0] == pytest.approx(0.1)   # down, then back up


@pytest.mark.parametrize('kind', ['sgd', 'adamw', 'miniai', 'miniai_adam'])
@pytest.mark.parametrize('kwargs', [dict(max_lr=0.4, total_steps=100),
                                    dict(max_lr=[0.4, 0.05], total_steps=137, pct_start=0.25),
                                    dict(max_lr=1., epochs=3, steps_per_epoch=17, div_factor=10., final_div_factor=100.,
                                         base_momentum=0.8, max_momentum=0.9)])
def test_one_cycle_matches_torch_over_a_whole_run(kind, kwargs):
    ref = two_groups('adamw' if kind in ('adamw', 'miniai_adam') else 'sgd')
    sched = optim.lr_scheduler.OneCycleLR(ref, **kwargs)
    theirs = trajectory(ref, sched, sched.total_steps)
    opt = two_groups(kind)
    ours = trajectory(opt, OneCycle(opt, **kwargs), sched.total_steps)
    assert (theirs[..., :2] - ours[..., :2]).abs().max() < 1e-6                  # lr and momentum, every step
    if kind == 'adamw': assert (ours[..., 2] == 0.99).all()                       # the second beta is left alone
    if kind == 'miniai_adam': assert all(pg['sqr_mom'] == 0.99 for pg in opt.param_groups)


def test_one_cycle_function_shape():
    T = 200
    lrs, moms = zip(*[one_cycle(s, T, 0.5) for s in range(T + 1)])
    peak = max(range(T + 1), key=lambda s: lrs[s])
    assert peak == 59 and lrs[peak] == pytest.approx(0.5) and moms[peak] == pytest.approx(0.85)
    assert lrs[0] == pytest.approx(0.5/25) and moms[0] == pytest.approx(0.95)
    assert lrs[T - 1] == pytest.approx(0.5/25/1e4) and moms[T - 1] == pytest.approx(0.95)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))              # up, then down
    assert all(a >= b for a, b in zip(lrs[peak:T - 1], lrs[peak + 1:T]))


def test_one_cycle_without_momentum_cycle_leaves_momentum_alone():
    opt = two_groups('sgd')
    sched = OneCycle(opt, max_lr=0.4, total_steps=10, cycle_momentum=False)
    for _ in range(10): opt.step(); sched.step()
    assert [pg['momentum'] for pg in opt.param_groups] == [0.9, 0.9]


def test_one_cycle_past_its_end_raises_like_torch():
    ref, opt = two_groups('sgd'), two_groups('sgd')
    theirs, ours = optim.lr_scheduler.OneCycleLR(ref, max_lr=0.4, total_steps=10), OneCycle(opt, max_lr=0.4, total_steps=10)
    for _ in range(10): ref.step(); theirs.step(); opt.step(); ours.step()        # steps 1..10 are fine for both
    with pytest.raises(ValueError): theirs.step()
    with pytest.raises(ValueError, match=r'total_steps=10 and was stepped to step 11'): ours.step()
    with pytest.raises(ValueError, match='step 12 is past the end of a schedule of total_steps=10'): one_cycle(12, 10, 0.4)


def test_one_cycle_bad_arguments():
    with pytest.raises(ValueError, match='total_steps, or epochs and steps_per_epoch'): OneCycle(two_groups(), max_lr=0.1)
    with pytest.raises(ValueError, match='positive number of steps'): OneCycle(two_groups(), max_lr=0.1, total_steps=0)
    with pytest.raises(ValueError, match='pct_start=0.01 of total_steps=50'):
        OneCycle(two_groups(), max_lr=0.1, total_steps=50, pct_start=0.01)
    with pytest.raises(ValueError, match='got 3 values for 2 parameter groups'):
        OneCycle(two_groups(), max_lr=[0.1, 0.2, 0.3], total_steps=50)
    with pytest.raises(ValueError, match='T_max must be a positive'): CosineAnnealing(two_groups(), T_max=0)


def test_momentum_interface_and_a_group_without_momentum():
    for kind, key in (('sgd', 'momentum'), ('adamw', 'betas'), ('miniai', 'mom')):
        pg = two_groups(kind).param_groups[1]
        set_mom(pg, 0.7)
        assert get_mom(pg) == 0.7 and key in pg
    adagrad = optim.Adagrad([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter group 0 has no momentum .* 'lr_decay'"):
        OneCycle(adagrad, max_lr=0.1, total_steps=10)
    OneCycle(adagrad, max_lr=0.1, total_steps=10, cycle_momentum=False)           # fine without the momentum cycle


class LRsSeen(Callback):
    "The learning rate and momentum each training batch was stepped with, and the validation batches' lrs."
    def before_fit(self, learn): self.train, self.valid = [], []
    def after_backward(self, learn): self.train.append((learn.opt.param_groups[0]['lr'], get_mom(learn.opt.param_groups[0])))
    def after_loss(self, learn):
        if not learn.training: self.valid.append(learn.opt.param_groups[0]['lr'])


def test_batch_sched_cb_follows_the_schedule_in_training_only():
    dls, epochs = toy_dls(), 3
    T = epochs * len(dls.train)
    seen = LRsSeen()
    sched = BatchSchedCB(partial(OneCycle, max_lr=0.3, total_steps=T))
    TrainLearner(nn.Linear(3, 1), dls, F.mse_loss, lr=0.1, cbs=[sched, seen], opt_func=partial(optim.SGD, momentum=0.9)).fit(epochs)
    want = [one_cycle(s, T, 0.3) for s in range(T)]
    assert len(seen.train) == T and max(abs(a - b) for got, w in zip(seen.train, want) for a, b in zip(got, w)) < 1e-12
    assert sched.schedo.last_step == T                                            # validation did not step it
    per_epoch = len(dls.train)
    assert seen.valid[0] == pytest.approx(one_cycle(per_epoch, T, 0.3)[0])        # validation sees the current lr


def test_batch_sched_cb_keeps_todays_behaviour_with_a_torch_scheduler():
    seen = LRsSeen()
    sched = BatchSchedCB(lambda opt: optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    TrainLearner(nn.Linear(3, 1), toy_dls(n_train=10), F.mse_loss, lr=0.8, cbs=[sched, seen]).fit(1)
    assert [lr for lr, _ in seen.train] == [0.8, 0.4, 0.2]


def test_epoch_sched_cb_steps_once_per_training_epoch():
    seen = LRsSeen()
    sched = EpochSchedCB(partial(CosineAnnealing, T_max=4))
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.2, cbs=[sched, seen], opt_func=SGD).fit(4)
    per_epoch = len(toy_dls().train)
    lrs = [lr for lr, _ in seen.train]
    assert all(lrs[e*per_epoch:(e + 1)*per_epoch] == [pytest.approx(cosine_lr(e, 4, 0.2))]*per_epoch for e in range(4))
    assert sched.schedo.last_step == 4


def test_a_fit_longer_than_the_schedule_stops_with_a_clear_error():
    dls = toy_dls()
    model = nn.Linear(3, 1)
    sched = BatchSchedCB(partial(OneCycle, max_lr=0.3, total_steps=2*len(dls.train)))   # built for 2 epochs
    learn = TrainLearner(model, dls, F.mse_loss, lr=0.1, cbs=[sched], opt_func=partial(optim.SGD, momentum=0.9))
    with pytest.raises(ValueError, match='total_steps=6 and was stepped to step 7') as e:
        learn.fit(3)
    assert 'BatchSchedCB.after_step (epoch 2, batch 0)' in ''.join(e.value.__notes__)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_recorder_records_per_training_batch_and_plots():
    dls, epochs = toy_dls(), 2
    T = epochs * len(dls.train)
    rec = RecorderCB(lr=lambda cb: cb.pg['lr'], mom=lambda cb: get_mom(cb.pg), loss=lambda cb: cb.learn.loss.item())
    sched = BatchSchedCB(partial(OneCycle, max_lr=0.3, total_steps=T))
    TrainLearner(nn.Linear(3, 1), dls, F.mse_loss, lr=0.1, cbs=[sched, rec], opt_func=partial(SGD, mom=0.9)).fit(epochs)
    want = [one_cycle(s, T, 0.3) for s in range(T)]
    assert rec.recs['lr'] == pytest.approx([lr for lr, _ in want]) and rec.recs['mom'] == pytest.approx([m for _, m in want])
    assert len(rec.recs['loss']) == T and rec.learn is None
    axs = rec.plot()
    assert [ax.get_ylabel() for ax in axs] == ['lr', 'mom', 'loss'] and all(ax.get_xlabel() == 'training batch' for ax in axs)


def test_has_learn_cb_drops_the_learner_however_the_fit_ends():
    seen = []
    class Boom(HasLearnCB):
        def after_batch(self, learn):
            seen.append(self.learn is learn)
            raise RuntimeError('boom')
    cb = Boom()
    with pytest.raises(RuntimeError): TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[cb]).fit(1)
    assert seen == [True] and cb.learn is None


@pytest.mark.parametrize('beta', [0.5, 0.9, 0.99])
def test_ewma_is_the_weighted_sum_of_the_values_so_far(beta):
    "a_t = sum_k (1 - beta) beta^k x_{t-k}; debiased, divided by the sum of those weights, 1 - beta^t."
    from miniai.sched import ewma
    xs = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    for t in (1, 2, 10, 50):
        w = [(1 - beta) * beta**k for k in range(t)]                   # weights of x_t, x_{t-1}, ..., x_1
        want = sum(wk * x for wk, x in zip(w, reversed(xs[:t])))
        assert ewma(xs, beta)[t - 1] == pytest.approx(want, rel=1e-12)
        assert ewma(xs, beta, debias=True)[t - 1] == pytest.approx(want / sum(w), rel=1e-12)
    assert ewma([3.0] * 20, beta, debias=True) == pytest.approx([3.0] * 20, rel=1e-12)   # a constant stays itself
