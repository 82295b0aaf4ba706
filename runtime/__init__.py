"""The runtime that ships inside every bundle, in layers; each may import only the layers below
it (import-linter checks this in `make test`; docs/architecture.md walks through them):

    launch      the command line, a launch, the modes (one-shot, terminal chat, server, bench)
    serving     the HTTP server and the OpenAI-compatible API
    prompts | inference | bundlefile
                chat templates, reasoning and tools | the model, sampling and the one decode
                loop | the bundle file's format, reader, writer and first-launch check
    host        this machine: cache folders, libraries, CPU, processes, GPUs, the console
    errors, text

It never imports the builder (bundler/, buildsys/, build.py).
"""

__version__ = "0.1.0"
