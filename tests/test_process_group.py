"""Host-side reductions and the end of a run, on a real (single-process) gloo group."""
import torch.distributed as dist

from conftest import free_port
from trainer.distributed.collectives import any_rank, end_processes, host_sum


def test_host_sums_need_no_device_and_the_run_leaves_the_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert host_sum(1234) == 1234 and isinstance(host_sum(5), int)
        assert any_rank(True) and not any_rank(False)
    finally:
        end_processes()
    assert not dist.is_initialized()  # NCCL would otherwise warn "destroy_process_group() was not called"
    assert host_sum(7) == 7  # single process again: no collective
