"""The system side: cost accounting (FLOPs, bytes), latency and memory models.

- :mod:`~mllm_ref.system.specs`: model shapes (the tiny VLM, LLaVA-1.5-7B, Qwen2-VL-2B, MobileVLM-1.7B);
- :mod:`~mllm_ref.system.complexity`: FLOPs and bytes per stage, the survey's Table 1 (``system.complexity``);
- :mod:`~mllm_ref.system.latency`: TTFT + (N - 1) TPOT and a roofline stage time (``system.latency``);
- :mod:`~mllm_ref.system.memory`: weights + KV cache, and the longest context that fits (``system.memory``).
"""

from mllm_ref.system import complexity, latency, memory, specs
from mllm_ref.system.complexity import Cost, decode_step_cost, encoder_cost, forward_cost, param_count, prefill_cost
from mllm_ref.system.latency import latency as request_latency
from mllm_ref.system.memory import kv_cache_bytes, max_context, memory_footprint
from mllm_ref.system.specs import LLAVA_15_7B, MOBILEVLM_17B, PUBLISHED, QWEN2_VL_2B, ModelSpec, spec_from_tinyvlm
