"""`benchmarks/av_alignment.py`: audio spans of video latent frames, band shares, and the matrix on a tiny model."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_pipeline import build_tiny_components

from diffusers_skyreels import SkyReelsV4Pipeline
from diffusers_skyreels.demo.world import sample_clip_spec

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


def test_matrix_rows_are_distributions_and_depend_on_the_coupling():
    pipe = SkyReelsV4Pipeline(**build_tiny_components())
    specs = [sample_clip_spec(np.random.default_rng(3))]
    matrix = av_alignment.alignment_matrix(pipe, specs, sigma=0.5, seed=0)
    assert matrix.shape == (9, 9)
    assert torch.all(matrix >= 0) and torch.allclose(matrix.sum(dim=1), torch.ones(9))
    # With the audio<->video projections at zero the audio prediction does not depend on the video at all.
    for block in pipe.audio_transformer.blocks:
        torch.nn.init.zeros_(block.attn_cross_modal.to_out[0].weight)
        torch.nn.init.zeros_(block.attn_cross_modal.to_out[0].bias)
    with pytest.raises(ValueError, match="does not depend on the video"):
        av_alignment.alignment_matrix(pipe, specs, sigma=0.5, seed=0)


@pytest.mark.parametrize("argv,message", [(["--sigma", "1"], "--sigma must lie in (0, 1)"),
                                          (["--num-clips", "0"], "--num-clips must be at least 1")])
def test_bad_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        av_alignment.main(argv)
    assert message in capsys.readouterr().err
