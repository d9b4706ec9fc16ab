#!/usr/bin/env bash
# Train the demo model shipped in src/diffusers_skyreels/demo/model from scratch, on a CPU.
#
#   bash examples/demo/train_demo.sh [WORK_DIR] [OUTPUT_DIR]
#
# Every step is one of the package's own commands. On a 2-core machine two single-threaded jobs run side by side
# (faster than one job with two threads); wall-clock times of the run that made the shipped model are in
# examples/demo/README.md.
set -euo pipefail
WORK=${1:-demo_build}
OUTPUT=${2:-src/diffusers_skyreels/demo/model}
PYTHON=${PYTHON:-python}
TRAIN="$PYTHON examples/train_skyreels_v4.py"
export OMP_NUM_THREADS=1
NUM_CLIPS=640     # clips the branches learn from
NUM_PAIRS=64      # of those, clips the refiner learns from (128 x 128 encoding is the slow part)
JOINT_STEPS=1200
REFINER_STEPS=600
stamp() { echo "[$(date +%T)] $*"; }

stamp "1/6 world: $NUM_CLIPS clips at the refiner's size (128 x 128, 32 fps); training derives 64 x 64 at 16 fps"
$PYTHON -m diffusers_skyreels.demo.world --output-dir "$WORK/data" --num-clips "$NUM_CLIPS" \
    --width 128 --height 128 --fps 32 --num-frames 65 --seed 0
head -n "$NUM_PAIRS" "$WORK/data/metadata.jsonl" > "$WORK/data/pairs.jsonl"

stamp "2/6 video and audio VAEs (two processes)"
$PYTHON -m diffusers_skyreels.demo.train_vaes --output-dir "$WORK/vaes"

stamp "3/6 initial pipeline: trained VAEs, frozen random tiny Qwen-VL, fresh branches and refiner"
$PYTHON -m diffusers_skyreels.demo.assemble --vae-dir "$WORK/vaes" --output-dir "$WORK/init"

BASE=(--pretrained_model_name_or_path "$WORK/init" --dataset_dir "$WORK/data" --height 64 --width 64
      --num_frames 33 --fps 16 --cpu --seed 0)
stamp "4/6 latent caches: 64 x 64 clips for the branches, 64 -> 128 pairs for the refiner (in parallel)"
$TRAIN "${BASE[@]}" --mode joint --cache_dir "$WORK/cache_joint" --precompute_only &
$TRAIN "${BASE[@]}" --mode refiner --metadata_file "$WORK/data/pairs.jsonl" --cache_dir "$WORK/cache_pairs" \
    --precompute_only &
wait

stamp "5/6 joint training of the two branches and training of the refiner (in parallel)"
# Each model trains in two runs: the second starts from the first's weights with a fresh cosine schedule (this is how
# the shipped weights were made: the first runs were short of the quality wanted, so they were continued). The
# second joint run uses both cores: the refiner finishes first.
TRIGGER="A red ball bounces quickly between the walls of a dark room. <sfx>a ping at every bounce</sfx>"
( $TRAIN "${BASE[@]}" --mode joint --cache_dir "$WORK/cache_joint" --output_dir "$WORK/joint" \
      --max_train_steps "$JOINT_STEPS" --train_batch_size 8 --learning_rate 4e-4 --lr_scheduler cosine \
      --lr_warmup_steps 100 --checkpointing_steps 400 --keyframe_rate 0 --trigger_prompt "$TRIGGER" &&
  OMP_NUM_THREADS=2 $TRAIN "${BASE[@]}" --pretrained_model_name_or_path "$WORK/joint" --seed 1 --mode joint \
      --cache_dir "$WORK/cache_joint" --output_dir "$WORK/joint2" \
      --max_train_steps "$JOINT_STEPS" --train_batch_size 8 --learning_rate 3e-4 --lr_scheduler cosine \
      --lr_warmup_steps 20 --checkpointing_steps 400 --keyframe_rate 0 --trigger_prompt "$TRIGGER" ) &
( $TRAIN "${BASE[@]}" --mode refiner --cache_dir "$WORK/cache_pairs" --output_dir "$WORK/refiner" \
      --max_train_steps "$REFINER_STEPS" --train_batch_size 2 --learning_rate 4e-4 --lr_scheduler cosine \
      --lr_warmup_steps 50 --checkpointing_steps 200 &&
  $TRAIN "${BASE[@]}" --pretrained_model_name_or_path "$WORK/refiner" --seed 1 --mode refiner \
      --cache_dir "$WORK/cache_pairs" --output_dir "$WORK/refiner2" \
      --max_train_steps "$REFINER_STEPS" --train_batch_size 2 --learning_rate 2e-4 --lr_scheduler cosine \
      --lr_warmup_steps 20 --checkpointing_steps 200 ) &
wait

stamp "6/6 the shipped folder: trained branches + trained refiner + generation_config.json"
$PYTHON -m diffusers_skyreels.demo.assemble --finalize "$WORK/joint2" --refiner "$WORK/refiner2" --output-dir "$OUTPUT"
stamp "done: $OUTPUT"
