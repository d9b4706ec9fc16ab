"""Paired data, high-resolution keyframe tokens and refiner training on tiny models and a tiny paired dataset: the
low-res derivation, the paired cache, keyframe conditions and the refiner guide against the pipelines, optimisation,
save / reload / resume of the refiner (full and LoRA), and bad input."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from fixtures_pipeline import build_tiny_components
from safetensors.torch import load_file

import diffusers_skyreels as ds
from diffusers_skyreels.demo import write_dataset
from diffusers_skyreels.training import (
    PairedScales,
    SkyReelsV4Trainer,
    TaskRates,
    TaskSampler,
    TrainingConfig,
    auto_keyframe_indices,
    decode_clip,
    parse_args,
    train,
)
from diffusers_skyreels.training.dataset import collate

REPO = Path(__file__).resolve().parents[1]
# The clips are 32x32, 17 frames at 32 fps; the tiny refiner's scales (2, 2) make the training clips 16x16, 9 frames at
# 16 fps: 4 x 3 x 2 x 2 low-res latents, 4 x 5 x 4 x 4 high-res latents, "auto" keyframes [0, 2].
SIZE = dict(height=16, width=16, num_frames=9, fps=16.0)
CHANNELS = 4
PROMPT = "A red ball bounces."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny pipeline (with its refiner), 3 bouncing-world clips at the high resolution, their paired cache."""
    root = tmp_path_factory.mktemp("paired")
    ds.SkyReelsV4Pipeline(**build_tiny_components()).save_pretrained(root / "pipeline")
    write_dataset(root / "data", 3, seed=0, width=32, height=32, fps=32, num_frames=17, sample_rate=16000)
    train(config(root, "joint", output_dir=root / "precompute", cache_dir=root / "cache", precompute_only=True))
    return root


def config(root: Path, mode: str, **overrides) -> TrainingConfig:
    values = dict(
        pretrained_model_name_or_path=str(root / "pipeline"), dataset_dir=str(root / "data"),
        output_dir=str(root / f"out-{mode}"), mode=mode, paired_data=True, train_batch_size=2, max_train_steps=2,
        learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=0, **SIZE,
    )
    values.update({k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
    return TrainingConfig(**values)


def prepared(root: Path, mode: str, **overrides) -> SkyReelsV4Trainer:
    trainer = SkyReelsV4Trainer(config(root, mode, **overrides))
    trainer.prepare()
    return trainer


def refiner_pipeline(pipeline) -> ds.SkyReelsV4RefinerPipeline:
    names = ("tokenizer", "text_encoder", "refiner", "vae", "scheduler", "image_processor")
    pipe = ds.SkyReelsV4RefinerPipeline(**{name: getattr(pipeline, name) for name in names})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- data -------------------------------------------------------------------------------------------------------------


def test_paired_clip_is_the_high_res_clip_area_downsampled(workspace):
    path = workspace / "data" / "clips" / "000000.mp4"
    media = decode_clip(path, 16, 16, 9, 16.0, 16000, 9000, PairedScales(2, 2))
    high = decode_clip(path, 32, 32, 17, 32.0, None, 0)
    assert media.video.shape == (3, 9, 16, 16) and media.audio.shape == (9000,)
    torch.testing.assert_close(media.video_high, high.video, atol=0, rtol=0)
    # Independently: every other frame, then the mean of each 2x2 pixel block.
    frames = high.video.numpy()[:, ::2]
    expected = frames.reshape(3, 9, 16, 2, 16, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(media.video.numpy(), expected, atol=1e-6)
    assert PairedScales(2, 2).high_res(16, 16, 9, 16.0) == (32, 32, 17, 32.0)


def test_paired_cache_holds_both_resolutions_and_matches_decoding(workspace):
    index = json.loads((workspace / "cache" / "cache_index.json").read_text())
    assert index["settings"]["paired"] == {"spatial_scale": 2, "temporal_scale": 2}
    assert len(index["clips"]) == 3 and not index["skipped"]
    tensors = load_file(workspace / "cache" / index["clips"][0]["file"])
    assert tensors["video_latents"].shape == (CHANNELS, 3, 2, 2)
    assert tensors["high_res_latents"].shape == (CHANNELS, 5, 4, 4)
    assert tensors["high_res_reference_latents"].shape == (CHANNELS, 3, 4, 4)
    assert load_file(workspace / "cache" / "null.safetensors")["video_high"].shape == (CHANNELS, 5, 4, 4)

    rates = {"joint": dict(keyframe_rate=1.0, i2v_rate=0.5), "refiner": dict(refiner_guide_noise_rate=0.5)}
    for mode, key in (("joint", "loss_keyframe"), ("refiner", "loss_refiner")):
        losses = []
        for cache in (None, workspace / "cache"):
            trainer = prepared(workspace, mode, cache_dir=cache, image_reference_rate=1.0, **rates[mode])
            with torch.no_grad():
                losses.append(trainer.losses(trainer.model, collate([trainer.dataset[n] for n in (4, 5)]), step=3))
        torch.testing.assert_close(losses[0][key], losses[1][key], atol=1e-5, rtol=1e-5)


# -- keyframe tokens and the refiner guide, against the pipelines --------------------------------------------------


def test_keyframe_and_guide_draws():
    assert [auto_keyframe_indices(t, 4) for t in (1, 5, 9, 10)] == [[0], [0, 4], [0, 4, 8], [0, 4, 8, 9]]
    rates = TaskRates(keyframes=0.5, keyframe_subset=0.5, refiner_keyframes=0.5, guide_noise=0.2)
    tasks = TaskSampler(rates, "video", 33, 32, 32, 4, 8, 35, 256, seed=0)
    steps = [tasks.step_keyframes(s) for s in range(1000)]
    drawn = [k for k in steps if k is not None]
    assert abs(len(drawn) / 1000 - 0.5) < 0.05
    assert all(k and set(k) <= {0, 4, 8} and k == sorted(k) for k in drawn)
    assert abs(np.mean([k == [0, 4, 8] for k in drawn]) - (0.5 + 0.5 / 8)) < 0.06  # subsets are rarely all
    assert tasks.step_keyframes(7) == steps[7]
    refiner = TaskSampler(rates, "refiner", 33, 32, 32, 4, 8, 35, 256, seed=0)
    draws = [refiner.refiner_draws(n, 0.3) for n in range(1000)]
    assert abs(np.mean([bool(d.keyframe_indices) for d in draws]) - 0.5) < 0.05
    noises = [d.guide_noise for d in draws if d.guide_noise]
    assert abs(len(noises) / 1000 - 0.2) < 0.04 and max(noises) <= 0.3
    assert refiner.sample(3).video_task is None and refiner.step_keyframes(0) is None


def test_keyframe_tokens_are_conditioned_like_prepare_refinement(workspace):
    """Keyframes of I2V samples: keyframe 0 is the first high-res frame encoded alone (mask 1); others: black video
    latents (mask 0); targets are the high-res latents at `j * temporal_scale`, noised at the video's sigma."""
    trainer = prepared(workspace, "video", keyframe_rate=1.0, keyframe_subset_rate=0.0, i2v_rate=0.5)
    tasks = {trainer.task_sampler.sample(n).video_task: n for n in range(20)}
    batch = collate([trainer.dataset[tasks["i2v"]], trainer.dataset[tasks["t2v"]]])
    inputs, targets = trainer.model_inputs(batch, step=0)
    pipeline, c = trainer.pipeline, CHANNELS
    plain = pipeline.prepare_refinement(True, "auto", trainer.timing, 16, 16)
    i2v = pipeline.prepare_refinement(True, "auto", trainer.timing, 16, 16, first_frame=batch["video_high"][:1, :, 0])
    assert inputs["keyframe_indices"] == plain.keyframe_indices == [0, 2]
    for row, expected in ((0, i2v.keyframe_condition), (1, plain.keyframe_condition)):
        torch.testing.assert_close(inputs["keyframe_input"][row, c : 2 * c], expected.latents[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inputs["keyframe_input"][row, 2 * c :], expected.mask[0])
    assert inputs["keyframe_input"][0, 2 * c :, 0].eq(1).all() and inputs["keyframe_input"][0, 2 * c :, 1].eq(0).all()

    x0 = trainer._latents(batch)["high_res_latents"][:, :, [0, 4]]
    velocity, given = targets["keyframe"]
    sigma = (inputs["timestep"] / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(inputs["keyframe_input"][:, :c], (1 - sigma) * x0 + sigma * (velocity + x0))
    torch.testing.assert_close(given, inputs["keyframe_input"][:, 2 * c :])


def test_refiner_guide_is_the_refiner_pipelines(workspace):
    """The training input's guide and mask equal what `SkyReelsV4RefinerPipeline` feeds the refiner for the same
    low-res latents and keyframes; guide noise only touches the interpolated frames."""
    trainer = prepared(workspace, "refiner", cache_dir=workspace / "cache", refiner_keyframe_rate=0.5,
                       keyframe_subset_rate=0.5, refiner_guide_noise_rate=0.0)
    draws = {bool(trainer.task_sampler.refiner_draws(n, 0.1).keyframe_indices): n for n in range(20)}
    numbers = [draws[True], draws[False]]
    batch = collate([trainer.dataset[n] for n in numbers])
    inputs, targets = trainer.model_inputs(batch, step=0)
    seen = []
    hook = trainer.pipeline.refiner.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"]), with_kwargs=True
    )
    pipe = refiner_pipeline(trainer.pipeline)
    for row, n in enumerate(numbers):
        indices = trainer.task_sampler.refiner_draws(n, 0.1).keyframe_indices
        keyframes = batch["high_res_latents"][row : row + 1, :, [2 * j for j in indices]] if indices else None
        pipe(PROMPT, latents=batch["video_latents"][row : row + 1], keyframe_latents=keyframes,
             keyframe_indices=indices or None, guidance_scale=1.0, num_inference_steps=1, output_type="latent")
        torch.testing.assert_close(inputs["refiner_input"][row, CHANNELS:], seen[-1][0, CHANNELS:], atol=1e-6, rtol=0)
    hook.remove()
    assert inputs["refiner_input"][0, -1].sum() > 0 and inputs["refiner_input"][1, -1].sum() == 0
    torch.testing.assert_close(targets["refiner"][1], inputs["refiner_input"][:, -1:])

    noisy = prepared(workspace, "refiner", cache_dir=workspace / "cache", refiner_keyframe_rate=0.5,
                     keyframe_subset_rate=0.5, refiner_guide_noise_rate=1.0, refiner_guide_noise_strength=0.5)
    noisy_guide = noisy.model_inputs(batch, step=0)[0]["refiner_input"][:, CHANNELS : 2 * CHANNELS]
    change = (noisy_guide - inputs["refiner_input"][:, CHANNELS : 2 * CHANNELS]).abs()
    mask = inputs["refiner_input"][:, -1:].bool().expand_as(change)
    assert change[mask].max() == 0 and 0 < change[~mask].mean() < 0.5


# -- training ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, losses, rates", [
    ("joint", {"loss_video", "loss_keyframe", "loss_audio"}, dict(keyframe_rate=1.0, i2v_rate=0.5)),
    ("refiner", {"loss_refiner"}, dict(gradient_checkpointing=True)),
])
def test_steps_lower_the_loss_on_a_fixed_batch(workspace, mode, losses, rates):
    trainer = prepared(workspace, mode, cache_dir=workspace / "cache", image_reference_rate=1.0, **rates)
    batch = collate([trainer.dataset[n] for n in range(2)])
    history = []
    for _ in range(6):
        loss = trainer.losses(trainer.model, batch, step=0)
        assert set(loss) == {"loss"} | losses
        trainer.accelerator.backward(loss["loss"])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        history.append({k: float(v.detach()) for k, v in loss.items()})
    for key in ("loss", "loss_keyframe" if mode == "joint" else "loss_refiner"):
        assert history[-1][key] < 0.85 * history[0][key], history


@pytest.fixture(scope="module")
def refiner_run(workspace):
    cfg = config(workspace, "refiner", output_dir=workspace / "refiner-full", cache_dir=workspace / "cache",
                 max_train_steps=4, checkpointing_steps=2, image_reference_rate=0.5, validation_prompt=PROMPT,
                 validation_inference_steps=2, validation_steps=0)
    trainer = SkyReelsV4Trainer(cfg)
    return trainer, trainer.run()


def test_refiner_training_saves_validates_and_resumes(workspace, refiner_run, tmp_path):
    trainer, first = refiner_run
    saved = DiffusionPipeline.from_pretrained(first.output_dir)
    initial = DiffusionPipeline.from_pretrained(workspace / "pipeline")
    assert isinstance(saved, ds.SkyReelsV4Pipeline) and saved.refiner.config.spatial_scale == 2
    trained = trainer.pipeline.refiner.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in saved.refiner.state_dict().items())
    assert any(not torch.equal(value, initial.refiner.state_dict()[name])
               for name, value in saved.refiner.state_dict().items())
    for name in ("transformer", "audio_transformer"):
        assert all(torch.equal(v, getattr(initial, name).state_dict()[k])
                   for k, v in getattr(saved, name).state_dict().items())
    assert "refine=True" in (first.output_dir / "README.md").read_text()
    assert (first.output_dir / "validation" / "step-000004-0.mp4").is_file()
    assert [h["step"] for h in first.history] == [1, 2, 3, 4] and "loss_refiner" in first.history[0]

    shutil.copytree(first.output_dir / "checkpoint-2", tmp_path / "checkpoint-2")
    resumed = train(config(workspace, "refiner", output_dir=tmp_path, cache_dir=workspace / "cache",
                           max_train_steps=4, checkpointing_steps=2, image_reference_rate=0.5,
                           resume_from_checkpoint="latest"))
    assert resumed.history == first.history[2:]
    for file in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = load_file(first.output_dir / "checkpoint-4" / file), load_file(tmp_path / "checkpoint-4" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="incompatible run.*mode: checkpoint 'refiner', this run 'video'"):
        prepared(workspace, "video", resume_from_checkpoint=str(first.output_dir / "checkpoint-2"))


def test_refiner_lora_reloads_into_a_fresh_pipeline(workspace):
    trainer = SkyReelsV4Trainer(config(workspace, "refiner", output_dir=workspace / "refiner-lora", use_lora=True,
                                       rank=4, cache_dir=workspace / "cache", refiner_keyframe_rate=1.0))
    out = trainer.run().output_dir
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("refiner.") for k in keys)
    low_res = trainer.dataset[0]["video_latents"][None]

    def refine(pipeline):
        pipeline.refiner.eval()
        return refiner_pipeline(pipeline)(PROMPT, latents=low_res, guidance_scale=1.0, num_inference_steps=2,
                                          output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    trained = refine(trainer.pipeline)
    fresh = DiffusionPipeline.from_pretrained(workspace / "pipeline")
    base = refine(fresh)
    fresh.load_lora_weights(out)
    assert fresh.refiner.peft_config[next(iter(fresh.refiner.peft_config))].r == 4
    reloaded = refine(fresh)
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)
    assert (reloaded - base).abs().max() > 1e-6


# -- bad input and the command line -------------------------------------------------------------------------------


def test_bad_paired_and_refiner_inputs_are_refused(workspace, tmp_path):
    components = build_tiny_components()
    del components["refiner"]
    ds.SkyReelsV4Pipeline(**components).save_pretrained(tmp_path / "no-refiner")
    for mode in ("refiner", "video"):
        with pytest.raises(ValueError, match=f"--{'mode refiner' if mode == 'refiner' else 'paired_data'} needs the "
                                             "pipeline's `refiner` component"):
            SkyReelsV4Trainer(config(workspace, mode, pretrained_model_name_or_path=tmp_path / "no-refiner"))

    # Clips that cannot give the high-res clip without upscaling or repeating frames are skipped: here all of them.
    with pytest.raises(ValueError, match=r"No usable training clips.*3 skipped \(resolution too low\)"):
        prepared(workspace, "refiner", height=32, width=32)
    write_dataset(tmp_path / "slow", 1, seed=0, width=32, height=32, fps=16, num_frames=17, sample_rate=16000)
    with pytest.raises(ValueError, match=r"No usable training clips.*1 skipped \(frame rate too low\)"):
        prepared(workspace, "refiner", dataset_dir=tmp_path / "slow")

    with pytest.raises(ValueError, match="needs --paired_data"):
        config(workspace, "joint", paired_data=False, keyframe_rate=0.5).check()
    with pytest.raises(ValueError, match="not --mode audio"):
        config(workspace, "audio", keyframe_rate=0.5).check()
    with pytest.raises(ValueError, match="paired: cache .* vs now None"):
        prepared(workspace, "video", paired_data=False, cache_dir=workspace / "cache")


def test_cli_flags(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_skyreels_v4.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "examples" / "train_skyreels_v4.py"), run_name="__main__")
    text = capsys.readouterr().out
    for flag in ("--paired_data", "--keyframe_rate", "--keyframe_loss_weight", "--refiner_keyframe_rate",
                 "--refiner_guide_noise_rate", "{video,audio,joint,refiner}"):
        assert flag in text
    base = ["--pretrained_model_name_or_path", "p", "--dataset_dir", "d"]
    assert parse_args(base + ["--paired_data"]).resolved_keyframe_rate == 0.5
    assert parse_args(base).resolved_keyframe_rate == 0.0
    refiner = parse_args(base + ["--mode", "refiner", "--refiner_keyframe_rate", "0.3"])
    assert refiner.paired and refiner.resolved_keyframe_rate == 0.0 and refiner.task_rates().refiner_keyframes == 0.3
