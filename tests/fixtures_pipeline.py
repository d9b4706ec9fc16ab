"""Tiny SkyReels V4 pipelines built in code (random weights), shared by the pipeline tests."""

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, MMAudioVAE, MMAudioVocoder

from diffusers_skyreels import SkyReelsV4AudioTransformer, SkyReelsV4RefinerTransformer, SkyReelsV4Transformer
from diffusers_skyreels.utils import build_tiny_qwen_vl

# 9 frames of 32x32 at 16 fps -> 3 x 4 x 4 video latents; 16 kHz audio with a 256-sample latent hop -> 35 latents.
TINY_CALL = dict(height=32, width=32, num_frames=9, fps=16.0, num_inference_steps=2)


def build_tiny_components(seed: int = 0, couple: bool = True) -> dict:
    torch.manual_seed(seed)
    text_encoder, tokenizer, image_processor = build_tiny_qwen_vl("qwen2_5_vl", hidden_size=32, seed=seed)
    transformer = SkyReelsV4Transformer.from_preset("tiny")
    audio_transformer = SkyReelsV4AudioTransformer.from_preset("tiny")
    if couple:  # give the zero-initialised audio<->video projections weights, so that coupling is exercised
        for model in (transformer, audio_transformer):
            for block in model.blocks:
                torch.nn.init.normal_(block.attn_cross_modal.to_out[0].weight, std=0.2)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0],
    )
    audio_vae = MMAudioVAE(
        mel_bins=16, latent_channels=4, hidden_channels=8, channel_multipliers=(1, 1), layers_per_block=1,
        sample_rate=16000, n_fft=256, hop_length=128,
    )
    vocoder = MMAudioVocoder(
        num_mels=16, upsample_initial_channel=8, upsample_rates=(8, 4, 4), upsample_kernel_sizes=(16, 8, 8),
        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
    )
    refiner = SkyReelsV4RefinerTransformer.from_preset("tiny")
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        image_processor=image_processor,
        transformer=transformer.eval(),
        audio_transformer=audio_transformer.eval(),
        vae=vae.eval(),
        audio_vae=audio_vae.eval(),
        vocoder=vocoder.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        refiner=refiner.eval(),
    )


@pytest.fixture(scope="session")
def tiny_components():
    return build_tiny_components()
