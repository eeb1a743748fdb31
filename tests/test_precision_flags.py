"""--torch_dtype: the dtype weights are loaded in, and the refusal of low-precision weights unless asked for."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from trainer.errors import UsageError
from trainer.models.arguments import ModelArguments
from trainer.models.loading import load_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny GPT-2 saved in float32 and in bfloat16."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    root = tmp_path_factory.mktemp("dtype")
    model.save_pretrained(root / "fp32")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    return root


def load(path, **flags):
    return load_model(ModelArguments(model_name_or_path=str(path), **flags), AutoModelForCausalLM, tokenizer=None)


def test_float32_and_auto_load_a_float32_checkpoint_identically(checkpoints):
    a, b = load(checkpoints / "fp32", torch_dtype="float32"), load(checkpoints / "fp32", torch_dtype="auto")
    assert {p.dtype for p in b.parameters()} == {torch.float32}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_bf16_checkpoint_is_upcast_by_default_and_auto_keeps_bf16_only_when_allowed(checkpoints):
    assert load(checkpoints / "bf16").dtype == torch.float32  # unset: float32 master weights
    with pytest.raises(UsageError, match="--torch_dtype auto on .* trains the weights in bfloat16 without float32"):
        load(checkpoints / "bf16", torch_dtype="auto")
    model = load(checkpoints / "bf16", torch_dtype="auto", allow_low_precision_weights=True)
    assert model.dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.transformer.wte.weight.clone()
    model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.transformer.wte.weight)  # it trains, in bfloat16


@pytest.mark.parametrize("flags, dtype", [({}, torch.float32), ({"torch_dtype": "auto"}, torch.bfloat16),
                                          ({"torch_dtype": "float32"}, torch.float32)])
def test_the_lwf_teacher_loads_in_the_dtype_that_torch_dtype_names(flags, dtype, tmp_path):
    """The teacher goes through load_model's from_pretrained (models.loading.pretrained_model and weights_dtype)."""
    from transformers import BertConfig, BertForSequenceClassification

    from trainer.continual.distillation import load_teacher
    from trainer.models.loading import weights_dtype

    torch.manual_seed(0)
    labels = {0: "negative", 1: "positive"}
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, id2label=labels)
    BertForSequenceClassification(config).to(torch.bfloat16).save_pretrained(tmp_path / "teacher")
    model_args = ModelArguments(allow_low_precision_weights=True, **flags)
    teacher, _ = load_teacher(str(tmp_path / "teacher"), labels, "cpu", weights_dtype(model_args, from_checkpoint=True))
    assert {p.dtype for p in teacher.parameters()} == {dtype}
