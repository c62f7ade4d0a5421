"""Optional peer engines for the inference benchmark: what a user could deploy instead of this package's engines.

``onnxruntime_forwards`` exports the masked net's function as a plain dense model (its zeros stored as zeros) to
ONNX and runs it with onnxruntime, once with its own thread count and once with one thread, each with its
threads' spinning switched off (``session.intra_op.allow_spinning = 0``), so that no engine's idle threads steal
the cores of the engine timed next. The packages come from ``requirements-benchmarks.txt`` (``make benchmarks``
installs it); where they are missing, the function returns the one-line reason instead and the benchmark skips
the row.

``torch_channels_last_forwards`` runs the same plain dense model in torch with channels-last activations, the
layout torch's CPU convolutions run fastest in (the notebook's inputs are channels-last too); torch is always here.

``mkl_forwards`` runs this package's scipy engine (im2col convolutions, CSR linears) with every CSR x dense
product done by Intel MKL's sparse BLAS (``sparse_dot_mkl.dot_product_mkl``): the engine a user gets by
pointing the reference backend at MKL. MKL is loaded from ``$MKL_RT``, or else from the ``libmkl_rt.so`` that
pip's ``mkl`` package puts under this environment's ``lib/`` (on an AMD CPU sparse_dot_mkl does not find it
without that), with ``KMP_BLOCKTIME=0`` so its threads sleep at once after each call.
"""

import copy
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from dst.csr.model import SparseNet
from dst.engine.masked import MaskedNet

ONNXRUNTIME = "onnxruntime (dense model)"
TORCH_CHANNELS_LAST = "torch dense, channels_last"
MKL = "MKL sparse BLAS (scipy engine)"


def plain_dense(masked: MaskedNet) -> MaskedNet:
    """A copy of ``masked`` in eval mode without its mask step: the stored inactive weights are zero, so it is the
    same function as a plain dense net."""
    plain = copy.deepcopy(masked).eval()
    for layer in plain.masked_layers().values():
        layer.apply_mask = False
    return plain


def computes_the_same(got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether a peer's logits match the masked net's, to float32 tolerance scaled by their size."""
    return np.allclose(got, expected, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(expected).max())))


def onnxruntime_forwards(masked: MaskedNet, inputs: torch.Tensor) -> dict[str, object] | str:
    """``{"own threads": forward, "1 thread": forward}`` running ``masked``'s function in onnxruntime, or the reason
    it cannot run here (a string). Each forward takes no argument and runs ``inputs`` (a fixed batch)."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime
    except ImportError as error:
        return f"{ONNXRUNTIME}: not installed ({error.name}); make benchmarks installs requirements-benchmarks.txt"
    plain = plain_dense(masked)
    exported = io.BytesIO()
    # The TorchScript exporter (dynamo=False): the torch.export one needs onnxscript besides onnx, for a plain
    # Sequential of convs and linears that both export alike. Its deprecation notice says nothing about this net.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(plain, (inputs[:1],), exported, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    feed = {"x": inputs.detach().cpu().numpy().astype(np.float32)}
    forwards = {}
    for label, threads in (("own threads", os.cpu_count() or 1), ("1 thread", 1)):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(exported.getvalue(), options, providers=["CPUExecutionProvider"])
        expected = plain(inputs).detach().numpy()
        got = session.run(None, feed)[0]
        if not computes_the_same(got, expected):
            raise ValueError("onnxruntime's exported model does not compute the masked net's function")
        forwards[label] = (lambda session=session: session.run(None, feed)), None
    return forwards


def torch_channels_last_forwards(masked: MaskedNet, inputs: torch.Tensor) -> dict[str, object]:
    """``{"own threads": forward, "1 thread": forward}`` running ``masked``'s function as a plain dense torch model
    on channels-last activations; the benchmark sets torch's thread count for each block, as for the masked net."""
    plain = plain_dense(masked).to(memory_format=torch.channels_last)
    batch = inputs.detach().cpu().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, expected = plain(batch).numpy(), copy.deepcopy(masked).eval()(inputs).detach().numpy()
    if not computes_the_same(got, expected):
        raise ValueError("the channels_last dense model does not compute the masked net's function")

    def run():
        with torch.inference_mode():
            return plain(batch)

    return {"own threads": (run, None), "1 thread": (run, None)}


def mkl_forwards(masked: MaskedNet, inputs: torch.Tensor) -> dict[str, object] | str:
    """``{"own threads": forward, "1 thread": forward}`` running ``masked`` on the scipy engine with MKL's sparse
    products, or the reason it cannot run here (a string)."""
    if "MKL_RT" not in os.environ:
        found = sorted((Path(sys.prefix) / "lib").glob("libmkl_rt.so*"))
        if found:
            os.environ["MKL_RT"] = str(found[-1])
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        import sparse_dot_mkl
    except ImportError as error:  # not installed, or installed without a loadable MKL
        return f"{MKL}: {str(error).splitlines()[0]}; make benchmarks installs requirements-benchmarks.txt"
    model = SparseNet.from_masked(masked, "scipy")
    calls = []

    def product(matrix, dense):
        calls.append(1)
        return sparse_dot_mkl.dot_product_mkl(matrix, np.ascontiguousarray(dense))

    model.ops.matmul = product  # this model's own operations object: every step of it multiplies through MKL
    expected = copy.deepcopy(masked).eval()(inputs).detach().numpy()  # the caller's net keeps its mode
    got = np.asarray(model(inputs))
    if not calls or not computes_the_same(got, expected):
        raise ValueError("the MKL engine does not compute the masked net's function")

    def forward(threads: int):
        def run():
            previous = sparse_dot_mkl.mkl_set_num_threads_local(threads)
            try:
                return model(inputs)
            finally:
                sparse_dot_mkl.mkl_set_num_threads_local(previous)
        return run

    return {"own threads": (forward(os.cpu_count() or 1), None), "1 thread": (forward(1), None)}
