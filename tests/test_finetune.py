"""Fine-tuning (LP-FT): conversion of heads to torch, the schedule, the training run,
checkpoint/resume, and the artifacts (ONNX parity, predict, bundle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedx import finetune as ft
from embedx.errors import ConfigError, DataError

# --------------------------------------------------------------------------- data


def make_images(root: Path, *, per_class: dict[str, int] | None = None, classes=("blue", "red"), size=(40, 48), seed=0) -> Path:
    """Class folders under train/ and val/: noisy images tinted by class (easy to tell apart)."""
    per_class = per_class or {"train": 12, "val": 6}
    rng = np.random.default_rng(seed)
    channel = {"red": 0, "green": 1, "blue": 2}
    for split, count in per_class.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 90, (*size, 3), dtype=np.uint8)
                pixels[..., channel[name]] += 150
                Image.fromarray(pixels).save(folder / f"{name}-{index}.png")
    return root


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("head_type", ["logreg", "linear", "mlp"])
def test_torch_head_equals_the_saved_head_and_round_trips_its_arrays(head_type):
    from sklearn.datasets import make_classification

    from embedx.heads import make_head

    features, labels = make_classification(n_samples=120, n_features=6, n_informative=4, n_classes=3,
                                           random_state=0)
    features = features * 3.0 + 5.0  # standardization matters
    params = {"hidden": 8} if head_type == "mlp" else {}
    head = make_head(head_type, **params).fit(features[:90], labels[:90], X_val=features[90:], y_val=labels[90:])
    module = ft.TorchHead.from_head(head).eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(features).float()).numpy()
    np.testing.assert_allclose(logits, head.logits(features), rtol=1e-4, atol=1e-4)
    arrays = module.arrays()
    assert set(arrays) == set(head._arrays())
    for name, value in head._arrays().items():
        np.testing.assert_allclose(arrays[name], value, rtol=1e-6, atol=1e-6)


def test_torch_head_reset_is_a_fresh_head_on_raw_features():
    from embedx.heads import make_head

    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(40, 5)) + 3.0, np.repeat([0, 1], 20)
    module = ft.TorchHead.from_head(make_head("logreg", C=1.0).fit(features, labels))
    before = module.layers[0].weight.detach().clone()
    module.reset()
    assert torch.all(module.mean == 0) and torch.all(module.scale == 1)
    assert not torch.allclose(before, module.layers[0].weight)


def test_knn_head_cannot_be_fine_tuned():
    from embedx.errors import HeadError
    from embedx.heads import make_head

    rng = np.random.default_rng(0)
    head = make_head("knn").fit(rng.normal(size=(20, 4)), np.repeat([0, 1], 10))
    with pytest.raises(HeadError, match="knn"):
        ft.TorchHead.from_head(head)


def test_warmup_then_cosine_schedule():
    values = [ft.warmup_cosine(step, warmup_steps=4, total_steps=20) for step in range(21)]
    assert values[:4] == sorted(values[:4]) and values[0] < values[3] < 1.0
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[20] == pytest.approx(0.0, abs=1e-12)
    assert ft.warmup_cosine(12, warmup_steps=0, total_steps=24) == pytest.approx(0.5)


@pytest.mark.parametrize("value, expected", [("all", "all"), ("ALL", "all"), (2, "2"), ("0", "0")])
def test_parse_unfreeze(value, expected):
    assert ft.parse_unfreeze(value) == expected


@pytest.mark.parametrize("value", ["-1", "some", "1.5"])
def test_parse_unfreeze_rejects(value):
    with pytest.raises(ConfigError, match="unfreeze"):
        ft.parse_unfreeze(value)


def test_class_mismatch_names_both_lists(tmp_path):
    from embedx.data import discover

    data = make_images(tmp_path / "data", classes=("green", "red"), per_class={"train": 1, "val": 1})
    with pytest.raises(DataError) as info:
        ft._split_items(discover(data), ["blue", "red"])
    message = str(info.value)
    assert "['green', 'red']" in message and "['blue', 'red']" in message


def test_split_items_follows_the_heads_class_order(tmp_path):
    from embedx.data import discover

    data = make_images(tmp_path / "data", per_class={"train": 2, "val": 1})
    train, val = ft._split_items(discover(data), ["red", "blue"])
    assert {label for path, label in train if "/red/" in path} == {0}
    assert {label for path, label in val if "/blue/" in path} == {1}


def test_without_val_split_a_stable_part_is_held_out(tmp_path):
    from embedx.data import discover

    data = make_images(tmp_path / "data", per_class={"train": 20})
    first = ft._split_items(discover(data), ["blue", "red"])
    second = ft._split_items(discover(data), ["blue", "red"])
    assert first == second
    train, val = first
    assert val and train and len(train) + len(val) == 40
    assert not {p for p, _ in train} & {p for p, _ in val}


def test_train_transform_gives_normalized_tensors_of_input_size(tmp_path):
    from embedx.preprocess import PreprocessSpec, decode

    spec = PreprocessSpec(input_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = make_images(tmp_path / "data", per_class={"train": 1})
    image = decode(next((data / "train" / "red").iterdir()))
    out = ft.train_transform(spec)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert -1.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float(out[0].mean()) > float(out[2].mean())  # still red
