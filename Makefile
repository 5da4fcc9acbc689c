# `make test` builds everything it needs from nothing: a virtualenv, the pinned CPU torch, mmx and its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sandbox test test-all lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,hub]'
	touch $(STAMP)

install: $(STAMP) sandbox

# bubblewrap confines model-written code (code rewards, the agent's tools); without it mmx refuses to run such code
sandbox:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y bubblewrap || { apt-get update && apt-get install -y bubblewrap; }; \
	else \
		echo "bubblewrap (bwrap) is missing: mmx refuses to run model-written code without it."; \
		echo "Install it with: sudo apt-get install bubblewrap (Debian/Ubuntu) or sudo dnf install bubblewrap (Fedora)"; \
	fi

test: $(STAMP) sandbox
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the slow tests too; lm-evaluation-harness (the `eval` extra, large) is installed for them here only
test-all: $(STAMP) sandbox
	$(BIN)/pip install --quiet -e '.[test,hub,eval]'
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/mmx demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
