"""One array namespace over numpy or torch, so each L2 solver is written once.

The solvers of ``embedx.heads.lbfgs`` and the selection's calibrated NLL run on numpy
for small problems (importing torch costs seconds there, more than the fit) and on
torch for large ones (its elementwise kernels are vectorized and threaded).  Both
namespaces take numpy arrays in (``asarray``), give numpy arrays out (``numpy``), and
offer the few functions the solvers use under numpy's names; methods both array types
share (``reshape``, ``sum(axis=)``, ``mean(axis=)``, ``clip``, ``argmax(axis=)``, ``any``,
``@``, boolean masks) are called on the arrays directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np

#: Below this many multiply-adds per step (rows x dims x members x outputs), solvers run on one
#: thread: on a shared CPU, two threads synchronizing every small op cost more than they bring.
SMALL_WORK = 2.0e8


def _log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(z - z.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _logsumexp(z: np.ndarray, axis: int) -> np.ndarray:
    top = z.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=axis, keepdims=True))).squeeze(axis)


@contextmanager
def _blas_single_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


NUMPY = SimpleNamespace(
    name="numpy",
    float32=np.float32,
    float64=np.float64,
    asarray=lambda a, dtype=np.float32: np.ascontiguousarray(a, dtype=dtype),
    numpy=np.asarray,
    copy=np.copy,
    single_thread=_blas_single_thread,
    astype=lambda x, dtype: x.astype(dtype),
    zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype=dtype),
    ones=lambda shape, dtype=np.float32: np.ones(shape, dtype=dtype),
    where=np.where,
    amax=np.amax,
    exp=np.exp,
    sqrt=np.sqrt,
    maximum=np.maximum,
    minimum=np.minimum,
    take_along_axis=np.take_along_axis,
    log_softmax=_log_softmax,
    softmax=_softmax,
    logsumexp=_logsumexp,
)


def torch_namespace() -> SimpleNamespace:
    """The same functions on torch tensors (imports torch)."""
    import torch

    dtypes = {np.float32: torch.float32, np.float64: torch.float64, np.int64: torch.int64, bool: torch.bool}

    @contextmanager
    def single_thread() -> Iterator[None]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _blas_single_thread():  # numpy's too: the L-BFGS vector algebra
                yield
        finally:
            torch.set_num_threads(threads)

    return SimpleNamespace(
        name="torch",
        float32=np.float32,
        float64=np.float64,
        asarray=lambda a, dtype=np.float32: torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)),
        numpy=lambda t: t.detach().numpy(),
        copy=torch.clone,
        single_thread=single_thread,
        astype=lambda x, dtype: x.to(dtypes[dtype]),
        zeros=lambda shape, dtype=np.float32: torch.zeros(shape, dtype=dtypes[dtype]),
        ones=lambda shape, dtype=np.float32: torch.ones(shape, dtype=dtypes[dtype]),
        where=torch.where,
        amax=torch.amax,
        exp=torch.exp,
        sqrt=torch.sqrt,
        maximum=torch.maximum,
        minimum=torch.minimum,
        take_along_axis=torch.take_along_dim,
        log_softmax=lambda z, axis: torch.log_softmax(z, dim=axis),
        softmax=lambda z, axis: torch.softmax(z, dim=axis),
        logsumexp=lambda z, axis: torch.logsumexp(z, dim=axis),
    )


def threads_for(xp: SimpleNamespace, work: float) -> AbstractContextManager[None]:
    """One thread for torch and numpy's BLAS while a problem of ``work`` multiply-adds per step
    runs, when that is below ``SMALL_WORK``; the threads as they are otherwise."""
    return xp.single_thread() if work < SMALL_WORK else nullcontext()
