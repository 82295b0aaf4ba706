"""The model and every answer it gives: the engine (the model loaded from the bundle file,
tokens, samplers, embeddings), sampling (settings, llama.cpp's sampler chain with grammar
checks, stop strings, log-probabilities), and the scheduler, the one decode loop every mode goes
through (continuous batching, cancellation, the benchmark).

May import: runtime.host (the llama.cpp bindings, the CPU thread pool), runtime.errors. Never
the prompts, the bundle file, the server or the launch.
"""
