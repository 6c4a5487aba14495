"""miniai.callbacks: device and batch transforms, per-batch schedules, metrics against hand computations, rows, progress."""
import math

import fastprogress
import IPython.display

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from helpers import class_dls, toy_dls
from miniai.callback import Callback
from miniai.callbacks import (BatchSchedCB, BatchTransformCB, DeviceCB, MetricsCB, ProgressCB, epoch_times,
                              format_row)
from miniai.datasets import fashion_dls
from miniai.device import set_seed
from miniai.learner import TrainLearner


def test_batch_transform_and_device_callbacks():
    seen = []
    class Look(Callback):
        order = 10
        def before_batch(self, learn): seen.append((learn.training, float(learn.batch[0].abs().max())))
    tfm = BatchTransformCB(lambda b: (b[0]*0, b[1]), on_train=True, on_val=False)
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[DeviceCB('cpu'), tfm, Look()]).fit(1)
    assert all(v == 0 for t, v in seen if t) and all(v > 0 for t, v in seen if not t)
    assert [t for t, _ in seen] == [True]*3 + [False]


def test_batch_sched_cb_steps_per_batch():
    lrs = []
    class L(Callback):
        def before_batch(self, learn):
            if learn.training: lrs.append(learn.opt.param_groups[0]['lr'])
    sched = BatchSchedCB(lambda opt: optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.8, cbs=[sched, L()]).fit(1)
    assert lrs == [0.8, 0.4, 0.2]


# -- metrics ------------------------------------------------------------------------------------------------------

def test_metrics_match_a_hand_computation_on_real_data():
    dls = fashion_dls(1000, smoke=True)
    set_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    TrainLearner(model, dls, F.cross_entropy, lr=0.1, cbs=[metrics]).fit(1, train=False)
    row = metrics.history[-1]
    with torch.no_grad():
        xs, ys = dls.valid.x, dls.valid.y
        logits = model(((xs.float()/255 - dls.valid.mean)/dls.valid.std)[:, None])
        acc = (logits.argmax(1) == ys).float().mean().item()
        loss = F.cross_entropy(logits, ys).item()   # batches of 2000, 512 items: one uneven batch
    assert row['train'] is False and row['epoch'] == 0
    assert row['accuracy'] == pytest.approx(acc, abs=1e-6)
    assert row['loss'] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize('n_valid, bs', [
    (6, 4),       # batches of 4 and 2: the mean is weighted by batch size
    (1100, 1),    # 1100 batches: more than the 1024 losses MetricsCB keeps before folding them into the mean
])
def test_metrics_loss_is_the_mean_over_items(n_valid, bs):
    model = nn.Linear(3, 1)
    metrics = MetricsCB()
    dls = toy_dls(n_valid=n_valid, bs=bs)
    TrainLearner(model, dls, F.mse_loss, lr=0.1, cbs=[metrics]).fit(1, train=False)
    with torch.no_grad(): want = F.mse_loss(model(dls.valid.x), dls.valid.y).item()
    assert metrics.history[-1]['loss'] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('max_kept_batches', [1024, 2])
def test_metrics_updated_together_equal_one_update_per_batch(max_kept_batches):
    # MetricsCB keeps the batches and updates each metric once for all of them; per-batch updates are the reference
    from torcheval.metrics import MulticlassAUROC, MulticlassF1Score
    class Grab(Callback):
        def before_epoch(self, learn): self.batches = []
        def after_batch(self, learn): self.batches.append((learn.preds.detach().clone(), learn.batch[1]))
    metrics = MetricsCB(accuracy=MulticlassAccuracy(), f1=MulticlassF1Score(num_classes=5, average='macro'),
                        auroc=MulticlassAUROC(num_classes=5))
    metrics.max_kept_batches = max_kept_batches
    grab = Grab()
    TrainLearner(nn.Linear(3, 5), class_dls(), F.cross_entropy, lr=0.1, cbs=[metrics, grab]).fit(1, train=False)
    ref = {'accuracy': MulticlassAccuracy(), 'f1': MulticlassF1Score(num_classes=5, average='macro'),
           'auroc': MulticlassAUROC(num_classes=5)}
    for preds, y in grab.batches:                       # 6 batches: five of 4 items, one of 2
        for m in ref.values(): m.update(preds, y)
    assert [len(y) for _, y in grab.batches] == [4]*5 + [2]
    for k, m in ref.items(): assert metrics.history[-1][k] == pytest.approx(m.compute().item(), abs=1e-6)


def test_metrics_flush_when_the_prediction_shape_changes_or_the_bytes_run_out():
    class Shapes:   # the torcheval metric interface, recording what each update received
        def __init__(self): self.seen = []
        def reset(self): self.seen = []; return self
        def to(self, device): return self
        def update(self, preds, y): self.seen.append(tuple(preds.shape))
        def compute(self): return torch.tensor(float(len(self.seen)))
    class Widen(nn.Module):   # predictions of 2 columns for the first 3 batches, then 3
        def __init__(self): super().__init__(); self.lin, self.n = nn.Linear(3, 3), 0
        def forward(self, x):
            self.n += 1
            return self.lin(x)[:, :2] if self.n <= 3 else self.lin(x)
    shapes = Shapes()
    metrics = MetricsCB(shapes=shapes)
    dls = class_dls(n_valid=24, n_classes=2)
    TrainLearner(Widen(), dls, lambda p, y: p.sum(), lr=0.1, cbs=[metrics]).fit(1, train=False)
    # batch 0 alone (the first batch of an epoch goes in at once), batches 1-2, then the three wider ones together
    assert shapes.seen == [(4, 2), (8, 2), (12, 3)]
    metrics.max_kept_bytes = 1   # every batch is over the limit: one update per batch
    TrainLearner(nn.Linear(3, 2), dls, lambda p, y: p.sum(), lr=0.1, cbs=[metrics]).fit(1, train=False)
    assert shapes.seen == [(4, 2)] * 6


def test_metrics_reject_bad_predictions_at_the_first_batch():
    class Count(Callback):
        def __init__(self): self.n = 0
        def after_batch(self, learn): self.n += 1
    count = Count()
    model = nn.Sequential(nn.Linear(3, 10), nn.Unflatten(1, (2, 5)))   # (B, 2, 5): not the (B, C) accuracy wants
    learn = TrainLearner(model, class_dls(), lambda p, y: p.sum(), lr=0.1,
                         cbs=[MetricsCB(accuracy=MulticlassAccuracy()), count])
    with pytest.raises(ValueError) as e: learn.fit(1)
    notes = ' '.join(e.value.__notes__)
    assert "metric 'accuracy'" in notes and "shape (4, 2, 5)" in notes
    assert "MetricsCB.after_batch (epoch 0, batch 0)" in notes
    assert count.n == 0   # the fit stopped at the first batch, not at the end of the epoch


def test_metrics_positional_metrics_are_named_by_their_class():
    metrics = MetricsCB(MulticlassAccuracy())
    TrainLearner(nn.Linear(3, 5), class_dls(), F.cross_entropy, lr=0.1, cbs=metrics).fit(1, train=False)
    assert list(metrics.history[0]) == ['epoch', 'train', 'MulticlassAccuracy', 'loss', 'time']


# -- rows ---------------------------------------------------------------------------------------------------------

def test_format_row():
    row = {'epoch': 0, 'train': True, 'accuracy': 0.8125, 'loss': 0.512, 'time': 2.1037}
    assert format_row(row) == 'epoch 0  train  accuracy 0.812  loss 0.512  time 2.104'
    assert format_row({'epoch': 3, 'train': False, 'loss': 1.0}) == 'epoch 3  eval  loss 1.000'


def test_epoch_times_is_the_mean_over_training_epochs():
    metrics = MetricsCB()
    assert math.isnan(epoch_times(metrics))
    metrics.history = [{'train': True, 'time': 1.0}, {'train': False, 'time': 5.0}, {'train': True, 'time': 3.5}]
    assert epoch_times(metrics) == (1.0 + 3.5)/2


# -- progress -----------------------------------------------------------------------------------------------------

def test_progress_in_a_plain_terminal_is_clean_text(capsys):
    metrics = MetricsCB()
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[metrics, ProgressCB(plot=True)]).fit(1)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ['epoch', 'train', 'loss', 'time']
    assert out[1].split()[:2] == ['0', 'train'] and out[2].split()[:2] == ['0', 'eval'] and len(out) == 3
    assert [float(out[i].split()[2]) for i in (1, 2)] == [round(r['loss'], 3) for r in metrics.history]


def test_progress_records_every_training_loss():
    class L(Callback):
        def __init__(self): self.losses = []
        def after_loss(self, learn):
            if learn.training: self.losses.append(learn.loss.item())
    progress, ref = ProgressCB(), L()
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[MetricsCB(), progress, ref])
    learn.logger = None
    learn.fit(2)
    assert progress.losses == pytest.approx(ref.losses) and len(ref.losses) == 2*3
    assert len(progress.val_losses) == 2


def test_progress_takes_the_rows_and_gives_the_logger_back():
    rows = []
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[MetricsCB(), ProgressCB()])
    learn.logger = rows.append
    learn.fit(1)
    assert rows == [] and learn.logger == rows.append     # the rows went to the progress table


@pytest.mark.parametrize('where', ['after_batch', 'after_epoch', 'after_fit'])
def test_progress_restores_the_logger_when_fit_raises(where):
    rows = []
    class Boom(Callback):
        order = 5
    setattr(Boom, where, lambda self, learn: (_ for _ in ()).throw(RuntimeError('boom')))
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[MetricsCB(), ProgressCB(), Boom()])
    learn.logger = rows.append
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert learn.logger == rows.append


def test_progress_cleanup_after_an_earlier_before_fit_failed():
    # ProgressCB declares its state in __init__, so its cleanup_fit runs even when its before_fit never did
    class Boom(Callback):
        order = -1
        def before_fit(self, learn): raise RuntimeError('boom')
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[ProgressCB(), Boom()])
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)


def test_progress_graph_in_a_notebook_has_labelled_axes_and_a_legend(monkeypatch):
    fp = fastprogress.fastprogress                    # ProgressCB as in Jupyter: fastprogress's notebook bars
    class Handle:                                     # what IPython's display returns in a kernel: updatable output
        def __init__(self, obj): self.obj = obj
        def update(self, obj): self.obj = obj
    monkeypatch.setattr(IPython.display, 'display', lambda obj, *args, **kwargs: Handle(obj))   # no kernel here
    monkeypatch.setattr(fp, 'IN_NOTEBOOK', True)
    monkeypatch.setattr(fastprogress, 'master_bar', fp.NBMasterBar)
    monkeypatch.setattr(fastprogress, 'progress_bar', fp.NBProgressBar)
    progress = ProgressCB(plot=True)
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[MetricsCB(), progress]).fit(2)
    ax = progress.mbar.graph_ax
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ('training batches seen', 'loss', 'Loss during training')
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['training loss (each batch)',
                                                                  'validation loss (each epoch)']
    train, valid = ax.get_lines()
    assert list(train.get_ydata()) == pytest.approx(progress.losses) and len(progress.losses) == 2*3
    assert list(valid.get_ydata()) == pytest.approx(progress.val_losses) and list(valid.get_xdata()) == [3, 6]


def test_progress_plot_in_a_terminal_draws_nothing_and_keeps_the_text_table(monkeypatch, capsys):
    monkeypatch.setattr('sys.stdout.isatty', lambda: True)   # a terminal: fastprogress's console bars, no graph
    progress = ProgressCB(plot=True)
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[MetricsCB(), progress]).fit(1)
    assert not progress.graph and not hasattr(progress.mbar, 'graph_ax')
    assert 'epoch' in capsys.readouterr().out
