"""miniai.learner: events and their order, cancellation, errors and cleanup, lr_find, seeding, metrics."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from miniai.datasets import DataLoaders, TensorLoader, fashion_dls
from miniai.learner import (BatchSchedCB, BatchTransformCB, Callback, CancelBatchException, CancelEpochException,
                            CancelFitException, DeviceCB, Learner, MetricsCB, MomentumLearner, ProgressCB,
                            SingleBatchCB, TrainCB, TrainLearner, frozen_bn_stats, set_seed, to_cpu, to_device)


def toy_dls(n_train=10, n_valid=4, bs=4, n_in=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, n_in, generator=g), torch.randn(n_train + n_valid, 1, generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs), TensorLoader(x[n_train:], y[n_train:], bs))


class Recorder(Callback):
    def __init__(self): self.events = []
    def _rec(name):
        def f(self, learn): self.events.append((name, learn.training))
        return f
    for _n in ('before_fit after_fit cleanup_fit before_epoch after_epoch cleanup_epoch before_batch after_predict '
               'after_loss after_backward after_step after_batch cleanup_batch').split():
        locals()[_n] = _rec(_n)
    del _n, _rec


def test_events_fire_in_order():
    rec = Recorder()
    TrainLearner(nn.Linear(3, 1), toy_dls(n_train=4, n_valid=4), lr=0.1, cbs=[rec]).fit(1)
    names = [e for e, _ in rec.events]
    batch_train = ['before_batch', 'after_predict', 'after_loss', 'after_backward', 'after_step', 'after_batch',
                   'cleanup_batch']
    batch_valid = ['before_batch', 'after_predict', 'after_loss', 'after_batch', 'cleanup_batch']
    assert names == (['before_fit', 'before_epoch'] + batch_train + ['after_epoch', 'cleanup_epoch', 'before_epoch']
                     + batch_valid + ['after_epoch', 'cleanup_epoch', 'after_fit', 'cleanup_fit'])
    assert [t for e, t in rec.events if e == 'after_predict'] == [True, False]


def test_callbacks_run_by_order():
    seen = []
    class A(Callback):
        def __init__(self, name, order): self.name, self.order = name, order
        def before_fit(self, learn): seen.append(self.name)
    TrainLearner(nn.Linear(3, 1), toy_dls(), cbs=[A('c', 5), A('a', -1), A('b', 0)]).fit(0)
    assert seen == ['a', 'b', 'c']


def test_base_learner_with_traincb_equals_trainlearner():
    set_seed(0); m1 = nn.Linear(3, 1); m2 = nn.Linear(3, 1); m2.load_state_dict(m1.state_dict())
    Learner(m1, toy_dls(), lr=0.1, cbs=[TrainCB()]).fit(2)
    TrainLearner(m2, toy_dls(), lr=0.1).fit(2)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_cancel_batch_skips_the_step_but_cleans_up():
    model = nn.Linear(3, 1); w0 = model.weight.clone()
    rec = Recorder()
    class Skip(Callback):
        def after_loss(self, learn):
            if learn.training: raise CancelBatchException()
    TrainLearner(model, toy_dls(), lr=0.1, cbs=[Skip(), rec]).fit(1)
    assert torch.equal(model.weight, w0)
    names = [e for e, _ in rec.events]
    assert 'after_step' not in names and names.count('cleanup_batch') == 3 + 1


def test_cancel_epoch_and_cancel_fit():
    rec = Recorder()
    class StopEpoch(Callback):
        def after_batch(self, learn):
            if learn.iter == 0: raise CancelEpochException()
    TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.1, cbs=[StopEpoch(), rec]).fit(2)
    names = [e for e, _ in rec.events]
    assert names.count('before_batch') == 4 and names.count('after_epoch') == 0 and names.count('cleanup_epoch') == 4
    rec = Recorder()
    TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.1, cbs=[SingleBatchCB(), rec]).fit(3)
    names = [e for e, _ in rec.events]
    assert names.count('before_batch') == 1 and 'after_fit' not in names and names[-1] == 'cleanup_fit'


def test_failing_callback_is_named_and_temporary_cbs_are_removed():
    class Boom(Callback):
        def after_backward(self, learn):
            if learn.iter == 1: raise ValueError('boom')
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.1)
    with pytest.raises(ValueError, match='boom') as ei:
        learn.fit(1, cbs=[Boom()])
    assert ei.value.__notes__ == ['raised in callback Boom.after_backward (epoch 0, batch 1)']
    assert learn.cbs == []
    learn.fit(1)   # the learner is still usable


def test_nan_loss_stops_before_the_step_and_names_epoch_and_batch():
    model = nn.Linear(3, 1)
    dls = toy_dls()
    dls.train.x[4:8] = float('nan')   # the second training batch is poisoned
    snapshot = {}
    class Snap(Callback):
        def before_batch(self, learn):
            if learn.training: snapshot['w'] = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(FloatingPointError, match=r'epoch 0, batch 1.*before the optimizer step'):
        TrainLearner(model, dls, lr=0.1, cbs=[Snap()]).fit(1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshot['w']))


def test_model_output_that_does_not_fit_the_loss():
    learn = TrainLearner(nn.Linear(3, 2), toy_dls(), F.cross_entropy, lr=0.1)
    with pytest.raises(RuntimeError) as ei:
        learn.fit(1)
    assert 'predictions of shape torch.Size([4, 2])' in ei.value.__notes__[0]
    assert 'epoch 0, batch 0' in ei.value.__notes__[0]


def test_dls_without_train_and_valid():
    with pytest.raises(TypeError, match=r'no `.train` loader.*DataLoaders'):
        TrainLearner(nn.Linear(3, 1), [1, 2], lr=0.1).fit(1)


def test_missing_learning_rate_is_a_clear_error():
    with pytest.raises(ValueError, match='no learning rate'):
        MomentumLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss).fit(1)


def test_keyboard_interrupt_runs_cleanup_and_reaches_the_user():
    rec = Recorder()
    class Interrupt(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1: raise KeyboardInterrupt
    model = nn.Linear(3, 1)
    learn = TrainLearner(model, toy_dls(), lr=0.1, cbs=[rec])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, cbs=[Interrupt()])
    names = [e for e, _ in rec.events]
    assert names[-3:] == ['cleanup_batch', 'cleanup_epoch', 'cleanup_fit']
    assert learn.cbs == [rec] and model.training
    learn.fit(1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_momentum_learner_decays_gradients_and_skips_params_without_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    unused = nn.Parameter(torch.ones(2))
    model.register_parameter('unused', unused)
    model[0].weight.requires_grad_(False)   # frozen
    grads = []
    class Grab(Callback):
        def after_backward(self, learn): grads.append(learn.model[1].weight.grad.clone())
        def after_batch(self, learn):
            if learn.training: grads.append(learn.model[1].weight.grad.clone())
    learn = MomentumLearner(model, toy_dls(), F.mse_loss, lr=0.01, mom=0.5, cbs=[Grab()])
    learn.fit(1, valid=False)
    assert unused.grad is None and model[0].weight.grad is None
    torch.testing.assert_close(grads[1], 0.5*grads[0])   # zero_grad multiplied by mom


def test_set_seed_makes_two_fits_identical():
    def run():
        losses = []
        class L(Callback):
            def after_loss(self, learn): losses.append(learn.loss.item())
        set_seed(7)
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        dls = toy_dls(n_train=40, bs=8)
        dls.train.shuffle = True
        TrainLearner(model, dls, lr=0.05, cbs=[L()]).fit(2)
        return losses
    a, b = run(), run()
    assert a == b and len(a) == 2*(5 + 1)


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
    TrainLearner(model, dls, lr=0.1, cbs=[metrics]).fit(1, train=False)
    with torch.no_grad(): want = F.mse_loss(model(dls.valid.x), dls.valid.y).item()
    assert metrics.history[-1]['loss'] == pytest.approx(want, rel=1e-5)


def class_dls(n_train=40, n_valid=22, bs=4, n_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 3, generator=g), torch.randint(0, n_classes, (n_train + n_valid,), generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs), TensorLoader(x[n_train:], y[n_train:], bs))


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


def bn_model():
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_find_restores_model_buffers_grads_optimizer_and_rng():
    set_seed(0)
    model = bn_model()
    learn = MomentumLearner(model, toy_dls(n_train=400, bs=50), F.mse_loss, lr=0.1)
    learn.fit(1)   # leaves momentum gradients and an optimizer behind
    before, grads, opt = _state(model), [p.grad.clone() for p in model.parameters()], learn.opt
    torch.manual_seed(123)
    res = learn.lr_find(plot=False)
    after_rng = torch.rand(3)
    torch.manual_seed(123); want_rng = torch.rand(3)
    assert len(res.lrs) == len(res.losses) > 5
    assert all(b == pytest.approx(a*1.3) for a, b in zip(res.lrs, res.lrs[1:]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert learn.opt is opt and torch.equal(after_rng, want_rng)
    assert res.suggestion == pytest.approx(min(zip(res.losses, res.lrs))[1]/10)


def test_lr_find_restores_even_when_it_fails():
    model = bn_model()
    before = _state(model)
    class Fail(Callback):
        def after_step(self, learn):
            if learn.iter == 3: raise RuntimeError('disk full')
    learn = TrainLearner(model, toy_dls(n_train=100), lr=0.1, cbs=[Fail()])
    with pytest.raises(RuntimeError, match='disk full'):
        learn.lr_find(plot=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert learn.nan_guard and [type(c).__name__ for c in learn.cbs] == ['Fail']


def test_lr_find_with_negative_losses_and_few_batches():
    def neg_loss(preds, y): return -(preds - y).abs().mean() - 10   # always negative
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(n_train=12, bs=4), neg_loss, lr=0.1)
    res = learn.lr_find(max_epochs=2, plot=False)
    assert len(res.losses) == 2*3 and all(l < 0 for l in res.losses)   # the data ran out first: 2 epochs x 3 batches


def test_lr_find_diverging_on_the_first_step():
    dls = toy_dls()
    dls.train.x[:] = float('inf')
    learn = TrainLearner(nn.Linear(3, 1), dls, lr=0.1)
    res = learn.lr_find(plot=False)
    assert len(res.losses) == 1 and not math.isfinite(res.losses[0]) and res.suggestion is None


def test_metrics_and_progress_are_off_during_lr_find():
    metrics = MetricsCB()
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.1, cbs=[metrics, ProgressCB()])
    learn.lr_find(plot=False)
    assert metrics.history == [] and [type(c) for c in learn.cbs] == [MetricsCB, ProgressCB]


def test_progress_in_a_plain_terminal_is_clean_text(capsys):
    metrics = MetricsCB()
    TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.1, cbs=[metrics, ProgressCB(plot=True)]).fit(1)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ['epoch', 'train', 'loss', 'time']
    assert out[1].split()[:2] == ['0', 'train'] and out[2].split()[:2] == ['0', 'eval'] and len(out) == 3


def test_batch_transform_and_device_callbacks():
    seen = []
    class Look(Callback):
        order = 10
        def before_batch(self, learn): seen.append((learn.training, float(learn.batch[0].abs().max())))
    tfm = BatchTransformCB(lambda b: (b[0]*0, b[1]), on_train=True, on_val=False)
    TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.1, cbs=[DeviceCB('cpu'), tfm, Look()]).fit(1)
    assert all(v == 0 for t, v in seen if t) and all(v > 0 for t, v in seen if not t)


def test_batch_sched_cb_steps_per_batch():
    lrs = []
    class L(Callback):
        def before_batch(self, learn):
            if learn.training: lrs.append(learn.opt.param_groups[0]['lr'])
    sched = BatchSchedCB(lambda opt: optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    TrainLearner(nn.Linear(3, 1), toy_dls(), lr=0.8, cbs=[sched, L()]).fit(1)
    assert lrs == [0.8, 0.4, 0.2]


def test_to_device_and_to_cpu_are_recursive():
    b = {'x': torch.ones(2, dtype=torch.float16), 'y': [torch.zeros(1), (torch.ones(1),)], 'n': 3}
    c = to_cpu(to_device(b, 'cpu'))
    assert c['x'].dtype == torch.float32 and isinstance(c['y'][1], tuple) and c['n'] == 3


class ClosureSGD(optim.SGD):
    """SAM's protocol without SAM: the optimizer asks for the loss to be re-evaluated once per step."""
    requires_closure = True
    def step(self, closure=None):
        self.zero_grad()
        self.closure_losses = getattr(self, 'closure_losses', []) + [closure().item()]
        return super().step()


def test_closure_protocol_recomputes_without_touching_bn_running_stats():
    set_seed(0)
    model = bn_model()
    ref = bn_model(); ref.load_state_dict(model.state_dict())
    learn = TrainLearner(model, toy_dls(), lr=0.1, opt_func=lambda p, lr: ClosureSGD(p, lr=lr))
    learn.fit(1, valid=False)
    TrainLearner(ref, toy_dls(), lr=0.1).fit(1, valid=False)   # one forward pass per batch
    assert len(learn.opt.closure_losses) == 3
    # same weights, same gradients: the second pass changed neither the step nor the running statistics
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_frozen_bn_stats_restores_running_stats_and_counter():
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    bn(x)
    rm, rv, n = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with frozen_bn_stats(nn.Sequential(bn)):
        y = bn(x + 5)
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    assert torch.equal(bn.num_batches_tracked, n) and bn.momentum == 0.1
    torch.testing.assert_close(y.mean(0), bn.bias.expand(4), atol=1e-5, rtol=0)   # still normalised by batch stats


def test_frozen_bn_stats_covers_our_from_scratch_batchnorm():
    from miniai.norm import BatchNorm
    bn = BatchNorm(3)
    x = torch.randn(8, 3, 5, 5)
    bn(x)
    means, vars_ = bn.means.clone(), bn.vars.clone()
    with frozen_bn_stats(nn.Sequential(bn)):
        y = bn(x * 3 + 2)
    assert torch.equal(bn.means, means) and torch.equal(bn.vars, vars_)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)   # batch statistics used
    bn(x * 3 + 2)                                                                          # outside: updates again
    assert not torch.equal(bn.means, means)
