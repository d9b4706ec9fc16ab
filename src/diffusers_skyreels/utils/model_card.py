"""Model cards (README.md with Hub metadata) for SkyReels V4 pipelines and LoRAs, and pushing a folder to the Hub.

The card is rebuilt from its arguments on every call, so that it only states what the caller knows. It is not made
with `load_or_create_model_card`: that helper resolves its argument as an existing local file or else as a Hub
repository (a network call; a folder path fails validation), and its templates add placeholder sections.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import CommitInfo, ModelCard, ModelCardData, create_repo, upload_folder
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..loaders.lora_skyreels_v4 import LORA_BRANCHES

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

DEFAULT_TAGS = ("diffusers", "skyreels-v4", "text-to-video", "text-to-audio", "video-audio")
DEFAULT_EXAMPLE_PROMPT = "A red ball bounces between the walls of a dark room. <sfx>a ping at every bounce</sfx>"
BRANCH_DESCRIPTIONS = {
    "transformer": "the video branch (`transformer`)",
    "audio_transformer": "the audio branch (`audio_transformer`)",
    "refiner": "the refiner (`refiner`, super-resolution and frame interpolation)",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _quote(text: str) -> str:
    """A Python string literal (JSON strings are valid ones) for the usage code."""
    return json.dumps(text, ensure_ascii=False)


def _usage_code(source: str, base_model: str | None, lora: bool, example_prompt: str, audio: bool) -> str:
    pipeline_source = _quote(base_model if lora else source)
    lines = [
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        "import diffusers_skyreels  # registers the SkyReels V4 classes with Diffusers",
        "from diffusers_skyreels.utils.media_io import export_to_video_with_audio",
        "",
        f"pipe = DiffusionPipeline.from_pretrained({pipeline_source}, torch_dtype=torch.bfloat16).to(\"cuda\")",
    ]
    if lora:
        lines.append(f"pipe.load_lora_weights({_quote(source)})")
    if audio:
        lines += [
            f"output = pipe({_quote(example_prompt)})",
            "export_to_video_with_audio(",
            "    output.frames[0], \"output.mp4\", fps=int(output.fps), audio=output.audio[0],",
            "    audio_sample_rate=output.audio_sample_rate,",
            ")",
        ]
    else:
        lines += [
            f"output = pipe({_quote(example_prompt)}, generate_audio=False)",
            "export_to_video_with_audio(output.frames[0], \"output.mp4\", fps=int(output.fps))",
        ]
    return "```python\n" + "\n".join(lines) + "\n```"


def save_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str | None,
    instance_prompt: str | None,
    lora: bool,
    branches: list[str],
    example_prompt: str,
    training_summary: str | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    tags: list[str] | None = None,
    extra_markdown: str | None = None,
) -> Path:
    """Write `output_dir/README.md` for a SkyReels V4 pipeline or LoRA and return its path (overwrites a card).

    Args:
        base_model: the pipeline a LoRA applies to, or a full model was fine-tuned from (required for a LoRA).
        instance_prompt: the trigger prompt the weights were trained with, if any.
        lora: whether the folder holds LoRA weights (`load_lora_weights`) rather than a full pipeline.
        branches: the components the weights cover, among `transformer`, `audio_transformer`, `refiner`.
        example_prompt: the prompt of the usage example.
        training_summary: how the weights were trained, as given.
        license: a Hub license identifier.
        repo_id: where the folder is published; the usage example loads from there (else from `output_dir`).
        tags: added to the default tags (`diffusers`, `skyreels-v4`, ..., and `lora` for a LoRA).
        extra_markdown: appended before the license section.
    """
    unknown = [b for b in branches if b not in LORA_BRANCHES]
    if not branches or unknown or len(set(branches)) != len(branches):
        raise ValueError(f"`branches` must be distinct names among {list(LORA_BRANCHES)}, got {branches}.")
    if lora and not base_model:
        raise ValueError("A LoRA card needs `base_model`, the pipeline the LoRA is loaded into.")
    if not example_prompt.strip():
        raise ValueError("`example_prompt` must not be empty.")
    if not license.strip():
        raise ValueError("`license` must not be empty.")
    if repo_id is not None:
        validate_repo_id(repo_id)

    output_dir = Path(output_dir)
    descriptions = [BRANCH_DESCRIPTIONS[b] for b in branches]
    covered = descriptions[0] if len(descriptions) == 1 else f"{', '.join(descriptions[:-1])} and {descriptions[-1]}"
    title = repo_id.split("/")[-1] if repo_id else ("SkyReels V4 LoRA" if lora else "SkyReels V4")
    if lora:
        intro = f"LoRA weights for the SkyReels V4 pipeline `{base_model}`, adapting {covered}."
    else:
        intro = f"A SkyReels V4 pipeline (joint video and audio generation) in Diffusers format, with {covered}."
        if base_model:
            intro += f" Fine-tuned from `{base_model}`."
    sections = [f"# {title}", intro]
    if instance_prompt:
        sections.append(
            f"## Trigger prompt\n\nThe weights were trained with the prompt `{instance_prompt}`; use it in prompts."
        )
    # A LoRA goes into a full pipeline; a pipeline without the audio branch makes video only.
    usage = _usage_code(
        repo_id or str(output_dir), base_model, lora, example_prompt, audio=lora or "audio_transformer" in branches
    )
    sections.append(
        "## Usage\n\nNeeds the `diffusers_skyreels` package, which registers the SkyReels V4 classes with Diffusers "
        f"when imported.\n\n{usage}"
    )
    if training_summary:
        sections.append(f"## Training\n\n{training_summary.strip()}")
    if extra_markdown:
        sections.append(extra_markdown.strip())
    sections.append(f"## License\n\nReleased under the `{license}` license.")

    data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-video",
        instance_prompt=instance_prompt,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    all_tags = [*DEFAULT_TAGS, *(["lora"] if lora else []), *(tags or [])]
    card = populate_model_card(card, tags=list(dict.fromkeys(all_tags)))

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "README.md"
    card.save(path)
    return path


def write_pipeline_card(pipeline: DiffusionPipeline, save_directory: str | os.PathLike) -> Path:
    """Write the card of a pipeline saved in `save_directory`, unless the folder already has a README.md (a card
    written by `save_model_card` or by hand is kept). Returns the README's path."""
    path = Path(save_directory) / "README.md"
    if path.exists():
        return path
    branches = [name for name in LORA_BRANCHES if getattr(pipeline, name, None) is not None]
    components = "\n".join(
        f"- `{name}`: `{type(component).__name__}`"
        for name, component in pipeline.components.items()
        if component is not None
    )
    return save_model_card(
        save_directory,
        base_model=None,
        instance_prompt=None,
        lora=False,
        branches=branches,
        example_prompt=DEFAULT_EXAMPLE_PROMPT,
        extra_markdown=f"## Components\n\n`{type(pipeline).__name__}` with:\n\n{components}",
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SkyReels V4 weights and model card",
    ignore_patterns: list[str] | None = None,
) -> CommitInfo:
    """Create (or reuse) the Hub model repository `repo_id` and upload `folder` to it in one commit.

    The folder must hold a README.md and safetensors weights, and no pickled files (`.bin`, `.pt`, `.ckpt`, ...)
    outside `ignore_patterns` (e.g. `["checkpoint-*"]` for training checkpoints).
    """
    validate_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder.")
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
    if "README.md" not in files:
        raise ValueError(f"{str(folder)!r} has no README.md; write one with `save_model_card` first.")
    if not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{str(folder)!r} has no `.safetensors` weights to upload.")
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ValueError(f"Refusing to upload pickled files {pickled}; save safetensors, or pass `ignore_patterns`.")
    repo = create_repo(repo_id, token=token, private=private, exist_ok=True)
    return upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        ignore_patterns=ignore_patterns,
    )
