"""The real-size BLIP config: public values, and the parameter count they imply."""

from __future__ import annotations

import pytest
from transformers import BlipConfig, BlipForQuestionAnswering

from vqabench.models.blip_configs import blip_vqa_base_config, blip_vqa_base_values, parameter_breakdown


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _layer_norm(width: int) -> int:
    return 2 * width


def expected_vision(vc) -> int:
    """ViT: patch conv + class token + positions, L x (qkv, proj, MLP, 2 LN), final LN."""
    h, patch = vc.hidden_size, vc.patch_size
    positions = (vc.image_size // patch) ** 2 + 1
    embeddings = _linear(3 * patch * patch, h) + h + positions * h
    layer = (
        _linear(h, 3 * h)
        + _linear(h, h)
        + _layer_norm(h)
        + _linear(h, vc.intermediate_size)
        + _linear(vc.intermediate_size, h)
        + _layer_norm(h)
    )
    return embeddings + vc.num_hidden_layers * layer + _layer_norm(h)


def expected_text_stack(tc) -> int:
    """BERT with cross-attention in every layer (is_decoder): embeddings + L layers, no pooler."""
    h, i, enc = tc.hidden_size, tc.intermediate_size, tc.encoder_hidden_size
    embeddings = tc.vocab_size * h + tc.max_position_embeddings * h + _layer_norm(h)
    self_attention = 3 * _linear(h, h) + _linear(h, h) + _layer_norm(h)
    cross_attention = _linear(h, h) + 2 * _linear(enc, h) + _linear(h, h) + _layer_norm(h)
    feed_forward = _linear(h, i) + _linear(i, h) + _layer_norm(h)
    layer = self_attention + (cross_attention if tc.is_decoder else 0) + feed_forward
    return embeddings + tc.num_hidden_layers * layer


def expected_decoder(tc, tied: bool) -> int:
    """The text stack + LM head: transform dense + LN and a vocab bias; untied adds a weight and a bias."""
    h = tc.hidden_size
    head = _linear(h, h) + _layer_norm(h) + tc.vocab_size
    if not tied:  # transformers 5.2 then keeps decoder.weight and decoder.bias apart
        head += _linear(h, tc.vocab_size)
    return expected_text_stack(tc) + head


def expected_breakdown(config) -> dict[str, int]:
    # transformers 5.2 ties the decoder's LM head to its word embeddings unless both flags are off
    tied = config.tie_word_embeddings or config.text_config.tie_word_embeddings
    parts = {
        "vision_encoder": expected_vision(config.vision_config),
        "question_encoder": expected_text_stack(config.text_config),
        "answer_decoder": expected_decoder(config.text_config, tied),
    }
    parts["total"] = sum(parts.values())
    return parts


@pytest.fixture(scope="module")
def real_size_model():
    """The ~361M-parameter model, built once (a few seconds, ~1.5 GB RAM)."""
    model = BlipForQuestionAnswering(blip_vqa_base_config())
    yield model
    del model


def test_shipped_config_carries_the_public_values():
    config = blip_vqa_base_config()
    shipped = blip_vqa_base_values()["config"]
    for section in ("text_config", "vision_config"):
        for key, value in shipped[section].items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    assert config.text_config.num_attention_heads == 12  # the hub value, not transformers' default 8
    assert config.vision_config.image_size // config.vision_config.patch_size == 24  # 576 patches + CLS = 577
    assert config.text_config.vocab_size == 30524 and config.text_config.encoder_hidden_size == 768


def test_every_shipped_value_names_its_source():
    values = blip_vqa_base_values()
    keys = {f"{section}.{key}" for section in ("text_config", "vision_config") for key in values["config"][section]}
    keys |= {key for key, value in values["config"].items() if not isinstance(value, dict)}
    missing = keys - set(values["provenance"])
    assert not missing
    for key in keys:
        assert all(source.split(" ")[0] in values["sources"] for source in values["provenance"][key]), key


def test_real_size_model_has_the_parameter_count_its_config_implies(real_size_model):
    counts = parameter_breakdown(real_size_model)
    expected = expected_breakdown(blip_vqa_base_config())
    for part, value in expected.items():
        assert counts[part] == value, part
    assert counts["other"] == 0
    # the figures stated in docs/telemetry.md
    assert counts == {
        "vision_encoder": 86_090_496,
        "question_encoder": 137_258_496,
        "answer_decoder": 137_881_148,
        "other": 0,
        "total": 361_230_140,
        "trainable": 361_230_140,
    }
    decoder = real_size_model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def test_untied_count_matches_the_published_checkpoint_size():
    """The public file holds the LM-head weight apart (bias shared, as transformers 4.x did).

    4 bytes a value + a header.
    """
    config = blip_vqa_base_config()
    parts = expected_breakdown(config)
    untied = parts["total"] + config.text_config.vocab_size * config.text_config.hidden_size
    header = blip_vqa_base_values()["checks"]["safetensors_bytes"] - 4 * untied
    assert untied == 384_672_572
    assert 0 < header < 256 * 1024  # a JSON header of ~800 tensor names, not missing tensors


def test_parameter_breakdown_follows_the_config_on_a_small_model():
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(
        text_config=dict(
            small,
            vocab_size=100,
            max_position_embeddings=20,
            bos_token_id=98,
            sep_token_id=97,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        vision_config=dict(small, image_size=32, patch_size=8),
        tie_word_embeddings=False,
    )
    model = BlipForQuestionAnswering(config)
    model.vision_model.requires_grad_(False)
    counts = parameter_breakdown(model)
    expected = expected_breakdown(config)
    assert {k: counts[k] for k in expected} == expected
    assert counts["trainable"] == counts["total"] - counts["vision_encoder"]
