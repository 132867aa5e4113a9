"""mllm-ref: readable NumPy references for efficient multimodal LLM techniques, and the oracle that checks
other implementations against them.

Importing the package costs nothing: the families (``mllm_ref.nn``, ``mllm_ref.system``, ...), the tiny VLM
(``mllm_ref.tinyvlm``) and the registry (``mllm_ref.oracle``) are imported where they are used. The package
needs NumPy only.
"""

__version__ = "0.1.0"
