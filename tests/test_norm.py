"""miniai.norm: our BatchNorm against nn.BatchNorm1d/2d/3d, our LayerNorm against the formula and nn.LayerNorm."""
import pytest
import torch
from torch import nn

from miniai.norm import BatchNorm, LayerNorm


def _pair(nf, ref_cls=nn.BatchNorm2d, mom=0.1, eps=1e-5, seed=0):
    "Our BatchNorm and a PyTorch one with the same random affine parameters."
    torch.manual_seed(seed)
    ours, ref = BatchNorm(nf, mom=mom, eps=eps), ref_cls(nf, momentum=mom, eps=eps)
    with torch.no_grad():
        ours.mults.uniform_(0.5, 1.5); ours.adds.normal_()
        ref.weight.copy_(ours.mults); ref.bias.copy_(ours.adds)
    return ours, ref


def _step(ours, ref, x, atol=1e-5):
    "One forward/backward through both with the same input and upstream gradient; compare everything."
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.zero_grad(); ref.zero_grad()
    ya, yr = ours(xa), ref(xr)
    g = torch.randn_like(ya)
    (ya * g).sum().backward(); (yr * g).sum().backward()
    torch.testing.assert_close(ya, yr, atol=atol, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xr.grad, atol=atol, rtol=1e-4)
    torch.testing.assert_close(ours.mults.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.adds.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)


def test_batchnorm_train_mode_matches_torch_over_several_steps():
    ours, ref = _pair(6)
    shift, scale = torch.randn(1, 6, 1, 1) * 3, torch.rand(1, 6, 1, 1) * 4 + 0.5
    for _ in range(6):
        _step(ours, ref, torch.randn(16, 6, 9, 9) * scale + shift)
        torch.testing.assert_close(ours.means, ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.vars, ref.running_var, atol=1e-5, rtol=1e-5)
    # the running statistics really moved towards the data (so the comparison above is not of two untouched buffers)
    assert (ours.means - shift.flatten()).abs().max() < 0.6 * shift.abs().max()
    assert (ours.vars - 1).abs().max() > 1


def test_batchnorm_eval_mode_uses_running_stats_like_torch():
    ours, ref = _pair(5)
    for _ in range(4): _step(ours, ref, torch.randn(8, 5, 7, 7) * 2 + 1)
    ours.eval(); ref.eval()
    means, vars_ = ours.means.clone(), ours.vars.clone()
    x = torch.randn(3, 5, 7, 7) * 2 + 1
    _step(ours, ref, x)
    # eval mode: the formula with the running statistics, and the buffers are left alone
    want = (x - means.view(1, 5, 1, 1)) / (vars_.view(1, 5, 1, 1) + 1e-5).sqrt() * ours.mults.view(1, 5, 1, 1) \
        + ours.adds.view(1, 5, 1, 1)
    torch.testing.assert_close(ours(x), want.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.means, means) and torch.equal(ours.vars, vars_)


def test_batchnorm_stores_unbiased_but_normalises_with_biased_variance():
    bn = BatchNorm(3, mom=1.0)                      # mom 1: running stats = this batch's
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    y = bn(x)
    torch.testing.assert_close(bn.vars, x.var((0, 2, 3), correction=1))
    torch.testing.assert_close(bn.means, x.mean((0, 2, 3)))
    v = y.var((0, 2, 3), correction=0)
    torch.testing.assert_close(v, 1 / (1 + 1e-5 / x.var((0, 2, 3), correction=0)), atol=1e-5, rtol=0)


@pytest.mark.parametrize('mom', [0.01, 0.3, 0.9])
def test_batchnorm_momentum_convention_matches_torch(mom):
    ours, ref = _pair(4, mom=mom)
    for _ in range(3): _step(ours, ref, torch.randn(10, 4, 3, 3) * 2 - 1)
    torch.testing.assert_close(ours.means, ref.running_mean)
    torch.testing.assert_close(ours.vars, ref.running_var)


@pytest.mark.parametrize('ref_cls,shape', [(nn.BatchNorm1d, (32, 4)), (nn.BatchNorm1d, (8, 4, 11)),
                                           (nn.BatchNorm3d, (4, 4, 3, 5, 5))])
def test_batchnorm_other_ranks_match_torch(ref_cls, shape):
    ours, ref = _pair(4, ref_cls)
    for _ in range(3): _step(ours, ref, torch.randn(shape) * 2 + 0.5)
    torch.testing.assert_close(ours.vars, ref.running_var)
    ours.eval(); ref.eval()
    _step(ours, ref, torch.randn(shape))


def test_batchnorm_gradient_ignores_per_channel_shift_and_scale():
    "With the statistics in the graph, dL/dx is orthogonal to a per-channel constant and to xhat."
    bn = BatchNorm(3)
    x = (torch.randn(8, 3, 6, 6) * 2 + 1).requires_grad_()
    (bn(x) * torch.randn(8, 3, 6, 6)).sum().backward()
    xhat = (x - x.mean((0, 2, 3), keepdim=True)) / x.var((0, 2, 3), correction=0, keepdim=True).sqrt()
    assert x.grad.sum((0, 2, 3)).abs().max() < 1e-4
    assert (x.grad * xhat).sum((0, 2, 3)).abs().max() < 1e-3


def test_batchnorm_eps():
    # a constant channel: the output is beta, finite, with finite gradients
    bn = BatchNorm(2, eps=1e-5)
    x = torch.full((4, 2, 3, 3), 7.).requires_grad_()
    y = bn(x)
    torch.testing.assert_close(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # a large eps is added to the variance inside the square root, as in PyTorch
    for eps in (1e-3, 10.):
        ours, ref = _pair(3, eps=eps)
        for _ in range(2): _step(ours, ref, torch.randn(6, 3, 4, 4) * 0.5)
        ours.eval(); ref.eval()
        _step(ours, ref, torch.randn(6, 3, 4, 4))


def test_batchnorm_buffers_and_errors():
    bn = BatchNorm(5)
    assert {n for n, _ in bn.named_parameters()} == {'mults', 'adds'}
    assert set(bn.state_dict()) == {'mults', 'adds', 'means', 'vars'}
    assert bn.to(torch.float64).vars.dtype == torch.float64
    with pytest.raises(ValueError, match=r'BatchNorm\(5\).*\(2, 4, 3, 3\)'): bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match='more than one value'): bn.train()(torch.randn(1, 5, 1, 1))
    bn.eval()(torch.randn(1, 5, 1, 1))              # a single value per channel is fine in eval mode


def _ln_formula(x, mult, add, eps=1e-5):
    "Layer norm written out item by item with the biased variance."
    out = []
    for xi in x:
        m = xi.sum() / xi.numel()
        v = ((xi - m)**2).sum() / xi.numel()
        out.append((xi - m) / torch.sqrt(v + eps) * mult + add)
    return torch.stack(out)


@pytest.mark.parametrize('shape', [(6, 8, 5, 5), (4, 10), (3, 2, 7)])
def test_layernorm_matches_formula_forward_and_backward(shape):
    torch.manual_seed(0)
    ln = LayerNorm(shape[1]).double()
    with torch.no_grad(): ln.mult.fill_(1.7); ln.add.fill_(-0.4)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    mult = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    add = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    y, want = ln(x), _ln_formula(x2, mult, add)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    (y * g).sum().backward(); (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ln.mult.grad, mult.grad)
    torch.testing.assert_close(ln.add.grad, add.grad)


def test_layernorm_matches_nn_layernorm_with_scalar_affine():
    torch.manual_seed(1)
    ln = LayerNorm(8)
    with torch.no_grad(): ln.mult.fill_(0.8); ln.add.fill_(0.25)
    x = torch.randn(5, 8, 6, 6) * 4 - 1
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    mult, add = torch.tensor(0.8, requires_grad=True), torch.tensor(0.25, requires_grad=True)
    ya = ln(xa)
    yr = nn.LayerNorm([8, 6, 6], elementwise_affine=False)(xr) * mult + add
    torch.testing.assert_close(ya, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward(); (yr * g).sum().backward()
    torch.testing.assert_close(xa.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ln.mult.grad, mult.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ln.add.grad, add.grad, atol=1e-4, rtol=1e-5)


def test_layernorm_is_per_item_and_the_same_in_eval():
    ln = LayerNorm(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ln(x)[1:2], ln(x[1:2]))
    torch.testing.assert_close(ln.eval()(x), ln.train()(x))
    assert [tuple(p.shape) for p in ln.parameters()] == [(), ()]


def test_layernorm_eps():
    for eps in (1e-5, 0.5, 10.):
        ln = LayerNorm(None, eps=eps)
        x = torch.randn(3, 4, 2, 2) * 0.3
        torch.testing.assert_close(ln(x), nn.LayerNorm([4, 2, 2], eps=eps, elementwise_affine=False)(x),
                                   atol=1e-5, rtol=1e-5)
    # a constant item: output is the shift, finite, with finite gradients
    x = torch.full((2, 3, 4, 4), -2.).requires_grad_()
    y = LayerNorm(3)(x)
    torch.testing.assert_close(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match='LayerNorm'): LayerNorm(3)(torch.randn(5))
