"""LoRA on the two-branch pipeline: per-branch ranks, one-file save / load, adapter weights, fuse / unfuse / unload,
single-branch LoRAs and the errors for files that cannot be loaded."""

import json

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from fixtures_pipeline import TINY_CALL, build_tiny_components
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

import diffusers_skyreels as ds

PROMPT = "A red ball bounces between the walls. <sfx>a ping at every bounce</sfx>"
# Per-branch LoRA configs with different ranks, alphas and targets: reloading them exactly needs the saved metadata.
CONFIGS = {
    "transformer": dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
    "audio_transformer": dict(r=2, lora_alpha=1, target_modules=["to_q", "to_v", "ff.net.2"]),
}
BRANCHES = tuple(CONFIGS)


def make(**overrides):
    pipe = ds.SkyReelsV4Pipeline(**{**build_tiny_components(), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    """Video and audio latents of a seeded 2-step call."""
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **TINY_CALL)
    return out.frames, out.audio


def assert_outputs(got, expected, atol=0.0):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=atol, rtol=0)


def differs(a, b):
    return all((x - y).abs().max() > 1e-4 for x, y in zip(a, b, strict=True))


def add_style_adapters(pipe, name="style"):
    for branch, config in CONFIGS.items():
        torch.manual_seed(len(branch))
        getattr(pipe, branch).add_adapter(LoraConfig(**config, init_lora_weights=False), adapter_name=name)


def save_branches(pipe, directory, branches=BRANCHES, name="style"):
    layers = {f"{b}_lora_layers": get_peft_model_state_dict(getattr(pipe, b), adapter_name=name) for b in branches}
    metadata = {f"{b}_lora_adapter_metadata": getattr(pipe, b).peft_config[name].to_dict() for b in branches}
    type(pipe).save_lora_weights(directory, **layers, **metadata)


def lora_modules(model, name=None):
    """Names of the LoRA layers of `model` (holding adapter `name`, if given)."""
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and name in (None, *m.lora_A)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pipeline's base and LoRA outputs, and its two adapters saved in one file (in `dir`, and audio only)."""
    pipe = make()
    base = run(pipe)
    add_style_adapters(pipe)
    lora = run(pipe)
    directory = tmp_path_factory.mktemp("lora")
    save_branches(pipe, directory)
    audio_directory = tmp_path_factory.mktemp("audio_lora")
    save_branches(pipe, audio_directory, branches=["audio_transformer"])
    return dict(base=base, lora=lora, dir=directory, audio_dir=audio_directory)


def test_adapters_with_different_ranks_change_both_modalities(trained):
    assert differs(trained["lora"], trained["base"])


def test_save_writes_one_safetensors_file_with_per_branch_metadata(trained):
    assert [p.name for p in trained["dir"].iterdir()] == ["pytorch_lora_weights.safetensors"]
    path = trained["dir"] / "pytorch_lora_weights.safetensors"
    with safetensors.safe_open(path, framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
        rank = {b: f.get_tensor(next(k for k in keys if k.startswith(f"{b}.") and "lora_A" in k)).shape[0]
                for b in BRANCHES}
    assert {k.split(".")[0] for k in keys} == set(BRANCHES)
    assert rank == {"transformer": 4, "audio_transformer": 2}
    metadata = json.loads(header["lora_adapter_metadata"])
    for branch, config in CONFIGS.items():
        assert metadata[f"{branch}.r"] == config["r"] and metadata[f"{branch}.lora_alpha"] == config["lora_alpha"]
        assert sorted(metadata[f"{branch}.target_modules"]) == sorted(config["target_modules"])


def test_load_into_fresh_pipeline_reproduces_the_lora_output(trained):
    pipe = make()
    pipe.load_lora_weights(trained["dir"], adapter_name="style")
    assert pipe.get_list_adapters() == {"transformer": ["style"], "audio_transformer": ["style"]}
    assert_outputs(run(pipe), trained["lora"])


def test_set_adapters_disable_and_enable(trained):
    pipe = make()
    pipe.load_lora_weights(trained["dir"] / "pytorch_lora_weights.safetensors", adapter_name="style")
    pipe.set_adapters("style", 0.0)
    assert_outputs(run(pipe), trained["base"])
    # Per-branch weights reach each branch's layers (scaling = weight * alpha / r).
    pipe.set_adapters("style", {"transformer": 0.5, "audio_transformer": 0.0})
    assert pipe.transformer.blocks[0].attn.to_q.scaling["style"] == pytest.approx(0.5 * 8 / 4)
    assert pipe.audio_transformer.blocks[0].attn.to_q.scaling["style"] == 0.0
    pipe.set_adapters("style")
    pipe.disable_lora()
    assert_outputs(run(pipe), trained["base"])
    pipe.enable_lora()
    assert not any(getattr(pipe, b).blocks[0].attn.to_q.disable_adapters for b in BRANCHES)


def test_fuse_equals_lora_and_unfuse_unload_restore_the_base(trained):
    pipe = make()
    original = {b: getattr(pipe, b).blocks[0].attn.to_q.weight.detach().clone() for b in BRANCHES}
    pipe.load_lora_weights(trained["dir"], adapter_name="style")
    pipe.fuse_lora()
    assert pipe.fused_loras == {"style"}
    assert all(getattr(pipe, b).blocks[0].attn.to_q.merged for b in BRANCHES)
    assert_outputs(run(pipe), trained["lora"], atol=1e-5)
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    for branch in BRANCHES:
        layer = getattr(pipe, branch).blocks[0].attn.to_q
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, original[branch], atol=1e-6, rtol=0)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and not any(lora_modules(getattr(pipe, b)) for b in BRANCHES)
    assert_outputs(run(pipe), trained["base"], atol=1e-5)


def test_audio_only_lora_touches_only_the_audio_branch(trained):
    pipe = make()
    video_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(trained["audio_dir"])  # no name: the first free `default_<n>`
    assert pipe.get_list_adapters() == {"audio_transformer": ["default_0"]}
    assert not lora_modules(pipe.transformer) and lora_modules(pipe.audio_transformer, "default_0")
    # The pipeline-wide methods handle a branch without the adapter.
    pipe.load_lora_weights(trained["dir"])
    assert pipe.get_list_adapters() == {"transformer": ["default_1"], "audio_transformer": ["default_0", "default_1"]}
    pipe.set_adapters(["default_0", "default_1"], [0.5, 1.0])
    pipe.fuse_lora(adapter_names=["default_0"])
    assert pipe.fused_loras == {"default_0"}
    pipe.unfuse_lora()
    pipe.delete_adapters("default_1")
    assert pipe.get_list_adapters() == {"audio_transformer": ["default_0"]}
    assert not lora_modules(pipe.transformer, "default_1")
    pipe.unload_lora_weights()
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, video_weights[key], atol=1e-6, rtol=0)


def test_pipeline_folder_from_pretrained_then_load_lora(trained, tmp_path):
    make().save_pretrained(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, ds.SkyReelsV4Pipeline)
    pipe.load_lora_weights(trained["dir"], weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
    assert_outputs(run(pipe), trained["lora"])


# -- bad inputs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def style_state_dict(trained):
    return safetensors.torch.load_file(trained["dir"] / "pytorch_lora_weights.safetensors")


@pytest.fixture
def pipe():
    return make()


def test_refuses_pickled_and_invalid_files(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never run"))
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="No `.safetensors` LoRA file"):
        pipe.load_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="Only safetensors"):
        pipe.load_lora_weights(tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="Only safetensors"):
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="use_safetensors=False"):
        pipe.load_lora_weights(tmp_path, use_safetensors=False)
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        pipe.load_lora_weights(tmp_path / "broken.safetensors")
    assert pipe.get_list_adapters() == {}


def test_refuses_keys_that_name_no_branch(pipe, style_state_dict):
    unprefixed = {k.split(".", 1)[1]: v for k, v in style_state_dict.items() if k.startswith("transformer.")}
    with pytest.raises(ValueError, match="must start with one of"):
        pipe.load_lora_weights(unprefixed)
    with pytest.raises(ValueError, match="must start with one of"):
        pipe.load_lora_weights({**style_state_dict, "text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="Not a LoRA state dict"):
        pipe.load_lora_weights({"transformer.blocks.0.attn.to_q.weight": torch.zeros(32, 32)})
    assert pipe.get_list_adapters() == {}


def refiner_lora(style_state_dict):
    """The video branch's LoRA keys that also name refiner modules (it has no cross-modal attention)."""
    return {k.replace("transformer.", "refiner.", 1): v for k, v in style_state_dict.items()
            if k.startswith("transformer.") and "attn_cross_modal" not in k}


def test_refiner_lora_loads_into_the_refiner_or_is_skipped_without_one(style_state_dict):
    pipe = make()
    pipe.load_lora_weights(refiner_lora(style_state_dict), adapter_name="sharp")
    assert pipe.get_list_adapters() == {"refiner": ["sharp"]} and lora_modules(pipe.refiner, "sharp")
    no_refiner = make(refiner=None)
    with pytest.raises(ValueError, match=r"adapts \['refiner'\], none of which this pipeline has"):
        no_refiner.load_lora_weights(refiner_lora(style_state_dict))
    no_refiner.load_lora_weights({**style_state_dict, **refiner_lora(style_state_dict)}, adapter_name="style")
    assert no_refiner.get_list_adapters() == {"transformer": ["style"], "audio_transformer": ["style"]}
    no_refiner.fuse_lora()
    no_refiner.unfuse_lora()
    no_refiner.unload_lora_weights()
    assert no_refiner.get_list_adapters() == {}


def test_refuses_targets_missing_from_a_branch_and_loads_nothing(pipe, style_state_dict):
    bad = dict(style_state_dict)
    for key in [k for k in bad if k.startswith("audio_transformer.blocks.0.attn.to_q.")]:
        bad[key.replace("blocks.0.", "blocks.9.")] = bad[key]
    with pytest.raises(ValueError, match=r"`audio_transformer` does not have: \['blocks.9.attn.to_q'\]"):
        pipe.load_lora_weights(bad)
    assert pipe.get_list_adapters() == {}


def test_failed_branch_rolls_back_the_others(pipe, style_state_dict):
    bad = {k: (v[:, :-1] if k.startswith("audio_transformer.") and "lora_A" in k else v)
           for k, v in style_state_dict.items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        pipe.load_lora_weights(bad, adapter_name="broken")
    assert not any("broken" in names for names in pipe.get_list_adapters().values())
    assert not lora_modules(pipe.transformer, "broken") and not lora_modules(pipe.audio_transformer, "broken")


def test_adapter_names_taken_or_missing_for_hotswap(pipe, trained):
    pipe.load_lora_weights(trained["audio_dir"], adapter_name="style")
    with pytest.raises(ValueError, match=r"\['audio_transformer'\] already have an adapter named 'style'"):
        pipe.load_lora_weights(trained["dir"], adapter_name="style")
    assert pipe.get_list_adapters() == {"audio_transformer": ["style"]}
    with pytest.raises(ValueError, match=r"\['transformer'\] have no adapter named 'style'"):
        pipe.load_lora_weights(trained["dir"], adapter_name="style", hotswap=True)
    layer = pipe.audio_transformer.blocks[0].attn.to_q.lora_B["style"]
    doubled = {k: 2 * v for k, v in pipe.lora_state_dict(trained["audio_dir"]).items()}
    expected = 2 * layer.weight.detach().clone()
    pipe.load_lora_weights(doubled, adapter_name="style", hotswap=True)
    torch.testing.assert_close(layer.weight.detach(), expected)


def test_save_lora_weights_refuses_bad_arguments(tmp_path):
    layers = {"blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}
    save = ds.SkyReelsV4Pipeline.save_lora_weights
    with pytest.raises(ValueError, match="at least one of"):
        save(tmp_path)
    with pytest.raises(ValueError, match="safe_serialization"):
        save(tmp_path, transformer_lora_layers=layers, safe_serialization=False)
    with pytest.raises(ValueError, match="Only safetensors"):
        save(tmp_path, transformer_lora_layers=layers, weight_name="lora.bin")
    with pytest.raises(ValueError, match=r"metadata given without LoRA layers for \['refiner'\]"):
        save(tmp_path, transformer_lora_layers=layers, refiner_lora_adapter_metadata={"r": 2})
    assert not any(tmp_path.iterdir())
