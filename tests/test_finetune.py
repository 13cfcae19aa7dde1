"""Fine-tuning (LP-FT): conversion of heads to torch, the schedule, the training run,
checkpoint/resume, and the artifacts (ONNX parity, predict, bundle)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedx import finetune as ft
from embedx.errors import ConfigError, DataError
from tests.conftest import scratch

# --------------------------------------------------------------------------- data


def make_images(root: Path, *, per_class: dict[str, int] | None = None, classes=("blue", "red"), size=(40, 48),
                seed=0) -> Path:
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


# --------------------------------------------------------------------------- whole runs

BACKBONE = "resnet18"
#: Small images keep a random-init resnet18 cheap on the CPU; the head records this spec.
SMALL = {"input_size": 64, "resize_size": 72}


def make_head_dir(directory: Path, data: Path, *, head_type: str = "logreg", backbone: str = BACKBONE) -> Path:
    """A head fitted through the heads API on torch features of ``data`` (random-init backbone)."""
    from embedx.backbones import build_feature_extractor, get_spec
    from embedx.cache import CacheMeta
    from embedx.data import discover
    from embedx.heads import make_head
    from embedx.preprocess import PreprocessSpec, load_batch

    spec = get_spec(backbone)
    preprocess = PreprocessSpec.from_dict({**spec.preprocess.to_dict(), **SMALL})
    model = build_feature_extractor(backbone, weights="none")
    dataset = discover(data)
    features, labels = {}, {}
    for split in ("train", "val"):
        items = [item for item in dataset.items if item.split == split]
        with torch.no_grad():
            features[split] = model(torch.from_numpy(load_batch([i.path for i in items], preprocess))).numpy()
        labels[split] = np.asarray([dataset.classes[i.label] for i in items])
    head = make_head(head_type).fit(features["train"], labels["train"], X_val=features["val"], y_val=labels["val"])
    meta = CacheMeta(backbone=backbone, weights_tag="none", weights_arg="none", onnx_path="", onnx_sha256="",
                     feature_layer=spec.feature_layer, feature_dim=spec.feature_dim,
                     preprocess=preprocess.to_dict(), dtype="float32")
    head.save(directory, extra={"cache": {**meta.to_dict(), "fingerprint": meta.fingerprint, "path": ""}})
    return directory


FAST = {"batch_size": 8, "num_workers": 0, "unfreeze": 1}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Generated data and a logreg head fitted on it, shared by the runs: (data, head_dir)."""
    with scratch(tmp_path_factory, "ft-start") as root:
        data = make_images(root / "data")
        yield data, make_head_dir(root / "head", data)


@pytest.fixture(scope="module")
def finetuned(start, tmp_path_factory):
    """One short LP-FT run shared by the artifact tests: (data, head_dir, result)."""
    data, head_dir = start
    with pytest.MonkeyPatch.context() as patch, scratch(tmp_path_factory, "ft-cache") as cache:
        patch.setenv("EMBEDX_CACHE_DIR", str(cache))
        result = ft.finetune(head_dir, data, epochs=1, **FAST)
        yield data, head_dir, result


def test_one_epoch_writes_a_head_dir_on_the_fine_tuned_backbone(finetuned):
    from embedx.heads import load_head

    data, head_dir, result = finetuned
    out = result.output_dir
    assert out == head_dir.with_name("head-ft")
    for name in ("head.json", "weights.safetensors", "backbone.onnx", "backbone.safetensors", "finetune.json",
                 "train/checkpoint.pt", "confusion_matrix.png", "reliability.png"):
        assert (out / name).is_file(), name
    head = load_head(out)
    info = head.info_
    assert info["head_type"] == "logreg" and info["classes"] == ["blue", "red"]
    cache = info["cache"]
    assert cache["backbone"] == BACKBONE
    assert cache["onnx_path"] == "backbone.onnx"  # relative to the folder, which may move
    assert head.record_.backbone_onnx() == out / "backbone.onnx" == result.onnx_path
    assert cache["weights_arg"] == str((out / "backbone.safetensors").resolve())
    assert cache["weights_tag"].startswith("file:")
    assert cache["preprocess"]["input_size"] == SMALL["input_size"]
    assert info["finetune"]["initial"]["val_accuracy"] == result.initial_val_accuracy
    assert len(result.history) == 1 and result.history[0]["epoch"] == 1
    assert 0.0 <= result.best_val_accuracy <= 1.0
    assert result.best_val_accuracy >= result.initial_val_accuracy  # epoch 0 (the probe) is a candidate
    assert result.parity["trained_model"]["max_rel_error"] <= 1e-4


def test_exported_onnx_matches_the_backbone_rebuilt_from_the_saved_state_dict(finetuned):
    from embedx.backbones import build_feature_extractor
    from embedx.runtime import OrtModel

    _, _, result = finetuned
    rebuilt = build_feature_extractor(BACKBONE, weights=result.backbone_weights)
    start = build_feature_extractor(BACKBONE, weights="none")
    images = torch.randn(3, 3, SMALL["input_size"], SMALL["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = rebuilt(images).numpy()
        original = start(images).numpy()
    got = OrtModel(result.onnx_path, device="cpu").run(images.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    assert not np.allclose(expected, original)  # the top block really changed


def test_fine_tuned_head_works_with_predict_and_bundle(finetuned, tmp_path):
    import json

    from click.testing import CliRunner

    from embedx.cli.main import cli

    data, _, result = finetuned
    images = sorted((data / "val" / "red").glob("*.png"))[:2] + sorted((data / "val" / "blue").glob("*.png"))[:2]
    runner = CliRunner()
    by_head = runner.invoke(cli, ["predict", "--head", str(result.output_dir), "--json", "--device", "cpu",
                                  *map(str, images)])
    assert by_head.exit_code == 0, by_head.output
    bundle_path = tmp_path / "model.onnx"
    made = runner.invoke(cli, ["bundle", "--head", str(result.output_dir), "-o", str(bundle_path)])
    assert made.exit_code == 0, made.output
    by_model = runner.invoke(cli, ["predict", "--model", str(bundle_path), "--json", "--device", "cpu",
                                   *map(str, images)])
    assert by_model.exit_code == 0, by_model.output

    def rows(output):
        return [json.loads(line) for line in output.splitlines() if line.startswith("{")]

    head_rows, model_rows = rows(by_head.output), rows(by_model.output)
    assert len(head_rows) == len(model_rows) == 4
    for a, b in zip(head_rows, model_rows, strict=True):
        assert {c["label"] for c in a["top_k"]} == {"blue", "red"}
        probs_a = {c["label"]: c["probability"] for c in a["top_k"]}
        probs_b = {c["label"]: c["probability"] for c in b["top_k"]}
        assert probs_a == pytest.approx(probs_b, abs=1e-4)


def test_predict_and_bundle_put_back_an_output_a_killed_swap_moved_aside(finetuned, tmp_path):
    import shutil

    from click.testing import CliRunner

    from embedx.cli.main import cli

    data, _, result = finetuned
    out = tmp_path / "out"
    aside = tmp_path / ".out.tmp-aside-killed"
    aside.mkdir()
    shutil.copytree(result.output_dir, aside / "previous")  # what a kill between the two renames leaves
    image = str(sorted((data / "val" / "red").glob("*.png"))[0])
    runner = CliRunner()
    by_head = runner.invoke(cli, ["predict", "--head", str(out), "--json", "--device", "cpu", image])
    assert by_head.exit_code == 0, by_head.output
    assert out.is_dir() and not (aside / "previous").exists()
    shutil.move(out, aside / "previous")
    made = runner.invoke(cli, ["bundle", "--head", str(out), "-o", str(tmp_path / "model.onnx")])
    assert made.exit_code == 0, made.output
    assert out.is_dir() and (tmp_path / "model.onnx").is_file()


def test_training_loss_goes_down(start, tmp_path):
    data, head_dir = start
    result = ft.finetune(head_dir, data, epochs=3, lr=3e-3, augment=False, reinit_head=True,
                         output=tmp_path / "out", **{**FAST, "unfreeze": "all"})
    losses = [record["train_loss"] for record in result.history]
    assert losses[-1] < losses[0], losses


def test_interrupted_run_resumes_after_the_last_finished_epoch(start, tmp_path):
    data, head_dir = start
    out = tmp_path / "out"

    def interrupt(done, total, info):
        if info.get("epoch") == 3:
            raise KeyboardInterrupt  # what a kill in epoch 3 leaves behind: the checkpoint of epoch 2

    with pytest.raises(KeyboardInterrupt):
        ft.finetune(head_dir, data, epochs=3, output=out, progress=interrupt, **FAST)
    assert not (out / "head.json").exists()
    saved = torch.load(out / "train" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2
    seen = []
    resumed = ft.finetune(head_dir, data, epochs=3, output=out, progress=lambda d, t, i: seen.append(i["epoch"]),
                          **FAST)
    assert resumed.resumed_from_epoch == 2
    assert set(seen) == {3}
    assert [record["epoch"] for record in resumed.history] == [1, 2, 3]
    assert list(resumed.history[:2]) == saved["history"]
    assert resumed.initial_val_accuracy == saved["initial"]["val_accuracy"]
    assert (out / "head.json").is_file()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of an output but the carried-over checkpoint, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parent.name != "train"}


def _old_output(result, out: Path) -> dict[str, bytes]:
    """A copy of a finished output at ``out``, marked so that none of its files equals a rerun's."""
    import json
    import shutil

    shutil.copytree(result.output_dir, out)
    record = json.loads((out / "head.json").read_text())
    record["temperature"] = 1.5
    record["finetune"]["marker"] = "old"
    (out / "head.json").write_text(json.dumps(record))
    for name in ("backbone.safetensors", "backbone.onnx"):
        (out / name).write_bytes((out / name).read_bytes() + b"\0")  # load_head does not read them
    for name in ("confusion_matrix.png", "reliability.png", "finetune.json"):
        (out / name).write_bytes((out / name).read_bytes() + b"old")
    (out / "old-plot.png").write_bytes(b"an old plot the new output does not have")
    return _snapshot(out)


def _new_output_is_whole(out: Path) -> None:
    """The files of one run: none of the old ones, and head.json names these very files."""
    import json

    from embedx.fsio import sha256_file
    from embedx.heads import load_head

    assert not (out / "old-plot.png").exists()
    record = load_head(out).record_
    assert record.fields["finetune"].get("marker") is None
    assert sha256_file(record.backbone_onnx()) == record.cache["onnx_sha256"]
    assert record.cache["weights_tag"] == "file:" + sha256_file(out / "backbone.safetensors")[:16]
    assert json.loads((out / "finetune.json").read_text())["result"]["onnx_path"] == "backbone.onnx"


@pytest.mark.parametrize("step", [pytest.param("weights", marks=pytest.mark.slow), "plots",
                                  pytest.param("head", marks=pytest.mark.slow), "report", "swap"])
def test_killed_while_writing_leaves_the_old_output_whole(finetuned, tmp_path, monkeypatch, step):
    import os

    from embedx.finetune import artifacts, train
    from embedx.heads.record import HeadRecord

    data, head_dir, result = finetuned
    out = tmp_path / "out"
    before = _old_output(result, out)
    monkeypatch.setenv("EMBEDX_CACHE_DIR", str(tmp_path / "cache"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise KeyboardInterrupt  # the swap itself fails: the old folder goes back
        return real_replace(src, dst)

    target = {"weights": (artifacts, "_save_backbone_weights"), "plots": ("embedx.metrics.plot_reliability", None),
              "head": (HeadRecord, "write"), "report": (train, "_write_report"), "swap": (os, "replace")}[step]
    if target[1] is None:
        monkeypatch.setattr(target[0], killed)
    else:
        monkeypatch.setattr(*target, replace if step == "swap" else killed)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(head_dir, data, epochs=1, output=out, **FAST)  # resumes after epoch 1: writes at once
    monkeypatch.undo()
    assert _snapshot(out) == before  # the old output, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


#: A child that runs the rerun and SIGKILLs itself at the ``n``-th rename onto or from the output.
KILLED_RERUN = """
import os, signal, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
real, seen = os.replace, [0]
def replace(src, dst):
    if out in (Path(src), Path(dst)):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
if n == 0:  # killed while writing the new folder
    import embedx.metrics
    embedx.metrics.plot_reliability = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from embedx import finetune as ft
ft.finetune(sys.argv[3], sys.argv[4], epochs=1, output=out, batch_size=8, num_workers=0, unfreeze=1)
"""


@pytest.mark.parametrize("rename", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow),
                                    2, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_at_any_point_of_the_swap_leaves_old_or_new(finetuned, tmp_path, rename):
    """0: while writing the new folder; 1: as the old one is moved aside; 2: after that, before the
    new one is renamed in; 3: after the swap, before the old copy is deleted (a no-op rename)."""
    import os
    import subprocess
    import sys

    from embedx.heads import load_head

    data, head_dir, result = finetuned
    out = tmp_path / "out"
    before = _old_output(result, out)
    env = {**os.environ, "EMBEDX_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.run([sys.executable, "-c", KILLED_RERUN, str(out), str(rename), str(head_dir), str(data)],
                           env=env, capture_output=True, text=True, timeout=600)
    if rename == 3:  # no third rename: the run finishes, the new output is in place
        assert child.returncode == 0, child.stderr
        _new_output_is_whole(out)
        return
    assert child.returncode == -9, child.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # what the kill left beside it
    if rename == 2:
        assert not out.exists()  # moved aside, the new one not yet in: readers put the old one back
    load_head(out)
    assert _snapshot(out) == before
    # the next run cleans what the killed one left, and writes the new output whole
    ft.finetune(head_dir, data, epochs=1, output=out, **FAST)
    _new_output_is_whole(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(finetuned, tmp_path):
    import os
    import subprocess
    import sys

    from embedx.errors import HeadError

    data, head_dir, result = finetuned
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from embedx.finetune.artifacts import output_lock\n"
         "with output_lock(__import__('pathlib').Path(sys.argv[1])):\n print('held', flush=True); sys.stdin.read()",
         str(out)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HeadError, match=f"another process is writing the fine-tuning output .*pid {holder.pid}"):
            ft.finetune(head_dir, data, epochs=1, output=out, **FAST)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "train").exists()  # refused before any work


def test_an_output_folder_of_something_else_is_refused(finetuned, tmp_path):
    from embedx.errors import HeadError

    data, head_dir, _ = finetuned
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(HeadError, match="not a fine-tuning output"):
        ft.finetune(head_dir, data, epochs=1, output=tmp_path / "mine", **FAST)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_resume_refuses_a_checkpoint_of_other_settings(finetuned):
    data, head_dir, result = finetuned
    before = (result.output_dir / "train" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"lr: checkpoint 0\.001 vs now 0\.01.*--no-resume"):
        ft.finetune(head_dir, data, epochs=2, lr=0.01, output=result.output_dir, **FAST)
    assert (result.output_dir / "train" / "checkpoint.pt").read_bytes() == before


def test_data_with_other_classes_is_refused_before_training(start, tmp_path):
    _, head_dir = start
    other = make_images(tmp_path / "other", classes=("green", "red"), per_class={"train": 2, "val": 1})
    with pytest.raises(DataError, match=r"\['green', 'red'\].*\['blue', 'red'\]"):
        ft.finetune(head_dir, other, epochs=1, output=tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_unfreeze_beyond_the_backbone_blocks_is_refused(start, tmp_path):
    data, head_dir = start
    with pytest.raises(ConfigError, match="5 blocks"):
        ft.finetune(head_dir, data, output=tmp_path / "out", **{**FAST, "unfreeze": 9})


def test_cli_finetune_json(start, tmp_path):
    import json

    from click.testing import CliRunner

    from embedx.cli.main import cli

    data, head_dir = start
    out = tmp_path / "tuned"
    result = CliRunner().invoke(cli, ["finetune", "--head", str(head_dir), str(data), "--unfreeze", "0",
                                      "--epochs", "1", "--batch-size", "8", "--workers", "0", "-o", str(out),
                                      "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output_dir"] == str(out) and summary["history"][0]["epoch"] == 1
    assert summary["val_count"] == summary["history"][0]["val_count"] > 0
    low, high = summary["best_val_accuracy_ci"]
    assert low <= summary["best_val_accuracy"] <= high and low < high
    assert summary["initial_val_accuracy_ci"][0] <= summary["initial_val_accuracy"]
    assert json.loads((out / "head.json").read_text())["head_type"] == "logreg"


def test_cli_finetune_bad_unfreeze_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from embedx.cli.main import cli

    result = CliRunner().invoke(cli, ["finetune", "--head", str(tmp_path), str(tmp_path), "--unfreeze", "top"])
    assert result.exit_code == 2 and "unfreeze" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("unfreeze", ["all", 2])
def test_finetune_on_the_gpu_with_amp_and_channels_last(request, tmp_path, unfreeze):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    data, head_dir = request.getfixturevalue("start")
    result = ft.finetune(head_dir, data, epochs=2, device="cuda", output=tmp_path / "out",
                         **{**FAST, "unfreeze": unfreeze})
    assert result.device.startswith("cuda")
    assert len(result.history) == 2 and all(math.isfinite(r["train_loss"]) for r in result.history)
    # the artifacts are CPU/fp32 whatever the training device
    assert result.parity["trained_model"]["max_rel_error"] <= 1e-4


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.timeout(600)  # 23 s idle; the first user of hymenoptera_lite0 also extracts it
def test_lpft_on_hymenoptera_with_efficientnet_lite0(hymenoptera, hymenoptera_lite0, tmp_path):
    """The whole loop on real data: extract -> fit-head -> finetune -> extract with the new weights -> evaluate."""
    from embedx.extract import extract
    from embedx.heads import evaluate, fit_head

    features, _ = hymenoptera_lite0
    fitted = fit_head(features, head="logreg", output=tmp_path / "head", plots=False)
    cached_accuracy = fitted.metrics["val"]["accuracy"]
    result = ft.finetune(tmp_path / "head", hymenoptera, epochs=1, unfreeze=1, batch_size=16, num_workers=1)
    val_count = result.history[0]["val_count"]
    # the torch composition reproduces the cached head on the same val images (float16 cache aside)
    assert result.initial_val_accuracy == pytest.approx(cached_accuracy, abs=1.5 / val_count)
    assert result.initial_val_accuracy > 0.85
    # a cache extracted with the fine-tuned weights is one the new head accepts, at its accuracy
    extract(hymenoptera, backbone="efficientnet_lite0", weights=str(result.backbone_weights),
            output=tmp_path / "ft.h5", workers=1)
    metrics = evaluate(result.output_dir, tmp_path / "ft.h5", splits=["val"])
    assert set(metrics) >= {"val"} and "all" not in metrics
    assert metrics["val"]["accuracy"] == pytest.approx(result.best_val_accuracy, abs=1.5 / val_count)


def test_an_adapted_head_is_refused_before_the_backbone_is_built(start, tmp_path, monkeypatch):
    import json
    import shutil

    from safetensors.numpy import save_file

    from embedx.errors import HeadError

    data, head_dir = start
    adapted = tmp_path / "adapted"
    shutil.copytree(head_dir, adapted)
    record = json.loads((adapted / "head.json").read_text())
    dim = record["feature_dim"]
    record["adaptation"] = {"method": "standardize", "file": "adaptation.safetensors",
                            "target_cache": "/data/target.h5"}
    (adapted / "head.json").write_text(json.dumps(record))
    save_file({"mean": np.zeros(dim, np.float32), "scale": np.ones(dim, np.float32)},
              str(adapted / "adaptation.safetensors"))
    from embedx.heads import load_head

    assert load_head(adapted).adaptation_ is not None  # a valid adapted head

    def not_built(*args, **kwargs):
        raise AssertionError("the backbone was built before the refusal")

    monkeypatch.setattr("embedx.backbones.build_feature_extractor", not_built)
    with pytest.raises(HeadError, match="adapted to a target domain .standardize to /data/target.h5"):
        ft.finetune(adapted, data, epochs=1, **FAST)
