"""The `skyreels-v4` command line on a tiny saved pipeline."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
from fixtures_pipeline import build_tiny_components
from PIL import Image

import diffusers_skyreels as ds
from diffusers_skyreels.cli import main
from diffusers_skyreels.utils.media_io import export_to_video_with_audio, load_video

PROMPT = "A red ball bounces quickly. <sfx>a ping at every bounce</sfx>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    ds.SkyReelsV4Pipeline(**build_tiny_components()).save_pretrained(folder)
    # The model's recommended settings, read by the command line.
    (folder / "generation_config.json").write_text(json.dumps(
        dict(height=32, width=32, num_frames=9, fps=16, num_inference_steps=2, guidance_scale=2.0,
             audio_guidance_scale=2.0, refine=False)
    ))
    return folder


def streams(path):
    with av.open(str(path)) as container:
        return len(container.streams.video), len(container.streams.audio)


def test_generate_uses_the_model_settings_and_writes_mp4_and_wav(model_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", PROMPT, "--model", str(model_dir), "-o", str(out), "--wav"]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".wav"))]
    clip = load_video(out)
    assert streams(out) == (1, 1) and clip.frames.shape == (9, 32, 32, 3)
    assert clip.audio.shape == (9000,) and out.with_suffix(".wav").is_file()
    refined = tmp_path / "refined.mp4"
    assert main(["generate", PROMPT, "--model", str(model_dir), "-o", str(refined), "--refine", "--seed", "3"]) == 0
    clip = load_video(refined)
    assert clip.frames.shape == (17, 64, 64, 3) and clip.fps == 32 and clip.audio.shape == (8500,)
    silent = tmp_path / "silent.mp4"
    assert main(["generate", PROMPT, "--model", str(model_dir), "-o", str(silent), "--no-audio"]) == 0
    assert streams(silent) == (1, 0)


def test_clip_commands(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "source.mp4"
    export_to_video_with_audio(
        (rng.random((9, 32, 32, 3)) * 255).astype(np.uint8), source, fps=16,
        audio=(0.3 * np.sin(2 * np.pi * 440 * np.arange(9000) / 16000)).astype(np.float32), audio_sample_rate=16000,
    )
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    region = np.zeros((32, 32), np.uint8)
    region[8:24, 8:24] = 255
    Image.fromarray(region).save(mask)
    model = ["--model", str(model_dir)]
    cases = {
        "i2v.mp4": ["i2v", str(image), PROMPT],
        "extend.mp4": ["extend", str(source), PROMPT, "--seconds", "0.5"],
        "inpaint.mp4": ["inpaint", str(source), str(mask), PROMPT, "--keep-audio"],
        "edit.mp4": ["edit", str(source), "Make @video_1 darker"],
        "refine.mp4": ["refine", str(source)],
    }
    for name, command in cases.items():
        assert main([*command, *model, "-o", str(tmp_path / name)]) == 0, name
    assert load_video(tmp_path / "i2v.mp4").frames.shape == (9, 32, 32, 3)
    assert load_video(tmp_path / "extend.mp4").frames.shape == (17, 32, 32, 3)
    kept = load_video(tmp_path / "inpaint.mp4").audio
    original = load_video(source).audio
    assert np.corrcoef(kept, original)[0, 1] > 0.99  # the soundtrack is kept (up to another AAC round trip)
    refined = load_video(tmp_path / "refine.mp4")
    assert refined.frames.shape == (17, 64, 64, 3) and refined.fps == 32


def test_bad_input_fails_before_loading_and_writes_nothing(tmp_path, capsys):
    missing_model = ["--model", str(tmp_path / "no-such-model")]
    assert main(["generate", PROMPT, "-o", str(tmp_path / "clip.avi"), *missing_model]) == 2
    assert "must end in .mp4" in capsys.readouterr().err
    assert main(["generate", PROMPT, "-o", str(tmp_path / "nowhere" / "c.mp4"), *missing_model]) == 2
    assert "does not exist" in capsys.readouterr().err
    not_an_image = tmp_path / "image.png"
    not_an_image.write_text("hello")
    assert main(["i2v", str(not_an_image), PROMPT, "-o", str(tmp_path / "c.mp4"), *missing_model]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["extend", str(tmp_path / "gone.mp4"), PROMPT, "-o", str(tmp_path / "c.mp4"), *missing_model]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.glob("*.mp4")) == []


def test_help_and_plan():
    result = subprocess.run([sys.executable, "-m", "diffusers_skyreels.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "i2v", "extend", "inpaint", "edit", "refine", "plan"):
        assert command in result.stdout
    plan = subprocess.run(
        [sys.executable, "-m", "diffusers_skyreels.cli", "plan", "--height", "64", "--width", "64", "--fps", "32",
         "--duration", "2", "--preset", "tiny"],
        capture_output=True, text=True,
    )
    assert plan.returncode == 0 and "refiner (VSA)" in plan.stdout
