#!/bin/bash
# Megatron-LM style: argument arrays, context parallel as USP (a2a+p2p), interleaved pipeline.
GPUS_PER_NODE=8
NUM_NODES=${NUM_NODES:-4}
CHECKPOINT_PATH=${1:-checkpoints/gpt_cp}

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr $MASTER_ADDR
    --master_port 6000
)

GPT_MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --seq-length 32768
    --max-position-embeddings 32768
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 64
    --train-iters 500000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --clip-grad 1.0
    --bf16
    --lr 6.0e-5
    --lr-decay-style cosine
    --min-lr 6.0e-6
    --lr-warmup-iters 2000
    --lr-decay-iters 430000
    --use-distributed-optimizer
    --recompute-granularity full
    --recompute-method uniform
    --recompute-num-layers 1
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 4
    --pipeline-model-parallel-size 2
    --num-layers-per-virtual-pipeline-stage 4
    --context-parallel-size 4
    --cp-comm-type a2a+p2p
    --hierarchical-context-parallel-sizes 2 2
    --sequence-parallel
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \
    ${GPT_MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    --save $CHECKPOINT_PATH \
    --load $CHECKPOINT_PATH \
    --save-interval 1000 \
    --log-interval 100
