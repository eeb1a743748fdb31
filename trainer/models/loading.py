"""Tokenizers and models: from a local directory, the Hub, or from scratch."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil

from trainer.errors import UsageError, require
from trainer.hub.reachability import check_loadable
from trainer.layout import ADAPTER_MANIFEST_FILE
from trainer.tracking.console import logger

# Architectures whose position ids start after the padding index, leaving fewer usable positions.
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}

# Set by `shapes_only`: `load_model` builds on the meta device (shapes and dtypes, no weights).
_shapes_only = False


def cache_dir(*parts: str) -> str:
    root = os.environ.get("TRAINER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trainer"))
    return os.path.join(root, *parts)


@contextlib.contextmanager
def loading(flag: str, name: str, what: str):
    """transformers' errors for a directory (or Hub repository) without what it should hold, as a UsageError:
    OSError for missing files, ValueError for an unrecognised or unreadable config or tokenizer."""
    try:
        yield
    except (OSError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{flag} {name}: not a {what} that transformers can load ({detail}); give a directory "
                         f"written by save_pretrained, or a Hub id") from None


def is_adapter_directory(path: str | None) -> bool:
    """Whether `path` holds bottleneck adapters (trainer.classify's adapter strategy) rather than a whole model."""
    return bool(path) and os.path.isfile(os.path.join(path, ADAPTER_MANIFEST_FILE))


def load_tokenizer(model_args, training_texts, train_new=None):
    """The named tokenizer, the model's, or one trained on `training_texts()` and cached: by
    `train_new(corpus_files, vocab_size, output_dir)` (default: an uncased WordPiece tokenizer)."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
        check_loadable(name, "tokenizer", flag, cached_file="tokenizer_config.json")
        with loading(flag, name, "tokenizer"):
            return AutoTokenizer.from_pretrained(name)
    from trainer.data.demo import train_wordpiece_tokenizer

    return train_tokenizer(training_texts(), model_args.tokenizer_vocab_size, train_new or train_wordpiece_tokenizer)


def train_tokenizer(texts: list[str], vocab_size: int, train_new):
    from transformers import AutoTokenizer

    kind = train_new.__name__.removeprefix("train_").removesuffix("_tokenizer")
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    directory = cache_dir("tokenizers", f"{kind}-{vocab_size}-{digest.hexdigest()[:16]}")
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        logger.info("training a %s tokenizer (vocabulary %d) on the training text", kind, vocab_size)
        scratch = f"{directory}.tmp-{os.getpid()}"
        os.makedirs(scratch, exist_ok=True)
        corpus = os.path.join(scratch, "corpus.txt")
        with open(corpus, "w") as handle:
            handle.write("\n".join(texts))
        train_new([corpus], vocab_size=vocab_size, output_dir=scratch)
        os.remove(corpus)
        if os.path.exists(directory):  # another process cached the same tokenizer meanwhile
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, directory)
    return AutoTokenizer.from_pretrained(directory)


@contextlib.contextmanager
def shapes_only(enabled: bool = True):
    """While enabled, `load_model` builds its model on the meta device, the checkpoint's or the new one alike: the
    same modules, shapes and dtypes, no weights, nothing read and no random draws. For the processes whose values
    another process sends them afterwards (trainer.distributed.construction)."""
    global _shapes_only
    before, _shapes_only = _shapes_only, enabled
    try:
        yield
    finally:
        _shapes_only = before


def load_model(model_args, auto_class, tokenizer, preset=None, decoder: bool = False, **config_kwargs):
    """`auto_class` (e.g. AutoModelForMaskedLM) from a checkpoint, or a new model from a config, a --model_type or
    `preset(vocab_size)` (default: a tiny BERT). `decoder`: a causal LM, so architectures that attend both ways
    unless their config says `is_decoder` (BERT, RoBERTa, ...) get it. Inside `shapes_only`, on the meta device."""
    import torch

    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        # trainer.classify loads a directory of bottleneck adapters itself (finetune.adapters.load_base_with_adapters)
        require(not is_adapter_directory(model_args.model_name_or_path),
                f"--model_name_or_path {model_args.model_name_or_path} holds bottleneck adapters for sequence "
                f"classification; use it with trainer.classify, or give a whole model")
        if _shapes_only:  # from_pretrained refuses the meta device: the checkpoint's config, built empty
            return checkpoint_shapes(model_args, auto_class, decoder, **attention, **config_kwargs)
        model, loading_info = pretrained_model(auto_class, model_args.model_name_or_path, "--model_name_or_path",
                                               weights_dtype(model_args, from_checkpoint=True), decoder,
                                               **attention, **config_kwargs)
        log_loading_report(loading_info)
        model_args.check_weights_dtype(str(model.dtype).removeprefix("torch."),
                                       f"--torch_dtype auto on {model_args.model_name_or_path} ({model.dtype})")
        return model
    config = scratch_config(model_args, auto_class, len(tokenizer), preset, decoder, config_kwargs)
    config.pad_token_id = tokenizer.pad_token_id
    for name in ("bos", "eos", "cls", "sep"):  # ModernBERT's defaults are ids of its own 50k vocabulary
        if getattr(config, f"{name}_token_id", None) is not None:
            setattr(config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    logger.info("training a new %s model from scratch", config.model_type)
    with torch.device("meta") if _shapes_only else contextlib.nullcontext():
        return auto_class.from_config(config, dtype=weights_dtype(model_args, from_checkpoint=False), **attention)


def load_model_config(model_args, preset=None):
    """The model's config alone, without weights: the checkpoint's, or the one `load_model` gives a new model."""
    from transformers import AutoConfig

    if not model_args.model_name_or_path:
        return new_model_config(model_args, AutoConfig, preset)
    check_loadable(model_args.model_name_or_path, "model", "--model_name_or_path")
    with loading("--model_name_or_path", model_args.model_name_or_path, "model"):
        return AutoConfig.from_pretrained(model_args.model_name_or_path)


def pretrained_model(auto_class, path: str, flag: str, dtype, decoder: bool = False, **kwargs):
    """(`auto_class.from_pretrained(path)` in `dtype` (weights_dtype's answer), its loading info): every model the
    jobs load from a checkpoint, checked as loadable first and with load errors naming `flag`."""
    from transformers import AutoConfig

    check_loadable(path, "model", flag)
    with loading(flag, path, "model"):
        if decoder:
            kwargs.update(decoder_switch(AutoConfig.from_pretrained(path)))
        return auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)


def scratch_config(model_args, auto_class, tokenizer_size: int, preset=None, decoder: bool = False,
                   config_kwargs: dict | None = None):
    """The config of a model trained from scratch (see `load_model`), for a tokenizer of `tokenizer_size` tokens."""
    from transformers import AutoConfig

    config = new_model_config(model_args, AutoConfig, preset)
    # from_config would raise a ValueError listing every architecture that has this job's head.
    source = (f"--config_name {model_args.config_name}" if model_args.config_name
              else f"--model_type {model_args.model_type}")
    require(type(config) in auto_class._model_mapping, f"{source}: transformers has no {auto_class.__name__} for "
                                                       f"a {config.model_type} model; choose an architecture that "
                                                       f"has one")
    # New models get a vocabulary padded to a multiple of 64: faster matrix products, same tokenizer.
    config.vocab_size = 64 * math.ceil(tokenizer_size / 64)
    for key, value in {**(config_kwargs or {}), **(decoder_switch(config) if decoder else {})}.items():
        setattr(config, key, value)
    return config


def planned_tokenizer_size(model_args) -> int:
    """The tokenizer's length for a model from scratch, without training one: the named tokenizer's, else the
    vocabulary a tokenizer trained on the text aims at (--tokenizer_vocab_size, an upper bound)."""
    if not model_args.tokenizer_name:
        return model_args.tokenizer_vocab_size
    return len(load_tokenizer(model_args, training_texts=None))


def meta_model(model_args, auto_class, tokenizer_size: int, preset=None, decoder: bool = False):
    """The model `load_model` would build, on the meta device: its shapes and dtypes without any weights (a 70B
    config costs seconds and no memory). `tokenizer_size`: the tokenizer's length, for a model from scratch."""
    import torch

    if model_args.model_name_or_path:
        return checkpoint_shapes(model_args, auto_class, decoder)
    config = scratch_config(model_args, auto_class, tokenizer_size, preset, decoder)
    for name in ("pad", "bos", "eos", "cls", "sep"):  # defaults of a bigger vocabulary (ModernBERT's): no shape
        if (getattr(config, f"{name}_token_id", None) or 0) >= config.vocab_size:
            setattr(config, f"{name}_token_id", 0)
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=weights_dtype(model_args, from_checkpoint=False))


def checkpoint_shapes(model_args, auto_class, decoder: bool = False, attn_implementation=None, **config_kwargs):
    """--model_name_or_path's model as `load_model` would load it, on the meta device: built from its config (with
    `config_kwargs`, e.g. a classification head's labels) in the dtype from_pretrained gives it."""
    import torch
    from transformers import AutoConfig

    check_loadable(model_args.model_name_or_path, "model", "--model_name_or_path")
    with loading("--model_name_or_path", model_args.model_name_or_path, "model"):
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    for key, value in (decoder_switch(config) if decoder else {}).items():
        setattr(config, key, value)
    dtype = weights_dtype(model_args, from_checkpoint=True)
    dtype = (getattr(config, "dtype", None) or torch.float32) if dtype == "auto" else dtype
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=dtype, **attention)


def weights_dtype(model_args, from_checkpoint: bool):
    """--torch_dtype as from_pretrained/from_config take it: unset is float32, auto is the checkpoint's own."""
    import torch

    name = model_args.torch_dtype or "float32"
    if name == "auto":
        return "auto" if from_checkpoint else torch.float32
    return getattr(torch, name)


def decoder_switch(config) -> dict:
    """{"is_decoder": True} for a config that has the switch and has it off: without it such a model (e.g. BERT
    loaded as AutoModelForCausalLM) sees the tokens it is asked to predict, and its "perplexity" means nothing."""
    if getattr(config, "is_decoder", True):
        return {}
    logger.info("%s attends both ways unless is_decoder is set: set, so that it attends causally",
                config.model_type)
    return {"is_decoder": True}


def log_loading_report(loading_info: dict) -> None:
    """Say which weights are new (e.g. a classification head on an MLM checkpoint) and which were dropped.

    transformers reports this at WARNING level through its own logger, which we silence; at INFO in our log it
    is the expected outcome of switching heads rather than a problem.
    """
    for key, meaning in (("missing_keys", "newly initialised (not in the checkpoint)"),
                         ("unexpected_keys", "in the checkpoint but unused by this model")):
        names = sorted(loading_info.get(key) or [])
        if names:
            logger.info("weights %s: %s", meaning, ", ".join(names))


def new_model_config(model_args, auto_config, preset=None):
    from trainer.data.demo import tiny_bert_config

    if model_args.config_name:
        check_loadable(model_args.config_name, "config", "--config_name")
        with loading("--config_name", model_args.config_name, "model config"):
            config = auto_config.from_pretrained(model_args.config_name)
    elif model_args.model_type:
        try:
            config = auto_config.for_model(model_args.model_type)
        except ValueError:
            raise UsageError(f"--model_type {model_args.model_type} is not a transformers architecture") from None
    else:
        config = (preset or tiny_bert_config)(vocab_size=8000)
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)
        except (ValueError, TypeError) as error:  # TypeError: a key whose default is None (e.g. GPT-2's n_inner)
            raise UsageError(f"--config_overrides: {error}") from None
        config = with_layer_types_rederived(config)
    return config


def with_layer_types_rederived(config):
    """`update_from_string` sets attributes only; a config that lists one attention type per layer (ModernBERT's
    `layer_types`, 22 by default) keeps the old list when num_hidden_layers changes, and then fails to load
    ("num_hidden_layers must be equal to the number of layer_types"). Rebuilt without the list, it is derived again."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or len(layer_types) == config.num_hidden_layers:
        return config
    settings = config.to_dict()
    settings.pop("layer_types")
    return type(config).from_dict(settings)


def max_positions(config) -> int | None:
    """Positions a sequence may use; None for architectures without a limit (e.g. Mamba, RWKV)."""
    limit = getattr(config, "max_position_embeddings", None)
    return None if limit is None else limit - POSITION_OFFSET.get(config.model_type, 0)


def check_sequence_length(max_seq_length: int, config, flag: str = "--max_seq_length") -> None:
    limit = max_positions(config)
    require(limit is None or max_seq_length <= limit, f"{flag} {max_seq_length} exceeds the model's {limit} positions; "
                                     f"use {flag} {limit} or less")
