# streamrec — every target is idempotent and safe to re-run.
# `make test` and `make demo` run `setup` themselves, so a fresh clone needs nothing else.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
PY          := $(BIN)/python
STAMP       := $(VENV)/.streamrec-installed
KAFKA_PORT  ?= 9092
NPROC       ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup assets jars kafka-up kafka-down kafka-status topics test test-unit \
        test-integration demo loop bench chaos lint worker trainer serve evaluate clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	@touch $@

setup: $(STAMP) assets jars  ## venv + packages, the offline model, MovieLens-100k, the Kafka jars

assets: $(STAMP)  ## fetch the encoder and MovieLens-100k into .cache (checksummed)
	$(PY) -m infra.assets

jars: $(STAMP)  ## resolve the Kafka 3.9.1 broker jars with Maven into .cache
	$(PY) -m infra.broker fetch

kafka-up: setup  ## start the local broker on 127.0.0.1:$(KAFKA_PORT) and create the topics
	$(PY) -m infra.broker up --port $(KAFKA_PORT)
	STREAMREC_BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT) $(PY) -m infra.admin create

kafka-down: $(STAMP)  ## stop the local broker (keeps its data)
	$(PY) -m infra.broker down

kafka-status: $(STAMP)  ## is the local broker running, and where
	@$(PY) -m infra.broker status || true

topics: $(STAMP)  ## create every DESIGN.md topic on $$STREAMREC_BOOTSTRAP_SERVERS (idempotent)
	$(PY) -m infra.admin create

test: setup  ## the whole suite: unit tests and integration tests on a real broker
	$(BIN)/pytest

test-unit: setup
	$(BIN)/pytest tests/unit

test-integration: setup
	$(BIN)/pytest tests/integration

bench: setup  ## run every benchmark on a local broker it starts (each prints figures and a JSON last line)
	$(PY) benchmarks/broker_throughput.py --local
	$(PY) benchmarks/join_throughput.py --local
	$(PY) benchmarks/trainer_throughput.py
	$(PY) benchmarks/freshness.py --local
	$(PY) benchmarks/serving_latency.py --local
	$(PY) benchmarks/scaling.py --local
	$(PY) benchmarks/zero_shot.py
	$(PY) benchmarks/ope_coverage.py
	$(PY) -m benchmarks.logged_feedback
	$(PY) -m benchmarks.loop_ceiling
	$(PY) -m benchmarks.unseen_streams

chaos: setup  ## SIGKILL the services, restart the broker, inject bad input during a MovieLens run; print what held (JSON last line)
	$(PY) benchmarks/chaos.py --local $(CHAOS_ARGS)

worker: setup  ## run one streams (join) worker against $$STREAMREC_BOOTSTRAP_SERVERS
	$(PY) -m streams.worker --create-topics

trainer: setup  ## run the trainer service (NPROC=N: N data-parallel ranks under torchrun, one GPU each on CUDA)
ifeq ($(NPROC),1)
	$(PY) -m trainer
else
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m trainer
endif

serve: setup  ## run one scoring agent
	$(PY) -m serving

evaluate: setup  ## strategies vs baselines on the synthetic stream and MovieLens (first 20k ratings): tables + PNGs
	$(PY) -m harness.evaluate --dataset synthetic
	$(PY) -m harness.evaluate --dataset movielens

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

demo: setup  ## replay MovieLens-100k through the pipeline on a local broker and report
	$(PY) -m harness.demo

loop: setup  ## closed loop: simulated users vs four arms (explore, greedy, frozen, popularity) on a local broker
	$(PY) -m harness.loop $(LOOP_ARGS)

clean:  ## remove the venv and caches (the broker data in .cache goes too)
	-$(PY) -m infra.broker down
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .hypothesis
