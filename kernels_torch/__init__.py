"""PyTorch fast paths of the :mod:`mllm_ref` references, and the torch twin of the tiny VLM.

Mirroring. Every fast path lives at the module path of its reference with ``mllm_ref`` replaced by
``kernels_torch``, under the same function name and with the same signature: the reference
``mllm_ref.nn.attention:attention`` has the fast path ``kernels_torch.nn.attention:attention``. The oracle finds fast
paths by this rule alone (:meth:`mllm_ref.oracle.registry.Technique.fast_path`).

Contract. A fast path takes and returns NumPy arrays: inputs become tensors with ``torch.from_numpy`` (no copy
when the array is contiguous and writeable) and results go back with ``Tensor.numpy()``. It validates its input
with the reference's own checks, so bad input raises the same ``TypeError``/``ValueError``; it computes in the
input precision (float32 stays float32, no autocast) on the CPU, and must agree with the reference under the
oracle's tolerance policy.

:mod:`kernels_torch.tinyvlm` is not a fast path but the trainable torch model whose weights the NumPy tiny VLM
loads.
"""
