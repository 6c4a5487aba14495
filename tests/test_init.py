"""miniai.init against formulas: GeneralRelu, Kaiming init, conv/get_model, and LSUV (convergence, errors, restore)."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.datasets import fashion_dls
from miniai.init import GeneralRelu, conv, get_model, init_weights, lsuv_init, plot_func
from miniai.learner import set_seed


# ---- GeneralRelu --------------------------------------------------------------------------------------------------
def reference_general_relu(x, leak, sub, maxv):
    y = F.leaky_relu(x, leak) if leak is not None else F.relu(x)
    if sub is not None: y = y - sub
    if maxv is not None: y = y.clamp(max=maxv)
    return y


@pytest.mark.parametrize('leak,sub,maxv', [(None, None, None), (None, 0.4, None), (0.1, 0.4, None),
                                           (0.1, 0.4, 3.), (None, 0.4, 2.), (0.2, None, 1.5), (None, None, 2.)])
def test_general_relu_forward_and_gradient(leak, sub, maxv):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 8, 8) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    before = x.detach().clone()
    y = GeneralRelu(leak, sub, maxv)(x)
    y_ref = reference_general_relu(x_ref, leak, sub, maxv)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g); y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert torch.equal(x.detach(), before), "GeneralRelu modified its input"


def test_general_relu_gradient_values():
    x = torch.tensor([-2., -0.5, 0.5, 2., 5.], requires_grad=True)
    GeneralRelu(leak=0.1, sub=0.4, maxv=3.)(x).sum().backward()
    # slope 0.1 below 0, 1 above, 0 where the output is capped (x - 0.4 > 3)
    torch.testing.assert_close(x.grad, torch.tensor([0.1, 0.1, 1., 1., 0.]))


def test_plot_func_returns_axes_with_the_function():
    import matplotlib
    matplotlib.use('Agg')
    ax = plot_func(GeneralRelu(leak=0.1, sub=0.4), start=-2., end=2., steps=5)
    xs, ys = ax.lines[0].get_data()
    torch.testing.assert_close(torch.as_tensor(ys), F.leaky_relu(torch.linspace(-2, 2, 5), 0.1) - 0.4)


# ---- init_weights ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('make', [lambda: nn.Conv1d(64, 128, 5), lambda: nn.Conv2d(64, 256, 3),
                                  lambda: nn.Conv3d(16, 64, 3)], ids=['1d', '2d', '3d'])
@pytest.mark.parametrize('leaky', [0., 0.1, 0.5])
def test_kaiming_std_matches_gain_over_sqrt_fan_in(make, leaky):
    torch.manual_seed(0)
    m = make()
    bias_before = m.bias.detach().clone()
    init_weights(m, leaky=leaky)
    fan_in = m.weight[0].numel()                     # in_channels * prod(kernel)
    want = math.sqrt(2 / (1 + leaky**2)) / math.sqrt(fan_in)
    n = m.weight.numel()
    assert abs(m.weight.std().item() - want) < 4 * want / math.sqrt(2 * n) + 1e-3 * want
    assert abs(m.weight.mean().item()) < 4 * want / math.sqrt(n)
    assert torch.equal(m.bias, bias_before)


def test_init_weights_leaves_other_modules_alone():
    torch.manual_seed(0)
    lin, bn = nn.Linear(10, 10), nn.BatchNorm2d(4)
    states = [{k: v.clone() for k, v in mod.state_dict().items()} for mod in (lin, bn)]
    nn.Sequential(lin, bn).apply(init_weights)
    for mod, st in zip((lin, bn), states):
        for k, v in mod.state_dict().items(): assert torch.equal(v, st[k])


# ---- conv / get_model --------------------------------------------------------------------------------------------
def test_conv_shapes_and_bias_rule():
    x = torch.randn(2, 3, 28, 28)
    c = conv(3, 8)
    assert isinstance(c[0], nn.Conv2d) and c[0].bias is not None and isinstance(c[1], nn.ReLU)
    assert c(x).shape == (2, 8, 14, 14)
    assert conv(3, 8, ks=5, stride=1)(x).shape == (2, 8, 28, 28)
    bn = conv(3, 8, norm=nn.BatchNorm2d)
    assert bn[0].bias is None and isinstance(bn[1], nn.BatchNorm2d)
    assert conv(3, 8, norm=nn.InstanceNorm2d)[0].bias is None
    assert conv(3, 8, norm=partial(nn.GroupNorm, 2))[0].bias is not None   # GroupNorm does not remove per-channel means
    assert conv(3, 8, norm=nn.BatchNorm2d, bias=True)[0].bias is not None
    assert len(conv(3, 8, act=None)) == 1


def test_get_model_output_and_layers():
    m = get_model(act=partial(GeneralRelu, leak=0.1, sub=0.4))
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert sum(isinstance(l, nn.Conv2d) for l in m.modules()) == 5
    assert sum(isinstance(l, GeneralRelu) for l in m.modules()) == 4
    m = get_model(nfs=[1, 4, 8], norm=nn.BatchNorm2d)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 10]
    assert [c.bias is None for c in convs] == [True, True, False]


# ---- LSUV --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def batches():
    dls = fashion_dls(512, smoke=True)
    it = iter(dls.train)
    return next(it)[0], next(it)[0]


def act_conv_pairs(model):
    return [(blk[-1], blk[0]) for blk in list(model)[:-2]]


def output_stats(model, m, xb):
    out = {}
    h = m.register_forward_hook(lambda mod, i, o: out.update(mean=o.mean().item(), std=o.std().item()))
    with torch.no_grad(): model(xb)
    h.remove()
    return out['mean'], out['std']


def test_lsuv_gives_mean_0_std_1_on_a_real_batch(batches):
    xb, xb2 = batches
    set_seed(0)
    model = get_model(partial(GeneralRelu, leak=0.1, sub=0.4, maxv=6.))
    pairs = act_conv_pairs(model)
    for act, cv in pairs:
        r = lsuv_init(model, act, cv, xb)
        assert abs(r.mean) <= 1e-3 and abs(r.std - 1) <= 1e-3 and 0 < r.iters <= 50
    for act, _ in pairs:                       # measured independently, after all layers were adjusted
        mean, std = output_stats(model, act, xb)
        assert abs(mean) <= 1e-3 and abs(std - 1) <= 1e-3
        mean, std = output_stats(model, act, xb2)   # a batch LSUV never saw: close, not exact
        assert abs(mean) < 0.1 and abs(std - 1) < 0.1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_lsuv_respects_tolerance(batches):
    xb, _ = batches
    set_seed(0)
    model = get_model(partial(GeneralRelu, leak=0.1, sub=0.4))
    act, cv = act_conv_pairs(model)[0]
    r = lsuv_init(model, act, cv, xb, tol=0.05)
    assert abs(r.mean) <= 0.05 and abs(r.std - 1) <= 0.05
    r2 = lsuv_init(model, act, cv, xb, tol=0.05)
    assert r2.iters == 0                      # already within tolerance: nothing to do


@pytest.mark.parametrize('zero_bias', [True, False])
def test_lsuv_dead_layer_raises_and_restores(batches, zero_bias):
    xb, _ = batches
    set_seed(0)
    model = get_model(partial(GeneralRelu, leak=0.1, sub=0.4))
    act, cv = act_conv_pairs(model)[1]
    with torch.no_grad():
        cv.weight.zero_()                      # the output no longer depends on the input
        if zero_bias: cv.bias.zero_()
    w, b = cv.weight.clone(), cv.bias.clone()
    with pytest.raises(ValueError, match=r"'1\.1' \(GeneralRelu\).*same for every input"):
        lsuv_init(model, act, cv, xb)
    assert torch.equal(cv.weight, w) and torch.equal(cv.bias, b)


def test_lsuv_plain_relu_terminates_with_finite_weights(batches):
    xb, _ = batches
    set_seed(0)
    model = get_model()
    act, cv = act_conv_pairs(model)[0]
    w, b = cv.weight.clone(), cv.bias.clone()
    with pytest.raises(ValueError, match=r"'0\.1' \(ReLU\).*never negative"):
        lsuv_init(model, act, cv, xb)          # a ReLU's mean can only reach 0 once it is dead
    assert torch.equal(cv.weight, w) and torch.equal(cv.bias, b)
    r = lsuv_init(model, cv, cv, xb)           # measured before the ReLU, the target is reachable
    assert abs(r.mean) <= 1e-3 and abs(r.std - 1) <= 1e-3


def test_lsuv_non_finite_output_raises(batches):
    xb, _ = batches
    set_seed(0)
    model = get_model(partial(GeneralRelu, leak=0.1, sub=0.4))
    act, cv = act_conv_pairs(model)[0]
    bad = xb.clone(); bad[0, 0, 0, 0] = float('nan')
    w = cv.weight.clone()
    with pytest.raises(ValueError, match='not finite'):
        lsuv_init(model, act, cv, bad)
    assert torch.equal(cv.weight, w)


def test_lsuv_max_iter_raises_and_restores(batches):
    xb, _ = batches
    set_seed(0)
    model = get_model(partial(GeneralRelu, leak=0.1, sub=0.4))
    act, cv = act_conv_pairs(model)[0]
    w, b = cv.weight.clone(), cv.bias.clone()
    with pytest.raises(ValueError, match='after 2 updates'):
        lsuv_init(model, act, cv, xb, tol=1e-6, max_iter=2)
    assert torch.equal(cv.weight, w) and torch.equal(cv.bias, b)


def test_lsuv_bias_free_conv_adjusts_scale_only(batches):
    xb, _ = batches
    set_seed(0)
    block = conv(1, 8, act=partial(GeneralRelu, leak=0.1, sub=0.4), bias=False)
    r = lsuv_init(block, block[1], block[0], xb)
    assert block[0].bias is None
    mean, std = output_stats(block, block[1], xb)
    assert abs(std - 1) <= 1e-3 and abs(mean - r.mean) < 1e-6
    assert torch.isfinite(block[0].weight).all()


def test_lsuv_through_batchnorm(batches):
    xb, _ = batches
    set_seed(0)
    model = get_model(partial(GeneralRelu, leak=0.1, sub=0.4), norm=nn.BatchNorm2d)
    cv, bn, act = model[0]
    running = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    w = cv.weight.clone()
    with pytest.raises(ValueError, match='barely changes'):
        lsuv_init(model, act, cv, xb)          # BatchNorm undoes any rescaling of the conv
    assert torch.equal(cv.weight, w)
    r = lsuv_init(model, act, bn, xb)          # the BatchNorm's own scale and shift can do it
    assert abs(r.mean) <= 1e-3 and abs(r.std - 1) <= 1e-3
    # LSUV's forward passes leave the running statistics alone
    assert all(torch.equal(a, b) for a, b in zip(running, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))


def test_lsuv_bad_arguments(batches):
    xb, _ = batches
    model = get_model()
    with pytest.raises(TypeError, match='no weight'):
        lsuv_init(model, model[0][1], model[0][1], xb)
    with pytest.raises(ValueError, match='at least 2'):
        lsuv_init(model, model[0][1], model[0][0], xb[:1])
    other = nn.ReLU()
    with pytest.raises(ValueError, match='not called'):
        lsuv_init(model, other, model[0][0], xb)
