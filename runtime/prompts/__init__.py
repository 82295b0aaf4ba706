"""What the model reads and writes as text: chat templates rendered as llama-server renders them
(template), thinking split from answers (reasoning), and tool calls offered and parsed (tools).

May import: runtime.host (the JSON schema to grammar converter of the bindings), runtime.errors,
runtime.text. Never the engine, the server or the launch: templates are text in, text out.
"""
