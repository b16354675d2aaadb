"""Engines that run one job over many processes or machines, each part by the same runner.

``ray_limiter`` holds the job's global rate limit for every worker (no Ray import: the classes are
plain, Ray runs them as actors); ``ray_worker`` runs one shard as ``run --shard I/N`` does;
``ray_engine`` is the driver behind ``run --engine ray``. Ray itself (the ``qwen-batch[ray]`` extra)
is imported only when such a run starts.
"""
