"""Export trained runs to other inference engines (`detr export`), and decode through them
(`detr translate --engine`, `detr serve --engine`). Each engine's module uses that engine's own
API; this subpackage uses detr's public API and predictors only."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from detr.errors import ConfigError
from detr.translator import Translator

ENGINES = ("torch", "ctranslate2")


def ctranslate2_module() -> ModuleType:
    """`detr.export.ctranslate2`, or one line saying which extra to install."""
    try:
        from detr.export import ctranslate2  # the export extra (the ctranslate2 package): needed only here
    except ImportError as err:
        raise ConfigError(f"CTranslate2 export needs the export extra ({err.name} is missing): "
                          f"pip install 'torch==2.13.0' -e '.[export]'") from None
    return ctranslate2


def use_engine(translator: Translator, run_dir: str | Path, engine: str, quantize: str,
               weights: str | Path | None = None, threads: int = 0) -> Translator:
    """`translator` (of the run in `run_dir`, with `weights` if given) set to search with `engine`:
    detr's own ("torch"; float32 or dynamic int8) or CTranslate2 on a conversion kept in the run
    directory (made once; again when the weights change).

    Raises:
        ConfigError: an unknown engine, a quantization it lacks, or a missing export extra.
    """
    if engine == "torch":
        return translator.quantize(quantize)
    if engine != "ctranslate2":
        raise ConfigError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if len(translator.models) > 1:
        raise ConfigError("an ensemble needs the torch engine (drop --engine)")
    ct2 = ctranslate2_module()
    translator.engine = ct2.CTranslate2Search(ct2.cached_export(run_dir, quantize, weights), translator.tokenizer,
                                              threads=threads)
    return translator
