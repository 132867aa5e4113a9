"""The system side: cost accounting (FLOPs, bytes), latency and memory models, and model shapes.

- :mod:`~mllm_ref.system.specs`: model shapes (the tiny VLM, LLaVA-1.5-7B, Qwen2-VL-2B, MobileVLM-1.7B);
- :mod:`~mllm_ref.system.complexity`: FLOPs and bytes per stage, the survey's Table 1 (``system.complexity``);
- :mod:`~mllm_ref.system.latency`: TTFT + (N - 1) TPOT and roofline time estimates (``system.latency``);
- :mod:`~mllm_ref.system.memory`: weights + KV cache, the longest context that fits, parameter counts
  (``system.memory``).

Importing this package registers the three techniques.
"""

from mllm_ref.system import complexity, latency, memory, specs
from mllm_ref.system.complexity import (
    Cost,
    connector_cost,
    decode_cost,
    decode_step_cost,
    encoder_cost,
    forward_cost,
    intext_bounds,
    layer_flops,
    prefill_cost,
    table1,
)
from mllm_ref.system.latency import (
    RequestEstimate,
    estimate_request,
    estimate_stage_time,
    prefill_share,
    tokens_per_second,
)
from mllm_ref.system.latency import latency as request_latency
from mllm_ref.system.memory import (
    kv_cache_bytes,
    max_context,
    memory_footprint,
    model_max_context,
    model_memory,
    param_count,
)
from mllm_ref.system.specs import (
    LLAVA_15_7B,
    MOBILEVLM_1_7B,
    PUBLISHED,
    QWEN2_VL_2B,
    ConnectorSpec,
    DecoderSpec,
    ModelSpec,
    VisionSpec,
    qwen2_vl_2b,
    spec_from_tinyvlm,
)
