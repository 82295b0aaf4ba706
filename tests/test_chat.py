"""The terminal chat: the loop with scripted input, and the real executable in a pipe and a pty."""

import contextlib
import http.client
import json
import os
import pty
import re
import select
import subprocess
import time

from conftest import QUESTION

from runtime.launch.chat import ChatSession, read_message, run_chat


def scripted(lines):
    it = iter(lines)

    def read_line(prompt):
        try:
            item = next(it)
        except StopIteration:
            raise EOFError
        if isinstance(item, BaseException):
            raise item
        return item

    return read_line


def drive(lines, system=None):
    out, turns = [], []

    def respond(messages, write):
        turns.append([dict(m) for m in messages])
        write("reply")
        return "reply", False

    session = ChatSession(system)
    run_chat(session, scripted(lines), out.append, respond)
    return "".join(out), turns, session


def test_multi_turn_history_and_commands():
    text, turns, session = drive(["hello", "again", "/reset", "fresh", "/system Be terse.", "x", "/help", "/exit", "never"])
    assert [m["content"] for m in turns[1]] == ["hello", "reply", "again"]
    assert [m["content"] for m in turns[2]] == ["fresh"]
    assert turns[3] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "x"}]
    assert "conversation cleared" in text and "/system TEXT" in text
    assert len(turns) == 4  # nothing after /exit


def test_ctrl_d_leaves_and_ctrl_c_at_prompt_keeps_going():
    text, turns, _ = drive([KeyboardInterrupt(), "hi"])
    assert "Ctrl-D or /exit" in text and len(turns) == 1


def test_multi_line_input():
    assert read_message(scripted(["first \\", "second"])) == "first \nsecond"
    assert read_message(scripted(['"""', "a", "b", '"""'])) == "a\nb"


def test_unknown_command():
    text, turns, _ = drive(["/frobnicate"])
    assert "unknown command /frobnicate" in text and turns == []


def test_stopped_reply_is_kept_and_marked():
    out = []

    def respond(messages, write):
        write("partial")
        return "partial", True

    session = ChatSession()
    run_chat(session, scripted(["tell me"]), out.append, respond)
    assert "(stopped)" in "".join(out)
    assert session.history[-1] == {"role": "assistant", "content": "partial"}


def test_real_chat_through_a_pipe(built_bundle):
    script = f"{QUESTION}\nAnd of Germany? Answer in one word.\n/reset\n/exit\n"
    r = subprocess.run([str(built_bundle), "--cli", "--temp", "0"], input=script, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Berlin" in r.stdout  # the second turn saw the first
    assert "conversation cleared" in r.stdout


def read_until(fd, needle, timeout=60):
    buf = b""
    deadline = time.time() + timeout
    while needle.encode() not in buf and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    return buf.decode("utf-8", "replace")


@contextlib.contextmanager
def in_terminal(exe: str, argv: list[str], env=None):
    """Run exe in a new pseudo-terminal; yields (pid, fd); the child is killed on the way out."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(exe, argv, env if env is not None else dict(os.environ))
    try:
        yield pid, fd
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_ctrl_c_stops_the_reply_and_keeps_the_chat(built_bundle):
    """In a real terminal: no arguments starts the chat (and the web chat beside it); Ctrl-C
    stops a long reply; Ctrl-D leaves."""
    env = dict(os.environ, BUNDLE_PORT="0")
    with in_terminal(str(built_bundle), [str(built_bundle), "--temp", "0", "-n", "-1"], env) as (pid, fd):
        start = read_until(fd, ">>> ")
        assert "Type a message" in start
        port = int(re.search(r"web chat: http://127\.0\.0\.1:(\d+)/", start).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": QUESTION}],
                                                                 "temperature": 0}),
                     {"Content-Type": "application/json"})
        assert "Paris" in json.loads(conn.getresponse().read())["choices"][0]["message"]["content"]
        # A reply that cannot end on its own within the test: counting, with no token limit.
        os.write(fd, b"Count from 1 to 5000, one number per line, and say nothing else.\r")
        echo = read_until(fd, "else.\r\n", timeout=10)  # the echo of what was typed
        streamed = echo.split("else.\r\n", 1)[-1] + read_until(fd, "\n", timeout=60)
        streamed += read_until(fd, "\n", timeout=60)  # two lines of the reply: it is streaming
        assert ">>> " not in streamed, streamed  # (and has not ended)
        os.write(fd, b"\x03")
        after = read_until(fd, ">>> ", timeout=30)
        assert "(stopped)" in after
        # The chat goes on, the stopped reply in its history (so the model may go on counting:
        # what it says depends on how far it got); after /reset it answers afresh.
        os.write(fd, QUESTION.encode() + b"\r")
        reply = read_until(fd, ">>> ", timeout=60).split("word.\r\n", 1)[-1].removesuffix(">>> ")
        assert reply.strip(), reply
        os.write(fd, b"/reset\r")
        assert "conversation cleared" in read_until(fd, ">>> ", timeout=30)
        os.write(fd, QUESTION.encode() + b"\r")
        assert "Paris" in read_until(fd, ">>> ", timeout=60)
        os.write(fd, b"\x04")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_error_in_a_window_of_its_own_waits_for_enter(built_bundle, tmp_path):
    """Started by something that is not a shell (a file manager's "run in terminal"), an error
    stays on screen until Enter instead of closing the window at once."""
    import sys

    launcher = tmp_path / "fake-terminal"  # what the process list shows as our ancestor
    launcher.symlink_to(sys.executable)
    code = f"import subprocess,sys; sys.exit(subprocess.call([{str(built_bundle)!r}, '--ctx', '-5']))"
    with in_terminal(str(launcher), [str(launcher), "-c", code]) as (pid, fd):
        seen = read_until(fd, "Press Enter", timeout=60)
        assert "error: command line: ctx=-5" in seen and "Press Enter to close this window." in seen
        os.write(fd, b"\r")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 2


def test_error_from_a_shell_does_not_wait(built_bundle):
    # a terminal, and a shell as the parent: a user who typed the command
    with in_terminal("/bin/sh", ["/bin/sh", "-c", f"'{built_bundle}' --ctx -5"]) as (pid, fd):
        seen = read_until(fd, "\n", timeout=60)
        _, status = os.waitpid(pid, 0)  # exits without waiting for anything
        assert os.WEXITSTATUS(status) == 2
        assert "ctx=-5" in seen and "Press Enter" not in seen
