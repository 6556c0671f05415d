#!/bin/bash

# Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh (core_v0.16.1), shrunk for 2 CPU ranks:
# only sizes, paths (defaults for the positional arguments), rank counts and iteration counts differ.
# zeromega launch --config PATH/megatron_lm_gpt3_175b.sh pretrain_gpt.py
# run from a directory holding pretrain_gpt.py, tok/ and data/ (docs/configs.md, "Published launch scripts")

export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=2
# Change for multinode config
MASTER_ADDR=localhost
MASTER_PORT=6000
NUM_NODES=1
NODE_RANK=0
WORLD_SIZE=$(($GPUS_PER_NODE*$NUM_NODES))

CHECKPOINT_PATH=${1:-checkpoints/gpt3} #<Specify path>
TENSORBOARD_LOGS_PATH=${2:-tensorboard/gpt3} #<Specify path>
VOCAB_FILE=${3:-tok/vocab.json} #<Specify path to file>/gpt2-vocab.json
MERGE_FILE=${4:-tok/merges.txt} #<Specify path to file>/gpt2-merges.txt
DATA_PATH=${5:-data/gpt2_text_document} #<Specify path and file prefix>_text_document

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

GPT_MODEL_ARGS=(
    --num-layers 4
    --hidden-size 64
    --num-attention-heads 4
    --seq-length 64
    --max-position-embeddings 64
    --attention-backend auto # flash/fused/unfused/local in Megatron-LM
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 8
    --rampup-batch-size 4 2 16
    --train-iters 12
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --clip-grad 1.0
    --fp16
    --lr 6.0e-4
    --lr-decay-style cosine
    --min-lr 6.0e-5
    --lr-warmup-fraction .1
    --lr-decay-iters 10
)

MODEL_PARALLEL_ARGS=(
	--tensor-model-parallel-size 1
	--pipeline-model-parallel-size 2
)

DATA_ARGS=(
    --data-path $DATA_PATH
    --vocab-file $VOCAB_FILE
    --merge-file $MERGE_FILE
    --split 949,50,1
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 2
    --save-interval 12
    --eval-interval 6
    --save $CHECKPOINT_PATH
    --load $CHECKPOINT_PATH
    --eval-iters 2
    --tensorboard-dir $TENSORBOARD_LOGS_PATH
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \
    ${GPT_MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${DATA_ARGS[@]} \
    ${EVAL_AND_LOGGING_ARGS[@]}
