import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.kivi import cache_arrays, kivi_dequantize, kivi_quantize
from mllm_ref.kvcache.quant_attention import quant_attention
from mllm_ref.nn.attention import attention
from mllm_ref.oracle.registry import get

IMPLS = [quant_attention]
try:
    from kernels_torch.kvcache.quant_attention import quant_attention as _tq

    IMPLS.append(_tq)
except ImportError:  # pragma: no cover
    pass
try:
    from kernels_numba.kvcache.quant_attention import quant_attention as _nb

    IMPLS.append(_nb)
except ImportError:  # pragma: no cover
    pass


@pytest.mark.parametrize("impl", IMPLS)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.sampled_from([2, 3, 4, 8]), st.integers(1, 3),
       st.booleans())  # fmt: skip
def test_equals_attention_over_dequantized_cache(impl, seed, t, bits, grp, new):
    rng = np.random.default_rng(seed)
    hkv, d = 2, 8
    k = rng.standard_normal((hkv, t, d)) * 2
    v = rng.standard_normal((hkv, t, d))
    c = kivi_quantize(k, v, bits, 4, 8)
    q = rng.standard_normal((hkv * grp, 1, d))
    k1, v1 = rng.standard_normal((2, hkv, 1, d))
    if not new and t == 0:
        return
    kd, vd = kivi_dequantize(c)
    if new:
        kd, vd = np.concatenate([kd, k1], 1), np.concatenate([vd, v1], 1)
    ref = attention(q[None], kd[None], vd[None], causal=True)[0]
    got = impl(q, k_new=k1 if new else None, v_new=v1 if new else None, **cache_arrays(c))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_rejects_mismatched_parts():
    kw = get("kvcache.quant_attention").make_case("tiny", np.random.default_rng(0))
    kw["v_full"] = kw["v_full"][:, 1:]
    with pytest.raises(ValueError, match="same tokens"):
        quant_attention(**kw)
    kw = get("kvcache.quant_attention").make_case("tiny", np.random.default_rng(0))
    with pytest.raises(ValueError, match="k_new and v_new"):
        quant_attention(**{**kw, "v_new": None})
    with pytest.raises(TypeError, match="k_codes"):
        quant_attention(**{**kw, "k_codes": kw["k_codes"].astype(np.int32)})
