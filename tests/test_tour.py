"""The tour and the eval command on the bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_ref.cli import main
from mllm_ref.oracle import registry
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs, TokenPolicy
from mllm_ref.tinyvlm.tour import format_table, run_tour

TOUR_KEYS = {
    "id", "setting", "accuracy", "accuracy_delta", "prefill_flops_ratio", "llm_prefill_flops_ratio", "kv_bytes_ratio",
    "decode_tps_ratio", "wall_ratio", "layers_ratio", "identical_output",
}


class _KeepFirstHalf(TokenPolicy):
    """A deliberately crude token policy for testing the tour: keep the first half of the visual tokens."""

    name = "first-half"

    def after_connector(self, tokens, prompt_ids, encoder):
        return tokens.take(np.arange(tokens.n // 2))


def test_tour_rows_measure_a_technique_against_the_baseline(model, monkeypatch):
    tech = registry.Technique(
        id="tokens.first_half_for_test",
        reference=lambda x: x,
        make_case=lambda size, rng: {"x": rng.standard_normal(3)},
        paper="none (a test fixture)",
        model_level=True,
        extra={"plugs": lambda m: Plugs(token_policy=_KeepFirstHalf()), "setting": "keep 72 of 144"},
    )
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", {tech.id: tech})  # the fixture alone, not the real tokens rows
    rows = run_tour(model, only="tokens", n_per_type=4, n_captions=2)
    assert [r["id"] for r in rows] == ["baseline", tech.id]
    base, half = rows
    for row in rows:
        assert TOUR_KEYS <= set(row)
    assert base["accuracy_delta"] == 0 and base["identical_output"] is True
    assert base["prefill_flops_ratio"] == base["kv_bytes_ratio"] == base["layers_ratio"] == 1.0
    # half the visual tokens: the KV cache holds about half as many tokens, prefill FLOPs drop by a good part
    assert 0.45 < half["kv_bytes_ratio"] < 0.6
    assert 0.3 < half["prefill_flops_ratio"] < 0.9
    # the decoder's share shrinks more than the whole prefill (the encoder still sees every patch)
    assert half["llm_prefill_flops_ratio"] < half["prefill_flops_ratio"]
    assert half["layers_ratio"] == 1.0
    assert half["accuracy_delta"] == pytest.approx(half["accuracy"] - base["accuracy"])
    table = format_table(rows)
    assert "baseline" in table and tech.id in table


def test_eval_json(capsys):
    assert main(["eval", "--json", "--n", "5", "--captions", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"accuracy", "by_type", "caption_exact_match", "n"} <= set(out)
    assert out["n"] == 30 and len(out["by_type"]) == 6
    assert 0.0 <= out["accuracy"] <= 1.0


def test_tour_command_writes_json_and_plot(tmp_path, capsys):
    assert main(["tour", "--n", "2", "--captions", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed
    rows = json.loads((tmp_path / "tour.json").read_text())
    assert rows[0]["id"] == "baseline" and TOUR_KEYS <= set(rows[0])
    assert (tmp_path / "tour.png").stat().st_size > 1000


def test_tour_rejects_an_unknown_family(capsys):
    assert main(["tour", "--only", "nonsense"]) == 2
    assert "unknown family" in capsys.readouterr().err


class _LastTokens(KVPolicy):
    """A crude KV policy for testing the tour: after the prefill, keep only the last ``n`` cached tokens."""

    def __init__(self, n):
        self.n = n

    def store(self, layer, k, v, attn, info, *, positions, n_visual):
        return super().store(layer, k[:, -self.n :], v[:, -self.n :], attn, info, positions=positions,
                             n_visual=n_visual)  # fmt: skip


def test_kv_rows_read_the_question_through_the_cache_and_have_their_own_baseline(model, monkeypatch):
    tech = registry.Technique(
        id="kvcache.last_tokens_for_test",
        reference=lambda x: x,
        make_case=lambda size, rng: {"x": rng.standard_normal(3)},
        paper="none (a test fixture)",
        model_level=True,
        extra={"rows": lambda m: [(f"keep {n}", Plugs(kv_policy=_LastTokens(n))) for n in (1, 100)],
               "question_after_image": True},
    )
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", {tech.id: tech})
    rows = run_tour(model, only="kvcache", n_per_type=3, n_captions=1)
    assert [r["id"] for r in rows] == ["baseline", "baseline-question-after-image", tech.id, tech.id]
    base, after, keep1, keep100 = rows
    assert not base["question_after_image"] and after["question_after_image"] and keep1["question_after_image"]
    assert after["identical_output"] and after["accuracy_delta"] == 0 and after["kv_bytes_ratio"] == 1.0
    # the image-and-<bos> prefill is 145 tokens: keeping 1 of them loses the image, keeping 100 loses less
    assert keep1["kv_bytes_ratio"] < keep100["kv_bytes_ratio"] < 1.0
    assert keep1["accuracy"] < after["accuracy"] and not keep1["identical_output"]
    assert "keep 1" in format_table(rows)
