"""The demo assembly commands: the shipped folder combines the trained pipeline with the separately trained refiner."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from fixtures_pipeline import build_tiny_components

import diffusers_skyreels as ds
from diffusers_skyreels.demo.assemble import GENERATION_CONFIG, main


def test_finalize_takes_the_refiner_of_the_refiner_run(tmp_path):
    joint, refiner_run, shipped = tmp_path / "joint", tmp_path / "refiner", tmp_path / "shipped"
    ds.SkyReelsV4Pipeline(**build_tiny_components(seed=0)).save_pretrained(joint)
    ds.SkyReelsV4Pipeline(**build_tiny_components(seed=1)).save_pretrained(refiner_run)
    main(["--finalize", str(joint), "--refiner", str(refiner_run), "--output-dir", str(shipped)])

    pipe = DiffusionPipeline.from_pretrained(shipped)
    trained_refiner = ds.SkyReelsV4RefinerTransformer.from_pretrained(refiner_run / "refiner")
    trained_video = ds.SkyReelsV4Transformer.from_pretrained(joint / "transformer")
    for got, want in ((pipe.refiner, trained_refiner), (pipe.transformer, trained_video)):
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(pipe.refiner.proj_out.weight, pipe.transformer.proj_out.weight)
    assert json.loads((shipped / "generation_config.json").read_text()) == GENERATION_CONFIG
    card = (shipped / "README.md").read_text()
    assert "train_demo.sh" in card and "- demo" in card


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output-dir", "x"], "exactly one of"),
        (["--output-dir", "x", "--vae-dir", "a", "--finalize", "b"], "exactly one of"),
        (["--output-dir", "x", "--finalize", "b"], "go together"),
    ],
)
def test_assemble_rejects_ambiguous_commands(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_shipped_demo_model_loads_and_generates_a_clip_with_sound():
    from diffusers_skyreels.cli import GENERATION_CONFIG as CONFIG_FILE
    from diffusers_skyreels.cli import default_model_path

    path = default_model_path()
    settings = json.loads((path / CONFIG_FILE).read_text())
    assert settings == GENERATION_CONFIG
    pipe = DiffusionPipeline.from_pretrained(path)
    assert isinstance(pipe, ds.SkyReelsV4Pipeline) and pipe.refiner is not None
    weights = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert weights <= 40e6 and not list(path.rglob("*.bin"))
    out = pipe(
        "A green ball bounces quickly between the walls of a dark room. <sfx>a ping at every bounce</sfx>",
        **{**settings, "num_inference_steps": 2, "refine": False},
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, 33, 64, 64, 3) and out.fps == 16
    assert out.audio.shape == (1, 33000) and out.audio_sample_rate == 16000
