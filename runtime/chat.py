"""The terminal chat loop. It knows nothing about the model: it reads lines, keeps the history
and calls respond(messages, write) for each turn.

Ctrl-C while a reply streams stops that reply and keeps the chat; Ctrl-D leaves. Multi-line
input: end a line with a backslash to continue it, or wrap a block in triple quotes.
"""

from __future__ import annotations

from typing import Callable

HELP = """\
Commands:
  /help           this help
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over (/system alone clears it)
  /exit           leave (or Ctrl-D)
Multi-line input: end a line with \\ to continue it, or put \"\"\" on a line to start and end a block.
Ctrl-C stops a reply that is being written."""


class ChatSession:
    def __init__(self, system: str | None = None):
        self.system = system
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history


def read_message(read_line: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """Read one user message, possibly spanning several lines. EOFError on Ctrl-D."""
    first = read_line(prompt)
    if first.strip() == '"""':
        lines = []
        while True:
            line = read_line(more)
            if line.strip() == '"""':
                return "\n".join(lines)
            lines.append(line)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line(more))
    return "\n".join(lines)


def run_chat(
    session: ChatSession,
    read_line: Callable[[str], str],
    write: Callable[[str], None],
    respond: Callable[[list[dict], Callable[[str], None]], tuple[str, bool]],
    banner: str = "",
) -> None:
    """respond(messages, write) streams the reply through write and returns (text, stopped)."""
    if banner:
        write(banner + "\n")
    write("Type a message, /help for commands, Ctrl-D to leave.\n")
    while True:
        try:
            text = read_message(read_line)
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(Ctrl-D or /exit to leave)\n")
            continue
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("/"):
            command, _, arg = stripped.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return
            if command in ("/help", "/?"):
                write(HELP + "\n")
            elif command == "/reset":
                session.history.clear()
                write("(conversation cleared)\n")
            elif command == "/system":
                session.system = arg.strip() or None
                session.history.clear()
                write("(system prompt set; conversation cleared)\n" if session.system else "(system prompt cleared)\n")
            else:
                write(f"unknown command {command}; /help lists the commands\n")
            continue
        session.history.append({"role": "user", "content": text})
        try:
            reply, stopped = respond(session.messages(), write)
        except KeyboardInterrupt:  # Ctrl-C before the reply began
            reply, stopped = "", True
        write("\n")
        if stopped:
            write("(stopped)\n")
        session.history.append({"role": "assistant", "content": reply})
