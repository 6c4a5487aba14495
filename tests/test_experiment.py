"""miniai.experiment: the lessons' CNN, results rows against statistics, run() against hand-written fits, the
results payload, and the per-batch loss recorder."""
import json
import math
import statistics

import IPython.display
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from helpers import class_dls, toy_dls
from miniai.callback import Callback
from miniai.callbacks import DeviceCB, MetricsCB
from miniai.datasets import fashion_dls
from miniai.device import def_device, set_seed
from miniai.experiment import RESULTS_MIME, LossRecorderCB, conv, get_model, result_row, run, show_results
from miniai.learner import MomentumLearner, TrainLearner


def n_params(model): return sum(p.numel() for p in model.parameters())


# -- the CNN ------------------------------------------------------------------------------------------------------

def test_get_model_shapes():
    model = get_model()
    x = torch.randn(2, 1, 28, 28, device=def_device)
    shapes = []
    for layer in model:
        x = layer(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(2, 8, 14, 14), (2, 16, 7, 7), (2, 32, 4, 4), (2, 64, 2, 2), (2, 10, 1, 1), (2, 10)]
    assert next(model.parameters()).device.type == def_device.type


def test_get_model_parameter_count_by_hand():
    # a 3x3 conv from ni to nf channels: 9*ni*nf weights (+ nf biases); the head maps 64 channels to 10 logits
    convs = [9*1*8 + 8, 9*8*16 + 16, 9*16*32 + 32, 9*32*64 + 64]
    head = 9*64*10 + 10
    assert n_params(get_model()) == sum(convs) + head == 30154
    bn = [9*1*8 + 2*8, 9*8*16 + 2*16, 9*16*32 + 2*32, 9*32*64 + 2*64]   # no conv bias; BatchNorm's weight and bias
    assert n_params(get_model(norm=nn.BatchNorm2d)) == sum(bn) + head == 30274
    assert n_params(get_model(nfs=(1, 4, 8))) == (9*1*4 + 4) + (9*4*8 + 8) + (9*8*10 + 10)


def test_get_model_activation_and_norm_layers():
    model = get_model(act=nn.GELU, norm=nn.BatchNorm2d)
    assert [[type(l) for l in block] for block in model[:4]] == [[nn.Conv2d, nn.BatchNorm2d, nn.GELU]]*4
    assert [type(l) for l in model[4:]] == [nn.Conv2d, nn.Flatten] and model[4].bias is not None
    assert all(len(block) == 1 for block in get_model(act=None)[:4])


def test_conv_layout():
    c = conv(3, 8, ks=5, stride=1)
    assert [type(l) for l in c] == [nn.Conv2d, nn.ReLU]
    assert c[0].kernel_size == (5, 5) and c[0].stride == (1, 1) and c[0].padding == (2, 2)
    assert tuple(c(torch.randn(2, 3, 9, 9)).shape) == (2, 8, 9, 9)


@pytest.mark.parametrize('norm, bias', [(None, True), (nn.BatchNorm2d, False), (nn.InstanceNorm2d, False)])
def test_conv_drops_the_bias_before_a_mean_removing_norm(norm, bias):
    assert (conv(3, 8, norm=norm)[0].bias is not None) == bias
    assert conv(3, 8, norm=norm, bias=True)[0].bias is not None      # an explicit choice wins
    assert conv(3, 8, norm=norm, bias=False)[0].bias is None


def test_a_bias_before_batchnorm_changes_nothing():
    torch.manual_seed(0)
    without = conv(3, 8, norm=nn.BatchNorm2d)
    with_bias = conv(3, 8, norm=nn.BatchNorm2d, bias=True)
    with torch.no_grad():
        with_bias[0].weight.copy_(without[0].weight)
        with_bias[0].bias.normal_()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(with_bias(x), without(x), atol=1e-5, rtol=1e-5)   # BatchNorm subtracts it again


# -- results rows -------------------------------------------------------------------------------------------------

def test_result_row_statistics():
    accs, secs = [0.81, 0.835, 0.79], [10.0, 12.5, 11.0]
    row = result_row('plain', accs, [1, 2, 3], 2, secs, [5.0, 5.5, 6.0, 6.5], note='x')
    assert row['accuracy'] == statistics.fmean(accs) and row['spread'] == statistics.stdev(accs)
    assert row['accuracies'] == accs and row['seeds'] == [1, 2, 3] and row['epochs'] == 2
    assert row['train_seconds'] == statistics.fmean(secs) and row['epoch_time'] == 5.75 and row['note'] == 'x'
    one = result_row('one', [0.8], [7], 4, [10.0])
    assert one['spread'] == 0.0 and one['epoch_time'] == 10.0/4                 # no epoch times: seconds / epochs


def test_result_row_mismatched_lengths_is_a_clear_error():
    with pytest.raises(ValueError, match=r'plain: 2 accuracies for 3 seeds'):
        result_row('plain', [0.8, 0.9], [1, 2, 3], 1, [1.0])


# -- run ----------------------------------------------------------------------------------------------------------

def _fit_by_hand(seed, build, dls, lr, epochs=1, loss_func=F.cross_entropy):
    set_seed(seed)
    model = build()
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = MomentumLearner(model, dls, loss_func, lr=lr, cbs=[DeviceCB(), metrics])
    learn.logger = None
    learn.fit(epochs)
    return metrics.history[-1]['accuracy'], model


def test_run_over_two_seeds_equals_two_fits_by_hand(monkeypatch, capsys):
    monkeypatch.setenv('MINIAI_SMOKE', '1')
    dls = fashion_dls()
    assert len(dls.train.x) == 2048                                      # the small real subset
    row = run('plain', get_model, dls, epochs=1, lr=0.1, seeds=(1, 2), quiet=True)
    assert capsys.readouterr().out == ''
    want = [_fit_by_hand(s, get_model, dls, lr=0.1) for s in (1, 2)]
    assert row['accuracies'] == [a for a, _ in want]
    assert row['accuracy'] == statistics.fmean(row['accuracies']) and row['spread'] == statistics.stdev(row['accuracies'])
    assert row['technique'] == 'plain' and row['seeds'] == [1, 2] and row['epochs'] == 1
    assert row['train_seconds'] > 0 and row['epoch_time'] == pytest.approx(row['train_seconds'])
    learn = row['learn']
    assert isinstance(learn, MomentumLearner) and learn.logger is None
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), want[1][1].parameters()))   # the last seed


def _nan_first_build():
    "A builder whose first model has a NaN bias (its loss is NaN at once); later ones are plain."
    built = []
    def build():
        model = nn.Linear(3, 5)
        if not built: torch.nn.init.constant_(model.bias, math.nan)
        built.append(model)
        return model
    return build, built


def test_run_records_nan_for_a_diverged_seed(capsys):
    build, built = _nan_first_build()
    row = run('nan first', build, class_dls(), epochs=1, lr=0.1, seeds=(1,), quiet=True)
    assert 'nan first, seed 1: diverged (loss is nan at epoch 0, batch 0' in capsys.readouterr().out
    assert math.isnan(row['accuracies'][0]) and math.isnan(row['accuracy']) and row['spread'] == 0.0
    assert row['learn'].model is built[0]


def test_run_records_nan_when_a_callback_stops_the_fit():
    row = run('stopped', lambda: nn.Linear(3, 5), class_dls(), epochs=2, lr=0.1, quiet=True,
              cbs=lambda: [LossRecorderCB(limit=0.0)])                    # every loss is over the limit
    assert math.isnan(row['accuracy']) and row['learn'].cbs[-1].diverged == (0, 0)


def test_run_goes_on_after_a_diverged_seed(capsys):
    build, built = _nan_first_build()
    dls = class_dls()
    row = run('nan first', build, dls, epochs=1, lr=0.1, seeds=(1, 2), quiet=True)
    assert len(built) == 2 and 'seed 2' not in capsys.readouterr().out
    acc2, _ = _fit_by_hand(2, lambda: nn.Linear(3, 5), dls, lr=0.1)
    assert math.isnan(row['accuracies'][0]) and row['accuracies'][1] == acc2
    assert math.isnan(row['accuracy']) and math.isnan(row['spread']) and row['learn'].model is built[1]


def test_result_row_with_a_nan_accuracy_has_a_nan_spread():
    row = result_row('half diverged', [math.nan, 0.8], [1, 2], 1, [1.0, 1.0])
    assert math.isnan(row['accuracy']) and math.isnan(row['spread'])


# -- show_results -------------------------------------------------------------------------------------------------

def test_show_results_payload(monkeypatch):
    shown = []
    monkeypatch.setattr(IPython.display, 'display', lambda obj, **kw: shown.append((obj, kw)))
    rows = [result_row('plain', [0.8, 0.85], [1, 2], 3, [9.0, 11.0]),
            result_row('diverged', [math.nan], [1], 3, [0.0], learn=object())]
    show_results(rows, lesson='01_learner')
    (obj, kw), = shown
    assert kw == {'raw': True}
    payload = obj[RESULTS_MIME]
    keys = ['technique', 'accuracy', 'spread', 'accuracies', 'seeds', 'epochs', 'train_seconds', 'epoch_time']
    assert payload['lesson'] == '01_learner' and [list(r) for r in payload['rows']] == [keys, keys]
    assert payload['rows'][0] == {k: rows[0][k] for k in keys}
    assert payload['rows'][1]['accuracy'] is None and payload['rows'][1]['accuracies'] == [None]
    assert payload['rows'][1]['spread'] == 0.0
    json.dumps(payload, allow_nan=False)                                   # valid JSON: no NaN left
    md = obj['text/markdown'].splitlines()
    assert md[0] == '**01_learner**' and len(md) == 2 + 2 + 2
    assert md[4] == f"| plain | {statistics.fmean([0.8, 0.85]):.4f} ± {statistics.stdev([0.8, 0.85]):.4f} | 1, 2 | 3 | 10.0 | 3.33 |"


# -- LossRecorderCB -----------------------------------------------------------------------------------------------

class TrainLosses(Callback):
    order = 5
    def before_fit(self, learn): self.losses = []
    def after_loss(self, learn):
        if learn.training: self.losses.append(learn.loss.item())


def test_loss_recorder_keeps_one_loss_per_training_batch():
    rec, ref = LossRecorderCB(), TrainLosses()
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[rec, ref]).fit(2)   # 2 epochs x 3 batches
    assert rec.losses == ref.losses and len(rec.losses) == 6 and rec.diverged is None


def test_loss_recorder_limit_stops_the_fit_before_the_step():
    dls = toy_dls()
    dls.train.x[4:8] = float('nan')                                        # the second training batch
    model = nn.Linear(3, 1)
    rec = LossRecorderCB(limit=1e6)
    TrainLearner(model, dls, F.mse_loss, lr=0.1, cbs=rec).fit(2)            # no FloatingPointError: the fit ends
    assert rec.diverged == (0, 1) and len(rec.losses) == 2 and math.isnan(rec.losses[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ref = TrainLosses()
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=ref).fit(1, valid=False)
    limit = sorted(ref.losses)[1]                                          # the second-lowest loss of the same fit
    set_seed(0); m1 = nn.Linear(3, 1)
    set_seed(0); m2 = nn.Linear(3, 1)
    ref, rec = TrainLosses(), LossRecorderCB(limit=limit)
    TrainLearner(m1, toy_dls(), F.mse_loss, lr=0.1, cbs=ref).fit(1, valid=False)
    TrainLearner(m2, toy_dls(), F.mse_loss, lr=0.1, cbs=rec).fit(1, valid=False)
    first_over = next(i for i, l in enumerate(ref.losses) if l > limit)
    assert rec.losses == ref.losses[:first_over + 1] and rec.diverged == (0, first_over)
