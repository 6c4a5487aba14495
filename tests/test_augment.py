"""miniai.augment: batch transforms (shapes, dtype, identity at strength 0, seeding, against direct formulas),
capture_preds against a plain loop, test-time augmentation against a hand-made average."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.augment import (CapturePreds, RandCopy, RandErase, accuracy, capture_preds, hflip, rand_copy, rand_crop,
                            rand_erase, rand_flip, rand_translate, show_image_batch, tfm_batch, tta_preds)
from miniai.callbacks import BatchTransformCB, DeviceCB, MetricsCB
from miniai.datasets import DataLoaders, TensorLoader
from miniai.learner import Learner, MomentumLearner, TrainLearner

ALL = {'rand_flip': rand_flip, 'rand_translate': rand_translate, 'rand_crop': rand_crop,
       'rand_erase': rand_erase, 'rand_copy': rand_copy}
ZERO = {'rand_flip': partial(rand_flip, p=0.), 'rand_translate': partial(rand_translate, pad=0),
        'rand_crop': partial(rand_crop, pad=0), 'rand_erase': partial(rand_erase, pct=0.),
        'rand_copy': partial(rand_copy, max_num=0)}


def batch(b=16, c=1, h=28, w=28, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', ALL)
@pytest.mark.parametrize('shape', [(16, 1, 28, 28), (5, 3, 12, 20)])
def test_shape_dtype_and_input_untouched(name, shape):
    x = batch(*shape)
    x0 = x.clone()
    for dtype in (torch.float32, torch.float64):
        y = ALL[name](x.to(dtype))
        assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(x, x0)   # the transforms return a new batch


@pytest.mark.parametrize('name', ALL)
def test_identity_at_strength_zero(name):
    x = batch()
    assert torch.equal(ZERO[name](x), x)


@pytest.mark.parametrize('name', ALL)
def test_same_seed_same_batch_and_another_seed_another(name):
    x = batch(b=64)
    torch.manual_seed(3); a = ALL[name](x)
    torch.manual_seed(3); b = ALL[name](x)
    torch.manual_seed(4); c = ALL[name](x)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


@pytest.mark.parametrize('name', ALL)
def test_refuses_what_is_not_a_float_image_batch(name):
    with pytest.raises(ValueError, match=f'{name} expects a float batch of shape \\(B, C, H, W\\)'):
        ALL[name](torch.zeros(4, 28, 28))
    with pytest.raises(ValueError, match=name):
        ALL[name](torch.zeros(4, 1, 28, 28, dtype=torch.uint8))


def test_flip_each_image_is_itself_or_its_mirror_and_p_one_flips_all():
    x = batch(b=200)
    torch.manual_seed(0); y = rand_flip(x)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 60 < mirrored.sum() < 140
    assert torch.equal(rand_flip(x, p=1.), hflip(x)) and torch.equal(hflip(x), x[..., torch.arange(27, -1, -1)])


def shift_reference(img, dy, dx):
    "img (C, H, W) moved down by dy and right by dx, edge pixels repeated, by a loop over pixels."
    C, H, W = img.shape
    out = torch.empty_like(img)
    for i in range(H):
        for j in range(W): out[:, i, j] = img[:, min(max(i - dy, 0), H - 1), min(max(j - dx, 0), W - 1)]
    return out


def test_translate_is_a_shift_with_edges_repeated():
    x = batch(b=6, c=2, h=9, w=11)
    torch.manual_seed(1); y = rand_translate(x, pad=3)
    torch.manual_seed(1); dy, dx = torch.randint(-3, 4, (2, 6, 1, 1))   # the draws rand_translate makes
    for k in range(6):
        torch.testing.assert_close(y[k], shift_reference(x[k], int(dy[k]), int(dx[k])), rtol=0, atol=0)


def test_crop_is_a_window_of_the_padded_image():
    x = batch(b=6, c=2, h=9, w=11)
    torch.manual_seed(1); y = rand_crop(x, pad=2)
    torch.manual_seed(1); oy, ox = torch.randint(0, 5, (2, 6, 1, 1))
    for k in range(6):
        padded = F.pad(x[k:k+1], (2, 2, 2, 2), value=float(x[k].min()))[0]     # (C, H+4, W+4)
        want = padded[:, int(oy[k]):int(oy[k]) + 9, int(ox[k]):int(ox[k]) + 11]
        assert torch.equal(y[k], want)


def test_erase_changes_only_squares_of_the_right_size_within_the_batch_range():
    x = batch(b=300)
    torch.manual_seed(0); y = rand_erase(x, pct=0.25, max_num=1)     # at most one 7x7 square per image
    changed = (y != x).any(1)                                          # (B, H, W)
    n = changed.flatten(1).sum(1)
    assert set(n.tolist()) <= set(range(0, 50)) and (n == 0).any() and (n >= 45).any()
    for k in torch.nonzero(n)[:, 0]:
        rows, cols = torch.nonzero(changed[k], as_tuple=True)
        assert rows.max() - rows.min() < 7 and cols.max() - cols.min() < 7
    assert y.min() >= x.min() and y.max() <= x.max()
    assert RandErase(0.25, 1)(x).shape == x.shape and 'pct=0.25' in repr(RandErase(0.25, 1))


def test_copy_pastes_a_patch_of_the_same_image():
    x = torch.arange(2*1*10*10, dtype=torch.float32).reshape(2, 1, 10, 10)   # every pixel value unique
    torch.manual_seed(0)
    for _ in range(20):
        y = rand_copy(x, pct=0.3, max_num=1)
        for k in range(2):
            changed = y[k] != x[k]
            if changed.any():   # the new values are a 3x3 block of the same image, in the same arrangement
                rows, cols = torch.nonzero(changed[0], as_tuple=True)
                r0, c0 = int(rows.min()), int(cols.min())
                src = y[k, 0, r0:r0+3, c0:c0+3]
                assert ((src // 100) == k).all() and (torch.diff(src, dim=1) == 1).all()
                assert (torch.diff(src, dim=0) == 10).all()
    assert RandCopy(0.3, 2)(x).shape == x.shape


def test_tfm_batch_transforms_inputs_and_targets():
    x, y = batch(b=3), torch.tensor([1, 2, 3])
    bx, by = tfm_batch((x, y), hflip)
    assert torch.equal(bx, x.flip(-1)) and by is y
    assert tfm_batch((x, y), tfm_y=lambda t: t + 1)[1].tolist() == [2, 3, 4]


# -- learner helpers ---------------------------------------------------------------------------------------------
def image_dls(n_train=48, n_valid=20, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, 1, 6, 6, generator=g), torch.randint(0, 3, (n_train + n_valid,), generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], bs, shuffle=True), TensorLoader(x[n_train:], y[n_train:], bs))


def image_learner(cbs=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4*36, 3))
    learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB(), *cbs])
    learn.logger = None
    learn.fit(1)
    return learn


def plain_preds(learn, tfm=None):
    learn.model.eval()
    with torch.no_grad():
        out = [(learn.model(tfm(x) if tfm else x), y) for x, y in learn.dls.valid]
    return torch.cat([p for p, _ in out]), torch.cat([y for _, y in out])


def test_capture_preds_matches_a_plain_loop_and_leaves_the_model_and_metrics_alone():
    metrics = MetricsCB()
    learn = image_learner([metrics])
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    n_rows = len(metrics.history)
    preds, targs = capture_preds(learn)
    want_p, want_t = plain_preds(learn)
    torch.testing.assert_close(preds, want_p)
    assert torch.equal(targs, want_t) and len(metrics.history) == n_rows
    assert all(torch.equal(v, state[k]) for k, v in learn.model.state_dict().items())
    p2, t2, inps = learn.capture_preds(inps=True)                       # the course's spelling
    torch.testing.assert_close(p2, want_p)
    assert torch.equal(inps, torch.cat([x for x, _ in learn.dls.valid]))


def test_capture_preds_sees_the_batch_transforms():
    learn = image_learner()
    preds, _ = capture_preds(learn, cbs=BatchTransformCB(partial(tfm_batch, tfm_x=hflip), on_train=False))
    torch.testing.assert_close(preds, plain_preds(learn, hflip)[0])


def test_capture_preds_callback_after_training():
    cp = CapturePreds()
    learn = image_learner([cp])
    assert cp.all_preds.shape == (20, 3) and cp.all_targs.shape == (20,)   # the last phase: validation, 20 items


def test_tta_is_the_mean_of_plain_and_flipped_predictions():
    learn = image_learner()
    preds, targs = tta_preds(learn)
    want = (plain_preds(learn)[0] + plain_preds(learn, hflip)[0]) / 2
    torch.testing.assert_close(preds, want)
    assert accuracy(preds, targs) == pytest.approx((want.argmax(1) == targs).float().mean().item())


def test_accuracy_by_hand():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(preds, torch.tensor([1, 0, 0, 0])) == 0.75


def test_show_image_batch_shows_the_transformed_batch_without_training(monkeypatch):
    import miniai.augment as aug
    shown = []
    monkeypatch.setattr(aug, 'show_images', lambda ims, **kw: shown.append(ims))
    learn = image_learner([BatchTransformCB(partial(tfm_batch, tfm_x=lambda x: x * 0 + 7.), on_val=False)])
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    xb = show_image_batch(learn, max_n=4)
    assert xb.shape == (4, 1, 6, 6) and (xb == 7.).all() and (shown[0] == 7.).all()
    assert all(torch.equal(v, state[k]) for k, v in learn.model.state_dict().items())
