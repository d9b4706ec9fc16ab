"""`SkyReelsV4PromptEncoder`: turns prompts with reference images and video frames into Qwen-VL hidden states.

SkyReels V4 conditions both transformer branches on one frozen multimodal LLM (Qwen-VL) that reads the text together
with the referenced visuals (architecture.md §2, §6). This module owns everything between the user's prompt and the
`encoder_hidden_states` of the transformers: the chat template, the `@image_N` / `@video_N` / `@Actor-K` reference
tags, vision-token bookkeeping, hidden-state extraction, batching for classifier-free guidance, and an optional
prompt enhancer that rewrites a free-form prompt into the structured caption form with the same model.

The sequence fed to the model is ChatML, the format of Qwen2.5-VL and Qwen3-VL:

    <|im_start|>system\\n{system_prompt}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
    '------------------------ prefix (dropped) ------------------------'         '------------ suffix (kept) ------------'

The returned embeddings cover `content + suffix`: the prefix is the same for every prompt and is dropped, its length
measured by tokenizing it; the suffix is kept because, in a causal model, its states have read the whole prompt.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_TEXT_ENCODER_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
"""The documented default Qwen-VL checkpoint. Never downloaded by this package; Qwen3-VL checkpoints also work."""

DEFAULT_SYSTEM_PROMPT = (
    "Describe the video to be generated together with its synchronized audio: the subjects, their appearance and "
    "actions, the scene, lighting, camera motion and visual style; the dialogue, sound effects, background music "
    "and singing; and any text shown on screen. Reference images and videos are marked with tags such as @image_1, "
    "@video_1 and @Actor-0."
)

ENHANCER_SYSTEM_PROMPT = (
    "You rewrite a user's request for a video with sound into a detailed caption for a video and audio generator. "
    "First describe the visuals in one paragraph: subjects, appearance, actions, scene, lighting, camera motion and "
    "style. Then describe the audio with tags: spoken lines as <dialogue>speaker: words</dialogue>, sound effects "
    "as <sfx>...</sfx>, background music as <bgm>...</bgm>, singing as <singing>...</singing>, and on-screen text "
    "as <text>...</text>. Keep every reference tag such as @image_1, @video_1, @Actor-0 or @Audio-0 exactly as "
    "written. Answer with the caption only."
)

STRUCTURED_CAPTION_TAGS = ("dialogue", "sfx", "bgm", "singing", "text")
"""Audio and on-screen-text tags of the caption language [paper]; plain text to the tokenizer."""

CHAT_TEMPLATE_PREFIX = "<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
CHAT_TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

HIDDEN_STATE_CHOICES = ("last", "last_pre_norm")

# `@image_1`, `@video_2`, `@audio_1` (1-based) and `@Actor-0`, `@Audio-0` (0-based), case-insensitive.
REFERENCE_TAG_PATTERN = re.compile(r"@(?:(image|video|audio)_(\d+)|(actor|audio)-(\d+))(?![\w-])", re.IGNORECASE)

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes
"""One image: a PIL image, a `[H, W(, C)]` array (uint8, or float in [0, 1]), a `[(C,) H, W]` tensor (uint8, or
float in [0, 1]), a path to an image file, or the encoded bytes of one."""
VideoInput = Sequence[ImageInput] | np.ndarray | torch.Tensor
"""One video: a sequence of frames (each an `ImageInput`), a `[T, H, W, C]` array or a `[T, C, H, W]` tensor."""


@dataclass
class SkyReelsV4PromptInputs:
    """A tokenized, right-padded batch of chat sequences with its vision inputs, ready for the Qwen-VL forward.

    `num_prefix_tokens` leading tokens of every row are the chat-template prefix; the rest is content + suffix.
    """

    input_ids: torch.LongTensor  # [B, S]
    attention_mask: torch.LongTensor  # [B, S], 1 = real token
    mm_token_type_ids: torch.IntTensor  # [B, S], 0 = text, 1 = image token, 2 = video token
    pixel_values: torch.Tensor | None  # [num_patches, patch_dim], all visuals of the batch in sequence order
    image_grid_thw: torch.LongTensor | None  # [num_visuals, 3]
    num_prefix_tokens: int

    def to_model_kwargs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The keyword arguments of the Qwen-VL `forward` / `generate`, on `device`."""
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return {key: value.to(device) for key, value in kwargs.items()}


@dataclass
class _Visual:
    """One referenced visual of one prompt: its label in error messages and its decoded frames."""

    label: str
    frames: list[PIL.Image.Image]


class SkyReelsV4PromptEncoder:
    r"""Encodes SkyReels V4 prompts, with their reference images and videos, with a frozen Qwen-VL model.

    Built from the pipeline's components; holds no weights of its own.

    Reference tags. In each prompt, `@image_N` (1-based) is `images[N - 1]`, `@Actor-K` (0-based, as in the paper)
    is `images[K]` (so `@Actor-0` and `@image_1` are the same picture), and `@video_N` is `videos[N - 1]`. `images`
    may instead be a dict from tag to image (`{"@Actor-0": face, "@image_1": room}`); then every image tag is looked
    up by name. The first occurrence of a visual's tag is followed by its vision tokens
    (`@image_1<|vision_start|><|image_pad|>...<|vision_end|>`, as many pad tokens as the vision tower makes for
    that image: `prod(image_grid_thw) / merge_size**2`); later occurrences stay text, so the model can bind the name.
    Visuals given but not referenced are put in front of the text, like the standard Qwen-VL chat template does, so
    every visual appears exactly once. `@audio_N` / `@Audio-K` stay plain text: audio goes to the audio branch.
    Structured caption tags (`<dialogue>`, `<sfx>`, `<bgm>`, `<singing>`, `<text>`) are ordinary text, and text is
    tokenized with special tokens split, so a prompt cannot inject chat-control tokens.

    Videos. The PIL image processor cannot make Qwen-VL video inputs (the Qwen video processors need torchvision),
    so a video is inserted as a sequence of its frames, each as an image, with up to `max_video_frames` frames
    sampled uniformly.

    Args:
        text_encoder: `Qwen2_5_VLForConditionalGeneration` or `Qwen3VLForConditionalGeneration` (the generation head
            serves `enhance_prompt`); their base `*Model` classes also work for encoding. `None` allows only
            precomputed embeddings.
        tokenizer: the model's tokenizer (`Qwen2Tokenizer`).
        image_processor: the model's PIL image processor (`Qwen2VLImageProcessorPil`); `None` rejects visuals.
        system_prompt: the system turn of the chat template.
        hidden_state: which state becomes `prompt_embeds`: `"last"` (default; after the final RMSNorm, what
            `hidden_states[-1]` of transformers returns), `"last_pre_norm"` (the input of the final norm), or an int
            `k`: 0 = input embeddings, `k` = output of decoder layer `k` (before any final norm, so `-1` equals
            `"last_pre_norm"`).
        max_sequence_length: most tokens of content + suffix per prompt; longer prompts are truncated with a warning.
        max_video_frames: most frames kept from each reference video.
    """

    def __init__(
        self,
        text_encoder: torch.nn.Module | None,
        tokenizer: Any | None,
        image_processor: Any | None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        hidden_state: str | int = "last",
        max_sequence_length: int = 1024,
        max_video_frames: int = 8,
    ) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.system_prompt = system_prompt
        self.hidden_state = hidden_state
        self.max_sequence_length = max_sequence_length
        self.max_video_frames = max_video_frames
        if max_video_frames < 1:
            raise ValueError(f"`max_video_frames` must be at least 1, got {max_video_frames}.")
        if text_encoder is not None:
            self._check_hidden_state(hidden_state)
            self._check_components()
        if tokenizer is not None:
            self._check_max_sequence_length(max_sequence_length)

    # -- configuration checks ------------------------------------------------------------------------------------

    @property
    def _num_layers(self) -> int:
        return self.text_encoder.config.text_config.num_hidden_layers

    def _check_hidden_state(self, hidden_state: str | int) -> None:
        is_int = isinstance(hidden_state, int) and not isinstance(hidden_state, bool)
        if not is_int and hidden_state not in HIDDEN_STATE_CHOICES:
            raise ValueError(f"`hidden_state` must be one of {HIDDEN_STATE_CHOICES} or an int, got {hidden_state!r}.")
        if is_int and not -(self._num_layers + 1) <= hidden_state <= self._num_layers:
            raise ValueError(
                f"`hidden_state` index {hidden_state} is out of range for a text model with {self._num_layers} "
                f"layers (valid: {-(self._num_layers + 1)} to {self._num_layers})."
            )

    def _check_components(self) -> None:
        config = self.text_encoder.config
        if self.tokenizer is not None:
            for token in ("<|im_start|>", "<|im_end|>"):
                if len(self.tokenizer(token, add_special_tokens=False).input_ids) != 1:
                    raise ValueError(f"The tokenizer has no special token {token}: it is not a Qwen chat tokenizer.")
            for token, name in (
                ("<|image_pad|>", "image_token_id"),
                ("<|vision_start|>", "vision_start_token_id"),
                ("<|vision_end|>", "vision_end_token_id"),
            ):
                token_id, config_id = self.tokenizer.convert_tokens_to_ids(token), getattr(config, name)
                if token_id != config_id:
                    raise ValueError(
                        f"Tokenizer and text encoder disagree on {token}: tokenizer id {token_id}, "
                        f"`config.{name}` = {config_id}."
                    )
        if self.image_processor is not None:
            vision = config.vision_config
            for name, expected in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size)):
                if getattr(self.image_processor, name) != expected:
                    raise ValueError(
                        f"Image processor {name}={getattr(self.image_processor, name)} does not match the vision "
                        f"tower's {expected}."
                    )

    def _check_max_sequence_length(self, max_sequence_length: int) -> None:
        num_suffix = len(self._tokenize_template(CHAT_TEMPLATE_SUFFIX))
        if max_sequence_length <= num_suffix:
            raise ValueError(
                f"`max_sequence_length` must exceed the {num_suffix} tokens of the template suffix, "
                f"got {max_sequence_length}."
            )

    # -- chat template -------------------------------------------------------------------------------------------

    def _tokenize_template(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def template_prefix(self, system_prompt: str | None = None) -> str:
        """The chat text in front of the user content (system turn + user header)."""
        return CHAT_TEMPLATE_PREFIX.format(
            system_prompt=self.system_prompt if system_prompt is None else system_prompt
        )

    def num_prefix_tokens(self, system_prompt: str | None = None) -> int:
        """How many leading tokens `encode_prompt` drops: the tokenized template prefix."""
        return len(self._tokenize_template(self.template_prefix(system_prompt)))

    # -- inputs --------------------------------------------------------------------------------------------------

    def prepare_inputs(
        self,
        prompt: str | list[str],
        images: Any = None,
        videos: Any = None,
        system_prompt: str | None = None,
        max_sequence_length: int | None = None,
        allow_empty: bool = False,
    ) -> SkyReelsV4PromptInputs:
        """Tokenize prompts into chat sequences with their visuals; validates everything the model would choke on.

        `max_sequence_length=None` disables truncation. `allow_empty` admits `""` (the default negative prompt).
        Raises `ValueError` for empty prompts, unknown reference tags and visuals that cannot be decoded.
        """
        if self.tokenizer is None:
            raise ValueError("No tokenizer is loaded: pass `prompt_embeds` instead of text.")
        prompts = _as_prompt_list(prompt, "prompt", allow_empty)
        per_prompt_images = _split_images(images, len(prompts))
        per_prompt_videos = _split_videos(videos, len(prompts))
        prefix = self._tokenize_template(self.template_prefix(system_prompt))
        suffix = self._tokenize_template(CHAT_TEMPLATE_SUFFIX)

        rows, pixel_values, grids = [], [], []
        for index, text in enumerate(prompts):
            pieces = self._resolve_references(text, index, per_prompt_images[index], per_prompt_videos[index])
            content, row_pixels, row_grids = self._tokenize_content(pieces)
            if max_sequence_length is not None:
                content, row_pixels, row_grids = self._truncate(
                    content, row_pixels, row_grids, max_sequence_length, len(suffix), index
                )
            rows.append(prefix + [token for part in content for token in part] + suffix)
            pixel_values += row_pixels
            grids += row_grids

        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, : len(row)] = 1
        mm_token_type_ids = (input_ids == self._token_ids["image"]).int()
        return SkyReelsV4PromptInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=torch.cat(pixel_values) if pixel_values else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            num_prefix_tokens=len(prefix),
        )

    @property
    def _token_ids(self) -> dict[str, int]:
        convert = self.tokenizer.convert_tokens_to_ids
        return {
            "image": convert("<|image_pad|>"),
            "start": convert("<|vision_start|>"),
            "end": convert("<|vision_end|>"),
        }

    def _resolve_references(
        self, text: str, index: int, images: list | dict | None, videos: list | None
    ) -> list[str | _Visual]:
        """Split a prompt into text pieces and visuals, each visual right after its first tag (see class doc)."""
        images = images if images is not None else []
        videos = videos if videos is not None else []
        image_entries = (
            {str(key).lstrip("@").lower(): value for key, value in images.items()}
            if isinstance(images, Mapping)
            else None
        )
        pieces: list[str | _Visual] = []
        inserted: set[tuple[str, Any]] = set()
        cursor = 0
        for match in REFERENCE_TAG_PATTERN.finditer(text):
            kind = (match.group(1) or match.group(3)).lower()
            number = int(match.group(2) or match.group(4))
            if kind == "audio":
                continue
            key, value = self._lookup(match.group(0), kind, number, index, images, image_entries, videos)
            pieces.append(text[cursor : match.end()])
            cursor = match.end()
            if key not in inserted:
                inserted.add(key)
                pieces.append(self._decode_visual(value, key, match.group(0), index))
        pieces.append(text[cursor:])

        unreferenced: list[_Visual] = []
        if image_entries is not None:
            named = [(("image", name), value, f"@{name}") for name, value in image_entries.items()]
        else:
            named = [(("image", i), value, f"@image_{i + 1}") for i, value in enumerate(images)]
        named += [(("video", i), value, f"@video_{i + 1}") for i, value in enumerate(videos)]
        for key, value, tag in named:
            if key not in inserted:
                unreferenced.append(self._decode_visual(value, key, tag, index))
        return [*unreferenced, *pieces]

    @staticmethod
    def _lookup(
        tag: str,
        kind: str,
        number: int,
        index: int,
        images: list | dict,
        image_entries: dict[str, Any] | None,
        videos: list,
    ) -> tuple[tuple[str, Any], Any]:
        if kind == "video":
            if not 1 <= number <= len(videos):
                raise ValueError(f"Prompt {index} references {tag}, but {len(videos)} video(s) were given for it.")
            return ("video", number - 1), videos[number - 1]
        if image_entries is not None:
            name = tag.lstrip("@").lower()
            if name not in image_entries:
                raise ValueError(
                    f"Prompt {index} references {tag}, which is not a key of the images dict "
                    f"({sorted(image_entries)})."
                )
            return ("image", name), image_entries[name]
        position = number - 1 if kind == "image" else number
        if not 0 <= position < len(images):
            raise ValueError(f"Prompt {index} references {tag}, but {len(images)} image(s) were given for it.")
        return ("image", position), images[position]

    def _decode_visual(self, value: Any, key: tuple[str, Any], tag: str, index: int) -> _Visual:
        if self.image_processor is None:
            raise ValueError("No image processor is loaded, so prompts cannot take reference images or videos.")
        label = f"{tag} of prompt {index}"
        if key[0] == "image":
            return _Visual(label, [_to_pil(value, label)])
        frames = _video_frames(value, label)
        keep = np.unique(np.linspace(0, len(frames) - 1, num=min(len(frames), self.max_video_frames)).round())
        return _Visual(label, [frames[int(i)] for i in keep])

    def _tokenize_content(
        self, pieces: list[str | _Visual]
    ) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
        """Token ids per piece (a visual frame is one `start, pad * n, end` block) and the frames' pixel inputs."""
        ids = self._token_ids
        content, pixel_values, grids = [], [], []
        for piece in pieces:
            if isinstance(piece, str):
                if piece:
                    content.append(
                        self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True).input_ids
                    )
                continue
            for frame in piece.frames:
                try:
                    processed = self.image_processor(images=[frame], return_tensors="pt")
                except ValueError as error:
                    raise ValueError(f"Cannot process {piece.label}: {error}") from error
                grid = processed["image_grid_thw"]
                num_tokens = int(grid.prod()) // self.image_processor.merge_size**2
                content.append([ids["start"]] + [ids["image"]] * num_tokens + [ids["end"]])
                pixel_values.append(processed["pixel_values"])
                grids.append(grid)
        return content, pixel_values, grids

    def _truncate(
        self,
        content: list[list[int]],
        pixel_values: list[torch.Tensor],
        grids: list[torch.Tensor],
        max_sequence_length: int,
        num_suffix_tokens: int,
        index: int,
    ) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
        """Cut the content to fit `max_sequence_length` with the suffix. Text is cut anywhere; a vision block is
        kept whole or dropped with everything after it."""
        budget = max_sequence_length - num_suffix_tokens
        total = sum(len(part) for part in content)
        if total <= budget:
            return content, pixel_values, grids
        kept: list[list[int]] = []
        used = num_blocks = 0
        for part in content:
            is_block = part[0] == self._token_ids["start"]
            room = budget - used
            if room <= 0 or (is_block and len(part) > room):
                break
            kept.append(part if is_block else part[:room])
            used += len(kept[-1])
            num_blocks += is_block
        dropped = [token for part in content for token in part][used:]
        dropped_text = self.tokenizer.decode(
            [token for token in dropped if token not in self._token_ids.values()], skip_special_tokens=False
        )
        num_dropped_blocks = len(grids) - num_blocks
        logger.warning(
            f"Prompt {index} is longer than `max_sequence_length` = {max_sequence_length} tokens ({total} content + "
            f"{num_suffix_tokens} template-suffix tokens) and was truncated: dropped {num_dropped_blocks} "
            f"image/frame block(s) and the text {dropped_text!r}."
        )
        return kept, pixel_values[:num_blocks], grids[:num_blocks]

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        images: Any = None,
        videos: Any = None,
        max_sequence_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        r"""Encode prompts (and, for guidance, negative prompts) into `encoder_hidden_states` for the transformers.

        Args:
            prompt: one prompt or a batch; `None` when `prompt_embeds` is given.
            negative_prompt: one (broadcast) or one per prompt; default `""`. Encoded with the same `images` and
                `videos`, by the same rules, so both guidance branches see the same visuals.
            do_classifier_free_guidance: also return negative embeddings.
            num_videos_per_prompt: each row is repeated this many times (`repeat_interleave`).
            prompt_embeds, prompt_attention_mask: precomputed `[B, L, hidden]` and `[B, L]`, used instead of text.
            negative_prompt_embeds, negative_prompt_attention_mask: the same for the negative branch.
            images: one list for all prompts, or one list (or tag->image dict) per prompt; see the class doc.
            videos: one list of videos for all prompts, or one list per prompt.
            max_sequence_length: overrides the instance's limit on content + suffix tokens.
            device, dtype: of the returned tensors (default: the text encoder's). The model runs on `device`.

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`.
            Embeddings are `[B * num_videos_per_prompt, L, hidden]`, masks `[B * num_videos_per_prompt, L]` int64
            (1 = real token, 0 = padding). Each covers the user content (text and vision tokens) plus the template
            suffix `<|im_end|>\n<|im_start|>assistant\n`; rows are right-padded with zeros to the longest row of
            their own batch, so positive and negative `L` may differ. Negatives are `None` without guidance.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if num_videos_per_prompt < 1:
            raise ValueError(f"`num_videos_per_prompt` must be at least 1, got {num_videos_per_prompt}.")
        hidden_size = None if self.text_encoder is None else self.text_encoder.config.text_config.hidden_size
        if prompt_embeds is not None:
            _check_embeds(prompt_embeds, prompt_attention_mask, "prompt", hidden_size)
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = len(_as_prompt_list(prompt, "prompt", allow_empty=False))
        use_negative = do_classifier_free_guidance
        if use_negative and negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
            _check_embeds(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt", hidden_size)
            if negative_prompt_embeds.shape[0] != batch_size:
                raise ValueError(
                    f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]}, but there are "
                    f"{batch_size} prompts."
                )
        needs_model = prompt_embeds is None or (use_negative and negative_prompt_embeds is None)
        if needs_model and self.text_encoder is None:
            raise ValueError("No text encoder is loaded: pass `prompt_embeds` (and `negative_prompt_embeds`).")
        max_sequence_length = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        if self.tokenizer is not None:
            self._check_max_sequence_length(max_sequence_length)

        # Build (and so validate) every input before the model runs.
        positive_inputs = negative_inputs = None
        if prompt_embeds is None:
            positive_inputs = self.prepare_inputs(prompt, images, videos, max_sequence_length=max_sequence_length)
        if use_negative and negative_prompt_embeds is None:
            negatives = _broadcast_negative(negative_prompt, batch_size)
            negative_inputs = self.prepare_inputs(
                negatives, images, videos, max_sequence_length=max_sequence_length, allow_empty=True
            )

        device = torch.device(device) if device is not None else self._default_device()
        dtype = dtype if dtype is not None else self._default_dtype(prompt_embeds)
        if positive_inputs is not None:
            prompt_embeds, prompt_attention_mask = self._encode(positive_inputs, device)
        prompt_embeds, prompt_attention_mask = _finalize(
            prompt_embeds, prompt_attention_mask, num_videos_per_prompt, device, dtype
        )
        if not use_negative:
            return prompt_embeds, prompt_attention_mask, None, None
        if negative_inputs is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode(negative_inputs, device)
        negative_prompt_embeds, negative_prompt_attention_mask = _finalize(
            negative_prompt_embeds, negative_prompt_attention_mask, num_videos_per_prompt, device, dtype
        )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _default_device(self) -> torch.device:
        return self.text_encoder.device if self.text_encoder is not None else torch.device("cpu")

    def _default_dtype(self, prompt_embeds: torch.Tensor | None) -> torch.dtype:
        if self.text_encoder is not None:
            return self.text_encoder.dtype
        return prompt_embeds.dtype

    def _language_model(self) -> torch.nn.Module:
        return getattr(self.text_encoder, "model", self.text_encoder).language_model

    @contextmanager
    def _capture_hidden_state(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the configured hidden state during a forward, with a hook on the module that produces it.

        A hook keeps only the one state needed and works through the top-level forward (which offloading hooks
        wrap); `output_hidden_states` would keep every layer and, in transformers >= 5, replaces the last one with
        the post-norm state.
        """
        language_model = self._language_model()
        captured: dict[str, torch.Tensor] = {}
        choice = self.hidden_state
        if isinstance(choice, int):
            choice = choice % (self._num_layers + 1)
        if choice == "last":
            handle = language_model.norm.register_forward_hook(lambda module, args, output: captured.update(x=output))
        elif choice == "last_pre_norm" or choice == self._num_layers:
            handle = language_model.norm.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
        elif choice == 0:
            handle = language_model.layers[0].register_forward_pre_hook(
                lambda module, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
        else:
            handle = language_model.layers[choice - 1].register_forward_hook(
                lambda module, args, output: captured.update(x=output[0] if isinstance(output, tuple) else output)
            )
        try:
            yield captured
        finally:
            handle.remove()

    @torch.no_grad()
    def _encode(self, inputs: SkyReelsV4PromptInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the text encoder and return `(embeds, mask)` of content + suffix, zero at padded positions."""
        if self.text_encoder is None:
            raise ValueError("No text encoder is loaded: pass `prompt_embeds` instead of text.")
        kwargs = inputs.to_model_kwargs(device)
        if hasattr(self.text_encoder, "lm_head"):
            kwargs["logits_to_keep"] = 1  # only the hidden states are used; skip the vocabulary projection
        with self._capture_hidden_state() as captured:
            self.text_encoder(**kwargs, use_cache=False)
        start = inputs.num_prefix_tokens
        mask = inputs.attention_mask[:, start:].to(device)
        embeds = captured["x"][:, start:] * mask[..., None].to(captured["x"].dtype)
        return embeds, mask

    # -- prompt enhancement --------------------------------------------------------------------------------------

    @torch.no_grad()
    def enhance_prompt(
        self,
        prompt: str | list[str],
        images: Any = None,
        videos: Any = None,
        seed: int | None = 0,
        max_new_tokens: int = 512,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float = 0.9,
        system_prompt: str = ENHANCER_SYSTEM_PROMPT,
        device: torch.device | str | None = None,
    ) -> str | list[str]:
        """Rewrite free-form prompts into the structured caption form with the Qwen-VL model's `generate`.

        The model sees the same chat sequence as `encode_prompt` (visuals included) under an instruction to
        describe the visuals and tag the audio (`<dialogue>`, `<sfx>`, `<bgm>`, `<singing>`, `<text>`). Each
        prompt is generated alone with the torch RNG seeded by `seed` (the global RNG state is restored after), so
        the same seed gives the same text. An empty answer falls back to the original prompt, with a warning.
        Returns a string for a string prompt, else a list.
        """
        if self.text_encoder is None or not hasattr(self.text_encoder, "generate"):
            raise ValueError(
                "Prompt enhancement needs a text encoder with a generation head, e.g. "
                "`Qwen2_5_VLForConditionalGeneration`."
            )
        prompts = _as_prompt_list(prompt, "prompt", allow_empty=False)
        per_prompt_images = _split_images(images, len(prompts))
        per_prompt_videos = _split_videos(videos, len(prompts))
        all_inputs = [
            self.prepare_inputs([text], [per_prompt_images[i]], [per_prompt_videos[i]], system_prompt=system_prompt)
            for i, text in enumerate(prompts)
        ]
        device = torch.device(device) if device is not None else self._default_device()
        sampling = {"do_sample": do_sample}
        if do_sample:
            sampling.update(temperature=temperature, top_p=top_p)
        enhanced = []
        for text, inputs in zip(prompts, all_inputs, strict=True):
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                output = self.text_encoder.generate(
                    **inputs.to_model_kwargs(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **sampling,
                )
            answer = self.tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()
            if not answer:
                logger.warning(f"The prompt enhancer returned no text for {text!r}; keeping the original prompt.")
                answer = text
            enhanced.append(answer)
        return enhanced[0] if isinstance(prompt, str) else enhanced


# -- input normalisation ------------------------------------------------------------------------------------------


def _as_prompt_list(prompt: Any, name: str, allow_empty: bool) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
    for index, text in enumerate(prompts):
        if not isinstance(text, str):
            raise ValueError(f"`{name}`[{index}] must be a string, got {type(text).__name__}.")
        if not allow_empty and not text.strip():
            raise ValueError(f"`{name}`[{index}] is empty; describe the video to generate.")
    return list(prompts)


def _broadcast_negative(negative_prompt: str | list[str] | None, batch_size: int) -> list[str]:
    negatives = (
        [negative_prompt or ""] * batch_size if not isinstance(negative_prompt, (list, tuple)) else negative_prompt
    )
    negatives = _as_prompt_list(list(negatives), "negative_prompt", allow_empty=True)
    if len(negatives) != batch_size:
        raise ValueError(f"`negative_prompt` has {len(negatives)} entries, but there are {batch_size} prompts.")
    return negatives


def _is_frame(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim <= 3
    return isinstance(value, (PIL.Image.Image, str, os.PathLike, bytes, bytearray))


def _is_video(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 4
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_frame(frame) for frame in value)


def _split_images(images: Any, batch_size: int) -> list[list | dict | None]:
    """One image list (or tag dict) per prompt, from a shared list/dict/image or a per-prompt list."""
    if images is None or _is_frame(images) or isinstance(images, Mapping):
        shared = [images] if _is_frame(images) else images
        return [shared] * batch_size
    if not isinstance(images, (list, tuple)):
        raise ValueError(
            f"`images` must be an image, a list of images or a dict of them, got {type(images).__name__}."
        )
    if all(_is_frame(image) for image in images):
        return [list(images)] * batch_size
    if all(entry is None or isinstance(entry, (list, tuple, Mapping)) for entry in images):
        if len(images) != batch_size:
            raise ValueError(f"`images` has {len(images)} per-prompt lists, but there are {batch_size} prompts.")
        return [entry if isinstance(entry, Mapping) or entry is None else list(entry) for entry in images]
    raise ValueError("`images` must be one list of images shared by all prompts, or one list (or dict) per prompt.")


def _split_videos(videos: Any, batch_size: int) -> list[list | None]:
    """One video list per prompt, from a single video, a shared list of videos or a per-prompt list."""
    if videos is None or _is_video(videos):
        return [[videos] if videos is not None else None] * batch_size
    if not isinstance(videos, (list, tuple)):
        raise ValueError(f"`videos` must be a video or a list of videos, got {type(videos).__name__}.")
    if all(_is_video(video) for video in videos):
        return [list(videos)] * batch_size
    if all(entry is None or (isinstance(entry, (list, tuple)) and all(map(_is_video, entry))) for entry in videos):
        if len(videos) != batch_size:
            raise ValueError(f"`videos` has {len(videos)} per-prompt lists, but there are {batch_size} prompts.")
        return [None if entry is None else list(entry) for entry in videos]
    raise ValueError(
        "`videos` must be one list of videos (each a list of frames, a [T, H, W, C] array or a [T, C, H, W] tensor) "
        "shared by all prompts, or one such list per prompt."
    )


def _to_pil(value: Any, label: str) -> PIL.Image.Image:
    """Decode one image input to an RGB PIL image, or raise `ValueError` naming `label`."""
    if isinstance(value, (str, os.PathLike, bytes, bytearray)):
        source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
        try:
            with PIL.Image.open(source) as image:
                return image.convert("RGB")
        except (OSError, PIL.Image.DecompressionBombError) as error:
            what = "bytes" if isinstance(value, (bytes, bytearray)) else repr(os.fspath(value))
            raise ValueError(f"Cannot decode {label} ({what}) as an image: {error}") from error
    if isinstance(value, PIL.Image.Image):
        try:
            return value.convert("RGB")
        except OSError as error:
            raise ValueError(f"Cannot decode {label} as an image: {error}") from error
    if isinstance(value, torch.Tensor):
        if value.ndim == 3 and value.shape[0] in (1, 3, 4):
            value = value.permute(1, 2, 0)
        elif value.ndim != 2:
            raise ValueError(
                f"{label}: an image tensor must be [C, H, W] with C in (1, 3, 4) or [H, W], got {tuple(value.shape)}."
            )
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{label}: unsupported image type {type(value).__name__}.")
    if not (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3, 4))) or 0 in value.shape:
        raise ValueError(
            f"{label}: an image array must be [H, W, C] with C in (1, 3, 4) or [H, W], got {value.shape}."
        )
    if np.issubdtype(value.dtype, np.floating):
        if value.min() < 0 or value.max() > 1:
            raise ValueError(f"{label}: float images must be in [0, 1], got [{value.min():.3g}, {value.max():.3g}].")
        value = (value * 255).round()
    elif value.dtype != np.uint8:
        raise ValueError(f"{label}: image arrays must be uint8 or float in [0, 1], got {value.dtype}.")
    value = value.astype(np.uint8)
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    return PIL.Image.fromarray(value).convert("RGB")


def _video_frames(value: Any, label: str) -> list[PIL.Image.Image]:
    if (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4) or (
        isinstance(value, (list, tuple)) and value
    ):
        return [_to_pil(frame, f"frame {i} of {label}") for i, frame in enumerate(value)]
    raise ValueError(
        f"{label}: a video must be a non-empty list of frames, a [T, H, W, C] array or a [T, C, H, W] tensor."
    )


def _check_embeds(embeds: torch.Tensor, mask: torch.Tensor | None, name: str, hidden_size: int | None) -> None:
    if mask is None:
        raise ValueError(f"`{name}_embeds` needs `{name}_attention_mask` (1 for real tokens, 0 for padding).")
    if embeds.ndim != 3:
        raise ValueError(f"`{name}_embeds` must be [batch, tokens, hidden], got {tuple(embeds.shape)}.")
    if hidden_size is not None and embeds.shape[-1] != hidden_size:
        raise ValueError(f"`{name}_embeds` has hidden size {embeds.shape[-1]}, the text encoder {hidden_size}.")
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(
            f"`{name}_attention_mask` must have shape {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}."
        )


def _finalize(
    embeds: torch.Tensor, mask: torch.Tensor, repeats: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = embeds.to(device=device, dtype=dtype).repeat_interleave(repeats, dim=0)
    mask = mask.to(device=device, dtype=torch.long).repeat_interleave(repeats, dim=0)
    return embeds, mask
