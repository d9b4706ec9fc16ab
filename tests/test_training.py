"""Training and LoRA fine-tuning on tiny models and a tiny generated dataset: the flow-matching sign, the task
sampler, data loading and bad input, optimisation in each mode, LoRA save/reload, checkpoint/resume, the latent cache,
one process vs two, and the command line."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from fixtures_pipeline import build_tiny_components
from safetensors.torch import load_file

import diffusers_skyreels as ds
from diffusers_skyreels.demo import write_dataset
from diffusers_skyreels.pipelines.skyreels_v4.conditioning import latent_mask_from_pixels
from diffusers_skyreels.training import (
    LatentCache,
    SkyReelsV4Trainer,
    TaskRates,
    TaskSampler,
    TimestepSampler,
    TrainingConfig,
    build_parser,
    decode_clip,
    masked_mse,
    noisy_latents,
    read_metadata,
    scan_clips,
    sigma_to_timestep,
    train,
    velocity_target,
)
from diffusers_skyreels.training.dataset import clip_requirements, collate, resize_and_crop
from diffusers_skyreels.training.randomness import GlobalBatchSampler
from diffusers_skyreels.utils.media_io import export_to_video_with_audio

REPO = Path(__file__).resolve().parents[1]
# 9 frames of 32x32 at 16 fps -> 3 x 4 x 4 video latents; 16 kHz audio, 256-sample hop -> 35 audio latents.
SIZE = dict(height=32, width=32, num_frames=9, fps=16.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny pipeline, 4 bouncing-world clips with sound, and their latent cache."""
    root = tmp_path_factory.mktemp("training")
    ds.SkyReelsV4Pipeline(**build_tiny_components()).save_pretrained(root / "pipeline")
    write_dataset(root / "data", 4, seed=0, width=32, height=32, num_frames=9, sample_rate=16000)
    train(config(root, "joint", output_dir=root / "precompute", cache_dir=root / "cache", precompute_only=True))
    return root


def config(root: Path, mode: str, **overrides) -> TrainingConfig:
    values = dict(
        pretrained_model_name_or_path=str(root / "pipeline"), dataset_dir=str(root / "data"),
        output_dir=str(root / f"out-{mode}"), mode=mode, train_batch_size=2, max_train_steps=2,
        learning_rate=1e-3, lr_warmup_steps=0, checkpointing_steps=0, **SIZE,
    )
    values.update({k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
    return TrainingConfig(**values)


# -- flow matching ---------------------------------------------------------------------------------------------------


def test_flow_matching_sign_one_euler_step_lands_on_the_next_sigma():
    """The objective's convention, checked once against Diffusers' scheduler: with the exact target velocity, one
    Euler step from the sigma_i interpolation lands on the sigma_{i+1} interpolation."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=generator), torch.randn(2, 4, 3, 4, 4, generator=generator)
    for i in (0, 4, 9):
        sigma, next_sigma = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        torch.testing.assert_close(sigma_to_timestep(sigma, 1000), scheduler.timesteps[i])
        scheduler._step_index = i
        sample = noisy_latents(x0, noise, sigma.expand(2))
        stepped = scheduler.step(velocity_target(x0, noise), scheduler.timesteps[i], sample).prev_sample
        torch.testing.assert_close(stepped, noisy_latents(x0, noise, next_sigma.expand(2)), atol=1e-5, rtol=1e-5)
    # The paper's target `z0 - eps` (t = 1 - sigma is data) is the negative.
    torch.testing.assert_close(velocity_target(x0, noise), -(x0 - noise))
    torch.testing.assert_close(noisy_latents(x0, noise, torch.zeros(2)), x0)


def test_masked_mse_counts_only_voxels_to_generate():
    prediction, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    target[:, :, 0] = 5.0  # the given row of sample 0 is wrong by 25 and must not count
    given = torch.zeros(2, 1, 2, 2)
    given[0, :, 0] = 1
    given[1] = 1  # nothing to generate: contributes 0
    torch.testing.assert_close(masked_mse(prediction, target, given), torch.tensor([1.0, 0.0]))


def test_timestep_sampler_densities():
    def draws(sampler, n=2000):
        return torch.tensor([sampler.sample(torch.Generator().manual_seed(i)) for i in range(n)])

    uniform = draws(TimestepSampler())
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(float(uniform.mean()) - 0.5) < 0.03
    assert float(draws(TimestepSampler(shift=3.0)).mean()) > 0.65  # shifted toward noise
    assert float(draws(TimestepSampler("logit_normal", logit_mean=1.0)).mean()) > 0.6
    assert TimestepSampler().sample(torch.Generator().manual_seed(3)) == float(uniform[3])
    with pytest.raises(ValueError, match="weighting_scheme"):
        TimestepSampler("cosine")


# -- tasks ------------------------------------------------------------------------------------------------------------


def sampler(mode="joint", **rates) -> TaskSampler:
    return TaskSampler(TaskRates(**rates), mode, 9, 32, 32, 4, 8, 35, 256, seed=0)


def test_task_masks_match_their_tasks():
    tasks = sampler()
    generator = torch.Generator().manual_seed(0)
    frames = lambda task: tasks.video_given(task, generator)[0, 0].amin(dim=(1, 2)).tolist()  # noqa: E731
    assert frames("t2v") == [0, 0, 0]
    assert frames("i2v") == [1, 0, 0] and tasks.video_given("i2v", generator).sum() == 16  # only latent frame 0
    assert frames("first_last") == [1, 0, 1]
    for _ in range(10):
        prefix = frames("extension")
        k = int(sum(prefix))
        assert 1 <= k <= 2 and prefix == [1] * k + [0] * (3 - k)
    assert frames("keep") == [1, 1, 1]
    for seed in range(10):
        # Inpainting: a pixel box is regenerated; the latent mask is the helper's, and what is not given is a box.
        pixels = tasks.video_pixels_given("inpaint", torch.Generator().manual_seed(seed))
        mask = tasks.video_given("inpaint", torch.Generator().manual_seed(seed))
        torch.testing.assert_close(mask, latent_mask_from_pixels(pixels, 4, 8))
        hole = torch.nonzero(mask[0, 0] == 0)
        assert 0 < len(hole) < mask.numel()
        extent = (hole.max(0).values - hole.min(0).values + 1).prod()
        assert extent == len(hole)  # the voxels to generate fill their bounding box
    audio = lambda task: tasks.audio_given(task, generator)[0, 0]  # noqa: E731
    assert audio("none").sum() == 0 and audio("keep").sum() == 35
    continuation = audio("continuation")
    k = int(continuation.sum())
    assert 0.2 * 35 - 1 <= k <= 0.8 * 35 and continuation[:k].all() and not continuation[k:].any()


def test_task_rates_and_caption_dropout():
    tasks = sampler(i2v=0.2, inpaint=0.1, audio_keep=0.3, caption_dropout=0.25)
    draws = [tasks.sample(n) for n in range(1500)]
    share = lambda f: np.mean([f(d) for d in draws])  # noqa: E731
    assert abs(share(lambda d: d.video_task == "i2v") - 0.2) < 0.04
    assert abs(share(lambda d: d.video_task == "inpaint") - 0.1) < 0.03
    assert abs(share(lambda d: d.audio_task == "keep") - 0.3) < 0.04
    assert abs(share(lambda d: d.drop_caption) - 0.25) < 0.04
    assert abs(share(lambda d: d.video_task == "t2v") - 0.6) < 0.05
    # Deterministic per global sample; a single-branch mode has no draws for the other modality, no `keep`.
    assert tasks.sample(7).video_task == draws[7].video_task
    audio_only = sampler("audio", audio_continuation=0.0, audio_keep=1.0)
    assert {(d.video_task, d.audio_task) for d in map(audio_only.sample, range(20))} == {(None, "none")}
    with pytest.raises(ValueError, match="sum"):
        TaskRates(i2v=0.6, inpaint=0.6)


def test_global_batches_do_not_depend_on_the_process_split():
    one = list(GlobalBatchSampler(4, 1, 0, 1, start_step=1, max_steps=3))
    two = [list(GlobalBatchSampler(2, 2, r, 1, start_step=1, max_steps=3)) for r in range(2)]
    accumulated = list(GlobalBatchSampler(2, 1, 0, 2, start_step=1, max_steps=3))
    assert one == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert [a + b for a, b in zip(*two, strict=True)] == one
    assert [accumulated[0] + accumulated[1], accumulated[2] + accumulated[3]] == one


# -- data -------------------------------------------------------------------------------------------------------------


def test_decode_clip_size_rate_and_audio_length(workspace):
    path = workspace / "data" / "clips" / "000000.mp4"
    media = decode_clip(path, 16, 24, 4, 8.0, 16000, 8000)  # half the file's rate: every other frame
    full = decode_clip(path, 16, 24, 9, 16.0, 16000, 9000)
    assert media.video.shape == (3, 4, 16, 24) and media.audio.shape == (8000,)
    torch.testing.assert_close(media.video, full.video[:, :8:2])
    torch.testing.assert_close(media.audio, full.audio[:8000])
    # 5 frames at 8 fps are the file's frames 0, 2, ..., 8: the last training frame is the file's last frame.
    every_other = decode_clip(path, 16, 24, 5, 8.0, 16000, 8000)
    torch.testing.assert_close(every_other.video, full.video[:, ::2])
    with pytest.raises(ValueError, match="9 frames at 16 fps; training needs 11"):
        decode_clip(path, 16, 24, 6, 8.0, 16000, 10000)  # a frame at 0.625 s of a clip whose last is at 0.5 s
    assert -1 <= media.video.min() and media.video.max() <= 1
    # Scale to cover, then centre-crop: a 4x8 image keeps its middle columns.
    frames = np.zeros((1, 4, 8, 3), dtype=np.uint8)
    frames[:, :, 2:6] = 255
    assert resize_and_crop(frames, 4, 4).min() == 1.0


def test_bad_inputs_are_skipped_counted_or_refused(workspace, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    (data / "clips" / "broken.mp4").write_bytes(b"not a video" * 100)
    rng = np.random.default_rng(0)
    export_to_video_with_audio(rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8), data / "clips" / "silent.mp4", 16)
    export_to_video_with_audio(rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8), data / "clips" / "short.mp4", 16,
                               np.zeros(5000, dtype=np.float32), 16000)
    with open(data / "metadata.jsonl", "a") as metadata:
        for name in ("broken", "silent", "short"):
            metadata.write(json.dumps({"file_name": f"clips/{name}.mp4", "text": name}) + "\n")

    records = read_metadata(data)
    assert clip_requirements(32, 32, 9, 16.0) == {"min_duration": 0.5}  # time of the last training frame
    report = scan_clips(records, 0.5, needs_audio=True)  # 9 frames at 16 fps: the last one is at 0.5 s
    assert len(report.usable) == 4
    assert {reason: [n for n, _ in entries] for reason, entries in report.skipped.items()} == {
        "undecodable": ["clips/broken.mp4"], "no audio": ["clips/silent.mp4"], "too short": ["clips/short.mp4"],
    }
    assert len(scan_clips(records, 0.5, needs_audio=False).usable) == 5  # video training takes the silent clip
    with pytest.raises(ValueError, match="broken.mp4.*|silent.mp4"):
        report.enforce(strict=True)
    with pytest.raises(ValueError, match="broken.mp4"):
        SkyReelsV4Trainer(config(workspace, "joint", dataset_dir=data, strict=True)).prepare()

    with open(data / "metadata.jsonl", "a") as metadata:
        for name in ("gone", "lost"):
            metadata.write(json.dumps({"file_name": f"clips/{name}.mp4", "text": name}) + "\n")
    with pytest.raises(ValueError, match=r"2 video file\(s\) missing.*clips/gone.mp4, clips/lost.mp4"):
        read_metadata(data)

    with pytest.raises(ValueError, match="to_qq.*match no linear layer"):
        SkyReelsV4Trainer(config(workspace, "video", use_lora=True, lora_target_modules="to_q,to_qq")).prepare()
    with pytest.raises(ValueError, match="only run jointly"):
        cross_modal = config(workspace, "video", use_lora=True, lora_target_modules="attn_cross_modal.to_q")
        SkyReelsV4Trainer(cross_modal).prepare()
    settings = json.loads((workspace / "cache" / "cache_index.json").read_text())["settings"]
    with pytest.raises(ValueError, match="height: cache 32 vs now 64"):
        LatentCache(workspace / "cache").check_settings({**settings, "height": 64})


# -- training ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, cached", [("video", False), ("audio", True), ("joint", True)])
def test_steps_lower_the_loss_on_a_fixed_batch(workspace, mode, cached):
    trainer = SkyReelsV4Trainer(config(
        workspace, mode, cache_dir=workspace / "cache" if cached else None, gradient_checkpointing=mode == "joint",
        image_reference_rate=1.0, audio_reference_rate=1.0,
    ))
    trainer.prepare()
    batch = collate([trainer.dataset[n] for n in range(2)])
    losses = []
    for _ in range(6):
        loss = trainer.losses(trainer.model, batch, step=0)
        assert set(loss) == {"loss"} | {f"loss_{m}" for m in (("video", "audio") if mode == "joint" else (mode,))}
        trainer.accelerator.backward(loss["loss"])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(float(loss["loss"].detach()))
    assert losses[-1] < 0.85 * losses[0], losses


def test_separate_modality_timesteps_in_joint_mode(workspace):
    """The audio noise level is drawn from its own stream, reaches the audio branch and noises the audio input."""
    shared = SkyReelsV4Trainer(config(workspace, "joint", cache_dir=workspace / "cache"))
    separate = SkyReelsV4Trainer(config(workspace, "joint", cache_dir=workspace / "cache",
                                        separate_modality_timesteps=True))
    for trainer in (shared, separate):
        trainer.prepare()
    batch = collate([shared.dataset[n] for n in range(2)])
    shared_inputs, _ = shared.model_inputs(batch, step=0)
    separate_inputs, _ = separate.model_inputs(batch, step=0)
    assert "audio_timestep" not in shared_inputs
    torch.testing.assert_close(separate_inputs["timestep"], shared_inputs["timestep"])
    assert not torch.allclose(separate_inputs["audio_timestep"], separate_inputs["timestep"])
    torch.testing.assert_close(separate_inputs["video_input"], shared_inputs["video_input"])
    assert not torch.allclose(separate_inputs["audio_input"], shared_inputs["audio_input"])
    calls = []
    handle = separate.pipeline.audio_transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(a[1] if len(a) > 1 else k["timestep"]), with_kwargs=True
    )
    with torch.no_grad():
        separate.losses(separate.model, batch, step=0)
    handle.remove()
    torch.testing.assert_close(calls[0], separate_inputs["audio_timestep"].to(calls[0].dtype))


def test_cached_latents_give_the_same_loss_as_decoding(workspace):
    losses = []
    for cache in (None, workspace / "cache"):
        trainer = SkyReelsV4Trainer(config(workspace, "joint", cache_dir=cache, image_reference_rate=1.0,
                                           audio_reference_rate=1.0, i2v_rate=0.5, audio_continuation_rate=0.5))
        trainer.prepare()
        with torch.no_grad():
            losses.append(trainer.losses(trainer.model, collate([trainer.dataset[n] for n in (5, 6)]), step=3))
    for key in ("loss_video", "loss_audio"):
        torch.testing.assert_close(losses[0][key], losses[1][key], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lora_run(workspace):
    cfg = config(workspace, "joint", output_dir=workspace / "lora", use_lora=True, rank=4, audio_rank=2,
                 cache_dir=workspace / "cache", checkpointing_steps=2, validation_prompt="A red ball bounces.",
                 validation_inference_steps=2, validation_steps=0)
    trainer = SkyReelsV4Trainer(cfg)
    return trainer, trainer.run()


def test_lora_file_reloads_into_a_fresh_pipeline(workspace, lora_run):
    trainer, result = lora_run
    out = result.output_dir
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    assert (out / "validation" / "step-000002-0.mp4").is_file()
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.") for k in keys) and any(k.startswith("audio_transformer.") for k in keys)

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "audio_transformer"):
            getattr(pipe, name).eval()
        out = pipe("A red ball bounces.", output_type="latent", num_inference_steps=2, guidance_scale=1.0,
                   audio_guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **SIZE)
        return out.frames, out.audio

    trained = generate(trainer.pipeline)
    fresh = DiffusionPipeline.from_pretrained(workspace / "pipeline")
    base = generate(fresh)
    fresh.load_lora_weights(out)
    assert fresh.transformer.peft_config[next(iter(fresh.transformer.peft_config))].r == 4
    assert fresh.audio_transformer.peft_config[next(iter(fresh.audio_transformer.peft_config))].r == 2
    reloaded = generate(fresh)
    for got, want, before in zip(reloaded, trained, base, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert (got - before).abs().max() > 1e-6


@pytest.fixture(scope="module")
def full_run(workspace):
    cfg = config(workspace, "video", output_dir=workspace / "full", max_train_steps=4, checkpointing_steps=2)
    trainer = SkyReelsV4Trainer(cfg)
    return trainer, trainer.run()


def test_full_training_saves_a_loadable_pipeline_and_resumes_exactly(workspace, full_run, tmp_path):
    trainer, first = full_run
    saved = DiffusionPipeline.from_pretrained(first.output_dir)
    assert isinstance(saved, ds.SkyReelsV4Pipeline) and (first.output_dir / "README.md").is_file()
    for name, value in saved.transformer.state_dict().items():
        torch.testing.assert_close(value, trainer.pipeline.transformer.state_dict()[name], atol=0, rtol=0)
    assert [c.name for c in sorted(first.output_dir.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]

    # A crash after step 2: a new run in another folder resumes from that checkpoint.
    shutil.copytree(first.output_dir / "checkpoint-2", tmp_path / "checkpoint-2")
    resumed = train(config(workspace, "video", output_dir=tmp_path, max_train_steps=4, checkpointing_steps=2,
                           resume_from_checkpoint="latest"))
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert resumed.history == first.history[2:]
    for file in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = load_file(first.output_dir / "checkpoint-4" / file), load_file(tmp_path / "checkpoint-4" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "checkpoint-4" / "training_state.json").read_text())
    assert state["step"] == 4 and state["lr_scheduler"]["last_epoch"] == 4


def test_incompatible_checkpoints_are_refused(workspace, full_run, lora_run):
    video_checkpoint = str(full_run[1].output_dir / "checkpoint-2")
    with pytest.raises(ValueError, match="incompatible run.*mode: checkpoint 'video', this run 'audio'"):
        SkyReelsV4Trainer(config(workspace, "audio", resume_from_checkpoint=video_checkpoint)).prepare()
    with pytest.raises(ValueError, match="incompatible run.*lora"):
        SkyReelsV4Trainer(config(workspace, "video", use_lora=True, resume_from_checkpoint=video_checkpoint)).prepare()
    lora_checkpoint = str(lora_run[1].output_dir / "checkpoint-2")
    with pytest.raises(ValueError, match="incompatible run.*lora.video.rank: checkpoint 4, this run 8"):
        SkyReelsV4Trainer(config(workspace, "joint", use_lora=True, rank=8, audio_rank=2,
                                 resume_from_checkpoint=lora_checkpoint)).prepare()


@pytest.mark.slow
def test_two_processes_match_one(workspace, tmp_path):
    """The same global batch on 2 CPU processes (torchrun, gloo) as on 1 (and as 2 accumulated micro-batches)."""
    args = dict(mode="joint", max_train_steps=2, image_reference_rate=0.5, audio_reference_rate=0.5,
                i2v_rate=0.3, cache_dir=workspace / "cache")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "examples" / "train_skyreels_v4.py")]
    for key, value in {**vars(config(workspace, **args)), "train_batch_size": 1,
                       "output_dir": str(tmp_path / "two")}.items():
        if value is True:
            command.append(f"--{key}")
        elif value is not None and value is not False:
            command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "logs" / "losses.jsonl").read_text().splitlines()]

    one = train(config(workspace, output_dir=tmp_path / "one", **args)).history
    accumulated = train(config(workspace, output_dir=tmp_path / "acc", train_batch_size=1,
                               gradient_accumulation_steps=2, **args)).history
    for other in (two, accumulated):
        assert [h["step"] for h in other] == [1, 2]
        for mine, theirs in zip(one, other, strict=True):
            for key in ("loss", "loss_video", "loss_audio"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5)
    for branch in ("transformer", "audio_transformer"):
        a = load_file(tmp_path / "one" / branch / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "two" / branch / "diffusion_pytorch_model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


# -- command line -----------------------------------------------------------------------------------------------------


def test_cli_help_and_parsing(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_skyreels_v4.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / "train_skyreels_v4.py"), run_name="__main__")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--mode", "--use_lora", "--cache_dir", "--resume_from_checkpoint", "--separate_modality_timesteps"):
        assert flag in text
    args = build_parser().parse_args(["--pretrained_model_name_or_path", "p", "--dataset_dir", "d", "--mode", "audio",
                                      "--use_lora", "--rank", "8", "--audio_rank", "4"])
    parsed = TrainingConfig(**vars(args))
    assert (parsed.mode, parsed.use_lora, parsed.rank, parsed.audio_rank) == ("audio", True, 8, 4)
    assert parsed.lora_targets("audio") == ["to_q", "to_k", "to_v", "to_out.0"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mode", "stereo"])
