"""Batch mode: the whole job through DashScope's file-based Batch API, at half the price.

One module a job: ``ids`` (custom ids and batch names), ``shards`` (rows to JSONL files
within every limit), ``state`` (the durable record of shards and batches), ``api`` (the
files and batches calls, paced and retried), ``results`` (output and error lines to
outcomes), ``dryrun`` (the whole chain through ``batch-test-model``) and ``commands``
(``status`` and ``cancel``). ``executors/batch.py`` drives them.
"""
