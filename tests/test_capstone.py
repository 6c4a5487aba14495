"""miniai.capstone: the held-out split, the model, the EMA of weights against its formula, channels-last against the
default layout, TTACB against tta_preds, and a recipe's callbacks."""
import torch
import torch.nn.functional as F
from torch import nn

from miniai.augment import TTACB, hflip, tta_preds
from miniai.callbacks import BatchTransformCB, DeviceCB, MetricsCB
from miniai.capstone import BUDGETS, ChannelsLastCB, EMACB, Recipe, capstone_resnet, holdout_dls, run_recipe
from miniai.datasets import DataLoaders, TensorLoader
from miniai.learner import TrainLearner
from miniai.accel import MixedPrecision


def test_holdout_split_is_disjoint_fixed_and_uses_training_images_only():
    a, b = holdout_dls(64, smoke=False), holdout_dls(64, smoke=False)
    assert len(a.train.x) == 50_000 and len(a.valid.x) == 10_000
    assert torch.equal(a.valid.x, b.valid.x) and not torch.equal(a.valid.x, holdout_dls(64, seed=1, smoke=False).valid.x)
    t = holdout_dls(64, test=True, smoke=False)
    assert len(t.train.x) == 60_000 and len(t.valid.x) == 10_000 and t.train.mean == a.train.mean
    s = holdout_dls(64, smoke=True)
    assert (len(s.train.x), len(s.valid.x)) == (2048, 512)


def test_holdout_indices_partition_the_training_set():
    a = holdout_dls(64, smoke=False)
    assert torch.equal(torch.sort(torch.cat([a.train.y, a.valid.y])).values,
                       torch.sort(holdout_dls(64, test=True, smoke=False).train.y).values)


def test_capstone_resnet_shapes():
    m = capstone_resnet((8, 16, 32), stem=8)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert capstone_resnet((8, 16), stem=4, stem_stride=1, extra=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def image_dls(n_train=64, n_valid=24, bs=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + n_valid, 1, 28, 28, generator=g), torch.randint(0, 10, (n_train + n_valid,), generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs), TensorLoader(x[n_train:], y[n_train:], bs))


def test_ema_follows_its_formula_and_the_model_ends_with_the_average():
    torch.manual_seed(0)
    model = capstone_resnet((4, 8), stem=4)
    init = [t.detach().clone() for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]]
    snapshots = []
    class Snap(DeviceCB):
        order = 10
        def after_step(self, learn):
            snapshots.append([t.detach().clone() for t in [*learn.model.parameters(),
                              *(b for b in learn.model.buffers() if b.is_floating_point())]])
    ema = EMACB(0.9)
    learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.05, cbs=[DeviceCB(), ema, Snap()])
    learn.logger = None
    learn.fit(2)
    want = init
    for n, snap in enumerate(snapshots, start=1):
        d = min(0.9, (1 + n) / (10 + n))
        want = [d * w + (1 - d) * s for w, s in zip(want, snap)]
    got = [t.detach() for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]]
    for g, w in zip(got, want): torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_same_training():
    runs = []
    for cbs in ([], [ChannelsLastCB()]):
        torch.manual_seed(0)
        model = capstone_resnet((4, 8), stem=4)
        learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.05, cbs=[DeviceCB(), *cbs])
        learn.logger = None
        learn.fit(1)
        runs.append(model)
    assert runs[1][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ttacb_metrics_equal_tta_preds_accuracy():
    torch.manual_seed(0)
    model = capstone_resnet((4, 8), stem=4)
    learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.05, cbs=[DeviceCB()])
    learn.logger = None
    learn.fit(1)
    preds, targs = tta_preds(learn)
    from miniai.augment import capture_preds
    got, _ = capture_preds(learn, cbs=TTACB())
    torch.testing.assert_close(got, preds)
    plain, _ = capture_preds(learn)
    class Early(DeviceCB):   # pretend the fit has a later epoch: TTACB leaves this one alone
        def before_epoch(self, learn): learn.n_epochs = 2
    early, _ = capture_preds(learn, cbs=[Early(), TTACB()])
    torch.testing.assert_close(early, plain)


def test_recipe_callbacks_and_budgets():
    r = Recipe('x', flip=True, shift=2, ema=0.99, tta=True, channels_last=True, bf16=True, label_smoothing=0.1)
    kinds = [type(cb) for cb in r.cbs()]
    assert kinds == [BatchTransformCB, EMACB, TTACB, ChannelsLastCB, MixedPrecision]
    assert Recipe('y').cbs() == [] and Recipe('y').loss_func() is F.cross_entropy
    assert r.loss_func().keywords == {'label_smoothing': 0.1}
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(Recipe('z').augment(x), x) and r.augment(x).shape == x.shape
    assert set(BUDGETS) == {'5min', '20min'}


def test_run_recipe_gives_a_results_row():
    dls = image_dls()
    row = run_recipe(Recipe('tiny', epochs=2, nfs=(4, 8), stem=4, flip=True, tta=True), dls, seeds=(0, 1), quiet=True)
    assert row['technique'] == 'tiny' and row['seeds'] == [0, 1] and len(row['accuracies']) == 2 and row['epochs'] == 2
