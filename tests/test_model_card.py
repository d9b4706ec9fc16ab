"""Model cards: Hub metadata, usage code and trigger prompt, the pipeline card, and a mocked push to the Hub."""

import ast
import re

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from diffusers_skyreels.utils import model_card
from diffusers_skyreels.utils.model_card import push_folder_to_hub, save_model_card, write_pipeline_card

LORA_CARD = dict(
    base_model="someone/skyreels-v4-demo",
    instance_prompt="in sks style",
    lora=True,
    branches=["transformer", "audio_transformer"],
    example_prompt='A ball in sks style bounces. <sfx>a "ping"</sfx>',
)


def usage_code(text):
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_lora_card_metadata_usage_and_trigger(tmp_path):
    path = save_model_card(
        tmp_path, **LORA_CARD, repo_id="someone/sks-lora", tags=["ball", "lora"], training_summary="200 steps."
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "someone/skyreels-v4-demo" and data.license == "apache-2.0"
    assert data.library_name == "diffusers" and data.instance_prompt == "in sks style"
    assert data.tags == ["diffusers", "skyreels-v4", "text-to-video", "text-to-audio", "video-audio", "lora", "ball"]
    code = usage_code(card.text)
    ast.parse(code)  # the prompt is quoted safely
    assert "import diffusers_skyreels" in code
    assert 'DiffusionPipeline.from_pretrained("someone/skyreels-v4-demo"' in code
    assert 'pipe.load_lora_weights("someone/sks-lora")' in code
    assert 'pipe("A ball in sks style bounces. <sfx>a \\"ping\\"</sfx>")' in code
    assert "in sks style" in card.text and "200 steps." in card.text and "`apache-2.0`" in card.text
    assert "adapting the video branch (`transformer`) and the audio branch (`audio_transformer`)." in card.text
    assert "refiner" not in card.text


def test_pipeline_card_without_lora(tmp_path):
    card = ModelCard.load(save_model_card(
        tmp_path, base_model=None, instance_prompt=None, lora=False, branches=["transformer"],
        example_prompt="A ball.", license="mit", extra_markdown="## Notes\n\nTiny.",
    ))
    assert "lora" not in card.data.tags and card.data.license == "mit" and card.data.base_model is None
    code = usage_code(card.text)
    assert f'DiffusionPipeline.from_pretrained("{tmp_path}"' in code and "load_lora_weights" not in code
    assert 'pipe("A ball.", generate_audio=False)' in code  # no audio branch: video only
    assert "## Notes" in card.text and "Trigger prompt" not in card.text


def test_card_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs `base_model`"):
        save_model_card(tmp_path, **{**LORA_CARD, "base_model": None})
    with pytest.raises(ValueError, match="`branches`"):
        save_model_card(tmp_path, **{**LORA_CARD, "branches": ["text_encoder"]})
    with pytest.raises(ValueError, match="`branches`"):
        save_model_card(tmp_path, **{**LORA_CARD, "branches": []})
    with pytest.raises(ValueError, match="example_prompt"):
        save_model_card(tmp_path, **{**LORA_CARD, "example_prompt": " "})
    with pytest.raises(ValueError, match="Repo id"):
        save_model_card(tmp_path, **LORA_CARD, repo_id="not a/valid/id")
    assert not (tmp_path / "README.md").exists()


def test_write_pipeline_card_lists_components_and_keeps_an_existing_card(tmp_path, tiny_components):
    from diffusers_skyreels import SkyReelsV4Pipeline

    pipe = SkyReelsV4Pipeline(**{**tiny_components, "audio_transformer": None})
    card = ModelCard.load(write_pipeline_card(pipe, tmp_path))
    assert "`SkyReelsV4Pipeline`" in card.text and "`transformer`: `SkyReelsV4Transformer`" in card.text
    assert "video branch" in card.text and "audio branch" not in card.text
    (tmp_path / "README.md").write_text("# Mine\n")
    write_pipeline_card(pipe, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# Mine\n"


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    class Repo:
        repo_id = "someone/sks-lora"

    monkeypatch.setattr(model_card, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)) or Repo)
    def upload_folder(**kw):
        files = [p.relative_to(kw["folder_path"]).as_posix() for p in kw["folder_path"].rglob("*") if p.is_file()]
        calls.append(("upload", kw, sorted(filter_repo_objects(files, ignore_patterns=kw["ignore_patterns"]))))
        return "commit"

    monkeypatch.setattr(model_card, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_folder(tmp_path, fake_hub):
    save_model_card(tmp_path, **LORA_CARD)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "optimizer.bin").write_bytes(b"")
    ignore = ["checkpoint-*"]
    commit = push_folder_to_hub(tmp_path, "someone/sks-lora", token="t", private=True, ignore_patterns=ignore)
    assert commit == "commit"
    assert fake_hub == [
        ("create", "someone/sks-lora", dict(token="t", private=True, exist_ok=True)),
        ("upload", dict(repo_id="someone/sks-lora", folder_path=tmp_path, token="t", ignore_patterns=ignore,
                        commit_message="Upload SkyReels V4 weights and model card"),
         ["README.md", "pytorch_lora_weights.safetensors"]),
    ]


def test_push_refuses_incomplete_or_pickled_folders(tmp_path, fake_hub):
    with pytest.raises(ValueError, match="not a folder"):
        push_folder_to_hub(tmp_path / "missing", "someone/x")
    with pytest.raises(ValueError, match="Repo id"):
        push_folder_to_hub(tmp_path, "bad id/with/slashes")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no README.md"):
        push_folder_to_hub(tmp_path, "someone/x")
    save_model_card(tmp_path, **LORA_CARD)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(ValueError, match="no `.safetensors` weights"):
        push_folder_to_hub(tmp_path, "someone/x")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pickled files \['pytorch_lora_weights.bin'\]"):
        push_folder_to_hub(tmp_path, "someone/x")
    assert fake_hub == []
