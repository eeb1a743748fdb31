"""Tracking: where the metrics go (the console, log_history.jsonl, TensorBoard) and its command-line section."""
