"""trainer/distributed/construction.py's own parts, in one process (the multi-process fills are tested in
test_clm_launch.py, test_classify.py and test_fsdp.py)."""
import torch

from trainer.distributed.construction import file_pages, give_back_file_pages


def test_the_pages_of_a_loaded_checkpoint_go_back_to_the_kernel_and_every_value_stays(tmp_path):
    """from_pretrained maps safetensors files: the fill gives each sent parameter's whole pages back. Whatever the
    kernel does with them, a parameter read again holds its values, including one written in place after loading
    (MADV_DONTNEED, say, would lose that write)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=64, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)  # its pages become the process's own
    values = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}  # every page read
    embeddings = model.transformer.wte.weight  # 1 MiB
    pages = file_pages(embeddings)
    assert embeddings.data_ptr() <= pages.start < pages.stop <= embeddings.data_ptr() + embeddings.nbytes
    assert len(pages) >= embeddings.nbytes - 2 * 4096
    for parameter in model.parameters():  # what the memory saved is, is bench/construction_memory.py's to say
        give_back_file_pages(file_pages(parameter))
    assert [name for name, parameter in model.named_parameters() if not torch.equal(parameter, values[name])] == []


def test_memory_of_its_own_is_no_file_page():
    assert file_pages(torch.ones(4096, 16)) is None  # an allocation of its own: never given back
    assert file_pages(torch.ones(0)) is None
