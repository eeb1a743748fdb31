"""Processes: start-up and backends, collectives, step mechanics, per-rank parameter access, DeepSpeed configs."""
