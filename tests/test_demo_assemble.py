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
