# The README's two commands: `make train` (the main job) and `make test`.
# Both create .venv and install zeromega into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup train test bench nvme-deps
setup: $(VENV)/.installed

# torch is pinned on the same command line so pip takes the 2.13.0 CPU build
# instead of resolving a newer (multi-GB CUDA) torch for deepspeed.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[test]'
	touch $@

train: setup
	$(VENV)/bin/zeromega launch --nproc-per-node 2 --config examples/configs/zero1.json \
		examples/pretrain_gpt.py --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 128 \
		--train-iters 300 --lr-warmup-iters 20 --lr-decay-style cosine --hidden-dropout 0.0 \
		--attention-dropout 0.0 --metrics-out runs/main/metrics.jsonl

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/overhead.py

# NVMe offload (ZeRO-Infinity) needs libaio for DeepSpeed's async_io op (root, Debian/Ubuntu).
nvme-deps:
	dpkg -s libaio-dev >/dev/null 2>&1 || (apt-get update && apt-get install -y libaio-dev)
