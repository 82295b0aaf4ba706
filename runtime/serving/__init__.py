"""The local web chat and the OpenAI-compatible API: the HTTP guard (guard), the server and its
connection limits (http), request preparation off the event loop (state, parsing), the endpoints
(routes), answers streamed or whole (streaming, shapes), errors as the API answers them (errors),
and metrics.

May import: runtime.inference, runtime.prompts, runtime.host, runtime.errors, runtime.text.
Never the launch. Imported only by the modes that serve: `-p` never loads it.
"""
