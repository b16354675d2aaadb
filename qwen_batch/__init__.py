"""qwen-batch: bulk prompt jobs on Qwen models through DashScope."""

__version__ = "0.1.0"
