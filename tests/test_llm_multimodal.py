"""MLLMEraser and KIF on a tiny random LLaVA (image + text prompts), built from a config offline."""

from __future__ import annotations

import pytest
import torch

from erasekit import Concept
from erasekit.integrations.transformers import TransformersGuard, find_decoder_layers
from erasekit.integrations.transformers_calibrate import calibrate

IMAGE_TOKEN = 299
N_PATCHES = 4  # 32x32 image, 16x16 patches, CLS dropped ("default" feature strategy)


@pytest.fixture(scope="module")
def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=64, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    return model


def _example(seed: int, subject: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 100 if subject else 190, (5,), generator=g) + (0 if subject else 100)
    ids = torch.cat([torch.tensor([1]), torch.full((N_PATCHES,), IMAGE_TOKEN), words]).unsqueeze(0)
    pixels = torch.randn(1, 3, 32, 32, generator=g) + (1.5 if subject else 0.0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def test_layers_of_the_language_model_are_found(llava):
    layers = find_decoder_layers(llava)
    assert len(layers) == 3 and type(layers[0]).__name__ == "LlamaDecoderLayer"
    assert layers[0] is llava.model.language_model.layers[0]


@pytest.mark.parametrize("method", ["mllmeraser", "kif"])
def test_image_text_calibration_and_per_row_erasure(llava, method, tmp_path):
    forget = [_example(i, True) for i in range(8)]
    retain = [_example(100 + i, False) for i in range(10)]
    # knowledge-erasure counterparts: the same prompts with a clean (unperturbed) image
    erasure = [{**x, "pixel_values": x["pixel_values"] - 1.5} for x in forget]
    inputs = {"forget": forget, "retain": retain, "erasure": erasure}
    hp = {"strength": -4.0} if method == "mllmeraser" else {"gate_tau": -50.0}
    pack = calibrate(llava, Concept("logo"), method, inputs=inputs, hyperparameters=hp, progress=False)
    assert pack.fingerprint.architecture == "LlavaForConditionalGeneration"
    path = pack.save_pretrained(tmp_path / method)
    a, b = _example(7, True), _example(101, False)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}
    with torch.inference_mode():
        base = llava(**batch).logits
        with TransformersGuard(llava, [path]) as g:
            guarded = g(**batch, erase=[["logo"], []]).logits
            benign = g(**batch).logits
    assert torch.equal(guarded[1], base[1])
    assert torch.equal(benign, base)
    assert not torch.allclose(guarded[0], base[0])


def test_qwen2_vl_language_model_layers_are_found():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {"vocab_size": 200, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": 0, "eos_token_id": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    layers = find_decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["Qwen2VLDecoderLayer"] * 2
    assert layers[1] is model.model.language_model.layers[1]
