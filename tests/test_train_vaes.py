"""The demo VAE trainer: tiny runs learn, saved folders reload exactly, latent statistics normalize, metrics measure."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck

from diffusers_skyreels.demo import ClipSpec, render_clip
from diffusers_skyreels.demo.train_vaes import (
    SAMPLE_RATE,
    AudioVAESettings,
    VideoVAESettings,
    audio_batch,
    audio_vae_loss,
    build_audio_vae,
    build_video_vae,
    decode_unclamped,
    detect_onset,
    frames_to_tensor,
    latent_statistics,
    main,
    object_fill_ratio,
    peak_frequency,
    render_audio,
    rescale_audio_latents,
    set_latent_statistics,
    statistics_videos,
    tensor_to_frames,
    train,
    train_video_vae,
    video_batch,
    video_vae_loss,
)
from diffusers_skyreels.pipelines.skyreels_v4 import AudioCodec, VideoCodec

TINY_VIDEO = VideoVAESettings(
    base_dim=4,
    dim_mult=(1, 2, 2, 2),
    z_dim=4,
    image_steps=2,
    image_batch_size=2,
    clip_steps=1,
    clip_batch_size=1,
    clip_frames=5,
    clip_crop_size=32,
)
TINY_AUDIO = AudioVAESettings(
    latent_channels=2, channel_multiples=(1, 2), decoder_channels=4, batch_size=2, segment_samples=4096
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_video_vae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = build_video_vae(TINY_VIDEO)
    batch = video_batch(np.random.default_rng(0), 2, 5, 64, 32)
    with torch.no_grad():
        before = video_vae_loss(vae, batch, TINY_VIDEO, seeded()).item()
    losses = train(
        vae, lambda video, step: video_vae_loss(vae, video, TINY_VIDEO, seeded()), itertools.repeat(batch), 8, 2e-3
    )
    with torch.no_grad():
        after = video_vae_loss(vae, batch, TINY_VIDEO, seeded()).item()
    assert len(losses) == 8
    assert after < 0.8 * before


def test_audio_vae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = build_audio_vae(TINY_AUDIO)
    batch = audio_batch(np.random.default_rng(0), 2, 4096, ping_fraction=1.0)
    assert batch.shape == (2, 1, 4096) and batch.abs().max() > 0.3

    def loss(audio: torch.Tensor) -> torch.Tensor:
        return audio_vae_loss(vae, audio, TINY_AUDIO, step=None, generator=seeded())

    with torch.no_grad():
        before = loss(batch).item()
    train(vae, lambda audio, step: loss(audio), itertools.repeat(batch), 8, 1e-3)
    with torch.no_grad():
        after = loss(batch).item()
    assert after < 0.8 * before


def test_training_is_reproducible():
    first, first_losses = train_video_vae(TINY_VIDEO, seed=3)
    second, second_losses = train_video_vae(TINY_VIDEO, seed=3)
    assert first_losses == second_losses
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_fresh_video_vae_codes_a_still_clip_frame_by_frame():
    """Temporal taps start on the current frame, so a still clip has equal latent frames and decodes to still frames."""
    torch.manual_seed(0)
    vae = build_video_vae(TINY_VIDEO).eval()
    frame = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        single = vae.encode(frame).latent_dist.mode()
        latents = vae.encode(frame.expand(-1, -1, 9, -1, -1)).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 4, 3, 4, 4)
    torch.testing.assert_close(latents, single.expand_as(latents), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, decoded[:, :, :1].expand_as(decoded), atol=1e-5, rtol=0)


def test_unclamped_decoding_matches_decode_before_its_clamp():
    torch.manual_seed(0)
    vae = build_video_vae(TINY_VIDEO).eval()
    latents = 3.0 * torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        unclamped = decode_unclamped(vae, latents)
        decoded = vae.decode(latents).sample
    assert unclamped.shape == decoded.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(unclamped.clamp(-1, 1), decoded)


def test_latent_statistics_normalize_the_latents_they_were_measured_on():
    torch.manual_seed(0)
    vae = build_video_vae(TINY_VIDEO).eval()
    videos = list(statistics_videos(seed=0, num_clips=3, num_hires_clips=1, batch_size=2, num_frames=5))
    assert [video.shape[-1] for video in videos] == [64, 64, 128]
    set_latent_statistics(vae, *latent_statistics(vae, videos))

    codec = VideoCodec(vae)
    with torch.no_grad():
        latents = torch.cat([codec.encode(video).transpose(0, 1).flatten(1) for video in videos], dim=1)
    torch.testing.assert_close(latents.mean(dim=1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std(dim=1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_saved_vaes_reload_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    vae = build_video_vae(TINY_VIDEO).eval()
    set_latent_statistics(vae, [0.5, -0.25, 0.0, 1.0], [2.0, 1.0, 0.5, 3.0])
    audio_vae = build_audio_vae(TINY_AUDIO).eval()
    vae.save_pretrained(tmp_path / "vae")
    audio_vae.save_pretrained(tmp_path / "audio_vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    reloaded_audio = AutoencoderOobleck.from_pretrained(tmp_path / "audio_vae").eval()
    assert reloaded.config.latents_std == [2.0, 1.0, 0.5, 3.0]
    assert reloaded_audio.config.audio_channels == 1 and reloaded_audio.hop_length == 256

    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    audio = torch.rand(1, 2048) - 0.5
    with torch.no_grad():
        for old, new in ((VideoCodec(vae), VideoCodec(reloaded)), (AudioCodec(audio_vae), AudioCodec(reloaded_audio))):
            signal = video if isinstance(old, VideoCodec) else audio
            latents = old.encode(signal)
            assert torch.equal(latents, new.encode(signal))
            assert torch.equal(old.decode(latents), new.decode(latents))


def test_metrics_measure_ground_truth_clips():
    ball = render_clip(ClipSpec("ball", "green", "slowly", start_x=0.4, y=0.5, direction=1), num_frames=1)
    square = render_clip(ClipSpec("square", "green", "slowly", start_x=0.4, y=0.5, direction=1), num_frames=1)
    assert abs(object_fill_ratio(ball.frames[0], "green") - np.pi / 4) < 0.05
    assert object_fill_ratio(square.frames[0], "green") == pytest.approx(1.0)

    audio, bounces = render_audio(ClipSpec("ball", "yellow", "quickly", start_x=0.2, y=0.5, direction=1))
    assert bounces
    start = int(np.ceil(bounces[0] * SAMPLE_RATE))
    assert peak_frequency(audio[start : start + 1600]) == pytest.approx(1320.0, rel=0.005)
    assert detect_onset(audio, bounces[0]) == pytest.approx(bounces[0], abs=1e-3)
    assert detect_onset(np.zeros_like(audio), bounces[0]) is None


def test_frames_round_trip_through_the_model_range():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    video = frames_to_tensor(frames)
    assert video.shape == (3, 2, 8, 8) and video.min() >= -1 and video.max() <= 1
    assert np.array_equal(tensor_to_frames(video[None])[0], frames)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--output-dir" in capsys.readouterr().out
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_skyreels.demo.train_vaes", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--image-steps" in result.stdout


@torch.no_grad()
def test_rescale_audio_latents_scales_latents_and_keeps_reconstructions():
    torch.manual_seed(0)
    vae = build_audio_vae(TINY_AUDIO).eval()
    audio = audio_batch(np.random.default_rng(0), 2, 4096, 1.0)
    latents = vae.encode(audio).latent_dist.mode()
    reconstruction = vae.decode(latents).sample
    rescale_audio_latents(vae, 3.5)
    scaled = vae.encode(audio).latent_dist.mode()
    torch.testing.assert_close(scaled, 3.5 * latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vae.decode(scaled).sample, reconstruction, rtol=1e-4, atol=1e-6)
