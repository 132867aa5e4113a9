"""The checker must reject known-wrong implementations with readable messages, and accept right ones.

Two kinds of subjects: small techniques registered by these tests alone (so the checker's own logic is tested
whatever the library holds), and the library's ``nn.attention`` with textbook mistakes (gpu-mode's ``wrong/``
fixtures: all zeros, low-precision arithmetic, an off-by-one mask, a missing scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mllm_ref.oracle import registry
from mllm_ref.oracle.check import check, judge_case, resolve_impl
from mllm_ref.oracle.registry import OracleError, Technique, UnknownTechniqueError

# ---------------------------------------------------------------- techniques registered by these tests


def row_mean(x):
    """Mean of each row, in the precision of ``x``."""
    return np.mean(x, axis=-1)


def _mean_case(size, rng):
    n = {"short": 7, "long": 4099}[size]
    return {"x": (1 + rng.standard_normal((3, n))).astype(np.float32)}


def top_k(scores, k):
    """Indices of the ``k`` largest scores, largest first; equal scores go to the lower index."""
    return np.argsort(-scores, kind="stable")[:k]


def _top_k_case(size, rng):
    return {"scores": rng.integers(0, 4, 40).astype(np.float32), "k": 9}  # many ties


@dataclass
class Split:
    values: np.ndarray
    index: np.ndarray


def largest_half(x):
    """The larger half of ``x`` (a float output) and where it was (an integer output), in the order of ``x``."""
    index = np.sort(np.argsort(-x, kind="stable")[: x.size // 2])
    return Split(x[index], index)


def sorted_copy(x):
    """``x`` sorted ascending."""
    return np.sort(x)


def _is_sorted_permutation(reference_out, got, inputs):
    if not np.array_equal(np.sort(got), reference_out):
        return False, "the output is not a permutation of the input"
    if np.any(np.diff(got) < 0):
        return False, f"the output is not sorted: {got}"
    return True, ""


@pytest.fixture
def test_techniques(scratch_registry):
    def one_vector(size, rng):
        return {"x": rng.standard_normal(16).astype(np.float32)}

    scratch_registry(Technique("nn.test_row_mean", row_mean, _mean_case, "a test fixture", ("short", "long")))
    scratch_registry(Technique("tokens.test_top_k", top_k, _top_k_case, "a test fixture", ("a", "b"), compare="exact"))
    scratch_registry(Technique("tokens.test_largest_half", largest_half, one_vector, "a test fixture"))
    scratch_registry(
        Technique("tokens.test_sort", sorted_copy, one_vector, "a test fixture", compare=_is_sorted_permutation)
    )


def _rejected(technique_id, impl, *words):
    verdict = check(technique_id, impl)
    assert not verdict.passed, f"the checker accepted a wrong implementation:\n{verdict.message}"
    for w in words:
        assert w in verdict.message, f"{w!r} is not in the message:\n{verdict.message}"
    return verdict


@pytest.mark.usefixtures("test_techniques")
class TestOnTestTechniques:
    def test_right_implementations_pass_including_reordered_and_more_accurate_ones(self):
        assert check("nn.test_row_mean", row_mean).passed
        assert check("nn.test_row_mean", lambda x: (np.einsum("ij->i", x) / np.float32(x.shape[1]))).passed
        assert check("nn.test_row_mean", lambda x: x.mean(axis=-1, dtype=np.float64).astype(np.float32)).passed
        assert check("tokens.test_top_k", lambda scores, k: top_k(scores, k).astype(np.int32)).passed
        assert check("tokens.test_sort", lambda x: np.sort(x)[::-1][::-1].copy()).passed

    def test_all_zeros(self):
        v = _rejected("nn.test_row_mean", lambda x: np.zeros(x.shape[0], x.dtype), "exceed the allowed error")
        assert v.mismatches == 6 and v.max_rel_error == 1.0

    def test_float16_accumulation(self):
        def float16_sum(x):
            total = np.zeros(x.shape[0], np.float16)
            for j in range(x.shape[1]):  # a kernel whose accumulator is half precision
                total += x[:, j].astype(np.float16)
            return (total / np.float16(x.shape[1])).astype(x.dtype)

        _rejected("nn.test_row_mean", float16_sum, "case 'long'", "exceed the allowed error")

    def test_missing_scale(self):
        _rejected("nn.test_row_mean", lambda x: x.sum(axis=-1), "exceed the allowed error")

    def test_wrong_tie_break(self):
        def ties_to_the_higher_index(scores, k):
            n = scores.shape[0]
            return (n - 1 - np.argsort(-scores[::-1], kind="stable"))[:k]

        _rejected("tokens.test_top_k", ties_to_the_higher_index, "differ (exact comparison)", "got", "expected")

    def test_exact_outputs_need_the_same_dtype_kind(self):
        _rejected("tokens.test_top_k", lambda scores, k: top_k(scores, k).astype(np.float64), "dtype float64")

    def test_a_wrong_integer_leaf_inside_a_dataclass(self):
        def wrong_index(x):
            out = largest_half(x)
            return Split(out.values, out.index[::-1].copy())

        _rejected("tokens.test_largest_half", wrong_index, "out.index", "differ (exact comparison)")
        assert check("tokens.test_largest_half", largest_half).passed

    def test_an_invariant_checker_decides_and_its_own_crash_is_a_failure(self):
        _rejected("tokens.test_sort", lambda x: x.copy(), "not sorted")
        _rejected("tokens.test_sort", lambda x: np.sort(x)[:-1], "not a permutation")
        _rejected("tokens.test_sort", lambda x: None, "the comparison raised")

    def test_exceptions_become_failing_verdicts(self):
        def broken(x):
            raise RuntimeError("kernel launch failed")

        v = _rejected("nn.test_row_mean", broken, "RuntimeError: kernel launch failed", "FAILED on 2 of 2 cases")
        assert v.to_json()["max_abs_error"] is None

    def test_writing_into_an_input_fails(self):
        def in_place(x):
            x -= x.mean(axis=-1, keepdims=True)  # "saves memory"
            return row_mean(x + x.mean())

        _rejected("nn.test_row_mean", in_place, "modified its input(s) x")

    def test_nested_inputs_are_protected_too(self, scratch_registry):
        tech = scratch_registry(
            Technique("nn.test_pair_sum", lambda pair: pair[0] + pair[1], lambda s, rng: {"pair": (np.ones(3), np.ones(3))}, "a test fixture")
        )

        def in_place(pair):
            pair[1][:] = 0
            return pair[0] + 1

        v = judge_case(tech, in_place, tech.cases()[0][1], "")
        assert not v.passed and "modified its input(s) pair[1]" in v.message


def exp_of_sum(x, gain=50.0):
    """``exp(gain * sum(x))`` over the last axis: ``gain`` amplifies the rounding of the sum 50 times."""
    return np.exp(gain * np.sum(x, axis=-1))


def test_a_legitimate_reordering_passes_where_the_naive_run_was_lucky(scratch_registry):
    """In float64, 1 + 2**-53 + 2**-53 is 1 in one order and 1 + 2**-52 in the other: 50 ulps after exp(50 x).
    The naive run is the gold itself and the float32 run rounds the same way, so only the perturbed run shows that
    the case is this sensitive; a kernel summing from the right is as right as the reference."""

    def case(size, rng):
        return {"x": np.array([[1.0, 2.0**-53, 2.0**-53]])}

    scratch_registry(Technique("nn.test_exp_of_sum", exp_of_sum, case, "a test fixture"))

    def from_the_right(x, gain=50.0):
        return np.exp(gain * np.sum(x[..., ::-1], axis=-1))

    x = case("small", None)["x"]
    assert from_the_right(x) != exp_of_sum(x)  # the orders really differ
    assert check("nn.test_exp_of_sum", from_the_right).passed
    _rejected("nn.test_exp_of_sum", lambda x, gain=50.0: exp_of_sum(x, gain * (1 + 1e-12)), "exceed the allowed error")


# ---------------------------------------------------------------- nn.attention with textbook mistakes


def textbook_attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_weights=False, shift=0):
    """Plain attention (GQA by repeating k and v), with the causal mask moved by ``shift`` keys (0 is right)."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    group = hq // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(1 / np.sqrt(d) if scale is None else scale)
    allowed = np.ones((b, 1, tq, tk), dtype=bool)
    if causal:
        allowed &= np.arange(tk) <= (tk - tq + np.arange(tq))[:, None] + shift
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    w = np.exp(s - np.where(np.isfinite(m), m, 0))
    total = w.sum(axis=-1, keepdims=True)
    w = w / np.where(total > 0, total, 1)
    return (w @ v, w) if return_weights else w @ v


def zeros_attention(q, k, v, **kw):
    out = textbook_attention(q, k, v, **kw)
    return tuple(np.zeros_like(o) for o in out) if isinstance(out, tuple) else np.zeros_like(out)


def float16_attention(q, k, v, **kw):
    """Computes in float16, as a kernel with half-precision accumulators would, and returns float32."""
    out = textbook_attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), **kw)
    return tuple(o.astype(q.dtype) for o in out) if isinstance(out, tuple) else out.astype(q.dtype)


def off_by_one_causal_attention(q, k, v, **kw):
    """Each query also sees the next key."""
    return textbook_attention(q, k, v, **kw, shift=1)


def unscaled_attention(q, k, v, **kw):
    """Forgets the 1/sqrt(d) scale (and any scale given)."""
    return textbook_attention(q, k, v, **{**kw, "scale": 1.0})


def test_the_textbook_attention_is_right_so_each_mistake_below_is_the_only_fault():
    assert check("nn.attention", textbook_attention).passed


@pytest.mark.parametrize(
    "impl",
    [zeros_attention, float16_attention, off_by_one_causal_attention, unscaled_attention],
    ids=["all-zeros", "float16-arithmetic", "off-by-one-causal-mask", "missing-scale"],
)
def test_wrong_attention_is_rejected(impl):
    v = _rejected("nn.attention", impl, "nn.attention: FAILED", "exceed the allowed error", "got", "expected")
    assert v.mismatches > 0 and v.max_abs_error > 0


def test_the_off_by_one_mask_fails_only_where_the_mask_matters():
    v = check("nn.attention", off_by_one_causal_attention)
    assert "case 'prefill_causal_gqa'" in v.message and "case 'prefill_odd'" not in v.message  # not causal


@pytest.mark.parametrize("impl", ["numba", "torch", "kernels_numba.nn.attention:attention"])
def test_the_fast_paths_are_accepted_by_name_and_by_import_path(impl):
    v = check("nn.attention", impl)
    assert v.passed, v.message
    assert v.cases == len(registry.get("nn.attention").test_sizes)
    assert "all 8 cases agree" in v.message


def test_an_implementation_in_a_file(tmp_path):
    path = tmp_path / "my_attention.py"
    path.write_text("from mllm_ref.nn.attention import attention as reference\n\ndef attention(**kw):\n    return reference(**kw)\n")
    assert check("nn.attention", f"{path}:attention").passed


# ---------------------------------------------------------------- finding the implementation


@pytest.mark.parametrize(
    "impl, words",
    [
        ("cuda", "impl must be 'numba', 'torch', 'module:function'"),
        ("no_such_module_xyz:f", "cannot load no_such_module_xyz: ModuleNotFoundError"),
        ("mllm_ref.nn.attention:no_such_function", "has no function 'no_such_function'"),
        ("/no/such/file.py:f", "does not exist"),
        (42, "must be a callable or a string"),
    ],
)
def test_an_implementation_that_cannot_be_found_is_a_readable_error(impl, words):
    with pytest.raises(OracleError, match=words.replace("(", r"\(")):
        resolve_impl(impl, registry.get("nn.attention"))


def test_a_file_that_fails_to_load_is_a_readable_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n")
    with pytest.raises(OracleError, match="cannot load .*SyntaxError"):
        resolve_impl(f"{path}:f")


def test_a_missing_fast_path_and_an_unknown_id(test_techniques):
    with pytest.raises(OracleError, match="nn.test_row_mean has no numba fast path"):
        check("nn.test_row_mean", "numba")
    with pytest.raises(UnknownTechniqueError, match="no technique 'nn.nothing'; known: .*nn.attention"):
        check("nn.nothing", "numba")
