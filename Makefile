# `make test` builds everything it needs from nothing: a virtualenv, the pinned CPU torch, mmx and its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sandbox toolchain test test-all lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,hub]'
	touch $(STAMP)

install: $(STAMP) sandbox toolchain

# bubblewrap confines model-written code (code rewards, the agent's tools); without it mmx refuses to run such code
sandbox:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y bubblewrap || { apt-get update && apt-get install -y bubblewrap; }; \
	else \
		echo "bubblewrap (bwrap) is missing: mmx refuses to run model-written code without it."; \
		echo "Install it with: sudo apt-get install bubblewrap (Debian/Ubuntu) or sudo dnf install bubblewrap (Fedora)"; \
	fi

# the compiled decode step (torch.compile / inductor) builds C++ with g++ against Python's headers; without them mmx
# decodes eagerly
toolchain:
	@if command -v g++ >/dev/null 2>&1 && [ -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y g++ python3-dev || { apt-get update && apt-get install -y g++ python3-dev; }; \
	else \
		echo "g++ or Python's headers are missing: mmx will decode eagerly (slower)."; \
		echo "Install them with: sudo apt-get install g++ python3-dev (Debian/Ubuntu) or sudo dnf install gcc-c++ python3-devel (Fedora)"; \
	fi

test: $(STAMP) sandbox toolchain
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the slow tests too; lm-evaluation-harness (the `eval` extra, large) is installed for them here only
test-all: $(STAMP) sandbox toolchain
	$(BIN)/pip install --quiet -e '.[test,hub,eval]'
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/mmx demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
