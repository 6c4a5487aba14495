"""miniai.nfnet against direct computations: weight standardization, unit-wise norms, AGC, SGD_AGC, gammas, NF blocks."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from miniai.datasets import DataLoaders, TensorLoader
from miniai.learner import Callback, TrainLearner
from miniai.nfnet import (AGC, ACTIVATIONS, NFBlock, NFResNet, SGD_AGC, ScaledAct, StochasticDepth, WSConv2d, act_gamma,
                          adaptive_clip_grad, replace_conv, unitwise_norm, variance_gamma)


def ref_standardize(w: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    "Scaled weight standardization written out channel by channel: gain * (w - mean) / sqrt(max(N var, eps))."
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        wo = w[o].flatten()
        n = wo.numel()
        mean = wo.sum() / n
        var = ((wo - mean)**2).sum() / n           # biased, as in the paper's code
        out[o] = gain[o].flatten()[0] * (w[o] - mean) / torch.sqrt(torch.clamp(var * n, min=eps))
    return out


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_wsconv_matches_direct_standardization(groups):
    torch.manual_seed(0)
    conv = WSConv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=groups).double()
    with torch.no_grad(): conv.gain.uniform_(0.5, 2.0); conv.bias.normal_()
    assert conv.weight.shape == (12, 8 // groups, 3, 3)
    w_hat = ref_standardize(conv.weight, conv.gain, 1e-4)
    torch.testing.assert_close(conv.standardize_weight(1e-4), w_hat)
    # Each output channel of the standardized weight has mean 0 and squared norm gain**2 (variance gain**2 / fan_in).
    fan_in = 8 // groups * 9
    torch.testing.assert_close(w_hat.flatten(1).mean(1), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(w_hat.flatten(1).var(1, unbiased=False) * fan_in, conv.gain.flatten()**2)
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, stride=2, padding=1, groups=groups))


@pytest.mark.parametrize('groups', [1, 3])
def test_wsconv_gradients_match_reference(groups):
    torch.manual_seed(1)
    conv = WSConv2d(6, 6, 3, padding=1, groups=groups).double()
    with torch.no_grad(): conv.gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_()
    g = conv.gain.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ((conv(x) - t)**2).sum().backward()
    ((F.conv2d(x2, ref_standardize(w, g, 1e-4), b, padding=1, groups=groups) - t)**2).sum().backward()
    for got, want in [(conv.weight.grad, w.grad), (conv.gain.grad, g.grad), (conv.bias.grad, b.grad), (x.grad, x2.grad)]:
        torch.testing.assert_close(got, want)
    # The loss cannot change the weight's mean or scale: its gradient is orthogonal to both, per output channel.
    wg = conv.weight.grad.flatten(1)
    torch.testing.assert_close(wg.sum(1), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close((wg * conv.weight.detach().flatten(1)).sum(1), torch.zeros(6, dtype=torch.float64))


def test_wsconv_eps_floors_a_constant_channel_and_padding_modes_work():
    conv = WSConv2d(2, 2, 3, padding=1, padding_mode='circular', bias=False).double()
    with torch.no_grad(): conv.weight[0] = 0.7           # zero variance: the scale becomes 1/sqrt(eps)
    w_hat = conv.standardize_weight(1e-4)
    torch.testing.assert_close(w_hat[0], torch.zeros_like(w_hat[0]))
    torch.testing.assert_close(w_hat, ref_standardize(conv.weight, conv.gain, 1e-4))
    ref = nn.Conv2d(2, 2, 3, padding=1, padding_mode='circular', bias=False).double()
    with torch.no_grad(): ref.weight.copy_(w_hat)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x))
    torch.testing.assert_close(conv(x, eps=1.), F.conv2d(F.pad(x, (1, 1, 1, 1), mode='circular'),
                                                        ref_standardize(conv.weight, conv.gain, 1.)))


def test_wsconv_eps_from_the_constructor_and_per_call():
    torch.manual_seed(14)
    conv = WSConv2d(3, 4, 3, padding=1, eps=0.5).double()
    assert conv.eps == 0.5 and 'eps=0.5' in repr(conv) and 'eps' not in repr(WSConv2d(3, 4, 3))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = F.conv2d(x, ref_standardize(conv.weight, conv.gain, 0.5), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), want)                                  # eps=None: the constructor's
    torch.testing.assert_close(conv.standardize_weight(), ref_standardize(conv.weight, conv.gain, 0.5))
    torch.testing.assert_close(conv(x, eps=1e-4), F.conv2d(x, ref_standardize(conv.weight, conv.gain, 1e-4), conv.bias,
                                                           padding=1))           # the seed's per-call argument
    assert not torch.allclose(conv(x), conv(x, eps=1e-4))                    # the floor matters at 0.5 (fan-in 27)
    default = WSConv2d(3, 4, 3, padding=1).double()
    assert default.eps == 1e-4 and torch.equal(default(x), default(x, eps=1e-4))


def test_replace_conv_passes_eps_through():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1))).double()
    ref = copy.deepcopy(model)
    replace_conv(model, eps=0.3)
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    assert [m.eps for m in convs] == [0.3, 0.3]
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Conv2d): m.weight.copy_(ref_standardize(m.weight, torch.ones(m.out_channels, 1, 1, 1,
                                                                       dtype=torch.float64), 0.3))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x))
    assert [m.eps for m in replace_conv(nn.Sequential(nn.Conv2d(1, 1, 1))).modules() if isinstance(m, WSConv2d)] == [1e-4]


def test_replace_conv_keeps_hyperparameters_weights_and_outputs_up_to_standardization():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
                                        nn.BatchNorm2d(8)),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).double().eval()
    old = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # The reference: the same model with each conv's weight replaced by its standardized version.
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Conv2d): m.weight.copy_(ref_standardize(m.weight, torch.ones(m.out_channels, 1, 1, 1,
                                                                       dtype=torch.float64), 1e-4))
    assert replace_conv(model) is model
    new = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is WSConv2d for m in new) and len(new) == 2
    for o, n in zip(old, new):
        for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation', 'groups',
                     'padding_mode'):
            assert getattr(o, attr) == getattr(n, attr), attr
        assert torch.equal(o.weight, n.weight) and (o.bias is None) == (n.bias is None)
        if o.bias is not None: assert torch.equal(o.bias, n.bias)
        assert n.weight.dtype == torch.float64 and not n.training
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x))
    assert replace_conv(model)[0] is new[0]              # already standardized convs are left alone


@pytest.mark.parametrize('shape', [(), (7,), (5, 3), (4, 3, 2), (6, 3, 3, 3)])
def test_unitwise_norm_against_its_definition(shape):
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64)
    got = unitwise_norm(x)
    if len(shape) <= 1:
        assert got.shape == ()
        torch.testing.assert_close(got, torch.sqrt((x**2).sum()))
    else:
        assert got.shape == (shape[0],) + (1,) * (len(shape) - 1)
        want = torch.tensor([math.sqrt(sum(float(v)**2 for v in x[i].flatten())) for i in range(shape[0])],
                            dtype=torch.float64)
        torch.testing.assert_close(got.flatten(), want)


def ref_agc(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    "AGC written per unit: if |G_i| / max(|W_i|, eps) > clipping, rescale G_i to norm clipping * max(|W_i|, eps)."
    if w.ndim <= 1: w, g = w.reshape(1, -1), g.reshape(1, -1)
    out = g.clone()
    for i in range(w.shape[0]):
        wn = max(float(w[i].pow(2).sum().sqrt()), eps)
        gn = float(g[i].pow(2).sum().sqrt())
        if gn / wn > clipping: out[i] = g[i] * (clipping * wn / gn)
    return out


def test_adaptive_clip_grad_against_reference():
    torch.manual_seed(4)
    conv_w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    lin_w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(5, dtype=torch.float64, requires_grad=True)   # zero weights: eps sets the threshold
    unused = torch.randn(3, requires_grad=True)                      # no gradient: skipped
    grads = [torch.randn_like(conv_w) * torch.logspace(-3, 0, 6, dtype=torch.float64)[:, None, None, None],
             torch.randn_like(lin_w) * torch.tensor([1e-4, 1., 1e-4, 1., 0.05], dtype=torch.float64)[:, None],
             torch.randn_like(bias)]
    for p, g in zip((conv_w, lin_w, bias), grads): p.grad = g.clone()
    masks = adaptive_clip_grad([conv_w, lin_w, bias, unused], clipping=0.1, eps=1e-3)
    for p, g in zip((conv_w, lin_w, bias), grads):
        torch.testing.assert_close(p.grad, ref_agc(p.detach(), g, 0.1, 1e-3).reshape(p.shape))
    assert len(masks) == 4 and masks[3] is None and unused.grad is None
    assert 0 < int(masks[0].sum()) < 6 and 0 < int(masks[1].sum()) < 5 and bool(masks[2])
    # Clipped units end with exactly the maximal ratio; unclipped ones are untouched.
    ratio = unitwise_norm(conv_w.grad) / unitwise_norm(conv_w.detach()).clamp(min=1e-3)
    torch.testing.assert_close(ratio[masks[0]], torch.full_like(ratio[masks[0]], 0.1))
    torch.testing.assert_close(conv_w.grad[~masks[0].flatten()], grads[0][~masks[0].flatten()])


def ref_sgd_agc(params, grads_per_step, lr, momentum, dampening, weight_decay, nesterov, clipping, eps):
    "The seed's rule by hand: clip, add weight decay, v = mu*v + (1-dampening)*g (v = g at first), p -= lr*v."
    ps = [p.detach().clone() for p in params]
    vs = [None] * len(ps)
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(ps, grads)):
            g = ref_agc(p, g, clipping, eps).reshape(p.shape) if clipping is not None else g.clone()
            g = g + weight_decay * p
            vs[i] = g.clone() if vs[i] is None else momentum * vs[i] + (1 - dampening) * g
            step = g + momentum * vs[i] if nesterov else vs[i]
            ps[i] = p - lr * step
    return ps


@pytest.mark.parametrize('momentum,dampening,weight_decay,nesterov,clipping',
                         [(0., 0., 0., False, 0.05), (0.9, 0., 1e-2, False, 0.05), (0.9, 0.1, 0., False, 0.05),
                          (0.9, 0., 5e-4, True, 0.05), (0.9, 0., 5e-4, True, None)])
def test_sgd_agc_matches_hand_written_steps(momentum, dampening, weight_decay, nesterov, clipping):
    torch.manual_seed(5)
    params = [torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True)]
    steps = [[torch.randn_like(p) * s for p in params] for s in (0.01, 1.0, 0.1)]
    want = ref_sgd_agc(params, steps, 0.1, momentum, dampening, weight_decay, nesterov, clipping, 1e-3)
    opt = SGD_AGC(params, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  nesterov=nesterov, clipping=clipping, eps=1e-3)
    for grads in steps:
        for p, g in zip(params, grads): p.grad = g.clone()
        opt.step()
    for p, w in zip(params, want): torch.testing.assert_close(p.detach(), w)


def test_sgd_agc_without_clipping_is_torch_sgd():
    torch.manual_seed(6)
    a = [torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    o1 = SGD_AGC(a, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True, clipping=None)
    o2 = torch.optim.SGD(b, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for _ in range(4):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g): p.grad, q.grad = gi.clone(), gi.clone()
        o1.step(); o2.step()
    for p, q in zip(a, b): torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match='Nesterov'): SGD_AGC(a, lr=0.1, nesterov=True)


class HandSGD_AGC(torch.optim.Optimizer):
    "`SGD_AGC` as it was before it became a subclass of `torch.optim.SGD`: its own loop, kept to prove the two equal."
    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, clipping=0.01, eps=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, clipping=clipping, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mom, damp, wd = group['momentum'], group['dampening'], group['weight_decay']
            if group['clipping'] is not None: adaptive_clip_grad(group['params'], group['clipping'], group['eps'])
            for p in group['params']:
                if p.grad is None: continue
                d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if mom != 0:
                    state = self.state[p]
                    if 'momentum_buffer' not in state: buf = state['momentum_buffer'] = d_p.clone()
                    else: buf = state['momentum_buffer'].mul_(mom).add_(d_p, alpha=1 - damp)
                    d_p = d_p.add(buf, alpha=mom) if group['nesterov'] else buf
                p.add_(d_p, alpha=-group['lr'])


class ClipThenSGD:
    "`adaptive_clip_grad` on the clipped groups, then `torch.optim.SGD`'s step: what `SGD_AGC` should be."
    def __init__(self, groups, clipping, eps, **kw):
        self.clip = [(g['params'], g.get('clipping', clipping)) for g in groups]
        self.eps, self.opt = eps, torch.optim.SGD(groups, **kw)
    def step(self):
        for params, clipping in self.clip:
            if clipping is not None: adaptive_clip_grad(params, clipping, self.eps)
        self.opt.step()


def _trajectory(make_opt, n_steps=30, seed=16):
    "Parameters after `n_steps` steps on fixed random gradients of widely different sizes; one parameter has none."
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (10, 8), (10,), (5,)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    with torch.no_grad(): params[3].zero_()                                  # a zero bias: eps sets its threshold
    opt = make_opt([{'params': params[:2]}, {'params': params[2:], 'clipping': None}])
    for i in range(n_steps):
        for p in params[:4]: p.grad = torch.randn(p.shape, generator=gen) * 10**(i % 4 - 2)
        opt.step()
    assert params[4].grad is None
    return params


@pytest.mark.parametrize('kw', [dict(momentum=0.), dict(momentum=0.9), dict(momentum=0.9, dampening=0.2),
                                dict(momentum=0.9, weight_decay=5e-4, nesterov=True), dict(weight_decay=1e-2)])
def test_sgd_agc_is_bit_for_bit_its_former_self_and_clipping_then_torch_sgd(kw):
    ours = _trajectory(lambda g: SGD_AGC(g, lr=0.1, clipping=0.02, eps=1e-3, **kw))
    before = _trajectory(lambda g: HandSGD_AGC(g, lr=0.1, clipping=0.02, eps=1e-3, **kw))
    torch_sgd = _trajectory(lambda g: ClipThenSGD(g, 0.02, 1e-3, lr=0.1, **kw))
    for a, b, c in zip(ours, before, torch_sgd):
        assert torch.equal(a, b) and torch.equal(a, c)
    plain = _trajectory(lambda g: torch.optim.SGD(g, lr=0.1, **kw))
    assert not torch.equal(ours[0], plain[0])                                 # the clipping did something


def test_sgd_agc_is_a_torch_sgd_with_clipping_in_every_group():
    w, b = torch.randn(3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = SGD_AGC([w], lr=0.1, momentum=0.9, clipping=0.05, eps=1e-2)
    assert isinstance(opt, torch.optim.SGD)
    opt.add_param_group({'params': [b], 'lr': 0.2})
    assert [(g['clipping'], g['eps'], g['lr']) for g in opt.param_groups] == [(0.05, 1e-2, 0.1), (0.05, 1e-2, 0.2)]
    for p in (w, b): p.grad = torch.ones_like(p)
    opt.step()
    opt2 = SGD_AGC([w], lr=0.1, momentum=0.9, clipping=0.05, eps=1e-2); opt2.add_param_group({'params': [b], 'lr': 0.2})
    opt2.load_state_dict(opt.state_dict())                                    # momentum buffers and the groups' settings
    assert torch.equal(opt2.state[w]['momentum_buffer'], opt.state[w]['momentum_buffer'])
    assert opt2.param_groups[1]['clipping'] == 0.05


def test_sgd_agc_param_group_without_clipping_and_closure():
    torch.manual_seed(7)
    w = torch.randn(3, 3, requires_grad=True); head = torch.randn(2, 3, requires_grad=True)
    opt = SGD_AGC([{'params': [w]}, {'params': [head], 'clipping': None}], lr=1., clipping=0.01)
    w0, h0 = w.detach().clone(), head.detach().clone()
    def closure():
        opt.zero_grad()
        loss = (w.sum() * 100 + head.sum() * 100)
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert loss is not None
    torch.testing.assert_close(head.detach(), h0 - 100.)          # unclipped group takes the raw step
    torch.testing.assert_close(unitwise_norm(w.detach() - w0), 0.01 * unitwise_norm(w0))   # clipped to 1% per row


@pytest.mark.parametrize('name', sorted(ACTIVATIONS))
def test_gamma_against_monte_carlo(name):
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(4_000_000, generator=gen, dtype=torch.float64)
    mc = 1 / ACTIVATIONS[name](z).std()
    assert abs(act_gamma(name) / float(mc) - 1) < 2e-3, (name, act_gamma(name), float(mc))
    y = ScaledAct(name)(z)
    assert abs(float(y.var()) - 1) < 4e-3


def test_gamma_closed_forms():
    assert act_gamma('relu') == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-7)
    assert act_gamma('identity') == pytest.approx(1.0, rel=1e-7)
    assert variance_gamma(lambda z: 3 * z + 1) == pytest.approx(1 / 3, rel=1e-7)
    with pytest.raises(KeyError, match='unknown activation'): act_gamma('swishy')


def test_stochastic_depth_matches_torchvision_row_mode():
    x = torch.randn(64, 3, 4, 4)
    sd = StochasticDepth(0.3)
    torch.manual_seed(9); got = sd(x)
    torch.manual_seed(9); want = torchvision.ops.stochastic_depth(x, 0.3, 'row', training=True)
    torch.testing.assert_close(got, want)
    kept = got.flatten(1).abs().sum(1) > 0
    torch.testing.assert_close(got[kept], x[kept] / 0.7)
    assert torch.equal(sd.eval()(x), x)


def test_nf_block_at_init_is_the_shortcut():
    torch.manual_seed(10)
    x = torch.randn(4, 8, 6, 6)
    blk = NFBlock(8, 8, beta=0.5)
    assert torch.equal(blk(x), x)                                   # skip gain 0: the identity
    tr = NFBlock(8, 16, stride=2, beta=0.5)
    want = tr.shortcut(ScaledAct('relu')(x * 0.5))
    torch.testing.assert_close(tr(x), want)
    assert tr(x).shape == (4, 16, 3, 3)


def test_nf_resnet_expected_variance_bookkeeping():
    m = NFResNet(widths=(8, 16), depths=(3, 2), alpha=0.2)
    a2 = 0.04
    torch.testing.assert_close(torch.tensor(m.expected_vars), torch.tensor([1 + a2, 1 + 2*a2, 1 + 3*a2, 1 + a2, 1 + 2*a2]))
    betas = [b.beta for b in m.blocks]
    torch.testing.assert_close(torch.tensor(betas), torch.tensor([1., (1 + a2)**-0.5, (1 + 2*a2)**-0.5, (1 + 3*a2)**-0.5,
                                                                  (1 + a2)**-0.5]))


def test_nf_blocks_track_the_predicted_variance():
    torch.manual_seed(11)
    m = NFResNet(widths=(64, 128), depths=(4, 3), alpha=0.5, skip_init=1.)
    x = torch.randn(64, 64, 16, 16)                                  # unit-variance input to the first block
    var = []
    with torch.no_grad():
        for blk in m.blocks:
            x = blk(x); var.append(float(x.var(dim=(0, 2, 3)).mean()))
    ratio = torch.tensor(var) / torch.tensor(m.expected_vars)
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), (var, m.expected_vars)


def test_nf_resnet_forward_backward_with_se_and_stochastic_depth():
    torch.manual_seed(12)
    m = NFResNet(se_ratio=0.25, stochdepth_rate=0.2)
    out = m(torch.randn(8, 1, 28, 28))
    assert out.shape == (8, 10)
    F.cross_entropy(out, torch.randint(0, 10, (8,))).backward()
    assert all(p.grad is not None for p in m.parameters())


class _GradSnapshot(Callback):
    "Copy every gradient right after the AGC callback has run (order 1 > AGC's 0)."
    order = 1
    def after_backward(self, learn): self.grads = {n: p.grad.clone() for n, p in learn.model.named_parameters()}


def _agc_run(clip_last: bool):
    torch.manual_seed(13)
    x, y = torch.randn(32, 6) * 3, torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ref_model = copy.deepcopy(model)
    snap, agc = _GradSnapshot(), AGC(clipping=0.001, clip_last=clip_last, track=True)
    dls = DataLoaders(TensorLoader(x, y, 32), TensorLoader(x, y, 32))
    TrainLearner(model, dls, F.cross_entropy, lr=0., cbs=[agc, snap]).fit(1, valid=False)
    F.cross_entropy(ref_model(x), y).backward()
    return snap, agc, ref_model


def test_agc_callback_clips_all_but_the_classifier():
    snap, agc, ref_model = _agc_run(clip_last=False)
    assert agc.names == ['0.weight', '0.bias']
    for name, p in ref_model.named_parameters():
        want = ref_agc(p.detach(), p.grad, 0.001, 1e-3).reshape(p.shape) if name.startswith('0.') else p.grad
        torch.testing.assert_close(snap.grads[name], want)
    assert not torch.equal(snap.grads['0.weight'], ref_model[0].weight.grad)   # something was clipped
    hist = agc.clip_history()
    assert hist.shape == (1, 2) and float(hist[0, 0]) == 1.0


def test_agc_callback_clip_last():
    snap, agc, ref_model = _agc_run(clip_last=True)
    assert agc.names == ['0.weight', '0.bias', '2.weight', '2.bias']
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(snap.grads[name], ref_agc(p.detach(), p.grad, 0.001, 1e-3).reshape(p.shape))
