"""Run an ONNX Runtime session through IO binding at one fixed batch shape.

``BoundRunner(session, batch_size=B)`` binds a static input buffer and a preallocated
output once, and every ``run(batch)`` copies the batch into the input buffer (padding a
short last batch: the rows past it keep whatever was there, valid pixels of an earlier
batch or zeros, and their outputs are dropped), runs, and returns the real rows. So:

- the model only ever sees one shape: cuDNN searches its algorithms once, TensorRT builds
  one engine, and a CUDA graph can be captured (the addresses never change);
- on CUDA a batch that already lives on the device (a torch CUDA tensor from the GPU
  decoder) is copied device-to-device, never through the host; a numpy batch is uploaded
  as it is (uint8 pixels: a quarter of the bytes of float32);
- on the CPU the output is written into the same buffer every time (no allocation).

Torch is used only when the caller hands over torch tensors (GPU decode), or to upload
from pinned memory on CUDA when it is installed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from embedx.errors import BackendError

logger = logging.getLogger(__name__)

_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


class BoundRunner:
    """``run(batch) -> float32 (n, D)`` for batches of at most ``batch_size`` rows."""

    def __init__(self, session: Any, *, batch_size: int, input_name: str | None = None,
                 output_name: str | None = None, device_id: int = 0) -> None:
        import onnxruntime as ort

        self.session = session
        self.batch_size = int(batch_size)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        self.input_name = input_name or inputs[0].name
        self.output_name = output_name or outputs[0].name
        spec = next(i for i in inputs if i.name == self.input_name)
        if spec.type not in _ONNX_TO_NUMPY:
            raise BackendError(f"cannot bind an input of type {spec.type}")
        self.input_dtype = np.dtype(_ONNX_TO_NUMPY[spec.type])
        self.item_shape = tuple(int(d) if isinstance(d, int) else -1 for d in spec.shape[1:])
        if any(d < 0 for d in self.item_shape):
            raise BackendError(f"{self.input_name} has a symbolic non-batch dimension {spec.shape}; "
                               "IO binding needs fixed image sizes")
        self.on_gpu = session.get_providers()[0] in GPU_PROVIDERS
        self.device = "cuda" if self.on_gpu else "cpu"
        self.device_id = device_id
        self.binding = session.io_binding()
        shape = (self.batch_size, *self.item_shape)
        self._torch_input = None
        self._pinned = None
        if self.on_gpu and self._torch_cuda():
            import torch

            dtype = {np.uint8: torch.uint8, np.float32: torch.float32, np.float16: torch.float16,
                     np.int8: torch.int8}[self.input_dtype.type]
            self._torch_input = torch.zeros(shape, dtype=dtype, device=f"cuda:{device_id}")
            self._pinned = torch.zeros(shape, dtype=dtype).pin_memory()
            # copies on a stream of their own: work on the legacy default stream would wait for,
            # and hold up, every other stream (the GPU decoders', ONNX Runtime's)
            self._stream = torch.cuda.Stream(device=f"cuda:{device_id}")
            self.binding.bind_input(self.input_name, "cuda", device_id, self.input_dtype, list(shape),
                                    self._torch_input.data_ptr())
            self._input = None
        else:
            self._input = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.input_dtype), self.device, device_id)
            self.binding.bind_ortvalue_input(self.input_name, self._input)
        # the output's width: from the graph when it is static, else from one run
        out_spec = next(o for o in outputs if o.name == self.output_name)
        width = out_spec.shape[1] if len(out_spec.shape) == 2 and isinstance(out_spec.shape[1], int) else None
        if width is None:
            self.binding.bind_output(self.output_name, self.device, device_id)
            session.run_with_iobinding(self.binding)
            width = int(np.prod(self.binding.get_outputs()[0].shape()[1:]))
        out_type = _ONNX_TO_NUMPY.get(out_spec.type, np.float32)
        self._output = ort.OrtValue.ortvalue_from_shape_and_type([self.batch_size, width], out_type, self.device,
                                                                 device_id)
        self.binding.bind_ortvalue_output(self.output_name, self._output)
        self.feature_dim = width

    @staticmethod
    def _torch_cuda() -> bool:
        try:
            import torch
        except ImportError:
            return False
        return bool(torch.cuda.is_available())

    def _load(self, batch: Any) -> int:
        count = len(batch)
        if count > self.batch_size or count == 0:
            raise BackendError(f"a batch of {count} rows for a runner bound at {self.batch_size}")
        if tuple(batch.shape[1:]) != self.item_shape:
            raise BackendError(f"{self.input_name} expects items of shape {self.item_shape}, "
                               f"got {tuple(batch.shape[1:])}")
        if self._torch_input is not None:
            import torch

            with torch.cuda.stream(self._stream):
                if _is_torch_tensor(batch):
                    self._torch_input[:count].copy_(batch, non_blocking=True)
                else:
                    source = self._pinned[:count]
                    source.numpy()[...] = np.asarray(batch, dtype=self.input_dtype)
                    self._torch_input[:count].copy_(source, non_blocking=True)
            self._stream.synchronize()  # ORT computes on its own stream
        else:
            if _is_torch_tensor(batch):
                batch = batch.cpu().numpy()
            if count == self.batch_size:
                self._input.update_inplace(np.ascontiguousarray(batch, dtype=self.input_dtype))
            else:
                padded = np.zeros((self.batch_size, *self.item_shape), dtype=self.input_dtype)
                padded[:count] = batch
                self._input.update_inplace(padded)
        return count

    def run(self, batch: Any) -> np.ndarray:
        count = self._load(batch)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"inference failed on a bound batch of {count}: {e}") from e
        return np.array(self._output.numpy()[:count], dtype=np.float32)  # a copy: the buffer is reused


__all__ = ["BoundRunner"]
