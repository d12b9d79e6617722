"""Image-caption data for examples/train_clip.py, in open_clip's conventions, with no extra dependency.

- `CsvDataset`: a CSV/TSV with an image-path column and a caption column (open_clip's
  --csv-img-key / --csv-caption-key / --csv-separator).
- `TarShardDataset`: webdataset shards (`key.jpg|png` + `key.txt` pairs in .tar files), read with
  the standard library's tarfile, random access by member offset.
- `SyntheticShapes`: a deterministic captioned dataset generated on the fly (coloured shapes at
  positions, varied caption templates) whose zero-shot classes include combinations never seen in
  training.
- `ImageFolderClasses`: a zero-shot evaluation set, one folder per class.
- `StepBatchSampler`: which samples each step and rank reads, a pure function of (seed, step), so a
  resumed run reads exactly what the uninterrupted run would have.

Training datasets yield `(image, caption, skipped)`: an unreadable image is skipped with a warning,
the next readable sample takes its place (every rank keeps the same batch size, which the
contrastive loss's all_gather needs) and `skipped` counts the images passed over.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class UnreadableImageWarning(UserWarning):
    """An image file that could not be decoded; the sample was skipped."""


def _open_rgb(source) -> Image.Image:
    with Image.open(source) as image:
        return image.convert("RGB")


class _SkippingDataset(torch.utils.data.Dataset):
    """A map-style dataset of (image, caption) where an unreadable image is replaced by the next one."""

    captions: list[str]
    transform: Callable

    def __len__(self) -> int:
        return len(self.captions)

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        for skipped in range(len(self)):
            i = (index + skipped) % len(self)
            try:
                image = self._load(i)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                message = f"skipping unreadable image {self._describe(i)}: {err}"
                warnings.warn(message, UnreadableImageWarning, stacklevel=2)
                continue
            return self.transform(image), self.captions[i], skipped
        raise RuntimeError(f"{type(self).__name__}: none of the {len(self)} images could be read")


class CsvDataset(_SkippingDataset):
    """Rows of a CSV/TSV file: an image path column and a caption column.

    Relative image paths are read relative to the current directory, or else to the file's folder.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file has no rows, or lacks one of the two columns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable,
        *,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
    ) -> None:
        self.path = Path(path)
        self.transform = transform
        if not self.path.is_file():
            raise FileNotFoundError(f"training data: no such file {str(self.path)!r}")
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            if not columns:
                raise ValueError(f"training data {str(self.path)!r} is empty (no header, no rows)")
            for flag, key in (("--csv-img-key", img_key), ("--csv-caption-key", caption_key)):
                if key not in columns:
                    raise ValueError(
                        f"training data {str(self.path)!r} has no column {key!r} ({flag}); its columns, "
                        f"split on {sep!r} (--csv-separator), are {columns}"
                    )
            rows = [(row[img_key], row[caption_key]) for row in reader]
        if not rows:
            raise ValueError(f"training data {str(self.path)!r} has a header but no rows")
        self.image_paths = [self._resolve(p) for p, _ in rows]
        self.captions = [str(c) for _, c in rows]

    def _resolve(self, image_path: str) -> Path:
        p = Path(image_path)
        if p.is_absolute() or p.exists():
            return p
        return self.path.parent / p

    def _load(self, index: int) -> Image.Image:
        return _open_rgb(self.image_paths[index])

    def _describe(self, index: int) -> str:
        return str(self.image_paths[index])


def expand_shards(spec: str) -> list[str]:
    """Shard paths from webdataset's notation: "a/{000..009}.tar", "::"-separated lists, globs, folders."""
    paths: list[str] = []
    for part in spec.split("::"):
        match = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if match:
            lo, hi = match.group(1), match.group(2)
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                paths.extend(expand_shards(part[: match.start()] + f"{n:0{width}d}" + part[match.end() :]))
        elif Path(part).is_dir():
            paths.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        elif any(c in part for c in "*?["):
            paths.extend(sorted(glob.glob(part)))
        else:
            paths.append(part)
    return paths


class TarShardDataset(_SkippingDataset):
    """Samples of webdataset .tar shards: members `key.<jpg|jpeg|png|webp>` + `key.txt`.

    The key is a member's path up to the first dot of its file name (webdataset's rule). At start
    every shard's headers are read once (captions kept in memory, images by byte offset); a sample
    is then read with one seek, so shards get the same random access and exact resume as a CSV.

    Raises:
        FileNotFoundError: a shard does not exist.
        ValueError: no shard holds an image with its caption.
    """

    def __init__(self, spec: str, transform: Callable) -> None:
        self.transform = transform
        self.shards = expand_shards(spec)
        if not self.shards:
            raise FileNotFoundError(f"training data: no shards match {spec!r}")
        self.captions: list[str] = []
        self._where: list[tuple[int, int, int, str]] = []  # (shard, offset, size, member name)
        incomplete = 0
        for shard_id, shard in enumerate(self.shards):
            if not Path(shard).is_file():
                raise FileNotFoundError(f"training data: no such shard {shard!r}")
            samples: dict[str, dict] = {}
            with tarfile.open(shard, "r") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if not dot:
                        continue
                    entry = samples.setdefault(f"{folder}/{stem}", {})
                    ext = "." + ext.lower()
                    if ext in IMAGE_EXTENSIONS:
                        entry["image"] = (member.offset_data, member.size, member.name)
                    elif ext == ".txt":
                        entry["text"] = tar.extractfile(member).read().decode("utf-8").strip()
            for entry in samples.values():
                if "image" in entry and "text" in entry:
                    self._where.append((shard_id, *entry["image"]))
                    self.captions.append(entry["text"])
                else:
                    incomplete += 1
        if incomplete:
            warnings.warn(f"{incomplete} samples in {spec!r} lack an image or a .txt caption; not used", stacklevel=2)
        if not self.captions:
            raise ValueError(f"training data {spec!r}: no shard holds an image (jpg/png) with a .txt caption")
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()

    def _load(self, index: int) -> Image.Image:
        shard_id, offset, size, _ = self._where[index]
        if self._pid != os.getpid():  # a DataLoader worker: file handles are not shared across fork
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard_id)
        if f is None:
            f = self._files[shard_id] = open(self.shards[shard_id], "rb")
        f.seek(offset)
        return _open_rgb(io.BytesIO(f.read(size)))

    def _describe(self, index: int) -> str:
        shard_id, _, _, name = self._where[index]
        return f"{self.shards[shard_id]}:{name}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}


class ImageFolderClasses(torch.utils.data.Dataset):
    """A zero-shot evaluation set: `root/<class_name>/<image>`, class names with "_" read as spaces.

    Yields (image, label), or None for an unreadable image (dropped by `collate_eval`, counted).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--zeroshot-dir: no such folder {str(root)!r}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"--zeroshot-dir {str(root)!r} has no class folders (expected root/<class>/<image>)")
        self.classnames = [p.name.replace("_", " ") for p in folders]
        self.samples = [
            (f, label)
            for label, folder in enumerate(folders)
            for f in sorted(folder.rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"--zeroshot-dir {str(root)!r}: its class folders hold no images {IMAGE_EXTENSIONS}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            return self.transform(_open_rgb(path)), label
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping unreadable image {path}: {err}", UnreadableImageWarning, stacklevel=2)
            return None


# -- synthetic data ----------------------------------------------------------------------------------

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
POSITIONS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
SIZES = ("small", "large")
TRAIN_TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}.",
    "a {size} {color} {shape} in the {pos}",
    "{color} {shape}, {pos}",
    "there is a {color} {shape} at the {pos}",
    "a {shape} colored {color}",
    "the {pos} shows a {size} {color} {shape}",
    "a picture of a {size} {shape} in {color}",
)
VAL_TEMPLATE = "a {size} {color} {shape} in the {pos}"  # the full description: retrieval is well posed
_SPLITS = {"train": 0, "val": 1, "zeroshot": 2}


def synthetic_classes() -> tuple[list[str], list[int]]:
    """The zero-shot class names ("red circle", ...) and the indices of those never shown in training.

    One shape per colour is held out along a diagonal, so every colour and every shape still occurs
    in training and a held-out class needs only a new combination of known words.
    """
    names, heldout = [], []
    for c, color in enumerate(COLORS):
        for s, shape in enumerate(SHAPES):
            if s == c % len(SHAPES):
                heldout.append(len(names))
            names.append(f"{color} {shape}")
    return names, heldout


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside `shape` of radius r, from offsets (dx, dy) to its centre (image units, y down)."""
    d = np.hypot(dx, dy)
    if shape == "circle":
        return d <= r
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if shape == "cross":
        bar = r / 3
        return ((abs(dx) <= bar) & (abs(dy) <= r)) | ((abs(dy) <= bar) & (abs(dx) <= r))
    if shape == "triangle":  # apex up, base 0.8 r below the centre
        depth = (dy + r) / (1.8 * r)
        return (depth >= 0) & (depth <= 1) & (abs(dx) <= depth * r)
    raise ValueError(shape)


class SyntheticShapes(torch.utils.data.Dataset):
    """A coloured shape at one of 9 positions on a noisy background, with a caption; deterministic.

    Sample i of a split is a pure function of (seed, split, i), generated on access at `image_size`
    pixels and normalized with (mean, std).

    Splits:
        "train": `size` captioned samples over the seen classes, caption templates varied.
        "val": held-out captioned pairs (all classes, full-description captions) for retrieval.
        "zeroshot": images labelled by class (all classes, balanced) for zero-shot accuracy.

    Items: train -> (image, caption, 0); val -> (image, caption, 0); zeroshot -> (image, label).
    """

    def __init__(
        self,
        size: int,
        image_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        self.size, self.image_size, self.split, self.seed = size, image_size, split, seed
        self.classnames, self.heldout = synthetic_classes()
        heldout = set(self.heldout)
        self._train_classes = [k for k in range(len(self.classnames)) if k not in heldout]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self._x, self._y = np.meshgrid(grid, grid)

    def __len__(self) -> int:
        return self.size

    @property
    def captions(self) -> list[str]:
        return [self.describe(i)[1] for i in range(self.size)]

    def describe(self, index: int) -> tuple[dict, str]:
        """The attributes and the caption of sample `index` (no rendering)."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        if self.split == "zeroshot":
            label = index % len(self.classnames)
        elif self.split == "val":
            label = int(rng.integers(len(self.classnames)))
        else:
            label = self._train_classes[int(rng.integers(len(self._train_classes)))]
        color, shape = self.classnames[label].split(" ")
        pos = int(rng.integers(len(POSITIONS)))
        size = int(rng.integers(len(SIZES)))
        template = VAL_TEMPLATE if self.split == "val" else TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
        attrs = {"label": label, "color": color, "shape": shape, "pos": pos, "size": size, "rng": rng}
        caption = template.format(color=color, shape=shape, pos=POSITIONS[pos], size=SIZES[size])
        return attrs, caption

    def render(self, attrs: dict) -> torch.Tensor:
        rng = attrs["rng"]
        row, col = divmod(attrs["pos"], 3)
        cx = (col + 0.5) / 3 + rng.uniform(-0.05, 0.05)
        cy = (row + 0.5) / 3 + rng.uniform(-0.05, 0.05)
        r = rng.uniform(0.13, 0.16) if attrs["size"] == 0 else rng.uniform(0.2, 0.24)
        mask = _shape_mask(attrs["shape"], self._x - cx, self._y - cy, r)
        background = rng.uniform(0, 70)
        image = np.full((3, self.image_size, self.image_size), background, dtype=np.float32)
        image += rng.uniform(-20, 20, size=(3, 1, 1))  # a tinted background
        color = np.asarray(COLORS[attrs["color"]], dtype=np.float32) + rng.uniform(-20, 20, size=3)
        image[:, mask] = color[:, None]
        image += rng.normal(0, 12, size=image.shape).astype(np.float32)
        image = torch.from_numpy(np.clip(image, 0, 255) / 255.0)
        return (image - self._mean) / self._std

    def __getitem__(self, index: int):
        attrs, caption = self.describe(index)
        image = self.render(attrs)
        if self.split == "zeroshot":
            return image, attrs["label"]
        return image, caption, 0


# -- batching ----------------------------------------------------------------------------------------


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's sample indices for steps `start_step` .. `steps - 1`.

    Step s reads global positions [s * B * W, (s + 1) * B * W) of an endless stream made of one
    seeded permutation of the dataset per epoch; rank r takes its r-th slice of B. The stream
    depends only on (seed, dataset length, B * W), so resuming at step s reads what the
    uninterrupted run would have.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.steps, self.start_step, self.rank, self.world_size = steps, start_step, rank, world_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def indices(self, step: int) -> list[int]:
        start = (step * self.world_size + self.rank) * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, i = divmod(position, self.n)
            out.append(int(self._permutation(epoch)[i]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


class Collate:
    """Stacks images, tokenizes captions, sums the skipped-image counts. Picklable for workers."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple[torch.Tensor, str, int]]):
        images, captions, skipped = zip(*batch)
        return torch.stack(images), self.tokenizer(list(captions)), sum(skipped), list(captions)


def collate_eval(batch: list):
    """(images, labels, dropped) from (image, label) items, dropping the None of unreadable images."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images, labels = zip(*kept)
    return torch.stack(images), torch.tensor(labels), len(batch) - len(kept)
