"""CLIP towers from open_clip: local weights only, the tiny architecture, frame and text encoders."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import open_clip
import pytest
import torch
from hydra.utils import instantiate

from mmfsar.data.modalities import RGB
from mmfsar.models.base import build_encoder, export_encoder
from mmfsar.models.encoders.clip import (
    TINY_CLIP_MODEL,
    ClipFrameEncoder,
    ClipTextEncoder,
    load_open_clip,
)

IMG, FRAMES, DIM = 64, 4, 128


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP saved as a plain open_clip state dict."""
    torch.manual_seed(0)
    model = load_open_clip(TINY_CLIP_MODEL, None)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@functools.cache
def _tokenizer() -> open_clip.SimpleTokenizer:
    return open_clip.get_tokenizer(TINY_CLIP_MODEL)


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    images = torch.linspace(-1, 1, 2 * 3 * IMG * IMG).reshape(2, 3, IMG, IMG)
    tokens = _tokenizer()(["a photo of waving", "jumping jacks"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _forbid_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("open_clip.create_model was called")

    monkeypatch.setattr(open_clip, "create_model", fail)


def test_tiny_architecture_is_registered_and_its_tokenizer_is_packaged() -> None:
    import huggingface_hub.constants

    assert TINY_CLIP_MODEL in open_clip.list_models()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_MODEL)
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    tokens = tokenizer(["wave", "a person jumps over a box"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    vocabulary = Path(open_clip.tokenizer.default_bpe())
    assert vocabulary.is_file() and vocabulary.parent == Path(open_clip.__file__).parent
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_state_dict_and_training_checkpoint_load_identically(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = load_open_clip(TINY_CLIP_MODEL, None)
    expected = _outputs(model)
    plain = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), plain)
    wrapped = tmp_path / "epoch_1.pt"  # open_clip's training checkpoints: DDP names under "state_dict"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    assert not torch.allclose(_outputs(load_open_clip(TINY_CLIP_MODEL, None))[0], expected[0])
    for path in (plain, wrapped):
        image, text = _outputs(load_open_clip(TINY_CLIP_MODEL, path))
        assert torch.equal(image, expected[0]) and torch.equal(text, expected[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_openai_style_torchscript_file_loads_with_quick_gelu(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = load_open_clip(TINY_CLIP_MODEL, None, quick_gelu=True).eval()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(model).save(str(path))
    loaded = load_open_clip(TINY_CLIP_MODEL, path)
    assert type(loaded.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    for got, expected in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(got, expected)


def test_missing_weights_fail_before_anything_is_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _forbid_building(monkeypatch)
    missing = tmp_path / "clip_vit_b16.pt"
    with pytest.raises(FileNotFoundError, match="clip_vit_b16.pt") as error:
        load_open_clip("ViT-B-16", missing)
    assert "ViT-B-16" in str(error.value)
    with pytest.raises(FileNotFoundError, match="never downloaded"):  # a tag is not a file
        load_open_clip("ViT-B-16", "openai")
    with pytest.raises(FileNotFoundError, match="clip_vit_b16.pt"):
        ClipFrameEncoder(model_name="ViT-B-16", pretrained=missing, in_channels=3, num_frames=8, img_size=224)


def test_bad_architecture_names_and_mismatched_weights(tiny_weights: Path) -> None:
    with pytest.raises(ValueError, match="hf-hub"):
        load_open_clip("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    with pytest.raises(ValueError, match="Hugging Face text tower"):
        load_open_clip("coca_roberta-ViT-B-32", None)
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_open_clip("ViT-Tiny-404", None)
    with pytest.raises(ValueError, match=r"tiny_clip\.pt.*unexpected \['visual\.transformer\.resblocks\.2"):
        load_open_clip(TINY_CLIP_MODEL, tiny_weights, vision_cfg={"layers": 2})


def test_img_size_interpolates_the_position_embedding(tiny_weights: Path) -> None:
    model = load_open_clip(TINY_CLIP_MODEL, tiny_weights, img_size=96)
    assert model.visual.positional_embedding.shape == (1 + (96 // 8) ** 2, DIM)
    assert model.encode_image(torch.zeros(1, 3, 96, 96)).shape == (1, DIM)


def test_frame_encoder_shapes_per_frame_features_and_freezing(tiny_weights: Path) -> None:
    torch.manual_seed(3)
    clips = torch.randn(2, 3, FRAMES, IMG, IMG)
    frozen = ClipFrameEncoder(
        model_name=TINY_CLIP_MODEL, pretrained=tiny_weights, in_channels=3, num_frames=FRAMES, img_size=IMG, freeze=True
    )
    out = frozen(clips)
    assert out.pooled.shape == (2, DIM) and out.frames.shape == (2, FRAMES, DIM) and frozen.feature_dim == DIM
    reference = load_open_clip(TINY_CLIP_MODEL, tiny_weights).eval()
    with torch.no_grad():
        per_frame = torch.stack([reference.encode_image(clips[:, :, t]) for t in range(FRAMES)], dim=1)
    torch.testing.assert_close(out.frames, per_frame, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, per_frame.mean(dim=1), rtol=1e-5, atol=1e-5)

    frozen.train()
    assert not frozen.visual.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(clips).frames.requires_grad

    trainable = ClipFrameEncoder(
        model_name=TINY_CLIP_MODEL, pretrained=tiny_weights, in_channels=3, num_frames=FRAMES, img_size=IMG
    )
    trainable(clips).pooled.sum().backward()
    assert trainable.visual.conv1.weight.grad is not None and trainable.visual.conv1.weight.grad.abs().sum() > 0


def test_frame_encoder_rejects_bad_input(tiny_weights: Path) -> None:
    encoder = ClipFrameEncoder(
        model_name=TINY_CLIP_MODEL, pretrained=tiny_weights, in_channels=3, num_frames=FRAMES, img_size=IMG
    )
    with pytest.raises(ValueError, match=r"\(B, 3, T, 64, 64\)"):
        encoder(torch.zeros(2, 3, FRAMES, 32, 32))
    with pytest.raises(ValueError, match="cannot mask"):
        encoder(torch.zeros(1, 3, FRAMES, IMG, IMG), mask_ratio=0.5)
    with pytest.raises(ValueError, match="in_channels=2"):
        ClipFrameEncoder(model_name=TINY_CLIP_MODEL, pretrained=None, in_channels=2, num_frames=FRAMES, img_size=IMG)


def test_frame_encoder_builds_from_config_and_survives_export(tmp_path: Path) -> None:
    """Hydra builds it from the RGB modality's inputs; the exported file (pretrained cleared) rebuilds it."""
    config = {"_target_": "mmfsar.models.encoders.clip.ClipFrameEncoder", "model_name": TINY_CLIP_MODEL}
    inputs = {"num_frames": FRAMES, **RGB(name="rgb", size=IMG).encoder_inputs()}
    encoder = instantiate({**config, "pretrained": None}, **inputs).eval()
    # export_encoder clears "pretrained" in the saved config: the rebuild is random until the weights load
    path = export_encoder(
        tmp_path / "encoder.pt", encoder, encoder_config={**config, "pretrained": "/nowhere.pt", **inputs},
        modalities={}, frames={},
    )
    rebuilt = build_encoder(path).eval()
    clips = torch.randn(1, 3, FRAMES, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(rebuilt(clips).frames, encoder(clips).frames)


def test_text_encoder_batches_normalises_and_templates(tiny_weights: Path) -> None:
    encoder = ClipTextEncoder(model_name=TINY_CLIP_MODEL, pretrained=tiny_weights)
    names = ["jumping", "waving both arms", "squatting"]
    features = encoder.encode(names)
    assert features.shape == (3, DIM) and not features.requires_grad
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    reference = load_open_clip(TINY_CLIP_MODEL, tiny_weights).eval()
    tokens = _tokenizer()([f"a photo of {name}" for name in names])
    with torch.no_grad():
        torch.testing.assert_close(features, reference.encode_text(tokens, normalize=True))
    one_by_one = torch.cat([encoder.encode([name]) for name in names])
    torch.testing.assert_close(features, one_by_one, rtol=1e-5, atol=1e-5)
    assert not any(key.startswith("visual.") for key in encoder.model.state_dict())
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode([])
    with pytest.raises(ValueError, match="template"):
        ClipTextEncoder(model_name=TINY_CLIP_MODEL, pretrained=None, template="a photo")
