"""Train or LoRA-fine-tune SkyReels V4 (video branch, audio branch, or both jointly) on clips with sound.

Full training of the demo model from a pipeline folder (freshly initialised transformers), on the bouncing world:

    python -m diffusers_skyreels.demo.world --output-dir data/bouncing --num-clips 2000
    python examples/train_skyreels_v4.py --pretrained_model_name_or_path demo-init --dataset_dir data/bouncing \
        --cache_dir data/bouncing-latents --mode joint --height 64 --width 64 --num_frames 33 \
        --train_batch_size 8 --learning_rate 3e-4 --lr_warmup_steps 200 --max_train_steps 20000 \
        --checkpointing_steps 1000 --resume_from_checkpoint latest --validation_steps 1000 \
        --validation_prompt "A red ball bounces quickly between the walls. <sfx>a ping at every bounce</sfx>" \
        --output_dir skyreels-v4-demo

LoRA on both branches (one safetensors file, loaded with `pipe.load_lora_weights`):

    accelerate launch examples/train_skyreels_v4.py --pretrained_model_name_or_path skyreels-v4-demo \
        --dataset_dir my_clips --mode joint --use_lora --rank 32 --audio_rank 16 --mixed_precision bf16 \
        --height 64 --width 64 --num_frames 33 --learning_rate 1e-4 --max_train_steps 2000 \
        --checkpointing_steps 250 --output_dir my-skyreels-lora

Several processes: `accelerate launch --multi_gpu --num_processes N ...` on GPUs (FSDP via `accelerate config`),
`torchrun --standalone --nproc_per_node N ...` on CPUs. `--help` lists every option; the code is
`diffusers_skyreels.training`.
"""

import logging
import os

import diffusers_skyreels  # noqa: F401  (registers the SkyReels V4 classes with Diffusers)
from diffusers_skyreels.training import main

if __name__ == "__main__":
    # Progress is logged by the first process only; the others report problems.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    main()
