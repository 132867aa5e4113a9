"""Cross-modal connectors: projectors, query-based compressors (Q-Former, resamplers), gated cross-attention and
multimodal positions.

One module per technique (``mllm_ref/connectors/<name>.py``), each registering itself as ``connectors.<name>``.
"""

from mllm_ref.connectors import qformer  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import mrope  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import mlp  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import ldp  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import pixel_shuffle  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import perceiver_resampler  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import cross_attention  # noqa: F401,E402  (importing registers it)
from mllm_ref.connectors import llava_mini  # noqa: F401,E402  (importing registers it)
