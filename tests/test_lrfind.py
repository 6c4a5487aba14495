"""miniai.lrfind: the learning-rate sweep, its suggestion and plot, restoring everything, which callbacks sit it out."""
import math

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import bn_model, state_of, toy_dls
from miniai.callback import Callback
from miniai.callbacks import MetricsCB, ProgressCB
from miniai.device import set_seed
from miniai.learner import MomentumLearner, TrainLearner
from miniai.lrfind import RECORDING_CBS, LRFinderCB, lr_find, suggest_lr


@pytest.fixture(autouse=True)
def close_figures():
    plt.close('all')
    yield
    plt.close('all')


def test_suggest_lr_is_a_tenth_of_the_lr_at_the_lowest_finite_loss():
    assert suggest_lr([1., 2., 3., 4.], [5., 2., math.nan, 1.]) == pytest.approx(0.4)
    assert suggest_lr([1., 2., 3.], [5., 2., math.inf]) == pytest.approx(0.2)
    assert suggest_lr([1., 2.], [5., math.nan]) is None and suggest_lr([], []) is None


def test_lr_find_restores_model_buffers_grads_optimizer_and_rng():
    set_seed(0)
    model = bn_model()
    learn = MomentumLearner(model, toy_dls(n_train=400, bs=50), F.mse_loss, lr=0.1)
    learn.fit(1)   # leaves momentum gradients and an optimizer behind
    before, grads, opt = state_of(model), [p.grad.clone() for p in model.parameters()], learn.opt
    torch.manual_seed(123)
    res = learn.lr_find(plot=False)
    after_rng = torch.rand(3)
    torch.manual_seed(123); want_rng = torch.rand(3)
    assert len(res.lrs) == len(res.losses) > 5
    assert res.lrs[0] == 1e-5 and all(b == pytest.approx(a*1.3) for a, b in zip(res.lrs, res.lrs[1:]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert learn.opt is opt and torch.equal(after_rng, want_rng)
    assert not model.training                              # as the fit left it: eval after validation
    assert res.suggestion == pytest.approx(min(zip(res.losses, res.lrs))[1]/10)


def test_lr_find_stops_when_the_loss_exceeds_max_mult_times_the_minimum():
    set_seed(0)
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(n_train=400, bs=10), F.mse_loss, lr=0.1)
    res = learn.lr_find(gamma=2, max_mult=3, plot=False)
    best = min(res.losses[:-1])
    assert res.losses[-1] > 3*best and all(l <= 3*min(res.losses[:i+1]) for i, l in enumerate(res.losses[:-1]))


def test_lr_find_restores_even_when_it_fails():
    model = bn_model()
    before = state_of(model)
    class Fail(Callback):
        def after_step(self, learn):
            if learn.iter == 3: raise RuntimeError('disk full')
    learn = TrainLearner(model, toy_dls(n_train=100), F.mse_loss, lr=0.1, cbs=[Fail()])
    with pytest.raises(RuntimeError, match='disk full'):
        learn.lr_find(max_mult=1e9, plot=False)          # a noisy loss must not end the sweep before batch 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(c).__name__ for c in learn.cbs] == ['Fail']


def test_lr_find_with_negative_losses_and_few_batches():
    def neg_loss(preds, y): return -(preds - y).abs().mean() - 10   # always negative
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(n_train=12, bs=4), neg_loss, lr=0.1)
    res = learn.lr_find(max_epochs=2, plot=False)
    assert len(res.losses) == 2*3 and all(l < 0 for l in res.losses)   # the data ran out first: 2 epochs x 3 batches


def test_lr_find_diverging_on_the_first_step():
    dls = toy_dls()
    dls.train.x[:] = float('inf')
    learn = TrainLearner(nn.Linear(3, 1), dls, F.mse_loss, lr=0.1)
    res = learn.lr_find(plot=False)
    assert len(res.losses) == 1 and not math.isfinite(res.losses[0]) and res.suggestion is None


def test_a_diverging_sweep_is_not_an_error_but_a_nan_loss_in_fit_still_is():
    set_seed(0)
    model = nn.Linear(3, 1)
    learn = TrainLearner(model, toy_dls(n_train=400, bs=10), F.mse_loss, lr=0.1)
    res = learn.lr_find(gamma=10, max_mult=math.inf, plot=False)   # only a non-finite loss ends this sweep
    assert not math.isfinite(res.losses[-1]) and all(math.isfinite(l) for l in res.losses[:-1])
    assert len(res.losses) < 40                                       # it stopped there, in the first epoch
    dls = toy_dls()
    dls.train.x[4:8] = float('nan')
    with pytest.raises(FloatingPointError, match='epoch 0, batch 1'):
        TrainLearner(model, dls, F.mse_loss, lr=0.1).fit(1)


def test_recording_callbacks_sit_out_the_sweep_and_come_back_in_place():
    seen = []
    class Spy(Callback):
        def before_fit(self, learn): seen.append([type(c) for c in learn.cbs])
    metrics, spy, progress = MetricsCB(), Spy(), ProgressCB()
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[metrics, spy, progress])
    learn.lr_find(plot=False)
    assert RECORDING_CBS == (MetricsCB, ProgressCB)
    assert seen == [[Spy, LRFinderCB]]                      # during the sweep: no metrics, no progress
    assert metrics.history == [] and learn.cbs == [metrics, spy, progress]


def test_lr_find_skip():
    seen = []
    class Spy(Callback):
        def before_fit(self, learn): seen.append([type(c) for c in learn.cbs])
    metrics, spy = MetricsCB(), Spy()
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(n_train=12, bs=4), lambda p, y: -(p - y).abs().mean() - 10,
                         lr=0.1, cbs=[metrics, spy])
    learn.logger = None
    lr_find(learn, max_epochs=2, plot=False, skip=())                 # nothing skipped: metrics record the sweep
    assert seen == [[MetricsCB, Spy, LRFinderCB]] and [r['train'] for r in metrics.history] == [True, True]
    lr_find(learn, max_epochs=2, plot=False, skip=(Spy,))             # the Spy skipped, the metrics kept
    assert len(seen) == 1 and len(metrics.history) == 4 and learn.cbs == [metrics, spy]


def test_lr_finder_cb_in_a_plain_fit_plots_and_suggests():
    set_seed(0)
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(n_train=400, bs=10), F.mse_loss, lr=1e-4)
    finder = LRFinderCB()
    assert plt.get_fignums() == []
    learn.fit(10, cbs=finder)                            # validation batches are skipped by the finder
    assert learn.cbs == [] and len(finder.lrs) == len(finder.losses) > 5
    assert finder.lrs[0] == pytest.approx(1e-4) and finder.lrs[1] == pytest.approx(1.3e-4)
    assert finder.suggestion == suggest_lr(finder.lrs, finder.losses)
    assert finder.suggestion == pytest.approx(min(zip(finder.losses, finder.lrs))[1]/10)
    assert len(plt.get_fignums()) == 1
    ax = plt.gcf().axes[0]
    x, y = ax.lines[0].get_data()
    assert list(x) == finder.lrs and list(y) == finder.losses and ax.get_xscale() == 'log'
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert list(ax.lines[1].get_xdata()) == [finder.suggestion]*2                 # the suggestion's marker


def test_lr_finder_cb_without_plot_and_lr_find_plot():
    set_seed(0)
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(n_train=400, bs=10), F.mse_loss, lr=1e-4)
    finder = LRFinderCB(plot=False)
    learn.fit(10, cbs=finder)
    assert plt.get_fignums() == [] and finder.suggestion is not None
    res = learn.lr_find()                                 # plot=True by default
    assert len(plt.get_fignums()) == 1 and list(plt.gcf().axes[0].lines[0].get_ydata()) == res.losses


def test_lr_find_when_an_earlier_before_fit_fails():
    class Boom(Callback):
        order = -1
        def before_fit(self, learn): raise RuntimeError('boom')
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[Boom()])
    with pytest.raises(RuntimeError, match='boom'): learn.lr_find(plot=False)
