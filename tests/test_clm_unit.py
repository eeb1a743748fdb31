"""Causal-LM mathematics in-process: packed documents, exact token counts, the chunked loss against the plain model."""
import importlib.util

import numpy as np
import pytest
import torch

from clm_helpers import tiny_gpt2
from trainer.clm import BlockCollator, CausalLMTask, chunked_cross_entropy, document_positions

VOCAB, EOS = 97, 0


def collate(blocks: np.ndarray, packed: bool) -> dict:
    batch = BlockCollator(pad_token_id=EOS, eos_token_id=EOS if packed else None)(
        {"input_ids": blocks, "sample_id": np.arange(len(blocks))})
    batch.pop("sample_id")
    return batch


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, VOCAB, n - 1)) + [EOS] for n in lengths]  # each ends with its EOS


def test_document_positions_restart_after_each_eos():
    ids = np.array([[5, 6, EOS, 7, EOS, 8, 9, 10]])
    assert document_positions(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_stream_blocks_predict_every_token_but_the_first():
    batch = collate(np.arange(1, 25).reshape(3, 8), packed=False)
    assert batch["num_loss_items"] == 3 * 7 and "position_ids" not in batch
    assert batch["predicted_tokens"].tolist() == [t for row in np.arange(1, 25).reshape(3, 8) for t in row[1:]]
    assert batch["predicting_positions"].tolist() == [r * 8 + c for r in range(3) for c in range(7)]


@pytest.mark.parametrize("chunk, attention", [(4, "sdpa"), (0, "sdpa"), (4, "eager")])  # chunked head or full logits
def test_packed_block_loss_equals_the_sum_of_its_documents_losses(chunk, attention):
    """A block of three documents, attention restricted per document (block-diagonal mask through SDPA, position
    ids restarting): its summed loss is the sum of each document's own loss computed alone, and it counts exactly
    the tokens each document predicts. Without the packing, attention crosses documents and the loss differs."""
    model = tiny_gpt2(VOCAB)
    model.set_attn_implementation(attention)
    docs = documents([7, 12, 5])
    block = np.array([sum(docs, [])])
    packed = collate(block, packed=True)
    with torch.no_grad():
        task = CausalLMTask(model, chunk=chunk)
        packed_loss = task(**{k: v for k, v in packed.items() if k != "num_loss_items"})["loss_sum"]
        alone = []
        for doc in docs:
            ids = torch.tensor([doc])
            alone.append(model(input_ids=ids, labels=ids).loss * (len(doc) - 1))  # HF: mean over len - 1
        stream = collate(block, packed=False)
        crossing = task(**{k: v for k, v in stream.items() if k != "num_loss_items"})["loss_sum"]
    assert packed["num_loss_items"] == sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(packed_loss, torch.stack(alone).sum(), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(crossing, packed_loss, rtol=1e-3)


def test_chunked_loss_and_gradients_equal_the_plain_model(monkeypatch):
    """Output layer + cross-entropy in fused chunks (7 rows; not dividing the row count) give the HF model's own
    loss and gradients, computing each chunk's logits once and never more than 7 rows of them."""
    import trainer.models.fused_loss

    ids = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = tiny_gpt2(VOCAB).train()
    (reference(input_ids=ids, labels=ids).loss * 3 * 15).backward()
    model = tiny_gpt2(VOCAB).train()
    widest = []
    linear = trainer.models.fused_loss.linear
    monkeypatch.setattr(trainer.models.fused_loss, "linear", lambda *a: widest.append(a[0].shape[0]) or linear(*a))
    batch = collate(ids.numpy(), packed=False)
    assert batch.pop("num_loss_items") == 3 * 15
    loss = CausalLMTask(model, chunk=7)(**batch)["loss_sum"]
    loss.backward()
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss.detach() * 45, rtol=1e-5, atol=0)
    assert max(widest) == 7 and len(widest) == 7  # 45 rows: 7 chunks, none run again in the backward
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        relative = float((p.grad - q.grad).norm() / q.grad.norm().clamp(min=1e-30))
        assert relative <= 1e-5, f"{name}: {relative:.1e}"


def test_chunked_cross_entropy_matches_one_pass_for_any_chunk():
    hidden, head = torch.randn(10, 8), torch.nn.Linear(8, 13)
    targets = torch.randint(0, 13, (10,))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
        for chunk in (3, 10, 64):  # several chunks, exactly one, fewer rows than one
            torch.testing.assert_close(chunked_cross_entropy(hidden, head, targets, chunk), expected)


@pytest.mark.parametrize("bias, frozen_head", [(True, False), (False, True)])
def test_fused_loss_gives_the_plain_loss_and_gradients_for_any_chunk(bias, frozen_head):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=bias).requires_grad_(not frozen_head)
    hidden, targets = torch.randn(10, 8, requires_grad=True), torch.randint(0, 13, (10,))
    wanted = [hidden] + ([] if frozen_head else list(head.parameters()))
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.7, wanted)
    for chunk in (3, 10, 64):  # several chunks, exactly one, fewer rows than one
        loss = chunked_cross_entropy(hidden, head, targets, chunk)
        torch.testing.assert_close(loss, expected)
        for got, want in zip(torch.autograd.grad(loss * 0.7, wanted), expected_grads):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("model_type, config", [
    ("llama", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=32)),
    ("mamba", dict(hidden_size=16, num_hidden_layers=1, state_size=4)),  # no position ids at all
])
def test_other_causal_lm_architectures_give_their_own_loss(model_type, config):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=VOCAB, **config)).eval()
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    batch = collate(ids.numpy(), packed=False)
    count = batch.pop("num_loss_items")
    with torch.no_grad():
        loss = CausalLMTask(model, chunk=5)(**batch)["loss_sum"]
        torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss * count, rtol=1e-5, atol=1e-5)


def test_fused_tanh_gelu_gives_the_models_loss_and_gradients_and_saves_the_model_as_it_was(tmp_path):
    """GPT-2's Python tanh-GELU swapped for torch's kernel (trainer/models/kernels.py): the same loss and gradients to float
    rounding, and the saved model still names its own activation. Weights drawn wide (std 0.3) put the FFN inputs
    where the GELU variants differ: the erf GELU misses these bounds by 100x (gradients 9e-4 apart, loss 1e-5)."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from trainer.models.kernels import fuse_activations

    ids = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))
    reference, fused = (tiny_gpt2(VOCAB, initializer_range=0.3).train() for _ in range(2))
    assert fuse_activations(fused) == 2 and fuse_activations(fused) == 0
    assert all(type(block.mlp.act) is torch.nn.GELU for block in fused.transformer.h)
    losses = []
    for model in (reference, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        relative = float((p.grad - q.grad).norm() / q.grad.norm().clamp(min=1e-30))
        assert relative <= 1e-5, f"{name}: {relative:.1e}"
    fused.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.activation_function == "gelu_new"
    assert type(reloaded.transformer.h[0].mlp.act) is NewGELUActivation


def test_packed_blocks_reach_flash_attention_as_one_row_and_keep_their_documents_apart():
    """transformers' FlashAttention takes its variable-length path (attention per document, from the position ids) only
    for a batch of one row; CausalLMTask lays a batch of packed blocks end to end for it. Here a stand-in for
    FlashAttention (its name says "flash", as transformers checks) requires one row and attends by sdpa with the
    per-document mask: three packed blocks give each block's own summed loss, as with sdpa on three rows."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    rows_seen = []

    def one_row_attention(module, query, *args, **kwargs):
        rows_seen.append(query.shape[0])
        return sdpa_attention_forward(module, query, *args, **kwargs)

    AttentionInterface.register("flash_stand_in", one_row_attention)
    AttentionMaskInterface.register("flash_stand_in", sdpa_mask)
    # The second block ends inside a document (no EOS): only the third block's own position 0 separates them.
    blocks = np.array([sum(documents(lengths, seed), [])[:24] for seed, lengths in enumerate([(7, 12, 5), (20, 9),
                                                                                                (24,)])])
    assert blocks[1, -1] != EOS
    batch = collate(blocks, packed=True)
    batch.pop("num_loss_items")
    model = tiny_gpt2(VOCAB)
    with torch.no_grad():
        by_rows = CausalLMTask(model, chunk=4)(**batch)["loss_sum"]
        model.config._attn_implementation = "flash_stand_in"  # set_attn_implementation would look for the kernel
        one_row = CausalLMTask(model, chunk=4)(**batch)["loss_sum"]
    assert rows_seen == [1, 1]  # both layers, one row each
    torch.testing.assert_close(one_row, by_rows, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs a CUDA GPU and the flash-attn package")
def test_packed_blocks_under_flash_attention_2_give_the_sdpa_loss():
    blocks = np.array([sum(documents(lengths, seed), [])[:24] for seed, lengths in enumerate([(7, 12, 5), (20, 9)])])
    batch = {k: v.cuda() for k, v in collate(blocks, packed=True).items() if k != "num_loss_items"}
    model = tiny_gpt2(VOCAB).to("cuda", torch.bfloat16)
    with torch.no_grad():
        sdpa = CausalLMTask(model, chunk=4)(**batch)["loss_sum"]
        model.set_attn_implementation("flash_attention_2")
        flash = CausalLMTask(model, chunk=4)(**batch)["loss_sum"]
    torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=0)


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_a_bert_trained_as_causal_lm_attends_causally_and_gets_its_own_heads_loss(from_checkpoint, tmp_path):
    """BERT as AutoModelForCausalLM attends both ways unless `is_decoder`: the job sets it, from scratch and for an
    MLM checkpoint. Its head transforms the hidden state before the output layer, so the loss comes from the model's
    own logits (not the chunked head), and equals transformers' own causal loss."""
    from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

    from trainer.models.arguments import ModelArguments
    from trainer.models.loading import load_model

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
    class Tokenizer(list):  # what load_model reads of a tokenizer: its length and special token ids
        pad_token_id = bos_token_id = eos_token_id = cls_token_id = sep_token_id = EOS

    tokenizer = Tokenizer([None] * VOCAB)
    if from_checkpoint:
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=VOCAB, **shape)).save_pretrained(tmp_path)
        model_args = ModelArguments(model_name_or_path=str(tmp_path))
    else:
        model_args = ModelArguments(model_type="bert", config_overrides=",".join(f"{k}={v}" for k, v in shape.items()))
    model = load_model(model_args, AutoModelForCausalLM, tokenizer, decoder=True).eval()
    assert model.config.is_decoder
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():  # the last token changed: nothing before it may see that
        torch.testing.assert_close(model(input_ids=changed).logits[:, :-1], model(input_ids=ids).logits[:, :-1])
        task = CausalLMTask(model, chunk=5)
        batch = collate(ids.numpy(), packed=False)
        count = batch.pop("num_loss_items")
        assert not task.chunked
        torch.testing.assert_close(task(**batch)["loss_sum"], model(input_ids=ids, labels=ids).loss * count,
                                   rtol=1e-5, atol=1e-5)
