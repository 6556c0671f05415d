#!/bin/bash
# MoE in the shape of Megatron-DeepSpeed's MoE examples: the DeepSpeed JSON is written by sed from a
# template; zeromega follows it to --deepspeed_config.
MODEL_SIZE=0.125
NUM_LAYERS=12
HIDDEN_SIZE=768
NUM_ATTN_HEADS=12
GLOBAL_BATCH_SIZE=256
LR=4.5e-4
MIN_LR=4.5e-06
EP_SIZE=8
MP_SIZE=1
NUM_GPUS=8
BATCH_SIZE=4
LOG_INTERVAL=10
CL_ENABLED="false"
if [[ $EP_SIZE -gt $NUM_GPUS ]]; then
    EP_PARALLEL_SIZE=$NUM_GPUS
else
    EP_PARALLEL_SIZE=$EP_SIZE
fi
template_json="ds_config_gpt_TEMPLATE.json"
# Megatron-DeepSpeed keeps the template next to the script; here the script writes it (quoted heredoc:
# nothing expanded) so the example is one file.
cat > ${template_json} <<'EOT'
{
  "train_batch_size" : CONFIG_BATCH_SIZE,
  "train_micro_batch_size_per_gpu": CONFIG_MBSIZE,
  "steps_per_print": LOG_INTERVAL,
  "zero_optimization": {
    "stage": ZERO_STAGE
  },
  "gradient_clipping": 1.0,
  "prescale_gradients": PRESCALE_GRAD,
  "fp16": {
    "enabled": CONFIG_FP16_ENABLED,
    "loss_scale": 0,
    "loss_scale_window": 500,
    "hysteresis": 2,
    "min_loss_scale": 1,
    "initial_scale_power": 11
  },
  "bf16": {
    "enabled": CONFIG_BF16_ENABLED
  },
  "wall_clock_breakdown" : false
}
EOT
config_json="ds_config_gpt_${NAME:-moe}.json"
sed "s/CONFIG_BATCH_SIZE/${GLOBAL_BATCH_SIZE}/" ${template_json} \
    | sed "s/CONFIG_MBSIZE/${BATCH_SIZE}/" \
    | sed "s/LOG_INTERVAL/${LOG_INTERVAL}/" \
    | sed "s/ZERO_STAGE/0/" \
    | sed "s/PRESCALE_GRAD/true/" \
    | sed "s/CONFIG_FP16_ENABLED/true/" \
    | sed "s/CONFIG_BF16_ENABLED/false/" \
    | sed "s/CONFIG_CL_ENABLED/${CL_ENABLED}/" \
      > ${config_json}
megatron_options=" \
    --tensor-model-parallel-size ${MP_SIZE} \
    --moe-expert-parallel-size ${EP_PARALLEL_SIZE} \
    --num-experts ${EP_SIZE} \
    --moe-loss-coeff 0.01 \
    --num-layers ${NUM_LAYERS} \
    --hidden-size ${HIDDEN_SIZE} \
    --num-attention-heads ${NUM_ATTN_HEADS} \
    --seq-length 2048 \
    --max-position-embeddings 2048 \
    --micro-batch-size ${BATCH_SIZE} \
    --global-batch-size ${GLOBAL_BATCH_SIZE} \
    --train-iters 10000 \
    --lr ${LR} \
    --min-lr ${MIN_LR} \
    --lr-decay-style cosine \
    --log-interval ${LOG_INTERVAL} \
    --fp16"
deepspeed_options=" \
    --deepspeed \
    --deepspeed_config ${config_json} \
    --pipeline-model-parallel-size 1 \
    --no-pipeline-parallel"
run_cmd="deepspeed --num_gpus ${NUM_GPUS} pretrain_gpt.py ${megatron_options} ${deepspeed_options} &> moe.log"
echo ${run_cmd}
eval ${run_cmd}
