"""Train or LoRA-fine-tune SkyReels V4 (video branch, audio branch, both jointly, or the refiner) on clips with sound.

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

High-resolution keyframes and the refiner (architecture.md §7) train on paired data: clips at the refiner's scale
(the pipeline needs a `refiner`; its default scales 2 and 2 make 128x128 at 32 fps from 64x64 at 16 fps). The bouncing
world at 128x128, 65 frames at 32 fps, and joint training with keyframe tokens on half of the steps:

    python -c "from diffusers_skyreels.demo import write_dataset; write_dataset('data/bouncing-hr', 2000, \
        width=128, height=128, fps=32, num_frames=65)"
    python examples/train_skyreels_v4.py --pretrained_model_name_or_path demo-init --dataset_dir data/bouncing-hr \
        --cache_dir data/bouncing-hr-latents --paired_data --mode joint --height 64 --width 64 --num_frames 33 \
        --keyframe_rate 0.5 --keyframe_loss_weight 1.0 --train_batch_size 8 --learning_rate 3e-4 \
        --lr_warmup_steps 200 --max_train_steps 20000 --checkpointing_steps 1000 --resume_from_checkpoint latest \
        --output_dir skyreels-v4-demo

The refiner on the same cache (low-res 64x64 16 fps latents -> 128x128 32 fps), then `pipe(prompt, refine=True)`;
the paper initialises it from the trained video branch (`SkyReelsV4RefinerTransformer.from_video_branch`, saved into
the pipeline folder as its `refiner`, here `skyreels-v4-demo-r0`):

    python examples/train_skyreels_v4.py --pretrained_model_name_or_path skyreels-v4-demo-r0 \
        --dataset_dir data/bouncing-hr --cache_dir data/bouncing-hr-latents --mode refiner \
        --height 64 --width 64 --num_frames 33 --refiner_keyframe_rate 0.5 --refiner_guide_noise_rate 0.1 \
        --train_batch_size 4 --learning_rate 1e-4 --max_train_steps 10000 --checkpointing_steps 1000 \
        --resume_from_checkpoint latest --validation_prompt "A red ball bounces quickly between the walls." \
        --validation_steps 1000 --output_dir skyreels-v4-demo-refined

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
