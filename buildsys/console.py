"""The build's one voice: a line on stdout, prefixed [build]."""


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)
