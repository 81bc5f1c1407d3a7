"""Batch inference jobs over JSONL datasets, run in the capacity interactive requests leave.

store.py   datasets (rows + files under data_dir/datasets/) and jobs with one result row per
           input line, in the server's database: a line's result is committed before it
           counts, so a job resumed after a restart runs every custom_id exactly once
lines.py   the input file: `{"custom_id", "body"}` lines, checked; the job's
           inferenceParameters applied to each body
runner.py  BatchRunner: the oldest runnable job's lines, a bounded number in flight,
           submitted only while no interactive request waits
cli.py     `girandole batch create|get|list|cancel`
"""
