#!/bin/bash
# Megatron-DeepSpeed style: the DeepSpeed JSON is written by the script itself.
DIR=$(pwd)
TP=2
PP=1
SP=2            # Ulysses sequence parallel (--ds-sequence-parallel-size)
ZERO_STAGE=1
MICRO_BATCH=4
GLOBAL_BATCH=64
config_json="./ds_config_gpt.json"

cat <<EOT > $config_json
{
  "train_batch_size" : $GLOBAL_BATCH,
  "train_micro_batch_size_per_gpu": $MICRO_BATCH,
  "steps_per_print": 10,
  "zero_optimization": {
    "stage": $ZERO_STAGE
  },
  "gradient_clipping": 1.0,
  "prescale_gradients": false,
  "bf16": {"enabled": true},
  "wall_clock_breakdown" : false
}
EOT

options=" \
    --tensor-model-parallel-size $TP \
    --pipeline-model-parallel-size $PP \
    --ds-sequence-parallel-size $SP \
    --num-layers 24 \
    --hidden-size 2048 \
    --num-attention-heads 16 \
    --seq-length 4096 \
    --max-position-embeddings 4096 \
    --micro-batch-size $MICRO_BATCH \
    --global-batch-size $GLOBAL_BATCH \
    --train-iters 10000 \
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 200 \
    --weight-decay 0.1 --clip-grad 1.0 \
    --bf16 \
    --use-flash-attn-v2 \
    --save checkpoints/gpt --load checkpoints/gpt --save-interval 1000 \
    --deepspeed \
    --deepspeed_config ${config_json} \
    --zero-stage ${ZERO_STAGE} \
    --deepspeed-activation-checkpointing"

run_cmd="deepspeed --num_gpus 8 ${DIR}/pretrain_gpt.py ${options}"
echo ${run_cmd}
eval ${run_cmd}
