"""On top: the command line (cli), settings from the bundle, the environment and flags
(settings), a launch (runtime: open the bundle once, check it, load libraries, back end and
model), the modes (modes: one-shot, terminal chat, server, bench, verify), the terminal chat
(chat), and the entry with its one error boundary (main).

May import every layer below.
"""
