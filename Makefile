# Quick start: `make demo` (set-up + build + ask the demo bundle a question), `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  := models/SmolLM2-135M-Instruct.gguf
BUNDLE := dist/SmolLM2-135M-Instruct
STUB   := stubs/linux-x86_64/bundle-runtime
QUESTION := What is the capital of France? Answer in one word.

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv buildtools stub model chromium demo test test-cuda fuzz bench clean distclean

all: demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian's tools the build and the tests use: dpkg-source unpacks the source packages the
# portable CPython is built from; debootstrap makes the old userland the portability tests run in.
buildtools:
	@command -v dpkg-source >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dpkg-dev debootstrap; }

# build.py skips every step whose output is up to date (the llama.cpp compile, CPython and the
# bootloader are cached per version, flags and toolchain under ~/.cache/bundle/build), so this
# target is cheap after the first time.
stub: venv buildtools
	$(PY) build.py

$(MODEL):
	$(PYTHON) scripts/fetch_demo_model.py $@

model: $(MODEL)

$(BUNDLE): stub $(MODEL)
	$(VENV)/bin/bundle build $(MODEL) -o $@

demo: $(BUNDLE)
	@echo "\$$ ./$(BUNDLE) -p \"$(QUESTION)\" --temp 0"
	@./$(BUNDLE) -p "$(QUESTION)" --temp 0

# The page tests drive Debian's Chromium (Playwright's own browser download is not used).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

test: stub $(MODEL) chromium
	$(PY) -m pytest tests -m "not cuda"

# The CUDA back end takes longer to compile on 2 cores than CI allows: its tests run here.
test-cuda: venv $(MODEL)
	$(PY) build.py --cuda
	$(PY) -m pytest tests -m cuda

# The long run of the readers' fuzz tests and of the cut-copy measurement (every one of the last
# 256 bytes); `make test` runs a few hundred cases of each.
fuzz: stub $(MODEL)
	BUNDLE_FUZZ_CASES=20000 BUNDLE_CUT_EVERY=1 $(PY) -m pytest tests/test_fuzz.py tests/test_trust.py -k "fuzz or cut"

bench: stub $(MODEL)
	$(PY) -m bench

clean:
	rm -rf dist build .pytest_cache

distclean: clean
	rm -rf $(VENV) models stubs/*/bundle-runtime stubs/*/*.zst stubs/*/stub.json
