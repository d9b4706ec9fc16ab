"""Assemble the demo's initial pipeline folder: trained VAEs, a frozen random tiny Qwen-VL, fresh `demo` branches.

`python -m diffusers_skyreels.demo.assemble --vae-dir VAES --output-dir INIT` writes a `SkyReelsV4Pipeline` folder
that the training script (`examples/train_skyreels_v4.py --pretrained_model_name_or_path INIT`) starts from. The
text encoder is randomly initialised and frozen: it only has to map different prompts to different embeddings, which
the branches learn to read. `--finalize JOINT --refiner REFINER` then writes the shipped folder from the two
training runs (see `finalize`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from ..models import SkyReelsV4AudioTransformer, SkyReelsV4RefinerTransformer, SkyReelsV4Transformer
from ..pipelines import SkyReelsV4Pipeline
from ..utils import build_tiny_qwen_vl, learn_merges
from ..utils.model_card import save_model_card
from .world import BASE_CLIP, all_prompts

TEXT_HIDDEN_SIZE = 64
# The tokenizer learns merges from the world's prompts, so that a prompt is ~24 tokens instead of ~100 bytes.
TOKENIZER_VOCAB_SIZE = 600
SCHEDULER_SHIFT = 2.0
# Pixels per video token side: 64 x 64 frames become 4 x 4 tokens per latent frame (patch 4 on the 4x VAE's latents),
# so that the branches train in minutes on a CPU while the VAE keeps the object sharp.
PIXELS_PER_TOKEN = 16


def build_demo_pipeline(vae_dir: str | Path, seed: int = 0) -> SkyReelsV4Pipeline:
    """A fresh demo pipeline around the trained VAEs in `vae_dir` (`vae/`, `audio_vae/`)."""
    vae_dir = Path(vae_dir)
    merges = learn_merges(all_prompts(), TOKENIZER_VOCAB_SIZE)
    text_encoder, tokenizer, image_processor = build_tiny_qwen_vl(
        "qwen2_5_vl", hidden_size=TEXT_HIDDEN_SIZE, seed=seed, merges=merges
    )
    vae = AutoencoderKLWan.from_pretrained(vae_dir / "vae")
    audio_vae = AutoencoderOobleck.from_pretrained(vae_dir / "audio_vae")
    torch.manual_seed(seed)
    overrides = dict(text_embed_dim=TEXT_HIDDEN_SIZE)
    patch = PIXELS_PER_TOKEN // vae.config.scale_factor_spatial
    video = SkyReelsV4Transformer.from_preset(
        "demo",
        out_channels=vae.config.z_dim,
        in_channels=2 * vae.config.z_dim + 1,
        patch_size=(1, patch, patch),
        **overrides,
    )
    audio_channels = audio_vae.config.decoder_input_channels
    audio = SkyReelsV4AudioTransformer.from_preset("demo", out_channels=audio_channels,
                                                   in_channels=2 * audio_channels + 1, **overrides)
    # Dense attention: the demo refiner sees ~1100 tokens (20 cubes), where Video Sparse Attention only adds overhead.
    refiner = SkyReelsV4RefinerTransformer.from_video_branch(video, sparse_attention=False)
    return SkyReelsV4Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        image_processor=image_processor,
        transformer=video,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        audio_transformer=audio,
        audio_vae=audio_vae,
        vocoder=None,
        refiner=refiner,
    )


# What the shipped model was trained for; the `skyreels-v4` command reads it as its defaults. The base model was
# trained without keyframe tokens (paired high-resolution data for all clips was too slow to encode on a CPU), so the
# refiner works from the low-resolution guide alone.
GENERATION_CONFIG = dict(
    **BASE_CLIP,
    num_inference_steps=20,
    guidance_scale=6.0,
    audio_guidance_scale=6.0,
    refine=True,
    keyframe_indices=[],
    refiner_num_inference_steps=8,
    refiner_guidance_scale=1.0,
)


EXAMPLE_PROMPT = "A blue square bounces slowly between the walls of a dark room. <sfx>a ping at every bounce</sfx>"
TRAINING_SUMMARY = """\
The demo model of `diffusers_skyreels`, trained from scratch on a CPU by `examples/demo/train_demo.sh` on a procedural
world (`diffusers_skyreels.demo.world`): one ball or square in one of four colours moves left and right at one of two
speeds and pings at every bounce, at a pitch set by its colour. It only knows that world. 64x64 at 16 fps, refined to
128x128 at 32 fps; 2-second clips. Its VAEs were trained on the same world
(`python -m diffusers_skyreels.demo.train_vaes`); its text encoder is a frozen, randomly initialised tiny Qwen2.5-VL
with a tokenizer whose merges were learnt from the world's prompts. The recipe, wall-clock times and evaluation are in
`examples/demo/README.md` of the repository. `generation_config.json` holds the settings the `skyreels-v4` command
uses by default.
"""


def finalize(pipeline_dir: str | Path, refiner_dir: str | Path, output_dir: str | Path) -> None:
    """The shipped folder: the trained pipeline with the refiner trained separately, and `generation_config.json`."""
    import json

    import diffusers_skyreels  # noqa: F401  (registers the classes)

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.register_modules(refiner=SkyReelsV4RefinerTransformer.from_pretrained(Path(refiner_dir) / "refiner"))
    pipe.save_pretrained(output_dir)
    (Path(output_dir) / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    save_model_card(
        output_dir,
        base_model=None,
        instance_prompt=None,
        lora=False,
        branches=["transformer", "audio_transformer", "refiner"],
        example_prompt=EXAMPLE_PROMPT,
        training_summary=TRAINING_SUMMARY,
        tags=["demo"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="where to save the pipeline folder")
    parser.add_argument("--vae-dir", type=Path, help="folder with the trained vae/ and audio_vae/")
    parser.add_argument("--finalize", type=Path,
                        help="instead: a trained pipeline to ship, with the refiner of --refiner")
    parser.add_argument("--refiner", type=Path, help="with --finalize: a pipeline folder whose refiner was trained")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if sum(value is not None for value in (args.vae_dir, args.finalize)) != 1:
        parser.error("pass exactly one of --vae-dir and --finalize")
    if (args.finalize is None) != (args.refiner is None):
        parser.error("--finalize and --refiner go together")
    if args.finalize is not None:
        finalize(args.finalize, args.refiner, args.output_dir)
    else:
        build_demo_pipeline(args.vae_dir, args.seed).save_pretrained(args.output_dir)
    print(args.output_dir)


if __name__ == "__main__":
    main()
