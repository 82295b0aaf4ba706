# Replaces pyinstaller-hooks-contrib's hook for llama_cpp, which copies every native library
# into PyInstaller's archive. Ours travel zstd-compressed in the bundle payload instead and are
# unpacked once per machine (docs/facts.md #6), so the archive gets only the Python modules.
hiddenimports = ["llama_cpp._ctypes_extensions", "llama_cpp._ggml"]
binaries = []
datas = []
