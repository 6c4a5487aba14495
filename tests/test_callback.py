"""miniai.callback: the events and their order, run_cbs, cancellation, errors naming the callback, cleanup."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import Recorder, toy_dls
from miniai.callback import (Callback, CancelBatchException, CancelEpochException, CancelFitException, run_cbs)
from miniai.callbacks import SingleBatchCB
from miniai.learner import TrainLearner


def test_events_fire_in_order():
    rec = Recorder()
    TrainLearner(nn.Linear(3, 1), toy_dls(n_train=4, n_valid=4), F.mse_loss, lr=0.1, cbs=[rec]).fit(1)
    batch_train = ['before_batch', 'after_predict', 'after_loss', 'after_backward', 'after_step', 'after_batch',
                   'cleanup_batch']
    batch_valid = ['before_batch', 'after_predict', 'after_loss', 'after_batch', 'cleanup_batch']
    assert rec.names() == (['before_fit', 'before_epoch'] + batch_train + ['after_epoch', 'cleanup_epoch', 'before_epoch']
                           + batch_valid + ['after_epoch', 'cleanup_epoch', 'after_fit', 'cleanup_fit'])
    assert [t for e, t in rec.events if e == 'after_predict'] == [True, False]


def test_callbacks_run_by_order():
    seen = []
    class A(Callback):
        def __init__(self, name, order): self.name, self.order = name, order
        def before_fit(self, learn): seen.append(self.name)
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, cbs=[A('c', 5), A('a', -1), A('b', 0)]).fit(0)
    assert seen == ['a', 'b', 'c']


def test_run_cbs_without_a_learner_skips_missing_methods_and_notes_the_callback():
    seen = []
    class A(Callback):
        order = 2
        def ping(self, learn): seen.append(('A', learn))
    class B(Callback):
        order = 1
        def ping(self, learn): seen.append(('B', learn))
    run_cbs([A(), Callback(), B()], 'ping')                       # Callback has no `ping`: skipped
    assert seen == [('B', None), ('A', None)]
    class Boom(Callback):
        def ping(self, learn): raise KeyError('x')
    with pytest.raises(KeyError) as ei: run_cbs([Boom()], 'ping')
    assert ei.value.__notes__ == ['raised in callback Boom.ping']   # no learner: no epoch or batch


@pytest.mark.parametrize('exc', [CancelFitException, CancelEpochException, CancelBatchException])
def test_run_cbs_passes_cancellations_through_unannotated(exc):
    class Stop(Callback):
        def ping(self, learn): raise exc()
    with pytest.raises(exc) as ei: run_cbs([Stop()], 'ping')
    assert not hasattr(ei.value, '__notes__')


def test_callback_repr():
    assert repr(SingleBatchCB()) == 'SingleBatchCB()'


def test_cancel_batch_skips_the_step_but_cleans_up():
    model = nn.Linear(3, 1); w0 = model.weight.clone()
    rec = Recorder()
    class Skip(Callback):
        def after_loss(self, learn):
            if learn.training: raise CancelBatchException()
    TrainLearner(model, toy_dls(), F.mse_loss, lr=0.1, cbs=[Skip(), rec]).fit(1)
    assert torch.equal(model.weight, w0)
    names = rec.names()
    assert 'after_step' not in names and names.count('cleanup_batch') == 3 + 1


def test_cancel_epoch_and_cancel_fit():
    rec = Recorder()
    class StopEpoch(Callback):
        def after_batch(self, learn):
            if learn.iter == 0: raise CancelEpochException()
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[StopEpoch(), rec]).fit(2)
    names = rec.names()
    assert names.count('before_batch') == 4 and names.count('after_epoch') == 0 and names.count('cleanup_epoch') == 4
    rec = Recorder()
    TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1, cbs=[SingleBatchCB(), rec]).fit(3)
    names = rec.names()
    assert names.count('before_batch') == 1 and 'after_fit' not in names and names[-1] == 'cleanup_fit'


def test_failing_callback_is_named_and_temporary_cbs_are_removed():
    class Boom(Callback):
        def after_backward(self, learn):
            if learn.iter == 1: raise ValueError('boom')
    learn = TrainLearner(nn.Linear(3, 1), toy_dls(), F.mse_loss, lr=0.1)
    with pytest.raises(ValueError, match='boom') as ei:
        learn.fit(1, cbs=[Boom()])
    assert ei.value.__notes__ == ['raised in callback Boom.after_backward (epoch 0, batch 1)']
    assert learn.cbs == []
    learn.fit(1)   # the learner is still usable


def test_keyboard_interrupt_runs_cleanup_and_reaches_the_user():
    rec = Recorder()
    class Interrupt(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1: raise KeyboardInterrupt
    model = nn.Linear(3, 1)
    learn = TrainLearner(model, toy_dls(), F.mse_loss, lr=0.1, cbs=[rec])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, cbs=[Interrupt()])
    assert rec.names()[-3:] == ['cleanup_batch', 'cleanup_epoch', 'cleanup_fit']
    assert learn.cbs == [rec] and model.training
    learn.fit(1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
