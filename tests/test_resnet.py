"""miniai.resnet: ResBlock shapes, gradients and norms, zero_last_norm, and summary against hand counts."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.datasets import DataLoaders, TensorLoader
from miniai.init import GeneralRelu
from miniai.learner import TrainLearner
from miniai.norm import BatchNorm
from miniai.resnet import ResBlock, act_gr, summary, zero_last_norm


def test_act_gr_is_the_lessons_general_relu():
    a = act_gr()
    assert isinstance(a, GeneralRelu) and (a.leak, a.sub, a.maxv) == (0.1, 0.4, None)


@pytest.mark.parametrize('ni,nf,stride,size,want', [(8, 8, 1, 28, 28), (8, 16, 1, 28, 28), (8, 16, 2, 28, 14),
                                                    (8, 16, 2, 7, 4), (8, 8, 2, 7, 4), (4, 4, 3, 7, 3),
                                                    (4, 6, 3, 10, 4)])
def test_shapes_including_strides_that_do_not_divide_the_input(ni, nf, stride, size, want):
    block = ResBlock(ni, nf, stride=stride, norm=nn.BatchNorm2d)
    assert block(torch.randn(2, ni, size, size)).shape == (2, nf, want, want)
    assert isinstance(block.idconv, nn.Identity) == (ni == nf) and isinstance(block.pool, nn.Identity) == (stride == 1)


def test_an_even_kernel_size_is_an_error_naming_the_shapes():
    with pytest.raises(ValueError, match=r'ResBlock\(4, 8, stride=2, ks=2\) on input \(2, 4, 28, 28\): the '
                                         r'convolutions give \(2, 8, 16, 16\) but the shortcut gives \(2, 8, 14, 14\)'):
        ResBlock(4, 8, stride=2, ks=2)(torch.randn(2, 4, 28, 28))


def reference_forward(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    "The block written out with functional calls on its own weights (batch norm in training mode)."
    c1, bn1 = block.convs[0][0], block.convs[0][1]
    c2, bn2 = block.convs[1][0], block.convs[1][1]
    bn = lambda m, h: F.batch_norm(h, None, None, m.weight, m.bias, training=True)
    act = lambda h: F.leaky_relu(h, 0.1) - 0.4
    h = act(bn(bn1, F.conv2d(x, c1.weight, stride=block.stride, padding=1)))
    h = bn(bn2, F.conv2d(h, c2.weight, padding=1))
    s = F.avg_pool2d(x, block.stride, ceil_mode=True) if block.stride > 1 else x
    if block.ni != block.nf: s = bn(block.idconv[1], F.conv2d(s, block.idconv[0].weight))
    return act(h + s)


@pytest.mark.parametrize('ni,nf,stride', [(6, 6, 1), (6, 10, 2), (6, 6, 2)])
def test_forward_and_gradients_match_the_written_out_block(ni, nf, stride):
    torch.manual_seed(0)
    block = ResBlock(ni, nf, stride=stride, norm=nn.BatchNorm2d)
    for m in block.modules():                                   # non-trivial norm scales and shifts
        if isinstance(m, nn.BatchNorm2d): nn.init.uniform_(m.weight, 0.5, 1.5); nn.init.uniform_(m.bias, -0.5, 0.5)
    x1 = torch.randn(4, ni, 9, 9, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(4, nf, -(-9 // stride), -(-9 // stride))    # an arbitrary upstream gradient
    y1, y2 = block(x1), reference_forward(block, x2)
    assert torch.allclose(y1, y2, atol=1e-5)
    params = list(block.parameters())
    g1 = torch.autograd.grad((y1 * g).sum(), [x1] + params)
    g2 = torch.autograd.grad((y2 * g).sum(), [x2] + params)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize('norm', [None, nn.BatchNorm2d])
def test_gradcheck_in_double_precision(norm):
    torch.manual_seed(0)
    block = ResBlock(3, 5, stride=2, norm=norm).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('norm,norm_type', [(nn.BatchNorm2d, nn.BatchNorm2d), (BatchNorm, BatchNorm),
                                            (partial(nn.GroupNorm, 2), nn.GroupNorm)])
@pytest.mark.parametrize('ni,nf,stride', [(4, 4, 1), (4, 8, 2)])
def test_norm_reaches_every_conv(norm, norm_type, ni, nf, stride):
    block = ResBlock(ni, nf, stride=stride, norm=norm)
    seqs = [m for m in block.modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d)]
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(seqs) == len(convs) == (2 if ni == nf else 3)
    assert all(isinstance(s[1], norm_type) for s in seqs)
    if norm_type is nn.BatchNorm2d: assert all(c.bias is None for c in convs)   # conv leaves out a bias BatchNorm removes
    plain = ResBlock(ni, nf, stride=stride, norm=None)
    assert not any(isinstance(m, norm_type) for m in plain.modules())
    assert all(c.bias is not None for c in plain.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize('norm', [nn.BatchNorm2d, BatchNorm])
def test_zero_last_norm_makes_each_block_start_as_its_shortcut(norm):
    torch.manual_seed(0)
    model = nn.Sequential(ResBlock(4, 4, norm=norm), ResBlock(4, 8, stride=2, norm=norm))
    assert zero_last_norm(model) is model
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    h = model[0](x)
    assert torch.equal(h, act_gr()(x))                          # identity shortcut: the block is just act(x)
    assert torch.equal(model[1](h), model[1].act(model[1].idconv(model[1].pool(h))))
    h.sum().backward()
    want = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.1))   # the gradient flows through the shortcut
    assert torch.allclose(x.grad, want)


def test_zero_last_norm_needs_a_norm():
    with pytest.raises(ValueError, match=r"ResBlock '1' has no norm with a scale .*norm=None"):
        zero_last_norm(nn.Sequential(ResBlock(2, 2, norm=nn.BatchNorm2d), ResBlock(2, 2)))
    with pytest.raises(ValueError, match='contains no ResBlock'): zero_last_norm(nn.Linear(2, 2))


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         ResBlock(4, 8, stride=2, norm=nn.BatchNorm2d), nn.Flatten(), nn.Linear(8*7*7, 10))


def test_summary_matches_hand_counts():
    s = summary(small_model(), torch.randn(5, 1, 28, 28))
    conv_macs = 4*14*14 * 1*9                                   # 4 channels of 14x14 outputs, each 1x3x3 products
    block_macs = 8*7*7 * 4*9 + 8*7*7 * 8*9 + 8*7*7 * 4          # conv 4->8 (stride 2), conv 8->8, 1x1 shortcut 4->8
    block_params = (4*8*9 + 2*8) + (8*8*9 + 2*8) + (4*8 + 2*8)  # three bias-free convs, each with a BatchNorm
    want = [('Conv2d', (4, 14, 14), 4*9 + 4, conv_macs), ('BatchNorm2d', (4, 14, 14), 8, 0), ('ReLU', (4, 14, 14), 0, 0),
            ('ResBlock', (8, 7, 7), block_params, block_macs), ('Flatten', (392,), 0, 0),
            ('Linear', (10,), 392*10 + 10, 392*10)]
    assert [(r.kind, r.out_shape, r.params, r.macs) for r in s.rows] == want
    assert s.params == sum(p.numel() for p in small_model().parameters()) and s.macs == sum(w[3] for w in want)
    assert s.in_shape == (1, 28, 28)
    text, md = repr(s), s._repr_markdown_()
    assert f"{s.macs:,}" in text and f"| total |  |  | {s.params:,} | {s.macs:,} |" in md
    assert len(md.splitlines()) == 2 + 2 + len(want) + 1


def test_summary_of_a_learner_leaves_the_model_as_it_was():
    model = small_model().train()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    learn = TrainLearner(model, DataLoaders(TensorLoader(x, y, 8), TensorLoader(x, y, 4)), F.cross_entropy, lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = summary(learn)                                          # the first validation batch
    assert s.in_shape == (1, 28, 28) and s.rows[-1].out_shape == (10,)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # BN stats too
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_summary_names_the_layer_that_fails_and_removes_its_hooks():
    model = small_model()
    with pytest.raises(RuntimeError) as e: summary(model, torch.randn(2, 1, 32, 32))   # 32x32 does not fit the Linear
    assert "summary: the forward pass failed in layer '5' on an input of shape (512,) per item" in e.value.__notes__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match='needs an input batch'): summary(model)
