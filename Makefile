# Two commands matter: `make run` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
CODEX_STAMP := tools/codex/node_modules/.installed
RUN_DIR := .run
# Run as root, the tests' children run under their own uids (gateway/sessions/isolation.py) and
# cannot reach an interpreter under a private directory (a pyenv under /root, say). They get a
# venv of the system python of the same minor version that reads the main venv's packages.
CHILD_PYTHON ?= /usr/bin/python3
CHILD_VENV := .venv-child
CHILD_STAMP := $(CHILD_VENV)/.installed
LISTEN ?= 127.0.0.1:8086
WORKSPACE ?= dev

.PHONY: run run-real test lint typecheck unit bench soak clean reach

$(PY_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The pinned real codex (npm @openai/codex, exact version in tools/codex/package-lock.json).
$(CODEX_STAMP): tools/codex/package.json tools/codex/package-lock.json
	cd tools/codex && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CHILD_STAMP): $(PY_STAMP)
	rm -rf $(CHILD_VENV)
	@if [ -x $(CHILD_PYTHON) ] && [ "$$($(CHILD_PYTHON) -c 'import sys; print(sys.version_info[:2])')" = "$$($(BIN)/python -c 'import sys; print(sys.version_info[:2])')" ]; then \
		$(CHILD_PYTHON) -m venv --without-pip $(CHILD_VENV) \
		&& printf '%s\n%s\n' "$$(cd $(VENV) && pwd)/lib/$$($(BIN)/python -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages" "$$(pwd)" \
			> "$$($(CHILD_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cxg-main-venv.pth"; \
	else mkdir -p $(CHILD_VENV); echo "no $(CHILD_PYTHON) of the venv's version: children use the venv's python"; fi
	touch $@

# Run as root, the children (under uids of their own) execute tools inside this checkout: every
# directory above it must let them pass (gateway_tests/checkout_reach.py).
reach: $(PY_STAMP)
	@$(BIN)/python -m gateway_tests.checkout_reach

$(RUN_DIR)/dev-hmac-secret: | $(PY_STAMP)
	mkdir -p $(RUN_DIR)
	umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_hex(32))' > $@

# The daemon on the embedded defaults (HMAC development auth, local directory store)
# with the fake codex as the child; the pinned real codex is installed too, as the client
# whose command this prints. Workspace `dev`, state in .run/fake.
run: $(PY_STAMP) $(CODEX_STAMP) $(CHILD_STAMP) $(RUN_DIR)/dev-hmac-secret reach
	@CXG_INBOUND_HMAC_SECRET="$$(cat $(RUN_DIR)/dev-hmac-secret)" $(BIN)/python -m gateway_tests.devrun \
		--listen-addr $(LISTEN) --workspace $(WORKSPACE) --run-dir $(RUN_DIR)/fake --codex fake

# The same with the real codex and the fake model server: a conversation in the real TUI.
# Its own workspace and store (`dev-real`, .run/real): no fake-codex file reaches a real
# child's CODEX_HOME archive.
run-real: $(PY_STAMP) $(CODEX_STAMP) $(CHILD_STAMP) $(RUN_DIR)/dev-hmac-secret reach
	@CXG_INBOUND_HMAC_SECRET="$$(cat $(RUN_DIR)/dev-hmac-secret)" $(BIN)/python -m gateway_tests.devrun \
		--listen-addr $(LISTEN) --workspace $(WORKSPACE)-real --run-dir $(RUN_DIR)/real --codex real

lint: $(PY_STAMP)
	$(BIN)/ruff check gateway gateway_tests
	$(BIN)/ruff format --check gateway gateway_tests

typecheck: $(PY_STAMP)
	$(BIN)/mypy

# The whole suite; pytest's "no tests collected" (exit 5) is a failure here, never a pass.
test: $(PY_STAMP) $(CODEX_STAMP) $(CHILD_STAMP) reach lint typecheck
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: $(PY_STAMP) $(CODEX_STAMP) $(CHILD_STAMP) reach
	$(BIN)/python -m gateway_tests.bench

soak: $(PY_STAMP) $(CODEX_STAMP)
	CXG_SOAK=1 $(BIN)/pytest gateway_tests/reliability -m soak --timeout=0

clean:
	rm -rf $(VENV) $(CHILD_VENV) tools/codex/node_modules $(RUN_DIR)
