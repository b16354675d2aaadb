"""The version of qwen-batch: for ``--version``, the User-Agent and a checkpoint's input identity."""

__version__ = "0.1.0"
