"""Bottleneck adapters for sequence classification, several per model (one per task), switched by name.

Written by hand: peft has no bottleneck adapters (its issue #244 is open), and the `adapters` package (the former
adapter-transformers) pins transformers 4.57 while we use transformers 5. What it takes is small:

- An adapter is down-projection (hidden -> hidden / reduction factor), nonlinearity, up-projection, plus the
  residual: h + up(act(down(h))). The up-projection starts at zero, so at step 0 the adapter is exactly the
  identity and the model's logits equal the base model's, bit for bit.
- Houlsby (Houlsby et al., 2019): an adapter on the attention block's output projection and one on the
  feed-forward block's; Pfeiffer (Pfeiffer et al., 2021): on the feed-forward block's only. The nonlinearities are
  the `adapters` package's defaults (swish for Houlsby, ReLU for Pfeiffer). The adapter acts on the projection's
  output, before the residual connection and the normalisation of the layer (post-norm BERT: before dropout and
  LayerNorm; pre-norm ModernBERT: before the residual sum).
- Placement: a forward hook on each output projection (a Linear) runs the `AdapterSlot` registered beside it
  (`<parent>.bottleneck_adapters`, one adapter per task name). Hooks leave every base parameter where it was:
  the base's state-dict names do not change, and DeepSpeed ZeRO-3 and FSDP2 gather an adapter's weights when its
  module is called, like any other module's.
- The task head (classifier, and the pooler or prediction head where the architecture has one: new on a masked-LM
  checkpoint, so it must train and be saved with the head) is per task too: each head module is replaced by a
  `HeadSwitch` holding one copy per task, since tasks may have different label sets.
- Only the active adapter and its head train (`requires_grad`); every base parameter and every other task's
  adapter stays bit-identical. That is why an adapter "forgets nothing": switching back to task A runs exactly
  the weights A was trained and evaluated with.

Saved output (`AdapterModel.save_pretrained`, what the engine calls for checkpoints and the final model):
`bottleneck_adapters.safetensors` (every task's adapter and head weights) and `bottleneck_adapters.json`: the base
model (path or Hub id), its config, a SHA-256 of its parameters as they were at the save (loading refuses a base
that has changed since), and per task the adapter's settings and label set. `load_adapter_model(directory, name)`
rebuilds a plain transformers model from them for `pipeline("text-classification", ...)`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from trainer.errors import UsageError, require
from trainer.layout import ADAPTER_MANIFEST_FILE, ADAPTER_WEIGHTS_FILE
from trainer.models.blocks import encoder_layers
from trainer.models.loading import is_adapter_directory, pretrained_model

ADAPTER_CONFIGS = ("houlsby", "pfeiffer")
FORMAT = "trainer.bottleneck_adapters/1"
SLOT_NAME = "bottleneck_adapters"  # the attribute of an output projection's parent that holds its AdapterSlot
NONLINEARITY = {"houlsby": torch.nn.SiLU, "pfeiffer": torch.nn.ReLU}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
RESERVED = ("template", "template_labels")  # HeadSwitch attributes (ModuleDict keys must not shadow attributes)
# Per encoder layer: (attention output projection, feed-forward output projection), as paths inside the layer.
LAYOUTS = {
    "BERT-style (BERT, RoBERTa, ELECTRA, XLM-R, ...)": ("attention.output.dense", "output.dense"),
    "ModernBERT": ("attn.Wo", "mlp.Wo"),
    "DistilBERT": ("attention.out_lin", "ffn.lin2"),
}


@dataclass
class AdapterSettings:
    """One task's adapter, as recorded in the manifest."""

    config: str  # houlsby | pfeiffer
    reduction_factor: int
    bottleneck_size: int
    id2label: dict  # int -> label name


# ------------------------------------------------------------------------------------------------- modules
class BottleneckAdapter(torch.nn.Module):
    """h + up(act(down(h))), with the up-projection zero-initialised: exactly the identity until it trains."""

    def __init__(self, hidden_size: int, bottleneck_size: int, config: str, like: torch.Tensor):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, bottleneck_size, device=like.device, dtype=like.dtype)
        self.act = NONLINEARITY[config]()
        self.up = torch.nn.Linear(bottleneck_size, hidden_size, device=like.device, dtype=like.dtype)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(self.act(self.down(hidden_states)))


class AdapterSlot(torch.nn.ModuleDict):
    """The adapters of one place in the network, one per task; the active one runs (none: the identity, e.g. a
    Pfeiffer task at an attention output)."""

    active: Optional[str] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self[self.active](hidden_states) if self.active in self else hidden_states


class HeadSwitch(torch.nn.ModuleDict):
    """Stands in for a head module (classifier, pooler, ...): one copy per task, the active one runs."""

    active: Optional[str] = None

    def forward(self, *args, **kwargs):
        return self[self.active](*args, **kwargs)


def run_slot(slot: AdapterSlot):
    def hook(module, inputs, output):
        return slot(output)

    return hook


# ------------------------------------------------------------------------------------------ building blocks
def check_adapter_name(name: str) -> None:
    require(bool(NAME.fullmatch(name)) and not hasattr(HeadSwitch(), name) and name not in RESERVED,
            f"--adapter_name {name!r}: an adapter name is a letter followed by up to 63 letters, digits, '_' or '-', "
            f"and not a reserved word of torch's ModuleDict (e.g. keys, items, forward); choose another")


def adapter_sites(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per encoder layer, (attention output projection, feed-forward output projection) as (parent, Linear)
    pairs flattened: [attn_0, ffn_0, attn_1, ffn_1, ...]. A UsageError for an architecture of unknown layout."""
    layers = encoder_layers(model)
    for paths in LAYOUTS.values():
        if all(isinstance(submodule(layer, path), torch.nn.Linear) for layer in layers for path in paths):
            return [(submodule(layer, path.rpartition(".")[0]), submodule(layer, path))
                    for layer in layers for path in paths]
    raise UsageError(f"--finetune_strategy adapter cannot place adapters in a {model.config.model_type} model (known "
                     f"layouts: {'; '.join(LAYOUTS)}); use --finetune_strategy lora or bitfit")


def submodule(module: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    for part in path.split(".") if path else []:
        module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def slot_at(parent: torch.nn.Module, projection: torch.nn.Linear) -> AdapterSlot:
    """The parent's AdapterSlot, created (with the hook on its projection) on first use."""
    slot = getattr(parent, SLOT_NAME, None)
    if slot is None:
        slot = AdapterSlot()
        parent.add_module(SLOT_NAME, slot)
        projection.register_forward_hook(run_slot(slot))
    return slot


def head_paths(model) -> list[str]:
    """The task head's modules: the model's own children outside the base model that hold parameters
    (classifier, ModernBERT's prediction head, DistilBERT's pre_classifier), and the base model's pooler."""
    prefix = model.base_model_prefix
    paths = [name for name, child in model.named_children()
             if name != prefix and child is not model.base_model and any(True for _ in child.parameters())]
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None and any(True for _ in pooler.parameters()):
        paths.append(f"{prefix}.pooler")
    require(bool(paths), f"--finetune_strategy adapter: a {model.config.model_type} model has no classification head "
                         f"outside its base model; use --finetune_strategy lora")
    return paths


def switches(model) -> dict[str, HeadSwitch]:
    """path -> HeadSwitch, created on first use from the model's own head modules (kept as each switch's template,
    outside the module tree: a fresh head for a new task is a copy of it)."""
    found = {}
    for path in head_paths(model) if not any(isinstance(m, HeadSwitch) for m in model.modules()) else []:
        parent_path, _, name = path.rpartition(".")
        parent = submodule(model, parent_path)
        switch = HeadSwitch()
        switch.__dict__["template"] = getattr(parent, name)
        switch.__dict__["template_labels"] = model.config.num_labels
        setattr(parent, name, switch)
    for path, module in model.named_modules():
        if isinstance(module, HeadSwitch):
            found[path] = module
    return found


def fresh_head(switch: HeadSwitch, num_labels: int) -> torch.nn.Module:
    """A copy of the template head, its output Linear resized when the task has another number of labels (the
    values of a resized layer do not matter: it is a saved task's, loaded next, or a new one, trained)."""
    head = copy.deepcopy(switch.template)
    if num_labels == switch.template_labels:
        return head
    for name, module in head.named_modules():  # the head itself first ("")
        if isinstance(module, torch.nn.Linear) and module.out_features == switch.template_labels:
            resized = torch.nn.Linear(module.in_features, num_labels, bias=module.bias is not None,
                                      device=module.weight.device, dtype=module.weight.dtype)
            if not name:
                return resized
            parent_path, _, attribute = name.rpartition(".")
            setattr(submodule(head, parent_path), attribute, resized)
    return head


# ------------------------------------------------------------------------------------------ the public API
def adapter_settings(model) -> dict[str, AdapterSettings]:
    """The adapters a model holds, by name (in the order they were added)."""
    return model.__dict__.setdefault("bottleneck_adapter_settings", {})


def add_adapter(model, name: str, config: str = "houlsby", reduction_factor: int = 16,
                id2label: Optional[dict] = None) -> None:
    """Add a new, identity-initialised adapter and a fresh head for the labels `id2label` (default: the model's).
    The active adapter does not change; see `set_active_adapter`."""
    check_adapter_name(name)
    require(name not in adapter_settings(model), f"--adapter_name {name}: the model already holds an adapter of that "
                                                 f"name ({', '.join(adapter_settings(model))}); choose another name")
    require(config in ADAPTER_CONFIGS, f"--adapter_config {config}: choose one of {', '.join(ADAPTER_CONFIGS)}")
    hidden = model.config.hidden_size
    require(isinstance(reduction_factor, int) and 1 <= reduction_factor <= hidden,
            f"--adapter_reduction_factor {reduction_factor}: must be an integer from 1 to the model's hidden size "
            f"{hidden}")
    id2label = {int(i): str(label) for i, label in (id2label or model.config.id2label).items()}
    sites = adapter_sites(model)
    heads = switches(model)
    bottleneck = hidden // reduction_factor
    for parent, projection in sites if config == "houlsby" else sites[1::2]:  # pfeiffer: feed-forward outputs only
        slot_at(parent, projection)[name] = BottleneckAdapter(projection.out_features, bottleneck, config,
                                                             projection.weight)
    for switch in heads.values():
        switch[name] = fresh_head(switch, len(id2label))
    adapter_settings(model)[name] = AdapterSettings(config, reduction_factor, bottleneck, id2label)


def set_active_adapter(model, name: str) -> None:
    """Run task `name`: its adapters, its head and its label names (config.id2label, what pipelines report)."""
    settings = adapter_settings(model)
    require(name in settings, f"no adapter named {name!r} in the model (it holds: {', '.join(settings) or 'none'})")
    for module in model.modules():
        if isinstance(module, (AdapterSlot, HeadSwitch)):
            module.active = name
    id2label = settings[name].id2label
    model.config.id2label = dict(id2label)
    model.config.label2id = {label: i for i, label in id2label.items()}
    if hasattr(model, "num_labels"):  # the transformers heads read it for their own loss
        model.num_labels = len(id2label)


def active_adapter(model) -> Optional[str]:
    return next((m.active for m in model.modules() if isinstance(m, HeadSwitch)), None)


def train_only(model, name: str) -> None:
    """Freeze everything but adapter `name` and its head."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (AdapterSlot, HeadSwitch)) and name in module:
            module[name].requires_grad_(True)


def task_tensor_names(model, state_dict: dict) -> dict[str, list[str]]:
    """adapter name -> the state-dict names of its adapter and head weights (names relative to `model`)."""
    prefixes = {name: [] for name in adapter_settings(model)}
    for path, module in model.named_modules():
        if isinstance(module, (AdapterSlot, HeadSwitch)):
            for name in module:
                prefixes[name].append(f"{path}.{name}.")
    return {name: sorted(key for key in state_dict if key.startswith(tuple(starts)))
            for name, starts in prefixes.items()}


def base_fingerprint(model, state_dict: dict, dtype: Optional[torch.dtype] = None) -> tuple[str, str]:
    """(SHA-256 of the base model's parameters, their dtype name): every parameter outside the adapters and
    heads, by name, in `state_dict` (cast to `dtype` first when given, e.g. a bf16 DeepSpeed run's)."""
    task_names = {key for keys in task_tensor_names(model, state_dict).values() for key in keys}
    names = sorted(name for name, _ in model.named_parameters() if name not in task_names)
    digest = hashlib.sha256()
    dtypes = set()
    for name in names:
        tensor = state_dict[name].detach().cpu()
        tensor = tensor.to(dtype) if dtype is not None else tensor
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), ",".join(sorted(dtypes))


def save_adapters(model, directory: str, state_dict: Optional[dict] = None) -> None:
    """Write every task's adapter and head weights and the manifest into `directory` (not the base model)."""
    from safetensors.torch import save_file

    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {key: state_dict[key].detach().cpu().contiguous().clone()
               for keys in task_tensor_names(model, state_dict).values() for key in keys}
    fingerprint, dtype = base_fingerprint(model, state_dict)
    base = model.__dict__["bottleneck_adapter_base"]
    manifest = {"format": FORMAT, "base_model": base, "base_parameters_sha256": fingerprint, "base_dtype": dtype,
                "base_config": config_without_labels(model.config), "active_adapter": active_adapter(model),
                "adapters": {name: asdict(settings) for name, settings in adapter_settings(model).items()}}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle, indent=2)  # adapters in the order they were added


def config_without_labels(config) -> dict:
    settings = config.to_dict()
    for key in ("id2label", "label2id", "_name_or_path"):
        settings.pop(key, None)
    return settings


def read_manifest(directory: str) -> dict:
    try:
        with open(os.path.join(directory, ADAPTER_MANIFEST_FILE)) as handle:
            manifest = json.load(handle)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        require(manifest.get("format") == FORMAT, f"unknown format {manifest.get('format')!r}")
        for name, settings in manifest["adapters"].items():
            settings["id2label"] = {int(i): label for i, label in settings["id2label"].items()}
        require(manifest["active_adapter"] in manifest["adapters"], "its active adapter is not among its adapters")
        require(isinstance(manifest["base_model"], str) and manifest["base_config"]["model_type"] in CONFIG_MAPPING,
                "no base model, or a base model type this transformers version does not know")
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError) as error:
        raise UsageError(f"{directory}: {ADAPTER_MANIFEST_FILE} is unreadable ({str(error).splitlines()[0] or type(error).__name__}"
                         f"); give a directory written by --finetune_strategy adapter") from None


def load_base_with_adapters(directory: str, id2label: Optional[dict] = None, dtype="auto"):
    """The base model named in `directory`'s manifest, every saved adapter and head loaded into it and checked
    against the base's fingerprint; no adapter active yet. `id2label`: the labels of the model's own head, the
    template of new tasks' heads (default: those of the adapter trained last). `dtype`: --torch_dtype as
    models.loading.weights_dtype gives it; the base is loaded in the dtype its fingerprint was taken in, checked,
    and then cast (a fingerprint over rounded weights could not be checked)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    manifest = read_manifest(directory)
    saved = manifest["adapters"]
    base = manifest["base_model"]
    settings = dict(manifest["base_config"])
    config = CONFIG_MAPPING[settings.pop("model_type")].from_dict(settings)
    config.id2label = dict(id2label or saved[manifest["active_adapter"]]["id2label"])
    config.label2id = {label: i for i, label in config.id2label.items()}
    dtypes = manifest["base_dtype"].split(",")
    fingerprinted = getattr(torch, dtypes[0]) if len(dtypes) == 1 else None
    with quiet_transformers():
        model, _ = pretrained_model(AutoModelForSequenceClassification, base, f"the base model of {directory}",
                                    fingerprinted or dtype, config=config)
    model.__dict__["bottleneck_adapter_base"] = base
    for name, adapter in saved.items():
        add_adapter(model, name, adapter["config"], adapter["reduction_factor"], adapter["id2label"])
    load_adapter_weights(model, directory)
    fingerprint, _ = base_fingerprint(model, model.state_dict(), fingerprinted)
    require(fingerprint == manifest["base_parameters_sha256"],
            f"the base model {base} is not the one the adapters in {directory} were trained on (its parameters "
            f"changed since); restore that base model")
    return model if dtype == "auto" else model.to(dtype)


@contextlib.contextmanager
def quiet_transformers():
    """Without transformers' load report, which would call the heads newly initialised: they are, until the saved
    heads are loaded into them a moment later."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def load_adapter_weights(model, directory: str) -> None:
    """Load `directory`'s adapter and head weights into a model that holds the same adapters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(os.path.join(directory, ADAPTER_WEIGHTS_FILE))
    except (OSError, SafetensorError) as error:
        raise UsageError(f"{directory}/{ADAPTER_WEIGHTS_FILE} cannot be read ({str(error).splitlines()[0]}); give a "
                         f"directory written by --finetune_strategy adapter") from None
    expected = {key for keys in task_tensor_names(model, model.state_dict()).values() for key in keys}
    require(set(weights) == expected, f"{directory}/{ADAPTER_WEIGHTS_FILE} does not fit the model: missing "
                                      f"{sorted(expected - set(weights))[:3]}, unexpected "
                                      f"{sorted(set(weights) - expected)[:3]}")
    model.load_state_dict(weights, strict=False)


def load_adapter_model(directory: str, adapter_name: Optional[str] = None):
    """A transformers sequence classifier with the adapters saved in `directory` (by `trainer.classify
    --finetune_strategy adapter`), task `adapter_name` active (default: the one trained last), in eval mode.

    The base model is loaded from the path or Hub id the manifest names and checked against the fingerprint of the
    base the adapters were trained on. Use it as any transformers model:

        from transformers import AutoTokenizer, pipeline
        from trainer.finetune.adapters import load_adapter_model, set_active_adapter
        model = load_adapter_model("out/task-b", "task_a")
        classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("out/task-b"))
        set_active_adapter(model, "task_b")   # the same model, now task B (its head and labels)
    """
    require(is_adapter_directory(directory), f"{directory} holds no {ADAPTER_MANIFEST_FILE}; give a directory written by "
                                             f"trainer.classify --finetune_strategy adapter")
    model = load_base_with_adapters(directory)
    set_active_adapter(model, adapter_name or read_manifest(directory)["active_adapter"])
    return model.eval()


def loading_code(directory: str) -> str:
    """One line of Python that loads `directory`'s adapters into a pipeline (for the closing summary)."""
    path = os.path.abspath(directory)
    return (f"from transformers import AutoTokenizer, pipeline; from trainer.finetune.adapters import load_adapter_model; "
            f"pipe = pipeline('text-classification', model=load_adapter_model({path!r}), "
            f"tokenizer=AutoTokenizer.from_pretrained({path!r}))")


# -------------------------------------------------------------------------------------------- training
class AdapterModel(torch.nn.Module):
    """The model the engine trains: the transformers model (adapters inside), whose `save_pretrained` writes
    only the adapters and heads, and `load_saved_weights` reads them back (resuming from a checkpoint)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __getattr__(self, name: str):  # config, get_output_embeddings, ...: the transformers model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, **inputs):
        return self.model(**inputs)

    def save_pretrained(self, directory: str, state_dict: Optional[dict] = None) -> None:
        """`state_dict`: the gathered weights under DeepSpeed or FSDP (names start with "model.")."""
        if state_dict is not None:
            state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
        save_adapters(self.model, directory, state_dict)

    def load_saved_weights(self, directory: str) -> None:
        load_adapter_weights(self.model, directory)


def prepare_adapter_training(model, name: str, config: str, reduction_factor: int) -> AdapterModel:
    """Add adapter `name` (with a head for the model's labels), make it active and the only part that trains."""
    if "bottleneck_adapter_base" not in model.__dict__:  # a plain pretrained model: the base of every adapter
        path = model.name_or_path
        model.__dict__["bottleneck_adapter_base"] = os.path.abspath(path) if os.path.isdir(path) else path
    add_adapter(model, name, config, reduction_factor)
    set_active_adapter(model, name)
    train_only(model, name)
    return AdapterModel(model)
