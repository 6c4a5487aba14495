"""miniai.optimizer: the seeds' worked examples, 100-step trajectories against torch.optim, state round-trips,
LARS and SAM, and every optimizer driven by the real Learner."""
import copy
import io
import math
import re
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn, tensor

import miniai.optimizer as mo
from miniai.optimizer import (SAM, LARS, SGD, Adam, Lamb, Larc, Lookahead, OptimWrapper, Optimizer, QHAdam, RAdam,
                              RMSProp, adam_step, average_grad, average_sqr_grad, debias, detuplify_pg, l2_reg,
                              lamb_step, larc_layer_lr, larc_step, momentum_step, pytorch_hp_map, qhadam_step,
                              radam_step, ranger, rms_prop_step, set_item_pg, sgd_step, step_stat, weight_decay)


# ---------------------------------------------------------------------------------------------------------------
# helpers

def tst_param(val, grad=None) -> torch.Tensor:
    "A (1,) or (1, n) tensor holding `val`, with gradient `grad` (default val/10), as in the seed."
    res = tensor([val]).float()
    if grad is None: grad = [v/10 for v in val] if isinstance(val, list) else val/10
    res.grad = tensor([grad]).float()
    return res

def tst_params() -> list[torch.Tensor]:
    return [tst_param(float(i)) for i in range(4)]

def close(a, b, atol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.numel() == b.numel(), (a.shape, b.shape)
    assert torch.allclose(a.reshape(b.shape), b, atol=atol, rtol=0), f"{a.tolist()} != {b.tolist()}"

def tst_arg(p, lr=0, **kwargs): return p
tst_arg.defaults = dict(lr=1e-2)
def tst_arg2(p, lr2=0, **kwargs): return p
tst_arg2.defaults = dict(lr2=1e-3)
def tst_arg3(p, mom=0, **kwargs): return p
tst_arg3.defaults = dict(mom=0.9)
def noop(p, **kwargs): return None


# ---------------------------------------------------------------------------------------------------------------
# seed 003: the general optimizer

def test_param_lists_from_collections_generators_and_groups():
    assert Optimizer([1, 2, 3], noop).param_lists == [[1, 2, 3]]
    assert Optimizer(range(3), noop).param_lists == [[0, 1, 2]]
    assert Optimizer([[1, 2], [3]], noop).param_lists == [[1, 2], [3]]
    assert Optimizer(([o, o+1] for o in range(0, 4, 2)), noop).param_lists == [[0, 1], [2, 3]]
    t = torch.zeros(3, 2)
    assert Optimizer(t, noop).param_lists == [[t]]          # one tensor is one parameter, not its rows
    opt = Optimizer([{'params': [1, 2], 'lr': 0.5}, {'params': [3]}], tst_arg)
    assert opt.param_lists == [[1, 2], [3]] and opt.hypers == [{'lr': 0.5}, {'lr': 1e-2}]
    with pytest.raises(ValueError, match='empty'): Optimizer([], noop)
    with pytest.raises(TypeError, match='mixes'): Optimizer([[1, 2], 3], noop)


def test_hypers_gathered_from_defaults_and_overridden():
    assert Optimizer([1, 2, 3], [tst_arg, tst_arg2, tst_arg3]).hypers == [{'lr2': 1e-3, 'mom': 0.9, 'lr': 1e-2}]
    assert Optimizer([1, 2, 3], tst_arg, lr=0.1).hypers == [{'lr': 0.1}]
    assert Optimizer([[1, 2], [3]], tst_arg).hypers == [{'lr': 1e-2}, {'lr': 1e-2}]
    assert Optimizer([[1, 2], [3]], tst_arg, lr=0.1).hypers == [{'lr': 0.1}, {'lr': 0.1}]
    # defaults of a functools.partial come from the wrapped function
    assert Optimizer([1], partial(average_grad, dampening=True)).hypers == [{'mom': 0.9}]


def test_set_hyper_lists_slices_and_count_mismatch():
    assert Optimizer([[1, 2], [3]], tst_arg, lr=[0.1, 0.2]).hypers == [{'lr': 0.1}, {'lr': 0.2}]
    assert Optimizer([[1, 2], [3], [4]], tst_arg, lr=slice(1e-2)).hypers == [{'lr': 1e-3}, {'lr': 1e-3}, {'lr': 1e-2}]
    opt = Optimizer([[1, 2], [3], [4]], tst_arg, lr=slice(1e-4, 1e-2))
    assert [h['lr'] for h in opt.hypers] == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    assert opt.param_groups == [{'params': [1, 2], 'lr': pytest.approx(1e-4)}, {'params': [3], 'lr': pytest.approx(1e-3)},
                                {'params': [4], 'lr': pytest.approx(1e-2)}]
    with pytest.raises(ValueError, match=r"got 2 values for 3 parameter groups"):
        Optimizer([[1, 2], [3], [4]], tst_arg, lr=np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match='lr'): opt.set_hyper('lr', [1, 2])
    opt.set_hyper('lr', torch.tensor([1., 2., 3.]))
    assert [h['lr'] for h in opt.hypers] == [1., 2., 3.]
    opt.set_hypers(mom=0.5, lr=slice(3.))
    assert opt.hypers == [{'lr': 0.3, 'mom': 0.5}, {'lr': 0.3, 'mom': 0.5}, {'lr': 3., 'mom': 0.5}]
    one = Optimizer([1], tst_arg, lr=slice(1e-4, 1e-2))
    assert one.hypers == [{'lr': 1e-2}]


def test_param_groups_are_live_views():
    opt = Optimizer([[1, 2], [3]], tst_arg, lr=0.1)
    for g in opt.param_groups: g['lr'] *= 2
    assert [h['lr'] for h in opt.hypers] == [0.2, 0.2]
    opt.param_groups[1]['params'] = [7, 8]
    assert opt.param_lists == [[1, 2], [7, 8]]
    assert len(opt.param_groups[0]) == 2 and set(opt.param_groups[0]) == {'params', 'lr'}
    with pytest.raises(KeyError): del opt.param_groups[0]['params']
    opt.param_groups = [{'params': [5], 'lr': 1.}, {'params': [6], 'lr': 2.}]
    assert opt.param_lists == [[5], [6]] and opt.hypers == [{'lr': 1.}, {'lr': 2.}]
    with pytest.raises(ValueError, match='3 groups'): opt.param_groups = [{'params': [1]}]*3


def test_steppers_sgd_weight_decay_l2():
    p = tst_param(1., 0.1); sgd_step(p, 1.)
    close(p, [0.9]); close(p.grad, [0.1])
    p = tst_param(1., 0.1); weight_decay(p, 1., 0.1)
    close(p, [0.9]); close(p.grad, [0.1])
    p = tst_param(1., 0.1); l2_reg(p, 1., 0.1)
    close(p, [1.]); close(p.grad, [0.2])
    p = tst_param(1., 0.1); weight_decay(p, 1., 0.1, do_wd=False); l2_reg(p, 1., 0.1, do_wd=False)
    close(p, [1.]); close(p.grad, [0.1])
    assert weight_decay.defaults == {'wd': 0.} and l2_reg.defaults == {'wd': 0.}


def test_step_zero_grad_and_groups():
    params = tst_params(); Optimizer(params, sgd_step, lr=0.1).step()
    close([p.item() for p in params], [i*0.99 for i in range(4)])
    params = tst_params(); Optimizer(params, [weight_decay, sgd_step], lr=0.1, wd=0.1).step()
    close([p.item() for p in params], [i*0.98 for i in range(4)])
    params = tst_params(); opt = Optimizer(params, sgd_step, lr=0.1)
    params[-1].grad = None; opt.step()
    close([p.item() for p in params], [0., 0.99, 1.98, 3.])
    params = tst_params(); opt = Optimizer([params[:2], params[2:]], sgd_step, lr=0.1)
    opt.hypers[0]['lr'] = 0.01; opt.step()
    close([p.item() for p in params], [0., 0.999, 1.98, 2.97])
    params = tst_params(); opt = Optimizer(params, [weight_decay, sgd_step], lr=0.1, wd=0.1)
    opt.zero_grad()
    assert all(torch.equal(p.grad, tensor([0.])) for p in params)


def test_step_with_closure_returns_loss_and_works_on_parameters():
    w = nn.Parameter(tensor([1., 2.]))
    opt = SGD([w], lr=0.1)
    def closure():
        opt.zero_grad(); loss = (w**2).sum(); loss.backward(); return loss
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.)
    close(w, [0.8, 1.6])           # w - 0.1 * 2w


def test_statistic_state_flows_between_calls():
    def tst_stat(p, **kwargs): return {'sum': kwargs.get('sum', torch.zeros_like(p)) + p}
    tst_stat.defaults = {'mom': 0.9}
    assert Optimizer([1, 2, 3], tst_stat).hypers == [{'mom': 0.9}]
    assert Optimizer([1, 2, 3], tst_stat, mom=0.99).hypers == [{'mom': 0.99}]
    x = torch.randn(4, 5)
    state = tst_stat(x); assert torch.equal(state['sum'], x)
    state = tst_stat(x, **state); assert torch.equal(state['sum'], 2*x)
    p = tst_param([1., 2.], [1., 1.])
    opt = Optimizer(p, tst_stat); opt.step(); opt.step()
    close(opt.state[p]['sum'], [[2., 4.]])


def test_average_grad_and_average_sqr_grad():
    p = tst_param([1., 2., 3.], [4., 5., 6.])
    state = average_grad(p, mom=0.9); close(state['grad_avg'], p.grad)
    state = average_grad(p, mom=0.9, **state); close(state['grad_avg'], p.grad*1.9)
    state = average_grad(p, mom=0.9, dampening=True); close(state['grad_avg'], 0.1*p.grad)
    state = average_grad(p, mom=0.9, dampening=True, **state); close(state['grad_avg'], (0.1*0.9 + 0.1)*p.grad)
    state = average_sqr_grad(p, sqr_mom=0.99, dampening=False); close(state['sqr_avg'], p.grad.pow(2))
    state = average_sqr_grad(p, sqr_mom=0.99, dampening=False, **state); close(state['sqr_avg'], p.grad.pow(2)*1.99)
    state = average_sqr_grad(p, sqr_mom=0.99); close(state['sqr_avg'], 0.01*p.grad.pow(2))
    state = average_sqr_grad(p, sqr_mom=0.99, **state); close(state['sqr_avg'], (0.01*0.99 + 0.01)*p.grad.pow(2))
    assert average_grad.defaults == {'mom': 0.9} and average_sqr_grad.defaults == {'sqr_mom': 0.99}


def test_freeze_unfreeze_force_train_and_warning():
    params = [tst_params(), tst_params(), tst_params()]
    opt = Optimizer(params, sgd_step, lr=0.1)
    opt.freeze_to(1)
    assert [[p.requires_grad for p in pg] for pg in params] == [[False]*4, [True]*4, [True]*4]
    opt.unfreeze()
    assert all(p.requires_grad for pg in params for p in pg)

    params = [tst_params(), tst_params(), tst_params()]
    opt = Optimizer(params, sgd_step, lr=0.1)
    for p in (params[1][1], params[1][3]): opt.state[p] = {'force_train': True}
    opt.freeze()
    assert [[p.requires_grad for p in pg] for pg in params] == [[False]*4, [False, True, False, True], [True]*4]
    assert opt.frozen_idx == 2
    opt.set_freeze(1, False, ignore_force_train=True)
    assert not any(p.requires_grad for p in params[1])
    with pytest.warns(UserWarning, match='whole model is frozen'): opt.freeze_to(3)
    assert [[p.requires_grad for p in pg] for pg in params] == [[False]*4, [False, True, False, True], [False]*4]
    with pytest.raises(ValueError, match='at least two groups'): Optimizer(tst_params(), sgd_step, lr=0.1).freeze()


def test_all_params_selects_groups_and_gradients():
    params = [tst_params(), tst_params()]
    params[1][0].grad = None
    opt = Optimizer(params, sgd_step, lr=0.1)
    assert len(opt.all_params()) == 8 and len(opt.all_params(1)) == 4
    assert len(opt.all_params(with_grad=True)) == 7
    p, pg, state, hyper = opt.all_params(1, with_grad=True)[0]
    assert p is params[1][1] and pg == params[1] and state == {} and hyper == {'lr': 0.1}


def test_state_dict_load_state_dict_and_clear_state():
    p = tst_param([1., 2., 3.], [4., 5., 6.])
    opt = Optimizer(p, average_grad); opt.step()
    close(opt.state[p]['grad_avg'], [[4., 5., 6.]])
    sd = opt.state_dict()
    p1 = tst_param([10., 20., 30.], [40., 50., 60.])
    opt = Optimizer(p1, average_grad, mom=0.99)
    assert opt.hypers[0]['mom'] == 0.99 and opt.state == {}
    opt.load_state_dict(sd)
    assert opt.hypers[0]['mom'] == 0.9
    close(opt.state[p1]['grad_avg'], [[4., 5., 6.]])
    opt.step()                                              # the loaded state is a copy: sd does not move
    close(sd['state'][0]['grad_avg'], [[4., 5., 6.]])
    with pytest.raises(ValueError, match='parameter groups'): Optimizer([[p1], [p]], average_grad).load_state_dict(sd)
    with pytest.raises(ValueError, match='has 3 parameters, this one 2'):
        Optimizer([p1, p], average_grad).load_state_dict(Optimizer([p1, p, tst_param(1.)], average_grad).state_dict())

    p = tst_param([1., 2., 3.], [4., 5., 6.])
    opt = Optimizer(p, average_grad)
    opt.state[p] = {'force_train': True}
    opt.step()
    close(opt.state[p]['grad_avg'], [[4., 5., 6.]])
    opt.clear_state()
    assert opt.state[p] == {'force_train': True}


def test_do_wd_flag_turns_weight_decay_off_per_parameter():
    a, b = tst_param(1., 0.), tst_param(1., 0.)
    opt = SGD([a, b], lr=0.1, wd=0.5)
    opt.state[b] = {'do_wd': False}
    opt.step()
    close(a, [0.95]); close(b, [1.])
    opt.clear_state(); assert opt.state[b] == {'do_wd': False}


# ---------------------------------------------------------------------------------------------------------------
# seed 003: the optimizers' worked values

def test_sgd_worked_values():
    params = tst_params(); opt = SGD(params, lr=0.1)
    opt.step(); close([p.item() for p in params], [i*0.99 for i in range(4)])
    opt.step(); close([p.item() for p in params], [i*0.98 for i in range(4)])
    params = tst_params(); opt = SGD(params, lr=0.1, mom=0.9)
    assert isinstance(opt, Optimizer)
    opt.step(); close([p.item() for p in params], [i*0.99 for i in range(4)])
    opt.step(); close([p.item() for p in params], [i*(1 - 0.1*(0.1 + 0.1*1.9)) for i in range(4)])
    close([opt.state[p]['grad_avg'].item() for p in params], [i*0.19 for i in range(4)])
    assert momentum_step is not None and opt.cbs[-1] is momentum_step


def test_sgd_weight_decay_versus_l2_corrected_value():
    params = tst_params()
    opt = SGD(params, lr=0.1, mom=0.9, wd=0.1)
    opt.step()
    close([p.item() for p in params], [i*0.98 for i in range(4)])
    # A new L2 optimizer continues from 0.98*i with gradients 0.1*i: grad -> 0.1*i + 0.1*0.98*i = 0.198*i,
    # so p -> 0.98*i - 0.1*0.198*i = 0.9602*i (the seed's 0.97*i, left commented out there, was wrong).
    opt = SGD(params, lr=0.1, mom=0.9, wd=0.1, decouple_wd=False)
    opt.step()
    close([p.item() for p in params], [i*0.9602 for i in range(4)])
    close([p.grad.item() for p in params], [i*0.198 for i in range(4)])


def test_rmsprop_worked_values():
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    opt = RMSProp(params, lr=0.1)
    opt.step(); close(params[0], [0., 1., 2.])
    opt.step()
    step = -0.1*0.1/(math.sqrt((0.01*0.99 + 0.01)*0.1**2) + 1e-8)
    close(params[0], [step, 1+step, 2+step])
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    opt = RMSProp(params, lr=0.1, mom=0.9)
    opt.step(); close(params[0], [0., 1., 2.])
    opt.step()
    step = -0.1*(0.1 + 0.9*0.1)/(math.sqrt((0.01*0.99 + 0.01)*0.1**2) + 1e-8)
    close(params[0], [step, 1+step, 2+step])
    assert rms_prop_step.defaults == {'eps': 1e-8}


def test_step_stat_and_debias():
    p = tst_param(1., 0.1)
    state = step_stat(p); assert state['step'] == 1
    for _ in range(5): state = step_stat(p, **state)
    assert state['step'] == 6
    assert debias(0.9, 0.1, 1) == pytest.approx(0.1)
    assert debias(0.9, 1., 3) == pytest.approx(1 + 0.9 + 0.81)         # undampened: the sum of the weights
    assert debias(0.99, 0.01, 10) == pytest.approx(1 - 0.99**10)


def test_adam_worked_values():
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    opt = Adam(params, lr=0.1, wd=0)
    opt.step()
    step = -0.1*0.1/(math.sqrt(0.1**2) + 1e-8)
    close(params[0], [1+step, 2+step, 3+step], 1e-4)
    opt.step()
    close(params[0], [1+2*step, 2+2*step, 3+2*step], 1e-3)
    # adam_step on its own, against the formula
    p = tst_param([1.], [0.5])
    adam_step(p, lr=0.1, mom=0.9, step=1, sqr_mom=0.99, grad_avg=tensor([[0.05]]), sqr_avg=tensor([[0.0025]]), eps=0.)
    close(p, [[1 - 0.1*(0.05/0.1)/math.sqrt(0.0025/0.01)]])


def test_radam_worked_values_and_rectification():
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    opt = RAdam(params, lr=0.1)
    r_inf = 2/(1 - 0.99) - 1
    for i in range(5):
        r = r_inf - 2*(i+1)*0.99**(i+1)/(1 - 0.99**(i+1))
        assert r <= 5
        opt.step()
    p = tensor([0.95, 1.9, 2.85])
    close(params[0], p)
    r = r_inf - 2*6*0.99**6/(1 - 0.99**6)
    assert r > 5
    opt.step()
    v = math.sqrt(((r-4)*(r-2)*r_inf)/((r_inf-4)*(r_inf-2)*r))
    step = -0.1*0.1*v/(math.sqrt(0.1**2) + 1e-8)
    close(params[0], p + step, 1e-4)


def test_radam_sadam_softplus_denominator():
    # sixth step with beta: the denominator is softplus_beta(sqrt(v_hat)) instead of sqrt(v_hat) + eps
    p = tst_param([1.], [0.1])
    grad_avg, sqr_avg = tensor([[0.1*(1 - 0.9**6)]]), tensor([[0.01*(1 - 0.99**6)]])
    radam_step(p, lr=0.1, mom=0.9, step=6, sqr_mom=0.99, grad_avg=grad_avg, sqr_avg=sqr_avg, eps=1e-5, beta=10.)
    r_inf = 2/(1 - 0.99) - 1
    r = r_inf - 2*6*0.99**6/(1 - 0.99**6)
    v = math.sqrt(((r-4)*(r-2)*r_inf)/((r_inf-4)*(r_inf-2)*r))
    denom = math.log1p(math.exp(10*0.1))/10
    close(p, [[1 - 0.1*v*0.1/denom]])
    assert radam_step.defaults == {'eps': 1e-5, 'beta': 0.}
    assert RAdam([tst_param(1.)], 0.1, beta=10.).hypers[0]['beta'] == 10.


def test_qhadam_worked_values():
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    opt = QHAdam(params, lr=0.1)
    opt.step()
    step = -0.1*(((1-0.7)*0.1) + (0.7*0.1))/(math.sqrt(((1-1.0)*0.1**2) + (1.0*0.1**2)) + 1e-8)
    close(params[0], [1+step, 2+step, 3+step])
    opt.step()
    close(params[0], [1+2*step, 2+2*step, 3+2*step], 1e-3)
    # nu_1 = 0, nu_2 = 0: a sign-like step g/(|g| + eps) whatever the averages
    p = tst_param([1., 1.], [0.5, -2.])
    qhadam_step(p, lr=0.1, mom=0.9, sqr_mom=0.99, sqr_avg=tensor([[9., 9.]]), nu_1=0., nu_2=0., step=3,
                grad_avg=tensor([[7., 7.]]), eps=0.)
    close(p, [[0.9, 1.1]])


def test_larc_worked_values():
    params = [tst_param([1., 2., 3.], [0.1, 0.2, 0.3]), tst_param([1., 2., 3.], [0.01, 0.02, 0.03])]
    opt = Larc(params, lr=0.1)
    opt.step()
    close(opt.state[params[0]]['local_lr'], 0.02)             # 0.1 * 0.02 * |p|/|g| = 0.02 < lr: not clipped
    close(opt.state[params[1]]['local_lr'], 0.1, 1e-7)        # 0.2 > lr: clipped to lr
    close(params[0], [0.998, 1.996, 2.994]); close(params[1], [0.999, 1.998, 2.997])
    params = [tst_param([1., 2., 3.], [0.1, 0.2, 0.3]), tst_param([1., 2., 3.], [0.01, 0.02, 0.03])]
    opt = Larc(params, lr=0.1, clip=False)
    opt.step()
    close(opt.state[params[0]]['local_lr'], 0.02); close(opt.state[params[1]]['local_lr'], 0.2)
    close(params[0], [0.998, 1.996, 2.994]); close(params[1], [0.998, 1.996, 2.994])


def test_larc_zero_norm_falls_back_to_lr_and_layer_lr_formula():
    zero = tst_param([0., 0.], [0.1, 0.2])
    assert larc_layer_lr(zero, lr=0.1, trust_coeff=0.02, wd=0., eps=1e-8)['local_lr'].item() == pytest.approx(0.1)
    p = tst_param([3., 4.], [0.3, 0.4])                        # |p| = 5, |g| = 0.5
    got = larc_layer_lr(p, lr=1., trust_coeff=0.02, wd=0.1, eps=0., clip=False)['local_lr']
    close(got, 0.02*5/(0.5 + 5*0.1))
    larc_step(p, local_lr=tensor(0.5))
    close(p, [[3 - 0.15, 4 - 0.2]])
    larc_step(p, local_lr=tensor(1.), grad_avg=tensor([[1., 1.]]))
    close(p, [[1.85, 2.8]])


def test_lamb_worked_values():
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    opt = Lamb(params, lr=0.1)
    opt.step()
    close(params[0], tensor([0.7840, 1.7840, 2.7840]), 1e-3)
    q = math.sqrt(14/3)                                        # rms(p) / rms(step), step ~ (1, 1, 1)
    close(params[0], [1 - 0.1*q, 2 - 0.1*q, 3 - 0.1*q], 1e-4)
    # trust ratio capped at 10, and 1 for a zero weight
    p = tst_param([100., 100.], [1., 1.])
    lamb_step(p, lr=0.01, mom=0.9, step=1, sqr_mom=0.99, grad_avg=tensor([[0.1, 0.1]]), sqr_avg=tensor([[0.01, 0.01]]), eps=0.)
    close(p, [[99.9, 99.9]])
    z = tst_param([0., 0.], [1., 1.])
    lamb_step(z, lr=0.01, mom=0.9, step=1, sqr_mom=0.99, grad_avg=tensor([[0.1, 0.1]]), sqr_avg=tensor([[0.01, 0.01]]), eps=0.)
    close(z, [[-0.01, -0.01]])


def test_lookahead_worked_values_and_forwarding():
    params = tst_param([1., 2., 3.], [0.1, 0.2, 0.3])
    p, g = params[0].clone(), tensor([0.1, 0.2, 0.3])
    opt = Lookahead(SGD(params, lr=0.1))
    assert isinstance(opt, Optimizer)
    for _ in range(5): opt.step()
    close(params[0], p - 0.5*g)
    opt.step()
    close(params[0], p*0.5 + (p - 0.6*g)*0.5)
    # hyper-parameters, groups, state and gradients go to the inner optimizer
    opt.set_hyper('lr', 0.01); assert opt.opt.hypers[0]['lr'] == 0.01
    opt.param_groups[0]['lr'] = 0.02; assert opt.opt.hypers[0]['lr'] == 0.02
    assert opt.param_lists is opt.opt.param_lists and opt.state is opt.opt.state and opt.cbs == opt.opt.cbs
    opt.zero_grad(); assert torch.equal(params.grad, torch.zeros(1, 3))
    opt.clear_state(); assert opt.count == 0 and opt.slow_weights is None
    with pytest.raises(ValueError, match='k must be'): Lookahead(SGD([tst_param(1.)], 0.1), k=0)


def test_lookahead_freeze_goes_to_inner_parameters():
    params = [tst_params(), tst_params()]
    opt = Lookahead(Adam(params, lr=0.1))
    opt.freeze()
    assert [[p.requires_grad for p in pg] for pg in params] == [[False]*4, [True]*4]


def test_ranger_is_lookahead_around_radam():
    opt = ranger([tst_param([1., 2.])], lr=0.1)
    assert isinstance(opt, Lookahead) and (opt.k, opt.alpha) == (6, 0.5)
    assert radam_step in opt.opt.cbs
    assert opt.hypers == [{'wd': 0.01, 'mom': 0.95, 'sqr_mom': 0.99, 'eps': 1e-6, 'beta': 0., 'lr': 0.1}]
    # same trajectory as a hand-built Lookahead(RAdam(...))
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), None
    b = nn.Parameter(a.detach().clone())
    oa = ranger([a], 1e-2)
    ob = Lookahead(RAdam([b], 1e-2, mom=0.95, eps=1e-6, wd=0.01))
    for _ in range(20):
        g = torch.randn(5); a.grad, b.grad = g.clone(), g.clone()
        oa.step(); ob.step()
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# seed 003: OptimWrapper

def test_detuplify_pg_and_set_item_pg():
    assert detuplify_pg({'lr': 1e-2, 'mom': 0.9, 'params': [0, 1, 2]}) == {'lr': 1e-2, 'mom': 0.9}
    assert detuplify_pg({'lr': 1e-2, 'betas': (0.9, 0.999), 'params': [0, 1, 2]}) == {'lr': 1e-2, 'betas__0': 0.9,
                                                                                    'betas__1': 0.999}
    assert set_item_pg({'lr': 1e-2, 'mom': 0.9, 'params': [0, 1, 2]}, 'lr', 1e-3) == {'lr': 1e-3, 'mom': 0.9,
                                                                                    'params': [0, 1, 2]}
    assert set_item_pg({'lr': 1e-2, 'betas': (0.9, 0.999), 'params': [0, 1, 2]}, 'betas__0', 0.95) == {
        'lr': 1e-2, 'betas': (0.95, 0.999), 'params': [0, 1, 2]}
    assert pytorch_hp_map['betas__1'] == 'sqr_mom' and pytorch_hp_map['momentum'] == 'mom'


def test_optim_wrapper_single_group():
    sgd = SGD([tensor([1., 2, 3])], lr=1e-3, mom=0.9, wd=1e-2)
    tst_sgd = OptimWrapper(torch.optim.SGD([tensor([1., 2, 3])], lr=1e-3, momentum=0.9, weight_decay=1e-2))
    assert [[p.tolist() for p in pg] for pg in tst_sgd.param_lists] == [[p.tolist() for p in pg] for pg in sgd.param_lists]
    new = tensor([4., 5, 6])
    tst_sgd.param_lists = [[new]]
    assert tst_sgd.opt.param_groups[0]['params'][0] is new
    # torch 2.x groups also hold maximize/foreach/...; the seed's hypers are a subset, plus dampening and nesterov
    hyp = tst_sgd.hypers[0]
    assert {k: hyp[k] for k in sgd.hypers[0]} == sgd.hypers[0] and hyp['dampening'] == 0. and hyp['nesterov'] is False
    tst_sgd.set_hyper('mom', 0.95)
    assert tst_sgd.opt.param_groups[0]['momentum'] == 0.95


def test_optim_wrapper_groups_betas_and_freezing():
    tst_sgd = OptimWrapper(torch.optim.SGD([{'params': [tensor([1., 2, 3])], 'lr': 1e-3},
                                            {'params': [tensor([4., 5, 6])], 'lr': 1e-2}], momentum=0.9, weight_decay=1e-2))
    sgd = SGD([[tensor([1., 2, 3])], [tensor([4., 5, 6])]], lr=[1e-3, 1e-2], mom=0.9, wd=1e-2)
    for ours, theirs in zip(sgd.hypers, tst_sgd.hypers): assert {k: theirs[k] for k in ours} == ours
    a, b = tensor([4., 5, 6]), tensor([1., 2, 3])
    tst_sgd.param_lists = [[a], [b]]
    assert tst_sgd.opt.param_groups[0]['params'][0] is a and tst_sgd.opt.param_groups[1]['params'][0] is b
    tst_sgd.set_hyper('mom', 0.95)
    assert [pg['momentum'] for pg in tst_sgd.opt.param_groups] == [0.95, 0.95]
    tst_sgd.set_hyper('lr', [1e-4, 1e-3])
    assert [pg['lr'] for pg in tst_sgd.opt.param_groups] == [1e-4, 1e-3]
    assert tst_sgd.param_groups is tst_sgd.opt.param_groups
    adam = OptimWrapper(torch.optim.AdamW([nn.Parameter(tensor([1., 2.]))], betas=(0.9, 0.99)))
    adam.set_hyper('sqr_mom', 0.95)
    assert adam.opt.param_groups[0]['betas'] == (0.9, 0.95) and adam.hypers[0]['mom'] == 0.9
    ps = [[nn.Parameter(torch.ones(2))], [nn.Parameter(torch.ones(2))]]
    w = OptimWrapper(torch.optim.SGD([{'params': ps[0]}, {'params': ps[1]}], lr=0.1))
    w.state[ps[0][0]]['force_train'] = True
    w.freeze()
    assert ps[0][0].requires_grad and ps[1][0].requires_grad
    w.set_freeze(0, False, ignore_force_train=True); assert not ps[0][0].requires_grad
    custom = OptimWrapper(torch.optim.SGD([tensor([1.])], lr=0.1, momentum=0.5), hp_map={'momentum': 'beta'})
    assert custom.hypers[0]['beta'] == 0.5
    custom.set_hyper('beta', 0.7); assert custom.opt.param_groups[0]['momentum'] == 0.7


def _mock_train(m, x, y, opt):
    m.train()
    for i in range(0, 100, 25):
        z = m(x[i:i+25])
        loss = F.mse_loss(z, y[i:i+25])
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize('decouple', [True, False])
def test_optim_wrapper_adam_matches_our_adam(decouple):
    torch.manual_seed(0)
    m = nn.Linear(4, 5)
    x, y = torch.randn(100, 3, 4), torch.randn(100, 3, 5)
    sd = copy.deepcopy(m.state_dict())
    torch_cls = torch.optim.AdamW if decouple else torch.optim.Adam
    opt1 = OptimWrapper(torch_cls(m.parameters(), betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2))
    _mock_train(m, x.clone(), y.clone(), opt1)
    w1 = [p.detach().clone() for p in m.parameters()]
    m.load_state_dict(sd)
    opt2 = Adam(m.parameters(), 1e-3, wd=1e-2, decouple_wd=decouple)
    _mock_train(m, x.clone(), y.clone(), opt2)
    for a, b in zip(w1, m.parameters()): close(a, b.detach(), 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 100-step trajectories against torch.optim

def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4))

def trajectory_gap(ours, theirs, n_steps=100, pre_step=None, groups=False, seed=0):
    "Max |difference| of parameters after `n_steps` identical random gradients fed to `ours` and `theirs`."
    torch.manual_seed(seed)
    ma = _model(); mb = copy.deepcopy(ma)
    pa, pb = list(ma.parameters()), list(mb.parameters())
    if groups: pa, pb = [pa[:2], pa[2:]], [pb[:2], pb[2:]]
    oa, ob = ours(pa), theirs(pb)
    for _ in range(n_steps):
        for a, b in zip(ma.parameters(), mb.parameters()):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        if pre_step is not None: pre_step(list(mb.parameters()))
        oa.step(); ob.step()
    gap = max((a - b).abs().max().item() for a, b in zip(ma.parameters(), mb.parameters()))
    moved = max((a - a0).abs().max().item() for a, a0 in zip(ma.parameters(), _model_like(seed).parameters()))
    assert moved > 1e-3, "the optimizer did not move the weights: the comparison would be vacuous"
    return gap

def _model_like(seed):
    torch.manual_seed(seed)
    return _model()

def decay_by_hand(lr, wd):
    "Decoupled weight decay done outside torch.optim.SGD: p <- p*(1 - lr*wd) before its step."
    def f(params):
        with torch.no_grad():
            for p in params: p.mul_(1 - lr*wd)
    return f

TOL = 1e-6

@pytest.mark.parametrize('mom', [0., 0.9])
def test_sgd_matches_torch_sgd(mom):
    # torch's buffer starts at the first gradient and then does buf = m*buf + (1-dampening)*g; ours starts at zero
    # and does m*avg + g: with dampening=0 the two sequences are identical.
    gap = trajectory_gap(lambda ps: SGD(ps, 0.01, mom=mom), lambda ps: torch.optim.SGD(ps, 0.01, momentum=mom, dampening=0))
    assert gap < TOL


@pytest.mark.parametrize('mom', [0., 0.9])
def test_sgd_l2_matches_torch_weight_decay(mom):
    gap = trajectory_gap(lambda ps: SGD(ps, 0.01, mom=mom, wd=0.1, decouple_wd=False),
                         lambda ps: torch.optim.SGD(ps, 0.01, momentum=mom, weight_decay=0.1))
    assert gap < TOL


@pytest.mark.parametrize('mom', [0., 0.9])
def test_sgd_decoupled_wd_matches_hand_decay_then_torch_sgd(mom):
    gap = trajectory_gap(lambda ps: SGD(ps, 0.01, mom=mom, wd=0.1),
                         lambda ps: torch.optim.SGD(ps, 0.01, momentum=mom), pre_step=decay_by_hand(0.01, 0.1))
    assert gap < TOL


def test_sgd_param_groups_match_torch_groups():
    gap = trajectory_gap(lambda ps: SGD(ps, [0.01, 0.03], mom=0.9),
                         lambda ps: torch.optim.SGD([{'params': ps[0], 'lr': 0.01}, {'params': ps[1], 'lr': 0.03}],
                                                    momentum=0.9), groups=True)
    assert gap < TOL


def test_sgd_decoupled_and_l2_differ_with_momentum():
    gap = trajectory_gap(lambda ps: SGD(ps, 0.01, mom=0.9, wd=0.1), lambda ps: SGD(ps, 0.01, mom=0.9, wd=0.1, decouple_wd=False))
    assert gap > 1e-3
    gap = trajectory_gap(lambda ps: SGD(ps, 0.01, wd=0.1), lambda ps: SGD(ps, 0.01, wd=0.1, decouple_wd=False))
    assert gap < 1e-5                      # without momentum, the same algorithm (rounding differs: p*(1-lr*wd) - lr*g)


def test_adam_matches_torch_adamw():
    gap = trajectory_gap(lambda ps: Adam(ps, 1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.05),
                         lambda ps: torch.optim.AdamW(ps, 1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05))
    assert gap < TOL


def test_adam_l2_matches_torch_adam():
    gap = trajectory_gap(lambda ps: Adam(ps, 1e-3, wd=0.05, decouple_wd=False),
                         lambda ps: torch.optim.Adam(ps, 1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.05))
    assert gap < TOL
    gap = trajectory_gap(lambda ps: Adam(ps, 1e-3, wd=0.),
                         lambda ps: torch.optim.Adam(ps, 1e-3, betas=(0.9, 0.99), eps=1e-5))
    assert gap < TOL


@pytest.mark.parametrize('wd', [0., 0.1])
def test_rmsprop_matches_torch_rmsprop(wd):
    gap = trajectory_gap(lambda ps: RMSProp(ps, 1e-3, sqr_mom=0.9, wd=wd, decouple_wd=False),
                         lambda ps: torch.optim.RMSprop(ps, 1e-3, alpha=0.9, eps=1e-8, weight_decay=wd))
    assert gap < TOL


def test_rmsprop_with_momentum_follows_its_formula():
    torch.manual_seed(0)
    w = torch.randn(6); p = w.clone()
    opt = RMSProp([p], 1e-2, mom=0.9, sqr_mom=0.95, wd=0.1)
    avg, sqr = torch.zeros(6), torch.zeros(6)
    for _ in range(50):
        g = torch.randn(6); p.grad = g.clone()
        opt.step()
        w = w*(1 - 1e-2*0.1)
        avg = 0.9*avg + g; sqr = 0.95*sqr + 0.05*g**2
        w = w - 1e-2*avg/(sqr.sqrt() + 1e-8)
    close(p, w, 1e-5)


def test_radam_matches_torch_radam_with_eps_zero():
    # torch adds eps to sqrt(v) before the bias correction, we add it after; with eps=0 they coincide
    gap = trajectory_gap(lambda ps: RAdam(ps, 1e-3, eps=0.), lambda ps: torch.optim.RAdam(ps, 1e-3, betas=(0.9, 0.99), eps=0.))
    assert gap < TOL


def test_qhadam_with_unit_nus_is_adam():
    gap = trajectory_gap(lambda ps: QHAdam(ps, 1e-3, mom=0.9, sqr_mom=0.99, nu_1=1., nu_2=1., eps=1e-5, wd=0.01),
                         lambda ps: Adam(ps, 1e-3, wd=0.01))
    assert gap < TOL


def test_lamb_follows_its_formula():
    torch.manual_seed(0)
    w = torch.randn(3, 4); p = w.clone()
    opt = Lamb([p], 1e-2, wd=0.1)
    m, v = torch.zeros(3, 4), torch.zeros(3, 4)
    for t in range(1, 31):
        g = torch.randn(3, 4); p.grad = g.clone()
        opt.step()
        w = w*(1 - 1e-2*0.1)
        m = 0.9*m + 0.1*g; v = 0.99*v + 0.01*g**2
        u = (m/(1 - 0.9**t))/((v/(1 - 0.99**t)).sqrt() + 1e-5)
        q = min(w.pow(2).mean().sqrt()/u.pow(2).mean().sqrt(), 10)
        w = w - 1e-2*q*u
    close(p, w, 1e-5)


def test_larc_with_momentum_follows_its_formula():
    torch.manual_seed(0)
    w = torch.randn(5); p = w.clone()
    opt = Larc([p], 0.1, mom=0.9, trust_coeff=0.02, wd=0.01, decouple_wd=False)
    avg = torch.zeros(5)
    for _ in range(30):
        g = torch.randn(5); p.grad = g.clone()
        opt.step()
        g = g + 0.01*w                                    # L2 first: the layer rate sees the regularised gradient
        avg = 0.9*avg + g
        local = min(0.1*0.02*w.norm()/(g.norm() + w.norm()*0.01 + 1e-8), 0.1)
        w = w - local*avg
    close(p, w, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# state_dict round trips: resume training bit for bit

def _fresh(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

def _grads(n, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in _fresh().parameters()]
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(n)]

def _run(model, opt, grads):
    for gs in grads:
        for p, g in zip(model.parameters(), gs): p.grad = g.clone()
        opt.step()

def _sam_closure(model, opt, gs):
    "A closure for SAM whose gradient depends on the (perturbed) weights, so the perturbation matters."
    def closure():
        opt.zero_grad()
        loss = sum(((p - g)**2).sum() for p, g in zip(model.parameters(), gs))
        loss.backward()
        return loss
    return closure

def _run_sam(model, opt, grads):
    for gs in grads:
        closure = _sam_closure(model, opt, gs)
        closure(); opt.step(closure)

OPT_FUNCS = {
    'SGD': lambda ps: SGD(ps, 0.1, mom=0.9, wd=0.01),
    'RMSProp': lambda ps: RMSProp(ps, 1e-2, mom=0.9),
    'Adam': lambda ps: Adam(ps, 1e-2),
    'RAdam': lambda ps: RAdam(ps, 1e-2),
    'QHAdam': lambda ps: QHAdam(ps, 1e-2),
    'Larc': lambda ps: Larc(ps, 0.1),
    'Lamb': lambda ps: Lamb(ps, 1e-2),
    'ranger': lambda ps: ranger(ps, 1e-2, k=4),
    'OptimWrapper': lambda ps: OptimWrapper(torch.optim.AdamW(ps, 1e-2)),
    'LARS': lambda ps: LARS(ps, 0.1, momentum=0.9, weight_decay=1e-4),
    'SAM': lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    'SAM-Adam': lambda ps: SAM(ps, Adam, rho=0.1, lr=1e-2),
}

@pytest.mark.parametrize('name', list(OPT_FUNCS))
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    run = _run_sam if name.startswith('SAM') else _run
    before, after = _grads(7, seed=1), _grads(9, seed=2)
    model = _fresh(); opt = OPT_FUNCS[name](model.parameters())
    run(model, opt, before)
    buf = io.BytesIO()
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, buf)
    run(model, opt, after)
    want = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = _fresh(seed=123)
    model2.load_state_dict(saved['model'])
    opt2 = OPT_FUNCS[name](model2.parameters())
    opt2.load_state_dict(saved['opt'])
    run(model2, opt2, after)
    for a, b in zip(want, model2.parameters()): assert torch.equal(a, b.detach()), name


def test_state_dict_is_a_snapshot_and_hypers_round_trip():
    model = _fresh(); opt = Adam(model.parameters(), 1e-2)
    _run(model, opt, _grads(3, 0))
    sd = opt.state_dict()
    first = sd['state'][0]['grad_avg'].clone()
    _run(model, opt, _grads(3, 1))
    assert torch.equal(sd['state'][0]['grad_avg'], first)          # later steps do not change a saved state
    opt.set_hyper('lr', 0.5)
    opt.load_state_dict(sd)
    assert opt.hypers[0]['lr'] == 1e-2 and opt.state[next(model.parameters())]['step'] == 3


def test_lookahead_round_trip_keeps_slow_weights_and_count():
    model = _fresh(); opt = Lookahead(SGD(model.parameters(), 0.1), k=3)
    _run(model, opt, _grads(4, 0))
    sd = opt.state_dict()
    assert sd['count'] == 4 and len(sd['slow_weights'][0]) == 4
    opt2 = Lookahead(SGD(model.parameters(), 0.1), k=3)
    opt2.load_state_dict(sd)
    assert opt2.count == 4 and all(torch.equal(a, b) for a, b in zip(opt2.slow_weights[0], opt.slow_weights[0]))


# ---------------------------------------------------------------------------------------------------------------
# seed 001: LARS

@pytest.mark.parametrize('kw', [dict(momentum=0.), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3),
                                dict(momentum=0.9, nesterov=True)])
def test_lars_without_weight_decay_is_torch_sgd(kw):
    gap = trajectory_gap(lambda ps: LARS(ps, 0.01, **kw), lambda ps: torch.optim.SGD(ps, 0.01, **kw))
    assert gap < TOL


def test_lars_scales_by_the_layer_trust_ratio():
    torch.manual_seed(0)
    w = torch.randn(4, 3); p = nn.Parameter(w.clone())
    opt = LARS([p], 0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.002)
    buf = None
    for _ in range(20):
        g = torch.randn(4, 3); p.grad = g.clone()
        opt.step()
        lars_lr = 0.002*w.norm()/(g.norm() + w.norm()*0.01 + 1e-8)
        d = (g + 0.01*w)*lars_lr
        buf = d.clone() if buf is None else 0.9*buf + d
        w = w - 0.1*buf
    close(p.detach(), w, 1e-6)


def test_lars_leaves_zero_weight_decay_groups_and_zero_norms_unscaled():
    a, b, z = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3))
    for p in (a, b, z): p.grad = torch.full((3,), 0.5)
    LARS([{'params': [a, z], 'weight_decay': 0.1}, {'params': [b], 'weight_decay': 0.}], lr=0.1).step()
    close(b.detach(), [0.95]*3)                            # plain SGD: group without weight decay
    close(z.detach(), [-0.05]*3)                           # plain SGD: zero weight norm
    lars_lr = 0.001*math.sqrt(3)/(0.5*math.sqrt(3) + math.sqrt(3)*0.1 + 1e-8)
    close(a.detach(), [1 - 0.1*lars_lr*(0.5 + 0.1)]*3)


class HandLARS(torch.optim.Optimizer):
    "`LARS.step` as it was before it called torch's SGD update: its own momentum loop, kept to prove the two equal."
    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, trust_coefficient=0.001,
                 eps=1e-8):
        self.trust_coefficient, self.eps = trust_coefficient, eps
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd, mom, damp = group['weight_decay'], group['momentum'], group['dampening']
            for p in group['params']:
                if p.grad is None: continue
                d_p = p.grad
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                if wd != 0 and p_norm != 0 and g_norm != 0:
                    lars_lr = self.trust_coefficient * p_norm / (g_norm + p_norm*wd + self.eps)
                    d_p = d_p.add(p, alpha=wd) * lars_lr
                if mom != 0:
                    state = self.state[p]
                    if 'momentum_buffer' not in state: buf = state['momentum_buffer'] = d_p.detach().clone()
                    else: buf = state['momentum_buffer'].mul_(mom).add_(d_p, alpha=1 - damp)
                    d_p = d_p.add(buf, alpha=mom) if group['nesterov'] else buf
                p.add_(d_p, alpha=-group['lr'])


class ScaleThenSGD:
    "LARS by hand: replace each gradient by (g + wd*p) * trust ratio, then `torch.optim.SGD` without weight decay."
    def __init__(self, groups, lr, weight_decay, trust_coefficient, eps, **kw):
        self.groups = [(g['params'], g.get('weight_decay', weight_decay)) for g in groups]
        self.tc, self.eps = trust_coefficient, eps
        self.opt = torch.optim.SGD([{'params': g['params']} for g in groups], lr=lr, **kw)
    def step(self):
        for params, wd in self.groups:
            for p in params:
                if p.grad is None or wd == 0 or p.norm() == 0 or p.grad.norm() == 0: continue
                p.grad = p.grad.add(p.detach(), alpha=wd) * (self.tc*p.norm()/(p.grad.norm() + p.norm()*wd + self.eps))
        self.opt.step()


def _lars_trajectory(make_opt, n_steps=40, seed=3):
    "Parameters after `n_steps` fixed random steps: two groups (one without weight decay), a zero weight, a zero"
    "gradient now and then, and a parameter that never gets a gradient."
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [(6, 4), (6,), (3, 6), (3,), (2,)]]
    with torch.no_grad(): params[1].zero_()
    opt = make_opt([{'params': params[:3]}, {'params': params[3:], 'weight_decay': 0.}])
    for i in range(n_steps):
        for j, p in enumerate(params[:4]):
            p.grad = torch.zeros_like(p) if (i + j) % 7 == 0 else torch.randn(p.shape, generator=gen) * 10**(i % 3 - 1)
        opt.step()
    assert params[4].grad is None
    return params, opt


@pytest.mark.parametrize('kw', [dict(momentum=0.), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3),
                                dict(momentum=0.9, nesterov=True)])
def test_lars_is_bit_for_bit_its_former_self_and_scaling_then_torch_sgd(kw):
    hp = dict(lr=0.5, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8)
    ours, opt = _lars_trajectory(lambda g: LARS(g, **hp, **kw))
    before, old = _lars_trajectory(lambda g: HandLARS(g, **hp, **kw))
    by_hand, _ = _lars_trajectory(lambda g: ScaleThenSGD(g, **hp, **kw))
    for a, b, c in zip(ours, before, by_hand):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert len(opt.state) == len(old.state) == (4 if kw['momentum'] else 0)   # buffers for the same parameters
    for p, q in zip(ours, before):
        if p in opt.state: assert torch.equal(opt.state[p]['momentum_buffer'], old.state[q]['momentum_buffer'])
    plain, _ = _lars_trajectory(lambda g: torch.optim.SGD(g, lr=0.5, weight_decay=1e-2, **kw))
    assert not torch.equal(ours[0], plain[0])                                  # the scaling did something


def test_lars_step_leaves_the_gradients_alone():
    p = nn.Parameter(torch.tensor([3., 4.])); g = torch.tensor([0.6, 0.8])
    opt = LARS([p], 0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for _ in range(2):
        p.grad = g.clone(); opt.step()
        assert torch.equal(p.grad, g)


def test_lars_validates_arguments_and_runs_closure():
    p = nn.Parameter(torch.ones(2))
    for kw, msg in [(dict(lr=-1.), 'learning rate'), (dict(lr=0.1, momentum=-1.), 'momentum'),
                    (dict(lr=0.1, weight_decay=-1.), 'weight_decay'), (dict(lr=0.1, nesterov=True), 'Nesterov')]:
        with pytest.raises(ValueError, match=msg): LARS([p], **kw)
    opt = LARS([p], 0.1)
    def closure():
        opt.zero_grad(); loss = (p**2).sum(); loss.backward(); return loss
    assert opt.step(closure).item() == pytest.approx(2.)
    close(p.detach(), [0.8, 0.8])


# ---------------------------------------------------------------------------------------------------------------
# seed 001: SAM

@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_step_matches_the_formula(adaptive):
    torch.manual_seed(0)
    X, y = torch.randn(32, 3), torch.randn(32)
    w0 = torch.randn(3)
    loss_at = lambda w: ((X @ w - y)**2).mean()
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1)
    assert SAM.requires_closure is True and opt.requires_closure
    def closure():
        opt.zero_grad(); loss = loss_at(w); loss.backward(); return loss
    closure()
    loss = opt.step(closure)
    g0 = torch.func.grad(loss_at)(w0)
    t = w0.abs() if adaptive else torch.ones(3)
    e = 0.05*t**2*g0/(t*g0).norm()
    assert loss.item() == pytest.approx(loss_at(w0 + e).item(), rel=1e-5)    # the closure ran at w + e(w)
    close(w.detach(), w0 - 0.1*torch.func.grad(loss_at)(w0 + e), 1e-6)


def test_sam_first_and_second_step_restore_weights():
    w = nn.Parameter(tensor([1., -2.])); unused = nn.Parameter(tensor([3.]))
    opt = SAM([w, unused], torch.optim.SGD, rho=0.5, adaptive=False, lr=0.)
    w.grad, unused.grad = tensor([3., 4.]), tensor([0.])
    opt.first_step(zero_grad=True)
    close(w.detach(), [1 + 0.5*3/5, -2 + 0.5*4/5])
    assert w.grad is None
    w.grad = tensor([1., 1.])                              # `unused` gets no gradient in the second pass
    opt.second_step(zero_grad=True)
    close(w.detach(), [1., -2.]); close(unused.detach(), [3.])
    assert all('e_w' not in opt.state[p] for p in (w, unused))


def test_sam_without_closure_is_a_clear_error():
    w = nn.Parameter(torch.ones(2)); w.grad = torch.ones(2)
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match='closure'): opt.step()
    close(w.detach(), [1., 1.])
    with pytest.raises(ValueError, match='rho'): SAM([w], torch.optim.SGD, rho=-1., lr=0.1)


def test_sam_shares_param_groups_with_our_base_optimizer():
    w = nn.Parameter(torch.ones(2))
    opt = SAM([w], Adam, lr=1e-2)
    assert isinstance(opt.base_optimizer, Optimizer) and adam_step in opt.base_optimizer.cbs
    for g in opt.param_groups: g['lr'] = 0.5
    assert opt.base_optimizer.hypers[0]['lr'] == 0.5
    assert opt.base_optimizer.hypers[0]['rho'] == 0.05   # SAM's own keys ride along, ignored by the steppers
    base = torch.optim.SGD([w], lr=0.1)
    assert SAM([w], base, rho=0.1).base_optimizer is base   # an already-built optimizer is used as is


# ---------------------------------------------------------------------------------------------------------------
# with the real Learner

def _bn_cnn() -> nn.Module:
    def conv(ni, nf):
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
    return nn.Sequential(conv(1, 8), conv(8, 16), conv(16, 32), conv(32, 64), nn.Conv2d(64, 10, 3, stride=2, padding=1),
                         nn.Flatten())

@pytest.fixture(scope='module')
def dls():
    from miniai.datasets import fashion_dls
    return fashion_dls(128, smoke=True)


def test_sam_in_learner_updates_batchnorm_stats_once_per_batch(dls):
    from miniai.learner import SingleBatchCB, TrainLearner, set_seed
    set_seed(0)
    model = _bn_cnn()
    start = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)                                   # the loader shuffles with torch's generator:
    xb, yb = next(iter(dls.train))                         # replay the batch the learner will draw first
    opt_func = lambda ps, lr: SAM(ps, torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9)
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, opt_func=opt_func, cbs=[SingleBatchCB()])
    torch.manual_seed(5)
    learn.fit(1, valid=False)

    # BatchNorm statistics: those of one plain forward pass of the starting weights on that batch
    ref = _bn_cnn(); ref.load_state_dict(start); ref.train()
    with torch.no_grad(): ref(xb)
    bns = [(m, r) for m, r in zip(model.modules(), ref.modules()) if isinstance(m, nn.BatchNorm2d)]
    for bn, rbn in bns:
        assert bn.num_batches_tracked.item() == 1
        assert torch.allclose(bn.running_mean, rbn.running_mean, atol=1e-6)
        assert torch.allclose(bn.running_var, rbn.running_var, atol=1e-6)

    # the weights: the same SAM step done by hand (in train mode BatchNorm normalises with batch statistics,
    # so the gradients do not depend on the running ones)
    hand = _bn_cnn(); hand.load_state_dict(start); hand.train()
    opt = SAM(hand.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    F.cross_entropy(hand(xb), yb).backward()
    def closure():
        loss = F.cross_entropy(hand(xb), yb); loss.backward(); return loss
    opt.step(closure)
    for (name, p), q in zip(model.named_parameters(), hand.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_sam_in_learner_epoch_counts_each_batch_once(dls):
    from miniai.learner import TrainLearner, set_seed
    set_seed(0)
    model = _bn_cnn()
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.05,
                         opt_func=lambda ps, lr: SAM(ps, Adam, rho=0.05, lr=lr))
    learn.fit(1, valid=False)
    n = len(dls.train)
    assert all(m.num_batches_tracked.item() == n for m in model.modules() if isinstance(m, nn.BatchNorm2d))


LEARNER_OPTS = {
    'SGD': (partial(SGD, mom=0.9), 0.05), 'RMSProp': (RMSProp, 1e-3), 'Adam': (partial(Adam, wd=0.01), 3e-3),
    'RAdam': (RAdam, 3e-3), 'QHAdam': (QHAdam, 3e-3), 'Larc': (partial(Larc, trust_coeff=0.1), 0.1),
    'Lamb': (Lamb, 3e-3), 'ranger': (ranger, 3e-3),
    'Lookahead-SGD': (lambda ps, lr: Lookahead(SGD(ps, lr, mom=0.9)), 0.05),
    'OptimWrapper': (lambda ps, lr: OptimWrapper(torch.optim.AdamW(ps, lr)), 3e-3),
    'LARS': (partial(LARS, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02), 0.5),
    'SAM': (lambda ps, lr: SAM(ps, torch.optim.SGD, lr=lr, momentum=0.9), 0.05),
}

@pytest.mark.parametrize('name', list(LEARNER_OPTS))
def test_every_optimizer_trains_in_the_learner(name, dls):
    from miniai.learner import MetricsCB, TrainLearner, set_seed
    opt_func, lr = LEARNER_OPTS[name]
    set_seed(0)
    metrics = MetricsCB()
    learn = TrainLearner(_bn_cnn(), dls, F.cross_entropy, lr=lr, opt_func=opt_func, cbs=[metrics])
    learn.fit(1, train=False)
    before = metrics.history[-1]['loss']
    learn.fit(2)
    after = metrics.history[-1]['loss']
    assert after < before - 0.3, f"{name}: validation loss {before:.3f} -> {after:.3f}"


def test_lr_find_changes_our_learning_rate_through_param_groups(dls):
    from miniai.learner import TrainLearner, set_seed
    set_seed(0)
    learn = TrainLearner(_bn_cnn(), dls, F.cross_entropy, lr=1e-3, opt_func=Adam)
    res = learn.lr_find(gamma=1.3, start_lr=1e-5, plot=False, max_epochs=3)
    ratios = [b/a for a, b in zip(res.lrs, res.lrs[1:])]
    assert len(ratios) > 5 and all(r == pytest.approx(1.3) for r in ratios)


# ---------------------------------------------------------------------------------------------------------------

def test_every_public_name_is_exercised_here():
    src = Path(__file__).read_text()
    body = src.split('# helpers', 1)[1]                    # not counting the import line
    missing = [n for n in mo.__all__ if not re.search(rf'\b{re.escape(n)}\b', body)]
    assert not missing, f"public names without a test: {missing}"
