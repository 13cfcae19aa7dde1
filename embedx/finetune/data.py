"""Images for fine-tuning: (path, label) lists in the head's class order, decoding, augmentation."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from embedx import preprocess as pp
from embedx.errors import DataError, ImageDecodeError
from embedx.fsio import sha256_file

logger = logging.getLogger(__name__)

#: RandomResizedCrop's area range.  torchvision's (0.08, 1) is tuned for ImageNet
#: from scratch; a few epochs on a small data set do better with milder crops.
DEFAULT_CROP_SCALE = (0.25, 1.0)
#: The held-out fraction when the data has no "val" split.
DEFAULT_VAL_FRACTION = 0.2


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) pairs -> (CHW float tensor, label); unreadable images give None."""

    def __init__(self, items: Sequence[tuple[str, int]], spec: pp.PreprocessSpec, transform=None) -> None:
        self.items = list(items)
        self.spec = spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            if self.transform is None:
                pixels = torch.from_numpy(pp.load(path, self.spec))
            else:
                pixels = self.transform(pp.decode(path, min_size=self.spec.resize_size))
        except ImageDecodeError as e:
            logger.warning("skipping %s", e)
            return None
        return pixels, label


def _collate(batch):
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None
    images = torch.stack([sample[0] for sample in batch])
    labels = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    return images, labels


def train_transform(spec: pp.PreprocessSpec, *, crop_scale=DEFAULT_CROP_SCALE, hflip: bool = True):
    """RandomResizedCrop (+ flip) on a decoded PIL image, normalized like the eval path."""
    from torchvision.transforms import InterpolationMode, v2

    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            spec.input_size,
            scale=tuple(crop_scale),
            interpolation=InterpolationMode(spec.interpolation),
            antialias=True,
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(steps)


def _split_items(dataset, head_classes: Sequence[str]) -> tuple[list, list]:
    """Train and val (path, label) lists, labels in the head's class order."""
    data_classes = list(dataset.classes)
    if sorted(data_classes) != sorted(head_classes):
        raise DataError(
            f"the data's classes {data_classes} differ from the head's classes {list(head_classes)}; "
            "fine-tune on data with the classes the head was fitted on, or fit a new head "
            "(`embedx extract` + `embedx fit-head`) for these classes"
        )
    remap = {i: list(head_classes).index(name) for i, name in enumerate(data_classes)}
    train = [(str(it.path), remap[it.label]) for it in dataset.items if it.split == "train"]
    val = [(str(it.path), remap[it.label]) for it in dataset.items if it.split == "val"]
    if not val and train:
        # The same content-keyed split as `embedx extract --val-fraction`, stable across reruns.
        from embedx.data import split_for_key

        held_out = [split_for_key(sha256_file(path), DEFAULT_VAL_FRACTION) == "val" for path, _ in train]
        val = [item for item, out in zip(train, held_out, strict=True) if out]
        train = [item for item, out in zip(train, held_out, strict=True) if not out]
        logger.warning(
            "the data has no 'val' split; holding out %d of %d training images for validation",
            len(val),
            len(val) + len(train),
        )
    if not train:
        raise DataError(f"no training images found in {dataset.root}; expected a 'train' split or class folders")
    if not val:
        raise DataError(f"no validation images in {dataset.root}; add a 'val' split folder")
    return train, val


def _first_images(dataset: ImageListDataset, count: int) -> torch.Tensor:
    """The first ``count`` decodable images of ``dataset`` as one batch."""
    images = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            images.append(sample[0])
        if len(images) == count:
            break
    if not images:
        raise DataError("none of the validation images could be decoded")
    return torch.stack(images)
