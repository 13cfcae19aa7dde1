"""embedx's keys in an ONNX model's ``metadata_props`` (torch-free).

Everything a model needs to be used again travels inside the file: the
preprocessing, the backbone and weights tag, the feature layer, the parity result,
and for bundles the class names.  Values are strings; structured ones are JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PREFIX = "embedx."

# Keys (without the prefix) and their meaning:
#   version        embedx version that wrote the file
#   kind           "backbone" (outputs features) or "bundle" (outputs probabilities)
#   backbone       registry name, or "onnx:<file name>" for a user ONNX file
#   weights        weights tag: "DEFAULT"/"IMAGENET1K_V1", "none", "file:<sha256[:16]>"
#   feature_layer  the tapped layer, e.g. "avgpool", "fc7"
#   feature_dim    int, as a string
#   preprocess     JSON of PreprocessSpec.to_dict()
#   parity         JSON {"max_abs_error", "max_rel_error", "batch_sizes", "tolerance"}
#   fingerprint    hex digest of everything that changes the graph
#   classes        JSON list of class names (bundles)
#   head           JSON of the head's head.json summary (bundles)
#   temperature    float as string (bundles)
#   input_format   "float_nchw" (default) or "uint8_nhwc" (bundles made --with-preprocess)


def write(model: Any, values: dict[str, Any]) -> None:
    """Set embedx keys on an ``onnx.ModelProto`` in place (dicts/lists become JSON)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        full = PREFIX + key
        if full in existing:
            existing[full].value = text
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = full, text


def from_proto(model: Any) -> dict[str, str]:
    return {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


def read(path: str | Path) -> dict[str, str]:
    """embedx keys of an ONNX file, without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return from_proto(model)


def read_json(meta: dict[str, str], key: str, default: Any = None) -> Any:
    return json.loads(meta[key]) if key in meta else default
