"""Launch scripts read as bash runs them (launch/shell_script.py, shell_parse.py, shell_eval.py, shell_run.py).

The corpus below is written here, in the shapes of the scripts users run:
Megatron-LM's examples (GPT-3 175B, Llama-3 8B, Mixtral 8x7B),
Megatron-DeepSpeed's (GPT-345M with a heredoc ds_config, Ulysses sequence
parallel, MoE with a sed template) and BigScience's (``GPT_ARGS=" ... \\``
strings, ``srun ... bash -c``). Each construct has its own small test that
asserts the exact words read; the corpus tests assert the values a run gets
and that ``--run-script`` (real bash, launchers recorded) reads the same.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from zeromega.config.errors import ConfigError
from zeromega.launch import cli, shell_script, translate

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="--run-script needs bash")


def read(text: str, env=None, **kw) -> shell_script.Script:
    return shell_script.read(text, env or {}, "run.sh", **kw)


def value(argv: list[str], flag: str) -> str:
    """The word after ``flag`` (or after ``flag=``); fails when the flag is absent."""
    for i, word in enumerate(argv):
        if word == flag:
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {argv}")


# ------------------------------------------------------------------ one construct each


def test_if_elif_else_takes_the_branch_bash_takes():
    script = """
MODE=${MODE:-large}
N=4
if [ "$MODE" = small ]; then
    TP=1
elif [[ $MODE == lar* && $N -gt 2 ]]; then
    TP=4
else
    TP=8
fi
if [ -n "$UNSET_THING" ]; then PP=9; elif [ -z "$UNSET_THING" ] && [ "$N" -eq 4 ]; then PP=2; fi
[[ ! -z "$TP" ]] || PP=7
python pretrain_gpt.py --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP
"""
    assert read(script).argv == ["--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"]
    assert read(script, {"MODE": "small"}).argv[1] == "1"
    assert read(script, {"MODE": "other"}).argv[1] == "8"


def test_plus_equals_on_strings_and_arrays():
    script = """
ARGS="--num-layers 2"
ARGS+=" --hidden-size 64"
EXTRA=(--lr 0.1)
EXTRA+=(--micro-batch-size 2)
EXTRA+=("--seed" 7)
python pretrain_gpt.py $ARGS "${EXTRA[@]}"
"""
    assert read(script).argv == ["--num-layers", "2", "--hidden-size", "64", "--lr", "0.1", "--micro-batch-size",
                                 "2", "--seed", "7"]


def test_arrays_with_comments_that_hold_parentheses_and_backslashes():
    script = """
MODEL_ARGS=(
    --num-layers 4   # layers (per stage: see below)
    # --hidden-size 9999   (commented out)
    --hidden-size 128 # ends with a backslash \\
    --num-attention-heads 8
)
python pretrain_gpt.py ${MODEL_ARGS[@]} --lr 1e-4
"""
    assert read(script).argv == ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8",
                                 "--lr", "1e-4"]


def test_a_comment_ending_in_a_backslash_continues_nothing():
    script = """
# the launch used to be: python pretrain_gpt.py --lr 9 \\
python pretrain_gpt.py --lr 0.5 --seed 3 --micro-batch-size 2
python tools/checkpoint_util.py --load ckpt
"""
    got = read(script)
    assert got.argv == ["--lr", "0.5", "--seed", "3", "--micro-batch-size", "2"] and got.line == 3


def test_multi_line_double_quoted_strings():
    script = '''
GPT_ARGS="
    --num-layers 2 \\
    --hidden-size 64
    --num-attention-heads 4 \\
    "
OPTIMIZER_ARGS=" \\
    --optimizer adam \\
    --lr 6e-5 \\
    "
python pretrain_gpt.py $GPT_ARGS $OPTIMIZER_ARGS
'''
    assert read(script).argv == ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                 "--optimizer", "adam", "--lr", "6e-5"]


def test_a_heredoc_json_passed_as_the_deepspeed_config_is_followed(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("""
ZERO_STAGE=2
MBS=4
cat <<EOT > ds_config.json
{"train_micro_batch_size_per_gpu": $MBS, "gradient_accumulation_steps": 2,
 "zero_optimization": {"stage": $ZERO_STAGE}}
EOT
cat > literal.json <<'EOT'
{"x": "$NOT_EXPANDED"}
EOT
python pretrain_gpt.py --lr 1e-4 --deepspeed --deepspeed_config ds_config.json
""")
    got = read(script.read_text())
    assert json.loads(got.files["ds_config.json"])["zero_optimization"]["stage"] == 2
    assert json.loads(got.files["literal.json"]) == {"x": "$NOT_EXPANDED"}
    found, _ = translate.sources(script)
    cfg = translate.resolve(found, megatron=True)
    assert (cfg.zero.stage, cfg.batch.micro, cfg.batch.accumulation) == (2, 4, 2)


def test_arithmetic_and_parameter_expansions():
    script = """
GPUS_PER_NODE=8
NNODES=2
WORLD=$(( GPUS_PER_NODE * NNODES ))
TP=${TP:-2}
: ${PP:=4}
DP=$(( WORLD / TP / PP ))
MODEL=(--num-layers 8 --hidden-size 256)
echo "model args: ${#MODEL[@]}"
N=${#MODEL[@]}
NAME=gpt_${TP}x${PP}.ckpt
python pretrain_gpt.py "${MODEL[@]}" --global-batch-size $(( DP * 4 )) --seed $N --save ${NAME%.ckpt} \\
    --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP
"""
    assert read(script).argv == ["--num-layers", "8", "--hidden-size", "256", "--global-batch-size", "8",
                                 "--seed", "4", "--save", "gpt_2x4", "--tensor-model-parallel-size", "2",
                                 "--pipeline-model-parallel-size", "4"]


def test_export_and_a_missing_source_is_named():
    script = """
export TP=2 PP=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
source ./cluster_env.sh
python pretrain_gpt.py --tensor-model-parallel-size $TP --micro-batch-size $MBS
"""
    with pytest.raises(ConfigError) as err:
        read(script)
    message = str(err.value)
    assert "MBS" in message and "cluster_env.sh" in message and "--env MBS=VALUE" in message
    got = read(script, {"MBS": "2"})
    assert got.argv == ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"]
    assert any("cluster_env.sh" in note and "no such file" in note for note in got.notes)


def test_a_source_next_to_the_script_is_read(tmp_path):
    (tmp_path / "env.sh").write_text("MBS=3\nGBS=$((MBS * 2))\n")
    got = read(". env.sh\npython pretrain_gpt.py --micro-batch-size $MBS --global-batch-size $GBS\n",
               base=tmp_path)
    assert got.argv == ["--micro-batch-size", "3", "--global-batch-size", "6"]


def test_pipes_and_redirections_are_not_arguments():
    script = """
LOG=train.log
python pretrain_gpt.py --lr 0.1 --seed 2 2>&1 | tee -a $LOG
"""
    assert read(script).argv == ["--lr", "0.1", "--seed", "2"]
    assert read("python pretrain_gpt.py --lr 0.1 > out.log 2> err.log &\nwait\n").argv == ["--lr", "0.1"]
    assert read("nohup python pretrain_gpt.py --lr 0.1 &> all.log\n").argv == ["--lr", "0.1"]


def test_several_commands_the_training_launch_is_picked_and_named():
    script = """
set -ex
mkdir -p logs
python tools/preprocess_data.py --input data.json --output-prefix data
pip install -r requirements.txt
deepspeed --num_gpus 4 pretrain_gpt.py --lr 0.1 --seed 1 --micro-batch-size 2
python tools/convert.py --load ckpt
"""
    got = read(script)
    assert got.line == 6 and got.argv == ["--lr", "0.1", "--seed", "1", "--micro-batch-size", "2"]
    assert got.launcher == {"launch.nproc_per_node": "4"}
    assert "the training command is line 6" in got.notes[0] and "lines 4, 7" in got.notes[0]


def test_sed_from_a_template_writes_the_json(tmp_path):
    (tmp_path / "ds_TEMPLATE.json").write_text(
        '{"train_batch_size": CONFIG_BATCH_SIZE, "train_micro_batch_size_per_gpu": CONFIG_MBSIZE,\n'
        ' "zero_optimization": {"stage": ZERO_STAGE}, "bf16": {"enabled": CONFIG_BF16_ENABLED},\n'
        ' "note": "a|b"}\n')
    script = tmp_path / "run.sh"
    script.write_text("""
GBS=64
MBS=2
sed "s/CONFIG_BATCH_SIZE/$GBS/" ds_TEMPLATE.json \\
    | sed -e 's/CONFIG_MBSIZE/'"$MBS"'/g' -e "s|ZERO_STAGE|1|" \\
    | sed -E 's/CONFIG_(BF16)_ENABLED/true/; s/(a)\\|(b)/\\2-\\1-&/' > ds.json
cp ds.json ds_copy.json
sed -i "s/true/false/" ds_copy.json
python pretrain_gpt.py --lr 1e-4 --deepspeed_config ds.json
""")
    got = read(script.read_text(), base=tmp_path)
    written = json.loads(got.files["ds.json"])
    assert written == {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
                       "bf16": {"enabled": True}, "note": "b-a-a|b"}
    assert json.loads(got.files["ds_copy.json"])["bf16"] == {"enabled": False}
    found, _ = translate.sources(script)
    cfg = translate.resolve(found, megatron=True)
    assert (cfg.zero.stage, cfg.batch.micro, cfg.precision) == (1, 2, "bf16")


def test_a_for_loop_is_not_the_launch():
    script = """
for SEED in 1 2 3; do
    python pretrain_gpt.py --seed $SEED --lr 0.1 --micro-batch-size 1 --global-batch-size 8 --num-layers 2
done
LAST=0
for N in 4 8; do LAST=$N; done
python pretrain_gpt.py --lr 0.2 --num-layers $LAST
"""
    got = read(script)
    assert got.argv == ["--lr", "0.2", "--num-layers", "8"] and got.line == 7


def test_case_and_functions():
    script = """
size() { case "$1" in 7B) echo 4096;; 13B|14B) echo 5120;; *) echo 0;; esac; }
MODEL=13B
HIDDEN=$(size $MODEL)
SEED=$(printf '%d' 0x10)
python pretrain_gpt.py --hidden-size $HIDDEN --lr 0.1 --seed $SEED
"""
    assert read(script).argv == ["--hidden-size", "5120", "--lr", "0.1", "--seed", "16"]


def test_a_value_from_a_program_is_named_with_the_env_that_supplies_it():
    script = """
GPUS=$(nvidia-smi -L | wc -l)
NODE=$(hostname)
WORLD=$((GPUS * 2))
torchrun --nproc_per_node $GPUS --master_addr $NODE pretrain_gpt.py --lr 0.1 --global-batch-size $((WORLD * 4))
"""
    with pytest.raises(ConfigError) as err:
        read(script)
    message = str(err.value)
    assert "GPUS comes from $(nvidia-smi -L | wc -l) (line 2)" in message and "--env GPUS=VALUE" in message
    got = read(script, {"GPUS": "8"})  # $(hostname) only feeds --master_addr, which nothing reads
    assert got.launcher == {"launch.nproc_per_node": "8"} and got.argv == ["--lr", "0.1", "--global-batch-size", "64"]


def test_an_undecidable_test_makes_what_it_sets_unknown_not_wrong():
    script = """
if command -v nvidia-smi > /dev/null; then MBS=4; else MBS=1; fi
SAME=1
if grep -q A100 /proc/cpuinfo; then SAME=1; fi
python pretrain_gpt.py --lr 0.1 --seed $SAME --micro-batch-size $MBS
"""
    with pytest.raises(ConfigError, match=r"--micro-batch-size=.*MBS comes from .*command -v nvidia-smi"):
        read(script)
    assert read(script, {"MBS": "2"}).argv == ["--lr", "0.1", "--seed", "1", "--micro-batch-size", "2"]


@pytest.mark.parametrize("text,problem", [
    ("echo 'unterminated\npython p.py --lr 1\n", "'line 1': a single quote (') is never closed"),
    ("if [ -z $A ]; then\npython p.py --lr 1\n", "is not closed with 'fi'"),
    ("fi\n", "unexpected 'fi'"),
    ("A=(1 2\n", "never closed"),
    ("cat <<EOF > x.json\n{}\n", "here-document"),
])
def test_a_script_bash_would_refuse_is_one_clean_error(text, problem):
    with pytest.raises(ConfigError) as err:
        read(text)
    assert problem in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the corpus

GPT3_175B = """#!/bin/bash
# GPT-3 175B in the shape of Megatron-LM's examples/gpt3 script (written here).
export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=8
MASTER_ADDR=localhost
MASTER_PORT=6000
NUM_NODES=16
NODE_RANK=0
WORLD_SIZE=$(($GPUS_PER_NODE*$NUM_NODES))

CHECKPOINT_PATH=${1:-checkpoints/gpt3}
TENSORBOARD_LOGS_PATH=${2:-tensorboard/gpt3}
DATA_PATH=${5:-data/my-gpt3_00_text_document}

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

GPT_MODEL_ARGS=(
    --num-layers 96
    --hidden-size 12288
    --num-attention-heads 96
    --seq-length 2048
    --max-position-embeddings 2048
    --attention-backend auto # one of (flash/fused/unfused/local/auto)
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 1536
    --train-iters 500000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --clip-grad 1.0
    --fp16
    --lr 6.0e-5
    --lr-decay-style cosine
    --min-lr 6.0e-6
    --lr-warmup-fraction .001
    --lr-decay-iters 430000
)

MODEL_PARALLEL_ARGS=(
\t--tensor-model-parallel-size 8
\t--pipeline-model-parallel-size 16
)

DATA_ARGS=(
    --data-path $DATA_PATH
    --split 949,50,1
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 100
    --save-interval 10000
    --eval-interval 1000
    --save $CHECKPOINT_PATH
    --load $CHECKPOINT_PATH
    --eval-iters 10
    --tensorboard-dir $TENSORBOARD_LOGS_PATH
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \\
    ${GPT_MODEL_ARGS[@]} \\
    ${TRAINING_ARGS[@]} \\
    ${MODEL_PARALLEL_ARGS[@]} \\
    ${DATA_ARGS[@]} \\
    ${EVAL_AND_LOGGING_ARGS[@]}
""".replace("\\t", "\t")

LLAMA3_8B = """#!/bin/bash
# Llama-3 8B in the shape of Megatron-LM's examples/llama script (written here).
export CUDA_DEVICE_MAX_CONNECTIONS=1
CHECKPOINT_PATH=${1:-"checkpoints/llama3_8b"}
TOKENIZER_ARG=${2:-"MOCK"}
DATA_ARG=${3:-"MOCK"}
GPUS_PER_NODE=8
NUM_NODES=1
DISTRIBUTED_ARGS=(--nproc_per_node $GPUS_PER_NODE --nnodes $NUM_NODES)
TP_SIZE=2
CP_SIZE=1
PP_SIZE=1
MICRO_BATCH_SIZE=1
GLOBAL_BATCH_SIZE=128
NUM_LAYERS=32
DTYPE="bf16"
SEQ_LENGTH=8192

MODEL_ARGS=(
    --use-mcore-models
    --num-layers $NUM_LAYERS
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length $SEQ_LENGTH
    --max-position-embeddings $SEQ_LENGTH
    --position-embedding-type rope
    --rotary-base 1000000
    --swiglu
    --normalization RMSNorm
    --disable-bias-linear
    --untie-embeddings-and-output-weights
)
TRAINING_ARGS=(
    --micro-batch-size $MICRO_BATCH_SIZE
    --global-batch-size $GLOBAL_BATCH_SIZE
    --train-iters 1000
    --lr 0.00015
    --min-lr 0.00001
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
)
if [[ "$DTYPE" == "fp8" ]]; then
    TRAINING_ARGS+=(--fp8-format hybrid --fp8-amax-history-len 1024)
else
    TRAINING_ARGS+=(--bf16)
fi
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size $TP_SIZE
    --context-parallel-size $CP_SIZE
    --pipeline-model-parallel-size $PP_SIZE
    --sequence-parallel
    --use-distributed-optimizer
)
DATA_ARGS_LIST=()
if [[ "$TOKENIZER_ARG" == "MOCK" ]] || [[ "$DATA_ARG" == "MOCK" ]] || [[ -z "$TOKENIZER_ARG" ]]; then
    DATA_ARGS_LIST+=("--mock-data" "--tokenizer-type NullTokenizer" "--vocab-size 128256")
else
    DATA_ARGS_LIST+=("--data-path $DATA_ARG" "--tokenizer-type HuggingFaceTokenizer" "--tokenizer-model $TOKENIZER_ARG")
fi
torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \\
    ${MODEL_ARGS[@]} ${TRAINING_ARGS[@]} ${MODEL_PARALLEL_ARGS[@]} ${DATA_ARGS_LIST[@]} \\
    --log-interval 1 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH --save-interval 500
"""

MIXTRAL_8X7B = """#!/bin/bash
# Mixtral 8x7B in the shape of Megatron-LM's examples/mixtral script (written here).
set -ex
export CUDA_DEVICE_MAX_CONNECTIONS=1
GPUS_PER_NODE=8
NNODES=${NNODES:-4}
WORLD_SIZE=$((GPUS_PER_NODE*NNODES))
LOG=logs/mixtral.log

MODEL_ARGS=(
    --disable-bias-linear
    --seq-length 4096
    --max-position-embeddings 32768
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --init-method-std 0.01
    --normalization RMSNorm
    --position-embedding-type rope
    --swiglu
    --untie-embeddings-and-output-weights
    --group-query-attention
    --num-query-groups 8
    --rotary-base 1000000
)
MOE_ARGS=(
    --num-experts 8
    --moe-router-topk 2
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2
    --moe-grouped-gemm
)
TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 256
    --lr 1e-4
    --train-iters 500000
    --lr-decay-style cosine
    --min-lr 1.0e-5
    --weight-decay 0.1
    --lr-warmup-iters 500
    --clip-grad 1.0
    --bf16
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 4
    --expert-model-parallel-size 8
    --use-distributed-optimizer
)
echo "MoE flags: ${#MOE_ARGS[@]} words"
mkdir -p logs
torchrun --nproc_per_node $GPUS_PER_NODE --nnodes $NNODES pretrain_gpt.py \\
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" \\
    --log-interval 1 2>&1 | tee $LOG
"""

MDS_GPT345M = """#!/bin/bash
# GPT-345M in the shape of Megatron-DeepSpeed's examples_deepspeed pretrain script (written here).
DIR=`pwd`
NLAYERS=24
NHIDDEN=1024
MICRO_BATCH=4
GLOBAL_BATCH=32
TP=1
PP=1
ZERO_STAGE=1
DS_CONFIG=ds_config.json

cat <<EOT > $DS_CONFIG
{
  "train_batch_size" : $GLOBAL_BATCH,
  "train_micro_batch_size_per_gpu": $MICRO_BATCH,
  "steps_per_print": 10,
  "zero_optimization": {
    "stage": $ZERO_STAGE
  },
  "fp16": {
    "enabled": true,
    "initial_scale_power": 12
  },
  "wall_clock_breakdown" : true
}
EOT

ds_args=""
ds_args=" --deepspeed ${ds_args}"
ds_args=" --deepspeed_config=$DS_CONFIG ${ds_args}"
ds_args=" --zero-stage=$ZERO_STAGE ${ds_args}"
if [ "${ACTIVATION_CHECKPOINT:-false}" = "true" ]; then
  ds_args="--deepspeed-activation-checkpointing ${ds_args}"
fi

deepspeed --num_gpus 8 $DIR/pretrain_gpt.py $@ \\
    --tensor-model-parallel-size $TP \\
    --pipeline-model-parallel-size $PP \\
    --num-layers $NLAYERS \\
    --hidden-size $NHIDDEN \\
    --num-attention-heads 16 \\
    --seq-length 1024 \\
    --max-position-embeddings 1024 \\
    --micro-batch-size $MICRO_BATCH \\
    --global-batch-size $GLOBAL_BATCH \\
    --train-iters 5000 \\
    --lr 1.5e-4 \\
    --lr-decay-style cosine \\
    --fp16 \\
    $ds_args
"""

MDS_ULYSSES = """#!/bin/bash
# Ulysses sequence parallel in the shape of Megatron-DeepSpeed's sequence_parallel example (written here).
num_gpus_pernode=$(nvidia-smi --list-gpus | wc -l)
num_node=1
num_gpus=$(( ${num_gpus_pernode} * ${num_node} ))
seq_len=32768
global_batch_size=8
sp_size=4
mp_size=1
pp_size=1
zero_stage=3
log_interval=10
dp_size=$(( ${num_gpus} / ${pp_size} / ${mp_size} / ${sp_size} ))
batch_size=$(( ${global_batch_size} / ${dp_size} ))
config_json="ds_config_gbs${global_batch_size}_mbs${batch_size}_zero${zero_stage}.json"
cat <<EOT > $config_json
{
  "train_batch_size": ${global_batch_size},
  "train_micro_batch_size_per_gpu": ${batch_size},
  "steps_per_print": ${log_interval},
  "zero_optimization": {"stage": ${zero_stage}},
  "bf16": {"enabled": true},
  "gradient_clipping": 1.0
}
EOT
megatron_options=" \\
    --tensor-model-parallel-size ${mp_size} \\
    --pipeline-model-parallel-size ${pp_size} \\
    --ds-sequence-parallel-size ${sp_size} \\
    --num-layers 24 \\
    --hidden-size 2048 \\
    --num-attention-heads 16 \\
    --seq-length ${seq_len} \\
    --max-position-embeddings ${seq_len} \\
    --micro-batch-size ${batch_size} \\
    --global-batch-size ${global_batch_size} \\
    --lr 2.0e-4 \\
    --min-lr 1.0e-6 \\
    --lr-decay-style cosine \\
    --log-interval ${log_interval} \\
    --train-iters 1000 \\
    --bf16"
deepspeed_options=" \\
    --deepspeed \\
    --deepspeed_config ${config_json} \\
    --zero-stage ${zero_stage}"
run_cmd="deepspeed --num_nodes ${num_node} --num_gpus ${num_gpus_pernode} pretrain_gpt.py ${megatron_options} ${deepspeed_options}"
echo ${run_cmd}
eval ${run_cmd}
set +x
"""

MDS_MOE_TEMPLATE = """{
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
"""

MDS_MOE = """#!/bin/bash
# MoE in the shape of Megatron-DeepSpeed's MoE examples: the DeepSpeed JSON comes from a template by sed.
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
config_json="ds_config_gpt_${NAME:-moe}.json"
sed "s/CONFIG_BATCH_SIZE/${GLOBAL_BATCH_SIZE}/" ${template_json} \\
    | sed "s/CONFIG_MBSIZE/${BATCH_SIZE}/" \\
    | sed "s/LOG_INTERVAL/${LOG_INTERVAL}/" \\
    | sed "s/ZERO_STAGE/0/" \\
    | sed "s/PRESCALE_GRAD/true/" \\
    | sed "s/CONFIG_FP16_ENABLED/true/" \\
    | sed "s/CONFIG_BF16_ENABLED/false/" \\
    | sed "s/CONFIG_CL_ENABLED/${CL_ENABLED}/" \\
      > ${config_json}
megatron_options=" \\
    --tensor-model-parallel-size ${MP_SIZE} \\
    --moe-expert-parallel-size ${EP_PARALLEL_SIZE} \\
    --num-experts ${EP_SIZE} \\
    --moe-loss-coeff 0.01 \\
    --num-layers ${NUM_LAYERS} \\
    --hidden-size ${HIDDEN_SIZE} \\
    --num-attention-heads ${NUM_ATTN_HEADS} \\
    --seq-length 2048 \\
    --max-position-embeddings 2048 \\
    --micro-batch-size ${BATCH_SIZE} \\
    --global-batch-size ${GLOBAL_BATCH_SIZE} \\
    --train-iters 10000 \\
    --lr ${LR} \\
    --min-lr ${MIN_LR} \\
    --lr-decay-style cosine \\
    --log-interval ${LOG_INTERVAL} \\
    --fp16"
deepspeed_options=" \\
    --deepspeed \\
    --deepspeed_config ${config_json} \\
    --pipeline-model-parallel-size 1 \\
    --no-pipeline-parallel"
run_cmd="deepspeed --num_gpus ${NUM_GPUS} pretrain_gpt.py ${megatron_options} ${deepspeed_options} &> moe.log"
echo ${run_cmd}
eval ${run_cmd}
"""

BIGSCIENCE = """#!/bin/bash
# BigScience-style SLURM script (written here): multi-line GPT_ARGS strings, a LAUNCHER string, srun bash -c.
set -x -e
source $six_ALL_CCFRWORK/start-tr11-176B-ml
MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)
MASTER_PORT=6000
GPUS_PER_NODE=8
NNODES=$SLURM_NNODES
TP_SIZE=4
PP_SIZE=12
MICRO_BATCH_SIZE=2
GLOBAL_BATCH_SIZE=2048
NLAYERS=70
NHIDDEN=14336
NHEADS=112
SEQ_LEN=2048
SAVE_INTERVAL=100
config_json="./ds_config.$SLURM_JOBID.json"
ZERO_STAGE=0
OPTIMIZER_ARGS=" \\
    --optimizer adam \\
    --adam-beta1 0.9 \\
    --adam-beta2 0.95 \\
    --adam-eps 1e-8 \\
    --lr 6e-5 \\
    --min-lr 6e-6 \\
    --lr-decay-style cosine \\
    --clip-grad 1.0 \\
    --weight-decay 1e-1 \\
    "
# for 20h 1190, for 100h 5990
#    --exit-duration-in-mins 1190 \\
EXIT_OPTS=" \\
    --exit-duration-in-mins 5990 \\
    "
GPT_ARGS=" \\
    --pp-partition-method 'type:transformer|embedding' \\
    --num-layers $NLAYERS \\
    --hidden-size $NHIDDEN \\
    --num-attention-heads $NHEADS \\
    --seq-length $SEQ_LEN \\
    --max-position-embeddings $SEQ_LEN \\
    --micro-batch-size $MICRO_BATCH_SIZE \\
    --global-batch-size $GLOBAL_BATCH_SIZE \\
    --init-method-std 0.0048 \\
    --embed-layernorm \\
    --bf16 \\
    --seed 42 \\
    $OPTIMIZER_ARGS \\
    $EXIT_OPTS \\
    "
OUTPUT_ARGS=" \\
    --log-interval 1 \\
    --save-interval $SAVE_INTERVAL \\
    --eval-interval 1000 \\
    --eval-iters 5 \\
    "
cat <<EOT > $config_json
{
  "train_micro_batch_size_per_gpu": $MICRO_BATCH_SIZE,
  "train_batch_size": $GLOBAL_BATCH_SIZE,
  "gradient_clipping": 1.0,
  "zero_optimization": {
    "stage": $ZERO_STAGE
  },
  "bf16": {
    "enabled": true
  },
  "steps_per_print": 2000,
  "wall_clock_breakdown": false
}
EOT
DEEPSPEED_ARGS=" \\
    --deepspeed \\
    --deepspeed_config ${config_json} \\
    --zero-stage ${ZERO_STAGE} \\
    --deepspeed-activation-checkpointing \\
    "
export LAUNCHER="python -u -m torch.distributed.run \\
    --nproc_per_node $GPUS_PER_NODE \\
    --nnodes $NNODES \\
    --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT \\
    --rdzv_backend c10d \\
    --max_restarts 0 \\
    --tee 3 \\
    "
export CMD=" \\
    pretrain_gpt.py \\
    --tensor-model-parallel-size $TP_SIZE \\
    --pipeline-model-parallel-size $PP_SIZE \\
    $GPT_ARGS \\
    $OUTPUT_ARGS \\
    --save checkpoints \\
    --load checkpoints \\
    --data-impl mmap \\
    --distributed-backend nccl \\
     $DEEPSPEED_ARGS \\
    "
echo $CMD
# do not remove or the training will hang and nodes will be lost w/o this workaround
export CUDA_LAUNCH_BLOCKING=1
# hide duplicated errors using this hack - will be properly fixed in pt-1.12
export TORCHELASTIC_ERROR_FILE=/tmp/torch-elastic-error.json
srun --jobid $SLURM_JOBID bash -c "$LAUNCHER --node_rank \\$SLURM_PROCID $CMD" 2>&1 | tee -a main_log.txt
echo "END TIME: $(date)"
"""

CORPUS = {
    # name: (script, files next to it, --env, expected {flag: value} in the training argv, launcher, ds keys)
    "megatron_lm_gpt3_175b": (GPT3_175B, {}, {}, {
        "--tensor-model-parallel-size": "8", "--pipeline-model-parallel-size": "16", "--micro-batch-size": "1",
        "--global-batch-size": "1536", "--lr": "6.0e-5", "--attention-backend": "auto", "--split": "949,50,1",
        "--save": "checkpoints/gpt3"}, {"launch.nproc_per_node": "8", "launch.nnodes": "16"}, None),
    "megatron_lm_llama3_8b": (LLAMA3_8B, {}, {}, {
        "--tensor-model-parallel-size": "2", "--micro-batch-size": "1", "--global-batch-size": "128",
        "--lr": "0.00015", "--tokenizer-type": "NullTokenizer", "--vocab-size": "128256",
        "--seq-length": "8192"}, {"launch.nproc_per_node": "8", "launch.nnodes": "1"}, None),
    "megatron_lm_mixtral_8x7b": (MIXTRAL_8X7B, {}, {}, {
        "--expert-model-parallel-size": "8", "--pipeline-model-parallel-size": "4", "--num-experts": "8",
        "--moe-router-topk": "2", "--global-batch-size": "256", "--lr": "1e-4", "--log-interval": "1"},
        {"launch.nproc_per_node": "8", "launch.nnodes": "4"}, None),
    "megatron_deepspeed_gpt345m": (MDS_GPT345M, {}, {}, {
        "--micro-batch-size": "4", "--global-batch-size": "32", "--zero-stage": "1", "--lr": "1.5e-4",
        "--deepspeed_config": "ds_config.json"}, {"launch.nproc_per_node": "8"},
        {"zero_optimization": {"stage": 1}, "train_batch_size": 32}),
    "megatron_deepspeed_ulysses": (MDS_ULYSSES, {}, {"num_gpus_pernode": "8"}, {
        "--ds-sequence-parallel-size": "4", "--micro-batch-size": "4", "--global-batch-size": "8",
        "--zero-stage": "3", "--deepspeed_config": "ds_config_gbs8_mbs4_zero3.json", "--lr": "2.0e-4"},
        {"launch.nproc_per_node": "8", "launch.nnodes": "1"},
        {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}),
    "megatron_deepspeed_moe_sed": (MDS_MOE, {"ds_config_gpt_TEMPLATE.json": MDS_MOE_TEMPLATE}, {}, {
        "--num-experts": "8", "--moe-expert-parallel-size": "8", "--micro-batch-size": "4",
        "--global-batch-size": "256", "--lr": "4.5e-4", "--deepspeed_config": "ds_config_gpt_moe.json"},
        {"launch.nproc_per_node": "8"},
        {"zero_optimization": {"stage": 0}, "train_batch_size": 256, "prescale_gradients": True}),
    "bigscience_tr11": (BIGSCIENCE, {"start-tr11-176B-ml": "export HF_DATASETS_OFFLINE=1\n"},
                        {"SLURM_NNODES": "48", "SLURM_JOBID": "17", "six_ALL_CCFRWORK": "."}, {
        "--tensor-model-parallel-size": "4", "--pipeline-model-parallel-size": "12", "--micro-batch-size": "2",
        "--global-batch-size": "2048", "--lr": "6e-5", "--zero-stage": "0", "--exit-duration-in-mins": "5990",
        "--pp-partition-method": "type:transformer|embedding", "--deepspeed_config": "./ds_config.17.json"},
        {"launch.nproc_per_node": "8", "launch.nnodes": "48"},
        {"zero_optimization": {"stage": 0}, "train_batch_size": 2048}),
}


def _corpus_dir(tmp_path: Path, name: str) -> Path:
    script, files, _, _, _, _ = CORPUS[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "run.sh").write_text(script)
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


def _check(got: shell_script.Script, name: str) -> None:
    _, _, _, flags, launcher, ds = CORPUS[name]
    for flag, expected in flags.items():
        assert value(got.argv, flag) == expected, (name, flag)
    assert got.launcher == launcher, name
    assert not any("#" in word or word in ("|", "2>&1", "tee") for word in got.argv), got.argv
    if ds is not None:
        written = json.loads(got.files[value(got.argv, "--deepspeed_config")])
        for key, expected in ds.items():
            assert written[key] == expected, (name, key)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_static_read(tmp_path, name):
    folder = _corpus_dir(tmp_path, name)
    env = CORPUS[name][2]
    got = shell_script.read((folder / "run.sh").read_text(), env, "run.sh", base=folder)
    _check(got, name)


def test_corpus_branches_and_arrays_are_bash_s():
    """What the old line reader got wrong on the corpus, checked word for word."""
    llama = read(LLAMA3_8B).argv
    assert "--mock-data" in llama and "--data-path" not in llama and "--fp8-format" not in llama
    assert llama[-8:] == ["--log-interval", "1", "--save", "checkpoints/llama3_8b", "--load", "checkpoints/llama3_8b",
                          "--save-interval", "500"] and "--bf16" in llama
    gpt3 = read(GPT3_175B).argv
    assert gpt3[gpt3.index("--attention-backend"):][:4] == ["--attention-backend", "auto", "--micro-batch-size", "1"]
    mixtral = read(MIXTRAL_8X7B)
    launch_line = next(n for n, line in enumerate(MIXTRAL_8X7B.splitlines(), 1) if line.startswith("torchrun"))
    assert mixtral.argv[-2:] == ["--log-interval", "1"] and mixtral.line == launch_line


def test_corpus_values_a_run_gets(tmp_path):
    """Through the translator: the zero stage, batch, tp/pp and lr a run gets from three corpus scripts."""
    for name, expected in [
        ("megatron_deepspeed_gpt345m", (1, 4, 32, 1, 1, 1.5e-4, "fp16")),
        ("megatron_deepspeed_moe_sed", (0, 4, 256, 1, 1, 4.5e-4, "fp16")),
        ("megatron_lm_gpt3_175b", (0, 1, 1536, 8, 16, 6.0e-5, "fp16")),
    ]:
        folder = _corpus_dir(tmp_path, name)
        found, _ = translate.sources(folder / "run.sh", CORPUS[name][2])
        cfg = translate.resolve(found, megatron=True)
        got = (cfg.zero.stage, cfg.batch.micro, cfg.batch.global_, cfg.parallel.tp, cfg.parallel.pp, cfg.optimizer.lr,
               cfg.precision)
        assert got == expected, name


@needs_bash
def test_run_script_agrees_with_the_static_read_on_the_corpus(tmp_path):
    seconds = {}
    for name in sorted(CORPUS):
        folder = _corpus_dir(tmp_path, name)
        text, env = (folder / "run.sh").read_text(), CORPUS[name][2]
        static = shell_script.read(text, env, "run.sh", base=folder)
        start = time.perf_counter()
        ran = shell_script.read(text, env, "run.sh", base=folder, run=True)
        seconds[name] = time.perf_counter() - start
        assert ran.argv == static.argv, name
        assert ran.launcher == static.launcher, name
        config = value(static.argv, "--deepspeed_config") if "--deepspeed_config" in " ".join(static.argv) else None
        if config:
            assert json.loads(ran.files[config]) == json.loads(static.files[config]), name
        assert "--run-script: ran it under bash" in ran.notes[0]
        _check(ran, name)
    assert max(seconds.values()) < 10, seconds


@needs_bash
def test_run_script_is_bash_itself():
    """Constructs only real bash evaluates come out right under --run-script (the static read names them)."""
    script = "GPUS=$(echo 3)\nN=$(printf '%d' $((GPUS + 1)))\npython pretrain_gpt.py --lr 0.1 --seed $(( N * 2 ))\n"
    assert read(script, run=True).argv == ["--lr", "0.1", "--seed", "8"]
    assert read(script).argv == ["--lr", "0.1", "--seed", "8"]  # echo/printf are builtins the static read runs
    with pytest.raises(ConfigError, match="did not finish|exited"):
        read("exit 3\n", run=True)


def test_cli_check_and_translate_read_scripts_statically_unless_asked(tmp_path, capsys, monkeypatch):
    folder = _corpus_dir(tmp_path, "megatron_deepspeed_gpt345m")
    path = str(folder / "run.sh")
    code = cli.main(["check", path, "--world-size", "8"])
    out, err = capsys.readouterr()
    assert code == 0 and "ZeRO-1" in out and "--run-script" not in err
    if shutil.which("bash"):
        code = cli.main(["check", path, "--world-size", "8", "--run-script"])
        out, err = capsys.readouterr()
        assert code == 0 and "ZeRO-1" in out and "--run-script: ran it under bash" in err, err
    (folder / "bad.sh").write_text("GPUS=$(nvidia-smi -L | wc -l)\ntorchrun --nproc_per_node $GPUS pretrain_gpt.py "
                                   "--lr 0.1\n")
    code = cli.main(["translate", str(folder / "bad.sh"), "--to", "zeromega"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--env GPUS=VALUE" in err, err
    code = cli.main(["translate", str(folder / "bad.sh"), "--to", "zeromega", "--env", "GPUS=4"])
    out, err = capsys.readouterr()
    assert code == 0 and '"nproc_per_node": 4' in out, (out, err)


def test_a_heredoc_json_passed_as_config_is_followed(tmp_path):
    """zeromega's own pretrain_gpt.py takes --config: a unified or DeepSpeed JSON the script writes is read."""
    script = tmp_path / "run.sh"
    script.write_text("""
STAGE=3
cat > run.json <<EOF
{"zero": {"stage": $STAGE}, "batch": {"micro": 2, "global": 16}, "optimizer": {"lr": 0.001}}
EOF
torchrun --nproc_per_node 2 pretrain_gpt.py --config run.json --num-layers 2
""")
    found, _ = translate.sources(script)
    cfg = translate.resolve(found, megatron=True)
    assert (cfg.zero.stage, cfg.batch.micro, cfg.batch.global_, cfg.model.num_layers) == (3, 2, 16, 2)
    assert any("run.json (written by the script)" in name for name, _ in found)
    script.write_text("torchrun --nproc_per_node 2 pretrain_gpt.py --config missing.json\n")
    with pytest.raises(ConfigError, match="--config='missing.json': no such file"):
        translate.sources(script)


def _random_program(rng) -> str:
    """A launch-script-shaped program: variables (decimal, octal, hex, text), arithmetic, expansions, if/elif
    on [ ] [[ ]] (( )), for, case, arrays and +=; then a training command reading them all."""
    names = ["A", "B", "TP", "N"]

    def atom():
        name = rng.choice(names)
        return rng.choice([str(rng.randint(0, 9)), name, f"${name}", f"${{{name}:-3}}"])

    def arith(depth=0):
        if depth > 2 or rng.random() < 0.4:
            return atom()
        op = rng.choice(["+", "-", "*", "/", "%", "**", "<", "==", "&&", "||"])
        return f"({arith(depth + 1)} {op} {arith(depth + 1)})"

    def word():
        name = rng.choice(names)
        return rng.choice([f"$(( {arith()} ))", f"${name}", f'"${name} x"', "'lit'", f"${{{name}:-d}}",
                           f"${{#{name}}}", f"${{{name}%1}}", '"${ARR[@]}"', "${ARR[@]}", "${#ARR[@]}",
                           f"a{rng.randint(0, 9)}"])

    def statement(depth=0):
        r, name = rng.random(), rng.choice(names)
        if r < 0.25:
            return f"{name}={word()}"
        if r < 0.35:
            return f"{name}+={word()}"
        if r < 0.45:
            return f"ARR+=({word()} {word()})"
        if r < 0.55:
            return f": ${{{name}:={rng.randint(0, 9)}}}"
        if r < 0.75 and depth < 2:
            cond = rng.choice([f'[ "${name}" = {rng.randint(0, 9)} ]', f"[[ ${name} -gt {rng.randint(0, 9)} ]]",
                               f'[ -z "${name}" ]', f'[[ -n "${name}" && ${rng.choice(names)} == 1* ]]',
                               f"(( {arith()} ))"])
            return (f"if {cond}; then\n  {statement(depth + 1)}\nelif {cond}; then {statement(depth + 1)}\n"
                    f"else\n  {statement(depth + 1)}\nfi")
        if r < 0.85:
            return f"for i in 1 2; do {name}=$(( ${{{name}:-0}} + i )); done"
        return f"case ${name} in 1*) {name}=x;; *) {name}=y;; esac"

    lines = ["ARR=(p q)"] + [f"{n}={rng.choice([str(rng.randint(0, 12)), '1x', '012', '0x1f', '-3'])}" for n in names]
    lines += [statement() for _ in range(rng.randint(1, 6))]
    lines.append("python pretrain_gpt.py --a " + " --b ".join(word() for _ in range(3)) +
                 ' --c "${ARR[@]}" --d $A$B$TP$N')
    return "\n".join(lines) + "\n"


@needs_bash
def test_static_read_equals_bash_on_random_programs():
    """Wherever the static read gives a value (it refuses, or leaves $NAME, where it cannot know one), bash
    gives the same words. 40 programs, seeded."""
    import random

    rng = random.Random(14)
    compared = 0
    for _ in range(40):
        text = _random_program(rng)
        try:
            static = read(text).argv
        except ConfigError:
            continue
        if any("$" in w for w in static):
            continue
        try:
            ran = read(text, run=True).argv
        except ConfigError as err:
            raise AssertionError(f"bash refused what the static read gave {static}: {err}\n{text}") from None
        assert static == ran, text
        compared += 1
    assert compared >= 20


def test_octal_and_hex_variables_in_arithmetic_are_bash_s():
    assert read("A=012\nB=0x10\npython p.py --seed $((A + B)) --x $((A ** 2))\n").argv == ["--seed", "26", "--x", "100"]


def test_editing_an_unknowable_value_keeps_it_unknowable_and_bash_errors_stop():
    for edit in ("${G/1/z}", "${G%0}", "${G#?}", "${G:1:3}", "${G^^}"):
        with pytest.raises(ConfigError, match=r"G comes from \$\(nvidia-smi -L\)"):
            read(f"G=$(nvidia-smi -L)\nX={edit}\npython p.py --lr 0.1 --num-layers $X\n")
    with pytest.raises(ConfigError, match=r"division by 0 \(bash stops the command there\)"):
        read("N=0\npython p.py --lr 0.1 --num-layers $(( 8 / N ))\n")
