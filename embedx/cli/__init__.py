"""The command line: one thin click group (``main.py``) over per-stage command modules.

Each ``*_cmd.py`` module exposes ``COMMANDS``, a list of click commands.  Command
modules import heavy libraries (torch, onnxruntime, h5py) inside the command
functions, so ``embedx --help`` stays fast.
"""
