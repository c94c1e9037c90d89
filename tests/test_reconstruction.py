"""Masked-autoencoder pieces: patch order, targets, decoder, loss, and that it learns."""

from __future__ import annotations

import pytest
import torch

from mmfsar.losses.reconstruction import masked_reconstruction_mse
from mmfsar.models.encoders import VideoViT, tube_mask
from mmfsar.models.reconstruction import (
    VideoMAEDecoder,
    normalized_patch_targets,
    patchify,
    reconstruction_targets,
    unpatchify,
)


def test_patchify_layout_by_hand_and_round_trip():
    x = torch.randn(2, 3, 4, 12, 8)  # tubelet 2, patch 4 -> grid (2, 3, 2)
    patches = patchify(x, tubelet_size=2, patch_size=4)
    assert patches.shape == (2, 12, 2 * 4 * 4 * 3)
    # token (slot 1, row 2, col 0); pixel (frame 1, y 3, x 2, channel 2) of that tubelet
    token = 1 * 6 + 2 * 2 + 0
    pixel = ((1 * 4 + 3) * 4 + 2) * 3 + 2
    assert patches[1, token, pixel] == x[1, 2, 1 * 2 + 1, 2 * 4 + 3, 0 * 4 + 2]
    assert torch.equal(unpatchify(patches, (2, 3, 2), tubelet_size=2, patch_size=4), x)


def test_patchify_follows_the_vit_token_order():
    """The tubelet embedding is a linear map of exactly the tubelets ``patchify`` returns."""
    model = VideoViT(
        in_channels=2, num_frames=4, img_size=16, patch_size=8, embed_dim=8, depth=0, num_heads=2
    )
    x = torch.randn(2, 2, 4, 16, 16)
    weight = model.patch_embed.proj.weight.permute(0, 2, 3, 4, 1).flatten(
        1
    )  # (D, t*p*p*C), channel last
    expected = patchify(x, 2, 8) @ weight.T + model.patch_embed.proj.bias
    torch.testing.assert_close(model.patch_embed(x), expected, rtol=1e-4, atol=1e-4)


def test_patchify_rejects_clips_that_do_not_divide():
    with pytest.raises(ValueError, match="tubelets"):
        patchify(torch.zeros(1, 3, 3, 8, 8), tubelet_size=2, patch_size=4)


def test_normalized_targets_have_zero_mean_unit_std_per_patch_and_channel():
    x = torch.rand(2, 3, 4, 8, 8) * 5 + torch.tensor([0.0, 10.0, -3.0]).view(1, 3, 1, 1, 1)
    targets = reconstruction_targets(x, tubelet_size=2, patch_size=4)
    per_channel = targets.reshape(2, 8, 2 * 4 * 4, 3)
    torch.testing.assert_close(per_channel.mean(dim=2), torch.zeros(2, 8, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=2), torch.ones(2, 8, 3), atol=1e-4, rtol=0)
    # per-channel affine input normalisation (ImageNet mean / std) does not change the targets
    rescaled = reconstruction_targets(x * 3 + 1, tubelet_size=2, patch_size=4)
    torch.testing.assert_close(rescaled, targets, atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized_patch_targets(patchify(x, 2, 4), 2, 3), targets)
    for tubelet_size, channels in ((2, 5), (4, 3)):  # 96 values are not t x p² x C of those
        with pytest.raises(ValueError, match=f"channels={channels}"):
            normalized_patch_targets(patchify(x, 2, 4), tubelet_size, channels)


def _tiny_pair() -> tuple[VideoViT, VideoMAEDecoder]:
    encoder = VideoViT(
        in_channels=3, num_frames=4, img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=4
    )
    return encoder, VideoMAEDecoder.for_encoder(encoder, decoder_dim=64, depth=1, num_heads=2)


def test_decoder_predicts_the_masked_positions_in_mask_order():
    encoder, _ = _tiny_pair()  # grid (2, 4, 4)
    decoder = VideoMAEDecoder(
        encoder_dim=64, decoder_dim=32, depth=0, num_heads=2, patch_dim=96, grid=encoder.grid
    )
    mask = tube_mask(2, encoder.grid, 0.75, generator=torch.Generator().manual_seed(0))
    out = encoder(torch.randn(2, 3, 4, 16, 16), mask=mask, return_tokens=True)
    pred = decoder(out.tokens, mask)
    assert pred.shape == (2, 24, 96)
    # Without blocks a masked prediction depends on its position only: head(norm(mask_token + pos)).
    for sample in range(2):
        positions = mask[sample].nonzero().flatten()
        expected = decoder.head(
            decoder.norm(decoder.mask_token[0] + decoder.pos_embed[0, positions])
        )
        torch.testing.assert_close(pred[sample], expected)
    with pytest.raises(ValueError, match="mask keeps"):
        decoder(out.tokens[:, :4], mask)


def test_masked_mse_uses_only_masked_targets():
    targets = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    pred = torch.randn(2, 2, 5)
    expected = ((pred - torch.stack([targets[0, [0, 3]], targets[1, [2, 4]]])) ** 2).mean()
    torch.testing.assert_close(masked_reconstruction_mse(pred, targets, mask), expected)
    targets_changed_where_visible = torch.where(mask[..., None], targets, torch.randn_like(targets))
    torch.testing.assert_close(
        masked_reconstruction_mse(pred, targets_changed_where_visible, mask), expected
    )
    with pytest.raises(ValueError, match="do not match"):
        masked_reconstruction_mse(torch.randn(2, 3, 5), targets, mask)


def test_reconstruction_loss_falls_when_overfitting_two_clips():
    torch.manual_seed(0)
    encoder, decoder = _tiny_pair()
    clips = torch.randn(2, 3, 4, 16, 16)
    targets = reconstruction_targets(clips, tubelet_size=2, patch_size=4)
    mask = tube_mask(2, encoder.grid, 0.5, generator=torch.Generator().manual_seed(0))
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(60):
        out = encoder(clips, mask=mask, return_tokens=True)
        loss = masked_reconstruction_mse(decoder(out.tokens, out.mask), targets, out.mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # predicting each patch's mean (zero) would score ~1 on normalised targets
    assert losses[-1] < 0.5 and losses[-1] < 0.3 * losses[0], losses
