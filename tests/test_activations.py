"""miniai.activations: hooks and their removal, ActivationStats and the course's helpers against direct computation."""
import matplotlib
matplotlib.use('Agg')

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miniai.memory
from miniai.activations import (ActivationStats, Hook, Hooks, HooksCallback, LayerStats, _batch_sums, _compact,
                                _rows_from_sums, append_stats, batch_stats, clean_ipython_hist, clean_mem, clean_tb,
                                get_hist, get_min, hist_items, is_leaf)
from miniai.datasets import DataLoaders, TensorLoader
from miniai.learner import Callback, CancelFitException, TrainLearner


def n_hooks(model): return sum(len(m._forward_hooks) for m in model.modules())


def model():
    return nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 1))


def dls(n=40, bs=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    return DataLoaders(TensorLoader(x, y, bs), TensorLoader(x[:8], y[:8], bs))


def test_hook_and_hooks_are_removed_by_with_blocks():
    m = model()
    with Hook(m[1], lambda h, mod, i, o: setattr(h, 'out', o)) as h:
        y = m(torch.randn(2, 4))
        assert torch.equal(h.out, y)
    with Hooks([m[0][0], m[1]], lambda h, mod, i, o: None) as hs:
        assert len(hs) == 2 and n_hooks(m) == 2
    assert n_hooks(m) == 0
    hs.remove()   # twice is fine


def test_leaf_modules_only_by_default():
    m = model()
    cb = HooksCallback(lambda *a: None)
    cb.before_fit(type('L', (), {'model': m})())
    assert [type(h.module) for h in cb.hooks] == [nn.Linear, nn.ReLU, nn.Linear] and all(is_leaf(h.module) for h in cb)
    cb.cleanup_fit(None)
    assert n_hooks(m) == 0


def test_hist_items_takes_the_fewest_items_with_enough_values():
    assert hist_items(torch.zeros(256, 8, 14, 14)) == 3      # 1568 values per image: 3 images give 4704 >= 4096
    assert hist_items(torch.zeros(256, 64, 2, 2)) == 16      # 256 per image: exactly 16
    assert hist_items(torch.zeros(256, 64, 2, 2), 4097) == 17
    assert hist_items(torch.zeros(4, 10)) == 410             # more than the batch: slicing then takes all 4
    assert hist_items(torch.zeros(0, 3)) == 4096             # an empty batch does not divide by zero


def test_batch_stats_against_direct_computation():
    a = torch.randn(32, 3, 5, 5)*2 + 0.5
    row = batch_stats(a, hist_values=1200)                 # 75 values per item: the first 16 items
    assert row.shape == (42,)
    torch.testing.assert_close(row[0], a.mean())
    torch.testing.assert_close(row[1], a.std(unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(row[2:], torch.histc(a[:16].abs(), 40, 0, 10))
    torch.testing.assert_close(batch_stats(a)[2:], torch.histc(a.abs(), 40, 0, 10))   # 4096 values: all 32 items
    b = a.permute(0, 2, 3, 1)                           # not contiguous: the flattening must copy, not misread
    torch.testing.assert_close(batch_stats(b)[:2], torch.stack([b.mean(), b.std(unbiased=False)]), rtol=1e-4, atol=1e-5)


def test_fast_path_rows_equal_batch_stats():
    # ActivationStats keeps two sums and a sample per batch and finishes them once per epoch; that must give the rows
    # `batch_stats` computes the plain way: different batch sizes, a non-contiguous tensor, a GeneralRelu-like shift,
    # values on the histogram's bin edges, at its top (10 is in the last bin) and beyond it
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        acts = [F.relu(conv(torch.rand(bs, 1, 28, 28, generator=g))) for bs in (64, 64, 17)]   # (B, 8, 14, 14)
        acts += [acts[0].permute(0, 2, 3, 1), F.leaky_relu(torch.randn(30, 16, 7, 7, generator=g), 0.1) - 0.4]
        acts += [torch.arange(-48, 48).float().view(6, 16) * 0.25]                      # -12 ... 11.75 in steps of 0.25
    for hist_values in (4096, 1000, 1):
        fast = _rows_from_sums([_batch_sums(a, hist_values) for a in acts])           # (6, 42)
        simple = torch.stack([batch_stats(a, hist_values) for a in acts])             # (6, 42)
        torch.testing.assert_close(fast, simple, rtol=1e-5, atol=1e-6)


def test_activation_stats_records_every_training_batch_on_the_hooked_layers():
    m = model()
    astats = ActivationStats(lambda mod: isinstance(mod, nn.ReLU))
    outs = []
    class Grab(Callback):
        def before_batch(self, learn):
            if learn.training:
                with torch.no_grad(): outs.append(F.relu(learn.model[0][0](learn.batch[0])))   # bypasses the hooked ReLU
    TrainLearner(m, dls(), F.mse_loss, lr=0.0, cbs=[Grab(), astats]).fit(2)   # lr 0: the weights stay as they were
    s = astats.stats()
    assert len(s) == 1 and len(s[0]['means']) == 10                # 5 batches x 2 epochs, validation not recorded
    torch.testing.assert_close(s[0]['means'], torch.stack([o.mean() for o in outs]))
    torch.testing.assert_close(s[0]['stds'], torch.stack([o.std(unbiased=False) for o in outs]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s[0]['hists'][3], torch.histc(outs[3].abs(), 40, 0, 10))   # 8 values an item: all


def test_activation_stats_memory_is_bounded():
    astats = ActivationStats(lambda mod: isinstance(mod, nn.ReLU), max_rows=8)
    astats.max_pending = 4
    class Pending(Callback):   # how many batches the hook keeps before turning them into rows
        order = 10
        def after_batch(self, learn): self.most = max(getattr(self, 'most', 0), len(astats.hooks[0].stats.pending))
    pending = Pending()
    TrainLearner(model(), dls(n=200, bs=8), F.mse_loss, lr=0.01, cbs=[astats, pending]).fit(3)   # 75 batches, 25 per epoch
    assert pending.most == 3
    assert len(astats.stats()[0]['means']) <= 8
    rows = torch.arange(10.).repeat(3, 1).T   # (10, 3)
    torch.testing.assert_close(_compact(rows)[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))
    torch.testing.assert_close(_compact(rows[:9])[-1], rows[8])


@pytest.mark.parametrize('how', ['exception', 'cancel', 'interrupt'])
def test_hooks_removed_however_fit_ends(how):
    class End(Callback):
        order = 5
        def after_batch(self, learn):
            if learn.iter == 1:
                raise {'exception': ValueError('bad'), 'cancel': CancelFitException(),
                       'interrupt': KeyboardInterrupt()}[how]
    m = model()
    astats = ActivationStats()
    learn = TrainLearner(m, dls(), F.mse_loss, lr=0.1, cbs=[astats])
    if how == 'cancel': learn.fit(1, cbs=[End()])
    else:
        with pytest.raises((ValueError, KeyboardInterrupt)): learn.fit(1, cbs=[End()])
    assert n_hooks(m) == 0 and learn.cbs == [astats]
    assert len(astats.stats()[0]['means']) == 2   # what was recorded before the end is kept


def test_plots_draw_real_axes():
    astats = ActivationStats()
    TrainLearner(model(), dls(), F.mse_loss, lr=0.1, cbs=[astats]).fit(1)
    assert len(astats.plot_stats()) == 2
    assert astats.color_dim().shape == (1, 3) and astats.dead_chart().shape == (1, 3)


def test_append_stats_get_hist_and_get_min_on_plain_hooks():
    # the course's helpers: `append_stats` as the hook function of plain `Hooks`, then `get_hist` and `get_min`
    # against each batch's `batch_stats` row and the course's formulas
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.ReLU())
    xs = [torch.randn(bs, 1, 12, 12, generator=g) * s for bs, s in ((16, 1.), (16, 3.), (5, 0.2))]
    with Hooks([m[1], m[3]], append_stats) as hooks, torch.no_grad():
        for x in xs: m(x)
    with torch.no_grad(): want = [[batch_stats(m[:i+2](x)) for x in xs] for i in (0, 2)]   # (42,) per batch, layer
    for h, rows in zip(hooks, want):
        rows = torch.stack(rows)                                                    # (3, 42)
        assert isinstance(h.stats, LayerStats) and len(h.stats.pending) == 3       # not binned until read
        torch.testing.assert_close(h.stats.means, rows[:, 0], rtol=1e-5, atol=1e-6)
        assert h.stats.pending == []
        torch.testing.assert_close(h.stats.stds, rows[:, 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(get_hist(h), torch.stack([r[2:] for r in rows]).T.log1p())   # (40, 3)
        hists = torch.stack([r[2:] for r in rows]).T                                             # (40, 3)
        torch.testing.assert_close(get_min(h), hists[0] / hists.sum(0))
    assert get_hist(hooks[0]).shape == (40, 3) and get_min(hooks[0]).shape == (3,)
    with pytest.raises(ValueError, match='hook on Conv2d has no statistics'):
        get_hist(Hook(m[0], lambda *a: None))


def test_get_min_of_an_empty_histogram_is_zero():
    h = Hook(nn.Identity(), append_stats)
    h.module(torch.full((4, 3), 20.))                       # every value beyond the histogram's range
    h.remove()
    assert h.stats.hists.sum() == 0 and get_min(h).tolist() == [0.]


def test_activation_stats_records_what_append_stats_records():
    # the callback is `append_stats` on hooks managed by the learner: the same rows, and its plots read them with
    # `get_hist` and `get_min`
    torch.manual_seed(0)
    m = model()
    astats = ActivationStats(lambda mod: isinstance(mod, nn.ReLU))
    TrainLearner(m, dls(), F.mse_loss, lr=0.0, cbs=[astats]).fit(1)
    with Hooks([m[0][1]], append_stats) as hooks, torch.no_grad():
        for xb, _ in dls().train: m(xb)
    (h,) = astats.hooks
    assert isinstance(h.stats, LayerStats) and h.stats.max_pending == 256
    hooks[0].stats.flush()
    assert len(h.stats.rows) == 5 and torch.equal(h.stats.rows, hooks[0].stats.rows)
    assert torch.equal(astats.stats()[0]['hists'], hooks[0].stats.hists)
    assert torch.equal(get_min(h), get_min(hooks[0]))
    assert 'in_lr_find' not in vars(HooksCallback) and 'in_lr_find' not in vars(ActivationStats)


def test_memory_helpers_are_still_importable_from_activations():
    assert (clean_mem, clean_tb, clean_ipython_hist) == (miniai.memory.clean_mem, miniai.memory.clean_tb,
                                                         miniai.memory.clean_ipython_hist)
