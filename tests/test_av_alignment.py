"""`benchmarks/av_alignment.py`: audio spans of video latent frames, band shares, the matrix and the own-vs-shifted
video audio loss on a tiny model."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_pipeline import build_tiny_components

from diffusers_skyreels import SkyReelsV4Pipeline
from diffusers_skyreels.demo.world import bounce_times, sample_clip_spec

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "av_alignment.py"
_SPEC = importlib.util.spec_from_file_location("av_alignment", _PATH)
av_alignment = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(av_alignment)


def test_audio_spans_follow_the_causal_latent_frames():
    pipe = SkyReelsV4Pipeline(**build_tiny_components())
    timing = pipe.clip_timing(16, num_frames=33)
    seconds = timing.num_audio_samples / timing.num_audio_latents / timing.audio_sample_rate
    spans = [av_alignment.audio_span_of_latent_frame(j, timing, 4) for j in range(timing.num_latent_frames)]
    # Latent frame 0 is pixel frame 0 alone (1/16 s), frame j >= 1 is pixel frames 4j - 3 .. 4j (1/4 s).
    assert spans[0][0] == 0 and spans[0][1] == int(np.ceil((1 / 16) / seconds))
    assert spans[1][1] == int(np.ceil((5 / 16) / seconds))
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no audio latent counted twice
    assert spans[-1][1] == min(timing.num_audio_latents, int(np.ceil((33 / 16) / seconds)))


def test_band_share_of_aligned_and_flat_matrices():
    assert av_alignment.band_share(torch.eye(5), 0) == pytest.approx(1.0)
    flat = torch.full((5, 5), 0.2)
    assert av_alignment.band_share(flat, 0) == pytest.approx(0.2)
    # Within one frame: rows 0 and 4 see 2 columns, rows 1-3 see 3.
    assert av_alignment.band_share(flat, 1) == pytest.approx((2 + 3 + 3 + 3 + 2) * 0.2 / 5)


def _zero_coupling(pipe) -> None:
    """Zero the audio branch's audio<->video output projections: its prediction then ignores the video."""
    for block in pipe.audio_transformer.blocks:
        torch.nn.init.zeros_(block.attn_cross_modal.to_out[0].weight)
        torch.nn.init.zeros_(block.attn_cross_modal.to_out[0].bias)


def test_matrix_rows_are_distributions_and_depend_on_the_coupling():
    pipe = SkyReelsV4Pipeline(**build_tiny_components())
    specs = [sample_clip_spec(np.random.default_rng(3))]
    matrix = av_alignment.alignment_matrix(pipe, specs, sigma=0.5, seed=0)
    assert matrix.shape == (9, 9)
    assert torch.all(matrix >= 0) and torch.allclose(matrix.sum(dim=1), torch.ones(9))
    # With the audio<->video projections at zero the audio prediction does not depend on the video at all.
    _zero_coupling(pipe)
    with pytest.raises(ValueError, match="does not depend on the video"):
        av_alignment.alignment_matrix(pipe, specs, sigma=0.5, seed=0)


def test_shifted_clip_differs_only_in_its_bounce_times():
    for seed in range(20):
        spec = sample_clip_spec(np.random.default_rng(seed))
        shifted = av_alignment.shifted_in_time(spec)
        assert shifted.prompt == spec.prompt and (shifted.colour, shifted.shape, shifted.speed, shifted.y) == (
            spec.colour, spec.shape, spec.speed, spec.y)
        own, other = bounce_times(spec, 2.0625), bounce_times(shifted, 2.0625)
        assert len(own) != len(other) or any(abs(a - b) > 0.05 for a, b in zip(own, other))


def test_timing_use_tells_own_from_shifted_video_only_through_the_coupling():
    pipe = SkyReelsV4Pipeline(**build_tiny_components())
    specs = [sample_clip_spec(np.random.default_rng(seed)) for seed in (4, 5)]
    coupled = av_alignment.timing_use(pipe, specs, [0.5], seed=0)[0.5]
    assert coupled[0] > 0 and coupled[1] > 0 and coupled[0] != pytest.approx(coupled[1], rel=1e-6)
    _zero_coupling(pipe)
    own, shifted, share = av_alignment.timing_use(pipe, specs, [0.5], seed=0)[0.5]
    assert own == pytest.approx(shifted, rel=1e-6) and share == 0.0


@pytest.mark.parametrize("argv,message", [(["--sigma", "1"], "--sigma must lie in (0, 1)"),
                                          (["--loss-sigmas", "0.5", "0"], "--loss-sigmas must each lie in (0, 1)"),
                                          (["--num-clips", "0"], "--num-clips must be at least 1")])
def test_bad_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        av_alignment.main(argv)
    assert message in capsys.readouterr().err
