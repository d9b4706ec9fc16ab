"""The planner's token counts and attention FLOPs against a computation by hand."""

import math

import pytest

from diffusers_skyreels.planner import main, plan


def test_1080p_32fps_15s_tokens():
    direct, base, refiner = plan(1080, 1920, 32.0, 15.0, preset="large")
    # 15 s x 32 fps = 480 -> 481 frames (4k + 1) -> 121 latent frames of ceil(1080 / 16) x (1920 / 16) patches.
    assert direct.video_tokens == 121 * 68 * 120 == 987_360
    # 481 / 32 s of audio at 44100 / 1024 latents per second.
    assert direct.audio_tokens == round(481 / 32 * 44100 / 1024) == 647
    # Base pass at 16 fps and 540x960: 241 frames -> 61 latent frames of 34 x 60 patches, plus full-resolution
    # keyframes on latent frames 0, 4, ..., 60 (16 of them).
    assert base.video_tokens == 61 * 34 * 60 + 16 * 68 * 120 == 255_000
    assert base.audio_tokens == direct.audio_tokens
    # The refiner doubles the frame rate back: (61 - 1) * 2 + 1 = 121 latent frames at full resolution.
    assert refiner.video_tokens == 121 * 68 * 120 and refiner.audio_tokens == 0
    assert direct.text_tokens == base.text_tokens == refiner.text_tokens == 256


def test_64x64_16fps_2s_tokens_and_attention_flops():
    direct, base, refiner = plan(64, 64, 16.0, 2.0, preset="tiny", text_tokens=8)
    # 32 -> 33 frames -> 9 latent frames of 4 x 4 patches; 33 / 16 s of audio.
    video, audio, text = 9 * 4 * 4, round(33 / 16 * 44100 / 1024), 8
    assert (direct.video_tokens, direct.audio_tokens) == (144, 89) == (video, audio)
    # Base: 17 frames at 8 fps -> 5 latent frames of 2 x 2, keyframes 0 and 4 at 4 x 4.
    assert base.video_tokens == 5 * 2 * 2 + 2 * 4 * 4 == 52
    assert refiner.video_tokens == 9 * 4 * 4
    # Per block, QK^T and AV cost 2 * 2 * dim FLOPs per (query, key) pair. Video: joint [x ; text] self-attention,
    # text cross-attention and a<->v attention; audio: joint self-attention and a<->v attention.
    dim, blocks = 2 * 16, 2
    pairs = (video + text) ** 2 + video * text + video * audio + (audio + text) ** 2 + audio * video
    assert math.isclose(direct.attention_tflops, 4 * dim * pairs * blocks / 1e12, rel_tol=1e-9)


def test_command_line_prints_the_plan(capsys):
    main(["--height", "64", "--width", "64", "--fps", "16", "--duration", "2", "--preset", "tiny"])
    out = capsys.readouterr().out
    assert "64x64, 16 fps, 2 s, preset 'tiny'" in out
    assert "direct: joint video+audio" in out and "strategy: refiner (VSA)" in out


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="Unknown preset"):
        plan(64, 64, 16.0, 2.0, preset="huge")
