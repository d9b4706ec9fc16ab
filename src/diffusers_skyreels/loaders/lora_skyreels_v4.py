"""LoRA for the SkyReels V4 pipelines, whose denoisers are up to three branch models.

A LoRA file is one safetensors file whose keys start with the component they adapt (`transformer.`,
`audio_transformer.`, `refiner.`), and whose header holds each branch's `LoraConfig` under the same prefixes, so that
branches trained with different ranks or alphas reload exactly.
"""

from __future__ import annotations

import os
import re

import safetensors
import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import logging
from huggingface_hub.utils import validate_hf_hub_args

logger = logging.get_logger(__name__)

LORA_BRANCHES = ("transformer", "audio_transformer", "refiner")
SAFETENSORS_SUFFIX = ".safetensors"

# What follows the adapted module's name in a LoRA key: `.lora_A.weight`, `.lora_magnitude_vector`, `.lora.down...`.
_LORA_KEY_SUFFIX = re.compile(r"\.lora[._]")


def _require_safetensors_name(name: str) -> None:
    if not name.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(
            f"Only safetensors LoRA files are supported (pickled checkpoints are never loaded); got {name!r}."
        )


def _target_module_names(keys: list[str], prefix: str) -> set[str]:
    """Names of the modules that LoRA keys starting with `prefix` adapt, without the prefix."""
    return {_LORA_KEY_SUFFIX.split(key.removeprefix(prefix), maxsplit=1)[0] for key in keys}


class SkyReelsV4LoraLoaderMixin(LoraBaseMixin):
    r"""Load, save, fuse and switch LoRA adapters on the SkyReels V4 branches (`transformer`, `audio_transformer` and,
    when the pipeline has one, `refiner`).

    Every branch gets the same adapter name, so `set_adapters`, `delete_adapters`, `fuse_lora`... act on a LoRA as a
    whole; `set_adapters(name, {"transformer": 1.0, "audio_transformer": 0.5})` weighs branches separately. Branches a
    pipeline does not have (or holds as `None`) are skipped.
    """

    _lora_loadable_modules = list(LORA_BRANCHES)

    def _present_lora_branches(self) -> list[str]:
        return [name for name in self._lora_loadable_modules if getattr(self, name, None) is not None]

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        proxies: dict[str, str] | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        use_safetensors: bool | None = None,
        return_lora_metadata: bool = False,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict | None]:
        """The LoRA state dict (with its adapter metadata when `return_lora_metadata`) of a state dict, a
        `.safetensors` file, or a folder or Hub repository holding one. Pickled files are refused, never opened."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            state_dict, metadata = dict(pretrained_model_name_or_path_or_dict), None
        else:
            if use_safetensors is False:
                raise ValueError("`use_safetensors=False` is not supported: LoRA files must be safetensors.")
            source = os.fspath(pretrained_model_name_or_path_or_dict)
            if weight_name is not None:
                _require_safetensors_name(weight_name)
            elif os.path.isfile(source):
                _require_safetensors_name(source)
            elif os.path.isdir(source):
                folder = os.path.join(source, subfolder or "")
                if os.path.isdir(folder) and not any(f.endswith(SAFETENSORS_SUFFIX) for f in os.listdir(folder)):
                    raise ValueError(
                        f"No `.safetensors` LoRA file in {folder!r}; only safetensors LoRA files are supported."
                    )
            try:
                state_dict, metadata = _fetch_state_dict(
                    pretrained_model_name_or_path_or_dict=source,
                    weight_name=weight_name,
                    use_safetensors=True,
                    local_files_only=local_files_only,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    proxies=proxies,
                    token=token,
                    revision=revision,
                    subfolder=subfolder,
                    user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                    allow_pickle=False,
                )
            except safetensors.SafetensorError as error:
                raise ValueError(f"{source!r} ({weight_name=}) is not a valid safetensors file.") from error

        not_lora = [key for key in state_dict if "lora" not in key]
        if not_lora:
            raise ValueError(f"Not a LoRA state dict: keys without `lora` in their name, e.g. {not_lora[:3]}.")
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = True,
        **kwargs,
    ) -> None:
        """Load a LoRA into the branches its keys name (`transformer.`, `audio_transformer.`, `refiner.`).

        All branches get the same `adapter_name` (by default the first free `default_<n>`). Keys of a branch the
        pipeline does not have are skipped with a warning. Nothing is loaded when a key names no branch, names a
        module the branch does not have, or the adapter name is taken (or missing, with `hotswap=True`).
        `kwargs` go to [`~SkyReelsV4LoraLoaderMixin.lora_state_dict`] (`weight_name`, `subfolder`, `revision`, ...).
        A state dict passed in memory has no adapter metadata: ranks come from the weights' shapes, alphas equal them.
        """
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

        by_branch = {
            name: {key: value for key, value in state_dict.items() if key.startswith(f"{name}.")}
            for name in self._lora_loadable_modules
        }
        routed = set().union(*by_branch.values())
        unrouted = [key for key in state_dict if key not in routed]
        if unrouted:
            raise ValueError(
                f"LoRA keys must start with one of {[f'{name}.' for name in self._lora_loadable_modules]}; "
                f"{len(unrouted)} of {len(state_dict)} do not, e.g. {unrouted[:3]}."
            )

        plan = []
        for name, branch_state_dict in by_branch.items():
            if not branch_state_dict:
                continue
            model = getattr(self, name, None)
            if model is None:
                logger.warning(f"This pipeline has no `{name}`: skipping the LoRA's {len(branch_state_dict)} keys.")
                continue
            prefix = f"{name}."
            targets = _target_module_names(list(branch_state_dict), prefix)
            missing = sorted(targets - {module_name for module_name, _ in model.named_modules()})
            if missing:
                raise ValueError(f"The LoRA targets modules that `{name}` does not have: {missing}.")
            branch_metadata = {k: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
            plan.append((name, model, branch_state_dict, branch_metadata or None))
        if not plan:
            adapted = [name for name, branch_state_dict in by_branch.items() if branch_state_dict]
            raise ValueError(f"The LoRA adapts {adapted}, none of which this pipeline has.")

        if adapter_name is None:
            taken = set().union(*self.get_list_adapters().values())
            adapter_name = next(f"default_{n}" for n in range(len(taken) + 1) if f"default_{n}" not in taken)
        clashes = [name for name, model, *_ in plan if (adapter_name in getattr(model, "peft_config", {})) != hotswap]
        if clashes:
            state = "have no adapter" if hotswap else "already have an adapter"
            raise ValueError(f"Branches {clashes} {state} named {adapter_name!r}.")

        loaded = []
        try:
            for name, model, branch_state_dict, branch_metadata in plan:
                model.load_lora_adapter(
                    branch_state_dict,
                    prefix=name,
                    adapter_name=adapter_name,
                    metadata=branch_metadata,
                    _pipeline=self,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    hotswap=hotswap,
                )
                loaded.append(model)
        except Exception:
            if not hotswap:  # leave no branch holding half of a LoRA
                for model in loaded:
                    model.delete_adapters(adapter_name)
            raise

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        audio_transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        refiner_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        transformer_lora_adapter_metadata: dict | None = None,
        audio_transformer_lora_adapter_metadata: dict | None = None,
        refiner_lora_adapter_metadata: dict | None = None,
        weight_name: str | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> None:
        """Write the LoRA layers of one or more branches to one safetensors file in `save_directory`.

        The layers are PEFT state dicts (`get_peft_model_state_dict(branch)`); the metadata is each branch's
        `peft_config[adapter].to_dict()` (e.g. from `diffusers.training_utils._collate_lora_metadata`), which lets
        branches with different ranks or alphas reload exactly.
        """
        if not safe_serialization:
            raise ValueError("LoRA weights are only saved as safetensors (`safe_serialization=True`).")
        if weight_name is not None:
            _require_safetensors_name(weight_name)
        given = {
            "transformer": (transformer_lora_layers, transformer_lora_adapter_metadata),
            "audio_transformer": (audio_transformer_lora_layers, audio_transformer_lora_adapter_metadata),
            "refiner": (refiner_lora_layers, refiner_lora_adapter_metadata),
        }
        orphans = [name for name, (layers, meta) in given.items() if meta and not layers]
        if orphans:
            raise ValueError(f"Adapter metadata given without LoRA layers for {orphans}.")
        layers = {name: branch_layers for name, (branch_layers, _) in given.items() if branch_layers}
        if not layers:
            raise ValueError(f"Pass the LoRA layers of at least one of {list(given)} (`<branch>_lora_layers`).")
        if not is_main_process:
            return
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={name: meta for name, (_, meta) in given.items() if name in layers},
            weight_name=weight_name,
            safe_serialization=True,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the active (or the named) adapters into the weights of `components` (default: every branch)."""
        super().fuse_lora(
            components=self._present_lora_branches() if components is None else components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo `fuse_lora` on `components` (default: every branch); the adapters stay loaded."""
        super().unfuse_lora(components=self._present_lora_branches() if components is None else components, **kwargs)
