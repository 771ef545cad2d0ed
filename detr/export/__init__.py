"""Export trained runs to other inference engines (`detr export`), and decode through them
(`detr translate --engine`, `detr serve --engine`). Each engine's module uses that engine's own
API; this subpackage uses detr's public API and predictors only."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from detr.errors import ConfigError
from detr.translator import Translator

ENGINES = ("torch", "ctranslate2", "onnxruntime")


def engine_module(name: str) -> ModuleType:
    """`detr.export.ctranslate2`, `.onnx` or `.huggingface`, or one line saying which extra to install."""
    try:
        return importlib.import_module(f"detr.export.{name}")  # the export extra's packages: needed only here
    except ImportError as err:
        raise ConfigError(f"{name} export needs the export extra ({err.name} is missing): "
                          f"pip install 'torch==2.13.0' -e '.[export]'") from None


def use_engine(translator: Translator, run_dir: str | Path, engine: str, quantize: str,
               weights: str | Path | None = None, threads: int = 0) -> Translator:
    """`translator` (of the run in `run_dir`, with `weights` if given) set to search with `engine`:
    detr's own ("torch"; float32 or int8), CTranslate2 on a conversion of the run, or detr's search
    over ONNX graphs of it run by ONNX Runtime ("onnxruntime"; float32). Conversions are kept in the
    run directory (made once; again when the weights change).

    Raises:
        ConfigError: an unknown engine, a quantization it lacks, or a missing export extra.
    """
    if engine == "torch":
        return translator.quantize(quantize)
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if len(translator.models) > 1:
        raise ConfigError("an ensemble needs the torch engine (drop --engine)")
    if engine == "onnxruntime":
        if quantize != "float32":
            raise ConfigError(f"--quantize {quantize}: the ONNX graphs are float32 (int8: --engine torch or "
                              f"ctranslate2)")
        onnx = engine_module("onnx")
        translator.engine = onnx.OnnxSearch(onnx.cached_export(run_dir, weights), threads=threads)
        return translator
    ct2 = engine_module("ctranslate2")
    translator.engine = ct2.CTranslate2Search(ct2.cached_export(run_dir, quantize, weights), translator.tokenizer,
                                              threads=threads)
    return translator
