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
  /think on|off   reasoning models: think before answering, or answer at once
  /think show|hide  show the thinking (dimmed), or only say that it is thinking
  /exit           leave (or Ctrl-D)
Multi-line input: end a line with \\ to continue it, or put \"\"\" on a line to start and end a block.
Ctrl-C stops a reply that is being written."""


DIM, PLAIN = "\x1b[2m", "\x1b[0m"


class ChatSession:
    def __init__(self, system: str | None = None):
        self.system = system
        self.history: list[dict] = []
        self.think: bool | None = None  # /think on|off; None: the bundle's setting
        self.show_thinking = True

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
            elif command == "/think" and arg.strip() in ("on", "off", "show", "hide"):
                word = arg.strip()
                if word in ("on", "off"):
                    session.think = word == "on"
                    write("(thinking on)\n" if session.think else "(thinking off: answers at once)\n")
                else:
                    session.show_thinking = word == "show"
                    write("(the thinking is shown)\n" if session.show_thinking else "(the thinking is hidden)\n")
            elif command == "/think":
                write("/think on, off, show or hide\n")
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


class ThoughtStream:
    """A reasoning model's reply as a terminal shows it: "Thinking…" and the thinking (dimmed
    on a terminal), or, hidden, only "(thinking…)"; then the answer. splitter is a
    reasoning.Splitter; answer collects the answer alone (what the history keeps). The answer
    goes to write, the thinking and what frames it to note (write unless given)."""

    def __init__(self, splitter, write: Callable[[str], None], show: bool = True, dim: bool = False,
                 note: Callable[[str], None] | None = None):
        self.splitter, self.write, self.show, self.dim = splitter, write, show, dim
        self.note = note or write
        self.thinking = self.answering = False
        self.answer: list[str] = []
        self.thought: list[str] = []

    def feed(self, text: str) -> None:
        for kind, piece in self.splitter.feed(text):
            self._out(kind, piece)

    def finish(self) -> None:
        for kind, piece in self.splitter.finish():
            self._out(kind, piece)
        if self.thinking and not self.answering:
            self.note(PLAIN + "\n" if self.dim and self.show else "\n")

    def _out(self, kind: str, piece: str) -> None:
        if not piece:
            return
        if kind == "reasoning":
            self.thought.append(piece)
            if not self.thinking:
                self.thinking = True
                self.note((DIM + "Thinking…\n" if self.dim else "Thinking…\n") if self.show else "(thinking…)")
            if self.show:
                self.note(piece)
            return
        if not self.answering:
            piece = piece.lstrip("\n")
            if not piece:
                return
            self.answering = True
            if self.thinking:
                self.note((PLAIN if self.dim and self.show else "") + ("\n\n" if self.show else "\n"))
        self.answer.append(piece)
        self.write(piece)
