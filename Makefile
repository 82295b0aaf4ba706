# Quick start: `make demo` (set-up + build + ask the demo bundle a question), `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  := models/SmolLM2-135M-Instruct.gguf
BUNDLE := dist/SmolLM2-135M-Instruct
STUB   := stubs/linux-x86_64/bundle-runtime
QUESTION := What is the capital of France? Answer in one word.

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

WIN_STUB := stubs/windows-x86_64/bundle-runtime.exe
WIN_BUNDLE := dist/SmolLM2-135M-Instruct.exe
USB_BUNDLE := dist/usb/SmolLM2-135M-Instruct.exe
WINE   := $(firstword $(wildcard /usr/lib/wine/wine64 /usr/bin/wine64 /usr/bin/wine))

.PHONY: all venv buildtools buildtools-vulkan buildtools-windows buildtools-aarch64 buildtools-universal stub stub-windows stub-aarch64 model chromium demo demo-windows usb test \
	test-windows test-universal test-cuda reference fuzz bench bench-windows clean distclean

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

# The Vulkan back end's build tools (glslc, the headers and loader to link against) and, for its
# tests, Mesa's software Vulkan driver (lavapipe), all from Debian.
buildtools-vulkan:
	@command -v glslc >/dev/null 2>&1 && [ -f /usr/include/vulkan/vulkan.hpp ] && [ -d /usr/include/spirv/unified1 ] \
		&& [ -f /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || { \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
		glslc libvulkan-dev spirv-headers mesa-vulkan-drivers; }

# The Windows stub is built on this machine: MinGW-w64 cross-compiles llama.cpp, wine runs the
# Windows CPython and PyInstaller (and the tests of the .exe).
buildtools-windows:
	@command -v x86_64-w64-mingw32-g++-posix >/dev/null 2>&1 && [ -x /usr/lib/wine/wine64 ] && command -v osslsigncode >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
		g++-mingw-w64-x86-64-posix wine64 osslsigncode; }

# The aarch64 stub is built here too: zig cross-compiles, qemu-user runs its CPython and
# PyInstaller (and its tests) in an arm64 userland made by debootstrap, registered in the
# binfmt_misc of a private user namespace (the machine's own is never touched).
buildtools-aarch64: buildtools
	@[ -x /usr/bin/qemu-aarch64-static ] && command -v aarch64-linux-gnu-strip >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
		qemu-user-static binutils-aarch64-linux-gnu; }

# The shells the universal file is tested from (bash and dash are Debian's own).
buildtools-universal:
	@command -v zsh >/dev/null 2>&1 && command -v busybox >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q zsh busybox; }

# build.py skips every step whose output is up to date (the llama.cpp compile, CPython, the
# bootloader and the Vulkan back end are cached per version, flags and toolchain under
# ~/.cache/bundle/build), so this target is cheap after the first time. The stub carries the
# Vulkan back end (any AMD, Intel or NVIDIA GPU; about 3 minutes to build the first time).
stub: venv buildtools buildtools-vulkan
	$(PY) build.py --vulkan

# stubs/windows-x86_64/ (about 8 minutes the first time on 2 cores; cached like the rest)
stub-windows: venv buildtools-windows
	$(PY) build.py --target windows-x86_64

# stubs/linux-aarch64/, with the Vulkan back end for ARM GPUs (about 30 minutes the first time on
# 2 cores; cached like the rest)
stub-aarch64: venv buildtools-aarch64 buildtools-vulkan
	$(PY) build.py --target linux-aarch64 --vulkan

$(MODEL):
	$(PYTHON) scripts/fetch_demo_model.py $@

model: $(MODEL)

$(BUNDLE): stub $(MODEL)
	$(VENV)/bin/bundle build $(MODEL) -o $@

demo: $(BUNDLE)
	@echo "\$$ ./$(BUNDLE) -p \"$(QUESTION)\" --temp 0"
	@./$(BUNDLE) -p "$(QUESTION)" --temp 0

# The same question to the Windows bundle, under wine (pipes for its streams: see tests/wine.py).
# One file for a USB stick: Windows x86-64, Linux x86-64 and Linux aarch64 (every stub is built).
usb: stub stub-windows stub-aarch64 $(MODEL)
	$(VENV)/bin/bundle build $(MODEL) --target universal -o $(USB_BUNDLE)
	@echo "\$$ sh $(USB_BUNDLE) -p \"$(QUESTION)\" --temp 0"
	@sh $(USB_BUNDLE) -p "$(QUESTION)" --temp 0

demo-windows: stub-windows $(MODEL)
	$(VENV)/bin/bundle build $(MODEL) --target windows-x86_64 -o $(WIN_BUNDLE)
	@echo "\$$ wine $(WIN_BUNDLE) -p \"$(QUESTION)\" --temp 0"
	@mkdir -p build/wine-prefix; WINEDEBUG=-all WINEPREFIX=$(CURDIR)/build/wine-prefix $(WINE) wineboot -i \
		</dev/null >/dev/null 2>&1; \
		$(PY) -c "from buildsys.windows import add_wine_standins; add_wine_standins('build/wine-prefix')"; \
		WINEDEBUG=-all WINEPREFIX=$(CURDIR)/build/wine-prefix $(WINE) $(WIN_BUNDLE) \
		-p "$(QUESTION)" --temp 0 </dev/null 2>&1 | cat

# The page tests drive Debian's Chromium (Playwright's own browser download is not used).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

# llama.cpp's own llama-server and llama-bench, built from the same source (about 8 minutes the
# first time, cached), with the reference chat templates that source ships: the template parity
# tests compare the bundle's prompts with llama-server's, the benchmarks its speed.
reference: venv
	$(PY) bench/native.py

# The runtime's layers (pyproject.toml's import-linter contracts) are checked first: seconds.
test: stub stub-windows stub-aarch64 reference buildtools-universal $(MODEL) chromium
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests -m "not cuda"

# The Windows bundle's tests alone (they are part of `make test` too).
test-windows: stub-windows $(MODEL)
	$(PY) -m pytest tests -m windows

# The aarch64 bundle's tests alone, under qemu (part of `make test` too).
test-aarch64: stub-aarch64 $(MODEL)
	$(PY) -m pytest tests -m aarch64

# The universal file's tests alone (part of `make test` too).
test-universal: stub stub-windows stub-aarch64 buildtools-universal $(MODEL)
	$(PY) -m pytest tests -m universal

# The CUDA back end takes longer to compile on 2 cores than CI allows: its tests run here.
test-cuda: venv buildtools-vulkan $(MODEL)
	$(PY) build.py --vulkan --cuda
	$(PY) -m pytest tests -m cuda

# The long run of the readers' fuzz tests, of the cut-copy measurement (every one of the last
# 256 bytes) and of the archive locator (every bit of it, and every 64th byte of the 32 KiB after
# it: no launch may hang); `make test` runs a few hundred cases of each.
fuzz: stub $(MODEL)
	BUNDLE_FUZZ_CASES=20000 BUNDLE_CUT_EVERY=1 BUNDLE_FUZZ_LOCATOR=all $(PY) -m pytest tests/test_fuzz.py \
		tests/test_trust.py tests/test_trust_limits.py -k "fuzz or cut or every_bit"

# The benchmarks (bench/__main__.py), then the aarch64 bundle against llama.cpp's llama-bench
# for aarch64, both under qemu (bench/aarch64.py).
bench: stub stub-windows stub-aarch64 reference $(MODEL)
	$(PY) -m bench
	$(PY) -m bench.aarch64
	$(PY) -m bench.universal
	$(PY) -m bench.lora
	$(PY) -m bench.caches
	$(PY) -m bench.rpc

# Decode and prompt speed of the Windows bundle under wine against the Linux bundle (wine is not Windows).
bench-windows: stub stub-windows $(MODEL)
	$(PY) -m bench.windows

clean:
	rm -rf dist build .pytest_cache

distclean: clean
	rm -rf $(VENV) models stubs/*/bundle-runtime stubs/*/*.zst stubs/*/stub.json
