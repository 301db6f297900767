"""`rex-stream bench`: the engine against a reference-style and a competent-user baseline.

workloads.py builds the message streams, baselines.py runs and measures the three paths,
report.py writes the table, JSON and PNG, runner.py ties them together (`main(args)`).
"""
