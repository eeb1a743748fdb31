"""Checkpoints: the checkpointer, sharded (FSDP/DeepSpeed) state, atomic file writing and finding checkpoints."""
