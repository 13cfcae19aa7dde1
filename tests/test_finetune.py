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


def test_affine_from_logits_matches_standardized_linear_head():
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(3, 7)), rng.normal(size=3)
    mean, scale = rng.normal(size=7), rng.uniform(0.5, 2.0, size=7)

    def logits(features):
        return ((features - mean) / scale) @ weight.T + bias

    features = rng.normal(size=(5, 7))
    probed = ft.affine_from_logits(logits, 7)
    folded = ft.standardized_linear(weight, bias, mean, scale)
    with torch.no_grad():
        for layer in (probed, folded):
            out = layer(torch.from_numpy(features).float()).double().numpy()
            np.testing.assert_allclose(out, logits(features), rtol=1e-5, atol=1e-5)


def test_affine_from_logits_turns_a_binary_logit_into_two_columns():
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=4), 0.3

    def logit(features):
        return features @ weight + bias  # one column, like sklearn's decision_function

    features = rng.normal(size=(6, 4))
    layer = ft.affine_from_logits(logit, 4)
    with torch.no_grad():
        probs = torch.softmax(layer(torch.from_numpy(features).float()), dim=1).numpy()
    expected = 1.0 / (1.0 + np.exp(-logit(features)))
    np.testing.assert_allclose(probs[:, 1], expected, atol=1e-5)


def test_warmup_then_cosine_schedule():
    values = [ft.warmup_cosine(step, warmup_steps=4, total_steps=20) for step in range(21)]
    assert values[:4] == sorted(values[:4]) and values[0] < values[3] < 1.0
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[20] == pytest.approx(0.0, abs=1e-12)
    assert ft.warmup_cosine(12, warmup_steps=0, total_steps=24) == pytest.approx(0.5)


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(size=(4000, 3)) * 2.0
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    temperature = ft.fit_temperature(true_logits * 3.0, labels)  # over-confident by 3x
    assert temperature == pytest.approx(3.0, rel=0.15)


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
