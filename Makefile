# d2seg: `make demo` trains and evaluates the default model on the synthetic shapes data;
# `make test` runs the test suite. Both create .venv (Python 3.11) and install everything first.
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml
DEMO_OUT ?= output/demo
# extra KEY VALUE overrides for the demo, shell-quoted, e.g.
#   make demo DEMO_OPTS="SOLVER.MAX_ITER 20 SOLVER.STEPS '(15, 18)' SOLVER.WARMUP_ITERS 5 SEED 7"
DEMO_OPTS ?=
PYTEST_ARGS ?=
# `make bench`: the CPU benchmark preset, compared with the last recorded run of it
BENCH_BASELINE ?= benchmarks/results/benchmark_cpu_2026-11-27_session20_fp32.json

.PHONY: setup demo test bench clean-cache

setup:
	@PYTHON=$(PYTHON_BIN) VENV=$(VENV) bash scripts/setup_venv.sh

demo: setup
	@start=$$(date +%s); \
	$(PY) tools/train_net.py --config-file "$(DEMO_CONFIG)" OUTPUT_DIR "$(DEMO_OUT)" $(DEMO_OPTS) && \
	echo "[demo] done in $$(( $$(date +%s) - start )) s; metrics: $(DEMO_OUT)/log.txt, overlays (prediction | ground truth): $(DEMO_OUT)/vis/"

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) tools/benchmark.py --preset cpu-record --compare $(BENCH_BASELINE)

clean-cache:
	rm -rf $${D2SEG_DATASETS:-$$HOME/.cache/d2seg}
