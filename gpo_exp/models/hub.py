"""Load real models: a hub id or local HF directory (source=hub), or a GGUF file (source=gguf).

A GGUF-loaded model is quantizer-wrapped and cannot `save_pretrained`, and dequantizing it takes
seconds each time. So the first load converts it once into a plain HF directory (float32
safetensors + tokenizer) under the cache, keyed by the file's name, size and mtime; every later
load reads that directory like any local model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.models.config import ModelConfig
from gpo_exp.registry import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hub(cfg: ModelConfig, device: torch.device | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on `device`) and tokenizer for `cfg.source` hub or gguf. Sets pad = eos when
    pad is missing. A GPU `device` loads the weights straight onto it (no host copy of a 7B model)."""
    if cfg.source == "hub":
        path = _resolve_hub_path(cfg)
    elif cfg.source == "gguf":
        path = str(convert_gguf(cfg))
    else:
        raise ConfigError(f"bad config model.source={cfg.source!r}: load_hub handles hub or gguf")
    t0 = time.perf_counter()
    on_gpu = device is not None and device.type == "cuda"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], trust_remote_code=False,
                                                     **({"device_map": {"": str(device)}} if on_gpu else {}))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as e:  # a hub id the hub does not have (a typo, a gated or private repo)
        if cfg.source != "hub" or os.path.isdir(path):
            raise
        raise ConfigError(f"bad config model.path={cfg.path!r}: not a model the hub serves to you (a typo, or a "
                          f"gated/private repo): {str(e).splitlines()[0][:200]}") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(f"bad config model.path={cfg.path!r}: the model needs its own code (trust_remote_code); "
                          f"gpo-exp runs only architectures that transformers implements") from None
    _ensure_pad(model, tokenizer)
    log.info("loaded %s (%s, %s) from %s in %.1fs", cfg.name, cfg.source, cfg.dtype, path, time.perf_counter() - t0)
    return model.eval(), tokenizer


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (its imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"bad config model.package={package!r}: must be an installed python package")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(cfg: ModelConfig) -> Path:
    """The GGUF file: `cfg.gguf_file` inside `cfg.path`, which is taken relative to `cfg.package` if set."""
    base = package_dir(cfg.package) / (cfg.path or "") if cfg.package else Path(cfg.path or "")
    file = base / str(cfg.gguf_file)
    if not file.is_file():
        raise ConfigError(f"bad config model.gguf_file={cfg.gguf_file!r}: no such file in {base}")
    return file


def cache_root() -> Path:
    """gpo_exp's cache directory: $GPO_EXP_CACHE, else ~/.cache/gpo_exp."""
    return Path(os.environ.get("GPO_EXP_CACHE") or Path.home() / ".cache" / "gpo_exp")


def gguf_cache_dir(cfg: ModelConfig) -> Path:
    """Where the converted HF copy of the GGUF lives: <cache>/models/<name>-<hash of name, size, mtime>."""
    file = gguf_path(cfg)
    st = file.stat()
    key = hashlib.sha1(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{cfg.name}-{key}"


def convert_gguf(cfg: ModelConfig) -> Path:
    """Return the HF directory for `cfg`'s GGUF, converting it first if it is not cached yet."""
    out = gguf_cache_dir(cfg)
    if (out / "config.json").is_file():
        log.info("gguf %s: using cached conversion %s", cfg.gguf_file, out)
        return out
    t0 = time.perf_counter()
    file = gguf_path(cfg)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    plain = dequantized_copy(model)
    # Write to a temporary sibling and rename, so an interrupted conversion never looks cached.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("gguf %s: converted to %s in %.1fs", file, out, time.perf_counter() - t0)
    return out


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain (non-quantized) model of the same class with the GGUF model's dequantized weights."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the saved config claims gguf and reloading fails
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def _resolve_hub_path(cfg: ModelConfig) -> str:
    """Local directory or hub id to load; fail fast offline when a hub id is not in the HF cache."""
    path = str(package_dir(cfg.package) / (cfg.path or "")) if cfg.package else str(cfg.path)
    if os.path.isdir(path):
        return path
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if looks_local:
        raise ConfigError(f"bad config model.path={path!r}: no such directory")
    if _in_hf_cache(path):
        return path
    if _offline():
        raise ConfigError(f"bad config model.path={path!r}: hub id not in the local HF cache and HF_HUB_OFFLINE "
                          f"is set; download it first or pass a local directory (model.path=/path/to/model)")
    # Not cached and not declared offline: probe the hub once (seconds) rather than let transformers retry
    # an unreachable host for a minute, printing every attempt.
    from gpo_exp.benchmarks.hub import hub_offline_reason

    reason = hub_offline_reason()
    if reason:
        raise ConfigError(f"bad config model.path={path!r}: hub id not in the local HF cache and the hub cannot be "
                          f"reached ({reason}); download it where the hub is reachable, or pass a local directory")
    return path


def _offline() -> bool:
    """HF offline mode; the env var is read too because hf_constants is frozen at import time."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hf_constants.HF_HUB_OFFLINE or env.upper() in ("1", "ON", "YES", "TRUE")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def _ensure_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched generation needs a pad token; eos is the usual stand-in. Padding side is left to the caller."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
