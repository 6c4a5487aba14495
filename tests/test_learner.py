"""miniai.learner: the training loop, the NaN guard, clear errors, logging, temporary callbacks, momentum, SAM's closure."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from helpers import Recorder, bn_model, class_dls, toy_dls
from miniai.callback import Callback
from miniai.callbacks import MetricsCB
from miniai.device import set_seed
from miniai.learner import Learner, MomentumLearner, TrainCB, TrainLearner, frozen_bn_stats, print_row


def test_base_learner_with_traincb_equals_trainlearner():
    set_seed(0); m1 = nn.Linear(3, 1); m2 = nn.Linear(3, 1); m2.load_state_dict(m1.state_dict())
    Learner(m1, toy_dls(), F.mse_loss, lr=0.1, cbs=[TrainCB()]).fit(2)
    TrainLearner(m2, toy_dls(), F.mse_loss, lr=0.1).fit(2)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_trainlearner_matches_a_hand_written_sgd_loop():
    set_seed(0); model = nn.Linear(3, 1); ref = nn.Linear(3, 1); ref.load_state_dict(model.state_dict())
    dls = toy_dls()
    TrainLearner(model, dls, F.mse_loss, lr=0.1).fit(2, valid=False)
    opt = optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for x, y in dls.train:
            F.mse_loss(ref(x), y).backward(); opt.step(); opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()): torch.testing.assert_close(a, b)


def test_dls_and_loss_func_are_required():
    with pytest.raises(TypeError): Learner(nn.Linear(3, 1))
    with pytest.raises(TypeError): TrainLearner(nn.Linear(3, 1), toy_dls())
    assert TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss).lr == 0.1   # the default learning rate


def test_a_single_callback_is_accepted_by_the_learner_and_by_fit():
    rec, extra = Recorder(), Recorder()
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=rec)
    assert learn.cbs == [rec]
    learn.fit(1, cbs=extra)
    assert learn.cbs == [rec]                            # the fit's callback is gone again
    assert rec.names() == extra.names() and rec.names().count('before_batch') == 3 + 1


def test_the_model_is_left_in_the_mode_of_the_last_phase():
    model = bn_model()
    learn = TrainLearner(model, toy_dls(), F.mse_loss, lr=0.1)
    learn.fit(1)
    assert not model.training and not learn.training                    # validation ran last: eval mode
    learn.fit(1, valid=False)
    assert model.training and not learn.training and all(m.training for m in model.modules())
    learn.fit(1, train=False)
    assert not model.training and not any(m.training for m in model.modules())


def test_nan_loss_stops_before_the_step_and_names_epoch_and_batch():
    model = nn.Linear(3, 1)
    dls = toy_dls()
    dls.train.x[4:8] = float('nan')   # the second training batch is poisoned
    snapshot = {}
    class Snap(Callback):
        def before_batch(self, learn):
            if learn.training: snapshot['w'] = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(FloatingPointError, match=r'epoch 0, batch 1.*before the optimizer step'):
        TrainLearner(model, dls, F.mse_loss, lr=0.1, cbs=[Snap()]).fit(1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshot['w']))


def test_a_nan_validation_loss_is_not_an_error():
    dls = toy_dls()
    dls.valid.x[:] = float('nan')                       # the guard protects the weights, so only training is checked
    metrics = MetricsCB()
    TrainLearner(nn.Linear(3, 1), dls, F.mse_loss, lr=0.1, cbs=metrics).fit(1)
    assert [r['train'] for r in metrics.history] == [True, False] and math.isnan(metrics.history[1]['loss'])


def test_model_output_that_does_not_fit_the_loss():
    learn = TrainLearner(nn.Linear(3, 2), toy_dls(), F.cross_entropy, lr=0.1)
    with pytest.raises(RuntimeError) as ei:
        learn.fit(1)
    assert 'predictions of shape torch.Size([4, 2])' in ei.value.__notes__[0]
    assert 'epoch 0, batch 0' in ei.value.__notes__[0]


def test_dls_without_train_and_valid():
    with pytest.raises(TypeError, match=r'no `.train` loader.*DataLoaders'):
        TrainLearner(nn.Linear(3, 1), [1, 2], F.mse_loss, lr=0.1).fit(1)


def test_missing_learning_rate_is_a_clear_error():
    with pytest.raises(ValueError, match='no learning rate'):
        MomentumLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=None).fit(1)
    model = nn.Linear(3, 1); w0 = model.weight.clone()
    MomentumLearner(model, toy_dls(), F.mse_loss, lr=None).fit(1, lr=0.1)   # the fit's lr is enough
    assert not torch.equal(model.weight, w0)


# -- logging -------------------------------------------------------------------------------------------------------

def _metrics_fit(logger='default'):
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = TrainLearner(nn.Linear(3, 5), class_dls(), F.cross_entropy, lr=0.1, cbs=metrics)
    if logger != 'default': learn.logger = logger
    learn.fit(1)
    return learn, metrics.history


def test_rows_are_printed_by_default_in_the_documented_format(capsys):
    learn, history = _metrics_fit()
    assert learn.logger is print_row
    want = [f"epoch 0  {phase}  accuracy {r['accuracy']:.3f}  loss {r['loss']:.3f}  time {r['time']:.3f}"
            for phase, r in zip(('train', 'eval'), history)]
    assert capsys.readouterr().out.splitlines() == want


def test_logger_none_silences_and_a_custom_logger_gets_the_rows(capsys):
    _, history = _metrics_fit(logger=None)
    assert len(history) == 2 and capsys.readouterr().out == ''
    rows = []
    _, history = _metrics_fit(logger=rows.append)
    assert rows == history and capsys.readouterr().out == ''


def test_log_writes_through_the_logger(capsys):
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss)
    learn.log({'epoch': 2, 'train': False, 'loss': 0.25})
    assert capsys.readouterr().out == 'epoch 2  eval  loss 0.250\n'
    learn.logger = None
    learn.log({'epoch': 2, 'train': False, 'loss': 0.25})
    assert capsys.readouterr().out == ''


# -- temporary callbacks ---------------------------------------------------------------------------------------------

def _four():
    cbs = [Recorder() for _ in range(4)]
    return cbs, TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=cbs)


def test_added_cbs_restores_the_list_also_on_error():
    (a, b, c, d), learn = _four()
    e, f = Recorder(), Recorder()
    with learn.added_cbs([e, f]):
        assert learn.cbs == [a, b, c, d, e, f]
    assert learn.cbs == [a, b, c, d]
    with pytest.raises(RuntimeError, match='inside'):
        with learn.added_cbs(e):                         # a single callback
            assert learn.cbs == [a, b, c, d, e]
            raise RuntimeError('inside')
    assert learn.cbs == [a, b, c, d]
    with learn.added_cbs(None): assert learn.cbs == [a, b, c, d]


def test_added_cbs_of_a_callback_already_present_restores_the_order():
    (a, b, c, d), learn = _four()
    with learn.added_cbs(a): pass
    assert learn.cbs == [a, b, c, d]


def test_removed_cbs_puts_callbacks_back_in_their_places_also_on_error():
    (a, b, c, d), learn = _four()
    with learn.removed_cbs([b, d]):
        assert learn.cbs == [a, c]
    assert learn.cbs == [a, b, c, d]
    with pytest.raises(RuntimeError, match='inside'):
        with learn.removed_cbs(a):                       # a single callback
            assert learn.cbs == [b, c, d]
            raise RuntimeError('inside')
    assert learn.cbs == [a, b, c, d]
    e = Recorder()
    with learn.removed_cbs([a, c]):
        learn.cbs.append(e)                              # added inside the block: kept, after the restored ones
    assert learn.cbs == [a, b, c, d, e]


def test_removed_callbacks_miss_the_fit_inside_the_block():
    (a, b, c, d), learn = _four()
    with learn.removed_cbs([a, c]):
        learn.fit(1, cbs=Recorder())
        assert learn.cbs == [b, d]
    assert a.events == [] == c.events and b.names() == d.names() and 'before_fit' in b.names()
    assert learn.cbs == [a, b, c, d]


# -- momentum -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mom', [0.5, None])
def test_momentum_learner_decays_gradients_and_skips_params_without_grad(mom):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    unused = nn.Parameter(torch.ones(2))
    model.register_parameter('unused', unused)
    model[0].weight.requires_grad_(False)   # frozen
    grads = []
    class Grab(Callback):
        def after_backward(self, learn): grads.append(learn.model[1].weight.grad.clone())
        def after_batch(self, learn):
            if learn.training: grads.append(learn.model[1].weight.grad.clone())
    kwargs = {} if mom is None else {'mom': mom}
    learn = MomentumLearner(model, toy_dls(), F.mse_loss, 0.01, cbs=[Grab()], **kwargs)   # lr by position
    assert learn.lr == 0.01 and learn.mom == (0.85 if mom is None else mom)
    learn.fit(1, valid=False)
    assert unused.grad is None and model[0].weight.grad is None
    torch.testing.assert_close(grads[1], learn.mom*grads[0])   # zero_grad multiplied by mom


# -- SAM's closure protocol and frozen BatchNorm statistics ------------------------------------------------------

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
    learn = TrainLearner(model, toy_dls(), F.mse_loss, lr=0.1, opt_func=lambda p, lr: ClosureSGD(p, lr=lr))
    learn.fit(1, valid=False)
    TrainLearner(ref, toy_dls(), F.mse_loss, lr=0.1).fit(1, valid=False)   # one forward pass per batch
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


# -- the old layout ------------------------------------------------------------------------------------------------

def test_old_import_paths_still_work():
    from miniai.learner import (BatchSchedCB, MetricsCB, ProgressCB, def_device, epoch_times, format_row, lr_find,
                                set_seed)
    from miniai.learner import (Callback, CancelBatchException, CancelEpochException, CancelFitException, DeviceCB,
                                SingleBatchCB, BatchTransformCB, LRFinderCB, LRFindResult, plot_lr_find, to_cpu,
                                to_device)
    import miniai.callback, miniai.callbacks, miniai.device, miniai.lrfind
    old = dict(locals())
    for module in (miniai.callback, miniai.callbacks, miniai.device, miniai.lrfind):
        for name in module.__all__:
            if name in old: assert old[name] is getattr(module, name), name
    assert sum(name in old for m in (miniai.callback, miniai.callbacks, miniai.device, miniai.lrfind)
               for name in m.__all__) == 20
