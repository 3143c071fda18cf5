# Two commands on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-dev
DEMO   := $(VENV)/.installed-demo

.PHONY: test test-slow demo lint proto clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk; anything
# looser would download a multi-gigabyte CUDA build.
$(STAMP): pyproject.toml | $(PY)
	bash scripts/system-deps
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,llama]'
	touch $@

$(DEMO): $(STAMP)
	$(PIP) install -e '.[dev,llama,demo]'
	touch $@

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=25

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(DEMO)
	$(VENV)/bin/specedge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotocol --python_out=protocol --pyi_out=protocol protocol/specedge.proto

clean:
	rm -rf $(VENV) build *.egg-info
