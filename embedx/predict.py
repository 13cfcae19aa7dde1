"""Classify image files with a bundle (one ONNX file) or a head directory.

``predict_files(..., model="model.onnx")`` needs only onnxruntime, numpy and Pillow:
the class names, the preprocessing and the input format come from the bundle's
``metadata_props`` (read through onnxruntime, not the ``onnx`` package).
``predict_files(..., head="heads/mine")`` runs the two stages separately: the
backbone ONNX named in ``head.json`` (found and sha256-checked by
``HeadRecord.backbone_onnx``) and the head's numpy inference.

``load_model`` (an ``OnnxClassifier``) and ``HeadPipeline`` give the same small interface
(``prepare`` one image, ``predict_proba`` a batch, ``top_k``), which the server and
the bundle parity tests share.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from embedx import onnxmeta, preprocess, untrusted
from embedx.bundle import PROBABILITIES
from embedx.data import list_images
from embedx.errors import ConfigError, ImageDecodeError, OnnxModelError
from embedx.preprocess import ImageSource, PreprocessSpec, decode_reason

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("float_nchw", "uint8_nhwc", "uint8_nhwc_full")
#: a bundle that resizes and crops itself: it takes decoded images of any size
FULL_IMAGE = "uint8_nhwc_full"


def stack_images(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One batch array of the prepared images, or the list itself when their shapes differ
    (full images for a ``uint8_nhwc_full`` bundle, which runs them size by size)."""
    if len({array.shape for array in arrays}) <= 1:
        return np.stack(arrays)
    return list(arrays)


class _Classifier:
    """What predict and serve need from a model: prepare, predict_proba, top_k."""

    classes: list[str]
    spec: PreprocessSpec
    input_format: str

    def prepare(self, source: ImageSource) -> np.ndarray:
        """One image -> the model's input for it (no batch axis).

        float32 CHW, normalized, for ``float_nchw``; uint8 HWC pixels for ``uint8_nhwc``;
        the decoded image, not resized, for ``uint8_nhwc_full``.
        Raises ``ImageDecodeError`` for anything that is not a readable image.
        """
        if self.input_format == FULL_IMAGE:
            return preprocess.decode_pixels(source, self.spec)
        if self.input_format == "uint8_nhwc":
            return preprocess.to_pixels(source, self.spec)
        return preprocess.load(source, self.spec)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def warmup_input(self, batch_size: int = 1) -> np.ndarray:
        size = self.spec.input_size
        if self.input_format == FULL_IMAGE:  # an image that the graph resizes
            return np.zeros((batch_size, self.spec.resize_size, self.spec.resize_size, 3), dtype=np.uint8)
        if self.input_format == "uint8_nhwc":
            return np.zeros((batch_size, size, size, 3), dtype=np.uint8)
        return np.zeros((batch_size, 3, size, size), dtype=np.float32)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The ``k`` most probable classes of one row, most probable first."""
        k = max(1, min(int(k), len(self.classes)))
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [
            {"label": self.classes[i], "probability": float(probabilities[i])} for i in order
        ]


class OnnxClassifier(_Classifier):
    """A bundle (or any ONNX classifier carrying embedx metadata), torch-free.

    The model must output class probabilities, as output ``"probabilities"`` or its
    first output, and carry ``embedx.classes`` and ``embedx.preprocess``.
    """

    def __init__(
        self, path: str | Path, *, device: str = "auto", threads: int | None = None, spinning: bool = True
    ) -> None:
        from embedx.runtime import OrtModel

        self.path = Path(path)
        self.runtime = OrtModel(self.path, device=device, threads=threads, spinning=spinning)
        self.session = self.runtime.session
        self.meta = self.runtime.meta
        if self.meta.get("kind") == "backbone":
            raise OnnxModelError(
                f"{self.path} is a backbone export (it outputs features, not classes); "
                "train a head and run `embedx bundle --head DIR -o model.onnx`"
            )
        missing = [key for key in ("classes", "preprocess") if key not in self.meta]
        if missing:
            raise OnnxModelError(
                f"{self.path} lacks embedx metadata {missing}; expected a model written by "
                "`embedx bundle` (metadata_props embedx.classes and embedx.preprocess)"
            )
        self._check_metadata()
        self.classes = [str(c) for c in onnxmeta.read_json(self.meta, "classes", where=str(self.path))]
        self.spec = PreprocessSpec.from_dict(onnxmeta.read_json(self.meta, "preprocess", where=str(self.path)))
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxModelError(f"{self.path} has {len(inputs)} inputs; a bundle has exactly one image input")
        self.input_name = inputs[0].name
        batch_dim = inputs[0].shape[0] if inputs[0].shape else None
        #: a model exported with a fixed batch size takes exactly that many images per call
        self.fixed_batch: int | None = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_name = PROBABILITIES if PROBABILITIES in outputs else next(iter(outputs))
        shape = outputs[self.output_name].shape or []
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] != len(self.classes):
            raise OnnxModelError(f"{self.path} outputs {shape[1]} probabilities per image but its metadata "
                                 f"embedx.classes lists {len(self.classes)} classes; rebuild it with `embedx bundle`")
        self.providers = self.runtime.providers

    def _check_metadata(self) -> None:
        """The embedx metadata a bundle is used by, checked before use (a bundle may come from anyone):
        ``classes`` a list of unique names, ``preprocess`` a valid spec, ``input_format`` a known one,
        ``feature_dim``/``temperature`` numbers and ``head`` JSON; one ``OnnxModelError`` line otherwise."""
        where, fix = str(self.path), "rebuild the model with `embedx bundle`"
        problem = untrusted.classes_problem(onnxmeta.read_json(self.meta, "classes", where=where))
        if problem:
            raise OnnxModelError(f"{where}: metadata embedx.classes must be {problem}; {fix}")
        spec = onnxmeta.read_json(self.meta, "preprocess", where=where)
        try:
            if not isinstance(spec, dict):
                raise ConfigError(f"expected an object, found a JSON {type(spec).__name__}")
            PreprocessSpec.from_dict(spec)
        except (ConfigError, TypeError) as e:
            raise OnnxModelError(f"{where}: metadata embedx.preprocess is not a valid preprocessing spec ({e}); "
                                 f"{fix}") from e
        self.input_format = self.meta.get("input_format", "float_nchw")
        if self.input_format not in INPUT_FORMATS:
            raise OnnxModelError(
                f"{self.path}: embedx.input_format is {self.input_format!r:.80}, expected one of {INPUT_FORMATS}"
            )
        dim = self.meta.get("feature_dim", "1")
        # the length first: int() refuses more than 4,300 digits with a ValueError of its own
        if not (dim.isascii() and dim.isdigit() and len(dim) <= len(str(untrusted.MAX_SIZE))
                and 1 <= int(dim) <= untrusted.MAX_SIZE):
            raise OnnxModelError(f"{where}: metadata embedx.feature_dim must be a positive integer of at most "
                                 f"{untrusted.MAX_SIZE:,}, found {dim!r:.80}; {fix}")
        temperature = self.meta.get("temperature", "1")
        try:
            valid = untrusted.finite(float(temperature)) and float(temperature) > 0
        except ValueError:
            valid = False
        if not valid:
            raise OnnxModelError(f"{where}: metadata embedx.temperature must be a finite positive number, found "
                                 f"{temperature!r:.80}; {fix}")
        onnxmeta.read_json(self.meta, "head", where=where)

    def predict_proba(self, batch: np.ndarray | list[np.ndarray]) -> np.ndarray:
        if isinstance(batch, list):  # full images of several sizes: one run per size
            out = np.empty((len(batch), len(self.classes)), dtype=np.float32)
            for shape in {array.shape for array in batch}:
                rows = [i for i, array in enumerate(batch) if array.shape == shape]
                out[rows] = self.predict_proba(np.stack([batch[i] for i in rows]))
            return out
        if self.fixed_batch is not None and len(batch) != self.fixed_batch:
            # a fixed-batch model (rare: most exports have a dynamic batch axis) runs chunk by chunk
            return np.concatenate([self.predict_proba(chunk) for chunk in self._fixed_chunks(batch)])[: len(batch)]
        (probabilities,) = self.session.run([self.output_name], {self.input_name: batch})
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.classes):
            raise OnnxModelError(
                f"{self.path} returned {self.output_name!r} of shape {probabilities.shape}, "
                f"expected (N, {len(self.classes)}) for its {len(self.classes)} classes"
            )
        return probabilities

    def _fixed_chunks(self, batch: np.ndarray):
        size = self.fixed_batch
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            if len(chunk) < size:  # pad the last chunk; its padding rows are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            yield chunk

    def describe(self) -> dict[str, Any]:
        """The model's metadata as plain JSON values (for ``GET /v1/model``)."""
        info: dict[str, Any] = {
            "file": self.path.name,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "preprocess": self.spec.to_dict(),
            "input_format": self.input_format,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "fixed_batch": self.fixed_batch,
            "providers": self.providers,
        }
        for key in ("kind", "backbone", "weights", "feature_layer", "version"):
            if key in self.meta:
                info[key] = self.meta[key]
        if "feature_dim" in self.meta:
            info["feature_dim"] = int(self.meta["feature_dim"])
        if "temperature" in self.meta:
            info["temperature"] = float(self.meta["temperature"])
        if "head" in self.meta:
            info["head"] = onnxmeta.read_json(self.meta, "head", where=str(self.path))
        return info


class HeadPipeline(_Classifier):
    """The two-stage pipeline: backbone ONNX (from head.json, sha256 checked) -> saved head (numpy)."""

    def __init__(self, head_dir: str | Path, *, device: str = "auto", threads: int | None = None) -> None:
        from embedx.heads import HeadRecord, load_head
        from embedx.runtime import OrtModel

        self.head_dir = Path(head_dir)
        record = HeadRecord.read(self.head_dir)
        self.backbone_path = record.backbone_onnx()
        self.head = load_head(record)
        self.backbone = OrtModel(self.backbone_path, device=device, threads=threads)
        self.classes = record.class_names
        self.spec = record.preprocess()
        self.input_format = "float_nchw"

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.head.predict_proba(self.backbone.run(batch)), dtype=np.float32)


def load_model(
    path: str | Path, *, device: str = "auto", threads: int | None = None, spinning: bool = True
) -> OnnxClassifier:
    """Open a bundle for inference (torch-free).  ``spinning=False`` when other threads share the cores."""
    return OnnxClassifier(path, device=device, threads=threads, spinning=spinning)


def expand_sources(sources: Iterable[str | Path], *, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Files stay as they are; a folder becomes its image files, found by the walker extract
    uses (``data.list_images``: hidden entries ignored, symlinks followed, loops skipped).
    What a folder's walk skipped is logged and appended to ``skipped`` as ``(path, reason)``."""
    expanded: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found, passed_over = list_images(path)
            expanded.extend(found)
            for name, reason in passed_over:
                logger.info("skipped %s: %s", name, reason)
            if skipped is not None:
                skipped.extend(passed_over)
        else:
            expanded.append(path)
    return expanded


def predict_files(
    sources: Iterable[str | Path],
    *,
    model: str | Path | None = None,
    head: str | Path | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``{"path", "top_k": [{"label", "probability"}, ...]}`` per image, in order.

    Exactly one of ``model`` (a bundle) or ``head`` (a head directory) is needed.
    Directories expand to their image files.  An unreadable image yields
    ``{"path", "error"}`` and the rest go on.
    """
    if (model is None) == (head is None):
        raise ConfigError("pass exactly one of model= (a bundle .onnx) or head= (a head directory)")
    if batch_size < 1 or top_k < 1:
        raise ConfigError(f"batch_size and top_k must be >= 1, got {batch_size} and {top_k}")
    classifier: _Classifier
    if model is not None:
        classifier = load_model(model, device=device, threads=threads)
    else:
        classifier = HeadPipeline(head, device=device, threads=threads)
    paths = expand_sources(sources)

    def prepare(path: Path) -> np.ndarray | str:
        try:
            return classifier.prepare(path)
        except ImageDecodeError as e:
            return decode_reason(e, path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            prepared = list(pool.map(prepare, chunk))
            good = [array for array in prepared if not isinstance(array, str)]
            probabilities = classifier.predict_proba(stack_images(good)) if good else None
            row = 0
            for path, array in zip(chunk, prepared, strict=True):
                if isinstance(array, str):
                    logger.warning("skipping %s: %s", path, array)
                    yield {"path": str(path), "error": array}
                else:
                    yield {"path": str(path), "top_k": classifier.top_k(probabilities[row], top_k)}
                    row += 1
