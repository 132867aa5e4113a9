"""The tiny VLM: the shapes world, the tokenizer, the NumPy forward against its torch twin, cached decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.config import TinyVLMConfig
from mllm_ref.tinyvlm.model import (
    WEIGHTS_DIR,
    Trace,
    decode_step,
    encode_image,
    forward_logits,
    generate,
    load,
    prefill,
)


# ---------------------------------------------------------------- the world


def test_scenes_are_deterministic():
    a = [world.make_scene(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert np.array_equal(world.render(a[0]), world.render(a[1]))


def test_scene_objects_are_unique_and_inside():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = world.make_scene(rng)
        assert 1 <= len(s.objects) <= 4
        assert len({o.shape for o in s.objects}) == len(s.objects)
        assert len({o.color for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert o.radius <= o.x <= world.IMAGE_SIZE - o.radius
            assert o.radius <= o.y <= world.IMAGE_SIZE - o.radius


def test_every_object_is_visible_and_has_its_colour():
    rng = np.random.default_rng(1)
    for _ in range(50):
        s = world.make_scene(rng)
        img, omap = world.render(s), world.object_map(s)
        for i, o in enumerate(s.objects):
            pixels = img[omap == i + 1]
            assert len(pixels) >= 9
            full = np.array(world.COLORS[o.color], dtype=np.uint8)
            dark = (full * world.DARK).astype(np.uint8)  # the shape's fill pattern
            assert np.all(np.all(pixels == full, axis=1) | np.all(pixels == dark, axis=1))
            assert np.any(np.all(pixels == full, axis=1))


def test_questions_have_one_right_answer():
    rng = np.random.default_rng(2)
    for _ in range(100):
        s = world.make_scene(rng)
        for qa in world.all_questions(s):
            if qa.qtype == "position":
                words = qa.question.split()
                a = next(o for o in s.objects if o.shape == words[2])
                b = next(o for o in s.objects if o.shape == words[-1])
                if "left" in words:
                    assert abs(a.x - b.x) >= world.MIN_GAP and (qa.answer == "left") == (a.x < b.x)
                else:
                    assert abs(a.y - b.y) >= world.MIN_GAP and (qa.answer == "above") == (a.y < b.y)
            if qa.qtype == "smallest":
                radii = sorted(o.radius for o in s.objects)
                assert radii[0] < radii[1]


def test_held_out_set_is_balanced_and_deterministic():
    a, b = world.vqa_set(3, 4), world.vqa_set(3, 4)
    assert [e.qa for e in a] == [e.qa for e in b]
    counts = {t: sum(e.qa.qtype == t for e in a) for t in world.QUESTION_TYPES}
    assert set(counts.values()) == {4}


def test_patch_objects_marks_small_objects():
    scene = world.Scene((world.Obj("circle", "red", "small", 10.0, 10.0),))
    owner = world.patch_objects(scene, 4)
    assert 1 <= (owner == 1).sum() <= 9
    assert owner[2, 2] == 1


def test_world_bad_input():
    with pytest.raises(TypeError, match="rng"):
        world.make_scene(np.random)
    with pytest.raises(ValueError, match="n_objects"):
        world.make_scene(np.random.default_rng(0), 5)
    with pytest.raises(ValueError, match="qtype"):
        world.sample_question(world.make_scene(np.random.default_rng(0)), "colour", np.random.default_rng(0))
    with pytest.raises(ValueError, match="patch"):
        world.patch_objects(world.make_scene(np.random.default_rng(0)), 5)


# ---------------------------------------------------------------- the tokenizer


def test_tokenizer_round_trip_covers_every_question_and_caption():
    rng = np.random.default_rng(4)
    for _ in range(50):
        s = world.make_scene(rng)
        for text in [qa.question for qa in world.all_questions(s)] + [world.caption(s)]:
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.encode("what colour is it")
    with pytest.raises(TypeError, match="text"):
        tokenizer.encode(3)
    with pytest.raises(ValueError, match="token id"):
        tokenizer.decode([999])


# ---------------------------------------------------------------- the shipped model


def test_manifest_describes_the_weights(model):
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    assert manifest["config"] == TinyVLMConfig().to_dict()
    assert manifest["eval"]["accuracy"] >= 0.9
    assert model.config.n_patches >= 144
    assert model.config.layers >= 4
    assert (WEIGHTS_DIR / manifest["weights_file"]).stat().st_size < 10e6  # a few MB: 2.4 M float32 parameters


def test_load_rejects_a_corrupted_file(tmp_path, model):
    for name in ("manifest.json", "tinyvlm.npz"):
        (tmp_path / name).write_bytes((WEIGHTS_DIR / name).read_bytes())
    data = bytearray((tmp_path / "tinyvlm.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "tinyvlm.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load(tmp_path)


def _example(seed=11, question="what color is the circle"):
    rng = np.random.default_rng(seed)
    scene = world.make_scene(rng, 3)
    return world.render(scene), scene


def test_numpy_forward_matches_the_torch_twin(model):
    torch = pytest.importorskip("torch")
    from kernels_torch.tinyvlm.model import TinyVLM as TorchVLM

    twin = TorchVLM(model.config)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.params.items()})
    twin.eval()
    for seed in (0, 1, 2):
        image, scene = _example(seed)
        ids = tokenizer.prompt_ids(world.all_questions(scene)[0].question)
        ref = forward_logits(model, image, ids)
        with torch.no_grad():
            got = twin(torch.from_numpy(image.astype(np.float32) / 255.0)[None], torch.tensor([ids]))[0].numpy()
        scale = np.abs(ref).max()
        # float32 rounding through ~10 layers: well under 1e-4 of the logit scale
        assert np.abs(got - ref).max() <= 1e-4 * scale, np.abs(got - ref).max() / scale
        assert np.array_equal(got[-1].argmax(), ref[-1].argmax())


@pytest.mark.parametrize("drop_after", [0, 2])
def test_torch_token_dropping_for_training_equals_a_numpy_token_policy(model, drop_after):
    """The torch twin's ``visual_keep`` masking (the training augmentation) gives the last prompt token the same
    logits as the NumPy forward with a token policy that drops those tokens after layer ``drop_after``."""
    torch = pytest.importorskip("torch")
    from kernels_torch.tinyvlm.model import TinyVLM as TorchVLM
    from mllm_ref.tinyvlm.plugs import Plugs, TokenPolicy

    twin = TorchVLM(model.config)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.params.items()})
    twin.eval()
    keep = np.random.default_rng(drop_after).random(model.config.n_patches) < 0.4

    class DropAfter(TokenPolicy):
        def in_decoder(self, layer, view):
            if layer != drop_after:
                return None
            return np.concatenate([np.flatnonzero(keep), np.arange(view.n_visual, view.hidden.shape[0])])

    image, scene = _example(4)
    ids = tokenizer.prompt_ids(world.all_questions(scene)[0].question)
    ref, _ = prefill(model, image, ids, Plugs(token_policy=DropAfter()))
    with torch.no_grad():
        got = twin(torch.from_numpy(image.astype(np.float32) / 255.0)[None], torch.tensor([ids]),
                   visual_keep=torch.from_numpy(keep)[None], drop_after=drop_after)[0, -1].numpy()  # fmt: skip
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_visual_dropout_mask_is_seeded_and_off_at_zero():
    pytest.importorskip("torch")
    from kernels_torch.tinyvlm.train import visual_dropout_mask
    from mllm_ref.tinyvlm.config import TinyVLMConfig

    cfg = TinyVLMConfig()
    assert visual_dropout_mask(np.random.default_rng(0), 4, cfg, 0.0) == (None, 0)
    a, la = visual_dropout_mask(np.random.default_rng(1), 64, cfg, 0.5)
    b, lb = visual_dropout_mask(np.random.default_rng(1), 64, cfg, 0.5)
    assert la == lb and np.array_equal(a.numpy(), b.numpy())
    dropped = (~a.numpy()).sum(axis=1)
    assert (dropped == 0).sum() > 10 and (dropped > 0).sum() > 10  # about half the images lose tokens
    assert dropped.max() <= 0.9 * 144 and dropped[dropped > 0].min() >= int(0.25 * 144)


def test_cached_decode_equals_full_reforward(model):
    image, _ = _example(5)
    prompt = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    logits, state = prefill(model, image, prompt)
    seq = list(prompt)
    for _ in range(6):
        full = forward_logits(model, image, seq)[-1]
        np.testing.assert_allclose(logits, full, rtol=0, atol=2e-5 * np.abs(full).max())
        token = int(np.argmax(logits))
        seq.append(token)
        logits, state = decode_step(model, state, token)


def test_generate_records_a_trace(model):
    image, scene = _example(6)
    gen = generate(model, image, tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT))
    tr = gen.trace
    assert isinstance(tr, Trace)
    assert tr.n_visual == tr.n_patches == model.config.n_patches
    assert tr.layer_tokens == [tr.n_visual + tr.n_prompt] * model.config.layers
    assert len(tr.decode_context) == len(gen.tokens)  # one decode step per token after the first, plus eos
    assert tr.decode_context == list(range(tr.n_visual + tr.n_prompt, tr.n_visual + tr.n_prompt + len(gen.tokens)))
    cfg = model.config
    kv_tokens = tr.n_visual + tr.n_prompt + len(gen.tokens)
    assert tr.kv_bytes == cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 4 * kv_tokens


def test_model_answers_a_few_questions(model):
    examples = world.vqa_set(world.EVAL_SEED, 3)
    from mllm_ref.tinyvlm.model import answer

    right = sum(answer(model, e.image, e.qa.question) == e.qa.answer for e in examples)
    assert right >= 0.75 * len(examples)


def test_model_bad_input(model):
    image, _ = _example(0)
    with pytest.raises(ValueError, match="image"):
        encode_image(model, image[:40])
    with pytest.raises(TypeError, match="image"):
        encode_image(model, image.tolist())
    with pytest.raises(ValueError, match="image"):
        encode_image(model, image.astype(np.float32))  # floats must be in [0, 1]
    with pytest.raises(ValueError, match="prompt_ids"):
        prefill(model, image, [1, 2, 999])
    with pytest.raises(TypeError, match="prompt_ids"):
        prefill(model, image, [1.0, 2.0])
    _, state = prefill(model, image, tokenizer.prompt_ids("how many objects are there"))
    with pytest.raises(ValueError, match="token"):
        decode_step(model, state, -1)
