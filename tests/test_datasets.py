"""miniai.datasets: the IDX reader against the real files and damaged copies, the cache, the loaders."""
import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from miniai import datasets as mds
from miniai.datasets import (FASHION_CLASSES, IDXError, DataLoaders, TensorLoader, collate_dict, fashion_dls,
                             fashion_mnist_arrays, find_source, inplace, load_fashion_mnist, read_idx)

SRC = find_source()
needs_data = pytest.mark.skipif(SRC is None, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _write_idx(path: Path, arr: np.ndarray, code: int = 0x08) -> Path:
    header = bytes([0, 0, code, arr.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if path.suffix == '.gz':
        with gzip.open(path, 'wb') as f: f.write(data)
    else: path.write_bytes(data)
    return path


def _fake_source(d: Path, n_train=20, n_test=10) -> Path:
    """A small IDX set of the same layout (for cache and error tests that must not touch the real cache)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('test', n_test)):
        ims, lbls = mds.IDX_FILES[split]
        _write_idx(d/f'{ims}.gz', rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d/f'{lbls}.gz', rng.integers(0, 10, (n,)))
    return d


@needs_data
def test_real_files_have_the_published_sizes_and_balance():
    arrays = fashion_mnist_arrays(smoke=False)
    (xt, yt), (xv, yv) = arrays['train'], arrays['test']
    assert xt.shape == (60000, 28, 28) and xt.dtype == np.uint8
    assert xv.shape == (10000, 28, 28)
    assert np.bincount(yt).tolist() == [6000]*10
    assert np.bincount(yv).tolist() == [1000]*10
    # read_idx agrees with a direct decode of the gzip stream
    raw = gzip.open(SRC/'t10k-labels-idx1-ubyte.gz').read()
    assert np.array_equal(read_idx(SRC/'t10k-labels-idx1-ubyte.gz'), np.frombuffer(raw[8:], np.uint8))


@needs_data
def test_load_fashion_mnist_has_the_hub_schema():
    dd = load_fashion_mnist(smoke=False)
    assert {k: len(v) for k, v in dd.items()} == {'train': 60000, 'test': 10000}
    assert dd['train'].features['label'].names == FASHION_CLASSES
    item = dd['train'][0]
    assert item['image'].size == (28, 28) and item['image'].mode == 'L'
    x, y = fashion_mnist_arrays(smoke=False)['train']
    assert np.array_equal(np.asarray(item['image']), x[0]) and item['label'] == y[0]
    assert np.bincount(dd['train']['label']).tolist() == [6000]*10


@needs_data
def test_smoke_mode_hands_back_a_subset(monkeypatch):
    monkeypatch.setenv('MINIAI_SMOKE', '1')
    dd = load_fashion_mnist()
    assert len(dd['train']) == mds.SMOKE_SIZES['train'] and len(dd['test']) == mds.SMOKE_SIZES['test']
    assert len(fashion_dls(256).train.x) == mds.SMOKE_SIZES['train']


def test_reader_handles_other_idx_sets_plain_and_gzipped(tmp_path):
    a = np.arange(2*3*4).reshape(2, 3, 4).astype(np.uint8)
    assert np.array_equal(read_idx(_write_idx(tmp_path/'a-idx3-ubyte', a)), a)
    assert np.array_equal(read_idx(_write_idx(tmp_path/'a-idx3-ubyte.gz', a)), a)


def test_truncated_gzip_names_the_file(tmp_path):
    p = _write_idx(tmp_path/'train-images-idx3-ubyte.gz', np.zeros((50, 28, 28)))
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(IDXError, match=r'train-images-idx3-ubyte\.gz.*(truncated|corrupt)'):
        read_idx(p)


def test_corrupt_gzip_names_the_file(tmp_path):
    p = tmp_path/'x.gz'
    p.write_bytes(b'\x1f\x8b\x08\x00' + b'garbage' * 20)
    with pytest.raises(IDXError, match=r'x\.gz'):
        read_idx(p)


def test_short_data_is_called_truncated(tmp_path):
    p = _write_idx(tmp_path/'y-idx1-ubyte', np.zeros(100))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(IDXError, match=r'y-idx1-ubyte.*\(100,\).*90 bytes.*truncated'):
        read_idx(p)


def test_wrong_magic_number(tmp_path):
    p = tmp_path/'z-idx1-ubyte'
    p.write_bytes(b'\x12\x34\x08\x01' + (3).to_bytes(4, 'big') + b'abc')
    with pytest.raises(IDXError, match=r'z-idx1-ubyte: bad magic number 12340801'):
        read_idx(p)


def test_images_and_labels_of_different_lengths(tmp_path):
    _fake_source(tmp_path)
    _write_idx(tmp_path/'t10k-labels-idx1-ubyte.gz', np.zeros(9))
    with pytest.raises(IDXError, match=r't10k-images.*10 images.*t10k-labels.*9 labels'):
        mds.read_idx_split(tmp_path, *mds.IDX_FILES['test'])


def test_out_of_range_labels(tmp_path):
    _fake_source(tmp_path)
    _write_idx(tmp_path/'t10k-labels-idx1-ubyte.gz', np.full(10, 12))
    with pytest.raises(IDXError, match=r'label 12 is out of range'):
        mds.read_idx_split(tmp_path, *mds.IDX_FILES['test'])


def test_missing_source_names_both_ways_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(mds, 'SYSTEM_DATA_DIR', tmp_path/'none')
    monkeypatch.setattr(mds, 'PROJECT_DIR', tmp_path)
    monkeypatch.setenv('MINIAI_DATA', str(tmp_path/'empty'))
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    with pytest.raises(FileNotFoundError, match=r'apt-get install dataset-fashion-mnist.*MINIAI_DATA'):
        fashion_mnist_arrays(smoke=False)


def test_search_order_prefers_miniai_data(tmp_path, monkeypatch):
    src = _fake_source(tmp_path/'src')
    monkeypatch.setenv('MINIAI_DATA', str(src))
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path/'cache'))
    arrays = fashion_mnist_arrays(smoke=False)
    assert len(arrays['train'][0]) == 20 and len(arrays['test'][0]) == 10


def test_interrupted_cache_build_is_never_picked_up(tmp_path, monkeypatch):
    src = _fake_source(tmp_path/'src')
    monkeypatch.setenv('MINIAI_DATA', str(src))
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path/'cache'))
    real_save = mds._save_arrays

    def save_then_die(arrays, dest):
        real_save(arrays, dest)   # everything is written ...
        raise KeyboardInterrupt   # ... but the build is interrupted before it is published
    monkeypatch.setattr(mds, '_save_arrays', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fashion_mnist_arrays(smoke=False)
    assert list((tmp_path/'cache').iterdir()) == []          # no half-built folder left behind
    # a stale temporary folder from a killed process is ignored and swept up by the next build
    (tmp_path/'cache'/f'.fashion_mnist-arrays-{mds._fingerprint(src)}.tmp-dead').mkdir()
    monkeypatch.setattr(mds, '_save_arrays', real_save)
    arrays = fashion_mnist_arrays(smoke=False)
    assert len(arrays['train'][0]) == 20
    assert [p.name.startswith('.') for p in (tmp_path/'cache').iterdir()] == [False]


def test_cache_follows_the_source_files(tmp_path, monkeypatch):
    src = _fake_source(tmp_path/'src')
    monkeypatch.setenv('MINIAI_DATA', str(src))
    monkeypatch.setenv('MINIAI_CACHE', str(tmp_path/'cache'))
    assert len(fashion_mnist_arrays(smoke=False)['train'][0]) == 20
    _fake_source(src, n_train=30)
    assert len(fashion_mnist_arrays(smoke=False)['train'][0]) == 30


def test_tensor_loader_batches_and_normalises():
    x = torch.arange(10*2*2, dtype=torch.uint8).reshape(10, 2, 2)
    y = torch.arange(10)
    dl = TensorLoader(x, y, 4, mean=0.5, std=0.25)
    batches = list(dl)
    assert len(dl) == len(batches) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    xb, yb = batches[0]
    assert xb.shape == (4, 1, 2, 2) and torch.equal(yb, y[:4])
    torch.testing.assert_close(xb, (x[:4, None].float()/255 - 0.5)/0.25)
    torch.manual_seed(0); a = torch.cat([b[1] for b in TensorLoader(x, y, 4, shuffle=True)])
    torch.manual_seed(0); b = torch.cat([b[1] for b in TensorLoader(x, y, 4, shuffle=True)])
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(10)) and not torch.equal(a, y)


def test_dataloaders_need_two_loaders():
    with pytest.raises(ValueError, match='training and a validation'):
        DataLoaders([1, 2])


def test_collate_functions_pickle():
    from datasets import Dataset
    ds = Dataset.from_dict({'image': [[1.0, 2.0]], 'label': [3]})
    f = pickle.loads(pickle.dumps(collate_dict(ds)))
    x, y = f([{'image': torch.tensor([1., 2.]), 'label': 3}])
    assert x.shape == (1, 2) and y.tolist() == [3]
    g = pickle.loads(pickle.dumps(inplace(dict.clear)))
    assert g({'a': 1}) == {}


def test_from_dd_batches_as_tuples_or_dicts():
    from datasets import Dataset, DatasetDict
    g = torch.Generator().manual_seed(0)
    cols = {split: {'image': torch.rand(n, 1, 4, 4, generator=g).tolist(), 'label': list(range(n))}
            for split, n in (('train', 10), ('test', 6))}
    dd = DatasetDict({split: Dataset.from_dict(c).with_format('torch') for split, c in cols.items()})
    tup, dic = DataLoaders.from_dd(dd, 2), DataLoaders.from_dd(dd, 2, as_tuple=False)
    xb, yb = next(iter(tup.valid))                      # the validation loader is not shuffled: the first 4 items
    b = next(iter(dic.valid))
    assert isinstance(b, dict) and list(b) == ['image', 'label']
    assert torch.equal(b['image'], xb) and torch.equal(b['label'], yb) and yb.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(xb, torch.tensor(cols['test']['image'][:4]))
    torch.manual_seed(0); t = torch.cat([y for _, y in tup.train])
    torch.manual_seed(0); d = torch.cat([b['label'] for b in dic.train])
    assert torch.equal(t, d) and sorted(t.tolist()) == list(range(10))   # the same shuffle either way


@needs_data
def test_fashion_dls_normalises_with_the_training_sets_statistics_not_per_batch():
    full = fashion_mnist_arrays(smoke=False)['train'][0]                 # (60000, 28, 28) uint8
    mean, std = float(full.mean()/255.), float(full.std()/255.)
    dls = fashion_dls(64, smoke=True)
    assert (dls.train.mean, dls.train.std) == (dls.valid.mean, dls.valid.std) == (mean, std)
    xb, _ = next(iter(dls.valid))                                        # (128, 1, 28, 28), the first test images
    x = torch.from_numpy(fashion_mnist_arrays(smoke=True)['test'][0][:128].copy())
    torch.testing.assert_close(xb, ((x.float()/255. - mean)/std)[:, None])
    assert abs(float(xb.mean())) > 1e-3 and abs(float(xb.std()) - 1) > 1e-3   # not this batch's own statistics
