"""What a run tells while it runs: metrics, live files, trackers, progress, timeline, status, logs."""
