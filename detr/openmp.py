"""CTranslate2 loaded before torch, when it is installed, so that it keeps its own OpenMP runtime.

Both wheels bring a GNU OpenMP runtime of their own. torch loads its copy into the process's
global symbol scope, and a CTranslate2 loaded after it binds its parallel regions to torch's copy
(`LD_DEBUG=bindings` shows it). One runtime then manages torch's thread team and CTranslate2's;
with more threads than cores GNU OpenMP stops spinning between parallel regions, and CTranslate2
decoded at about 0.6x its speed (RESULTS.md, issue 16). Loaded first, it binds to its own copy.

`detr/__init__.py` imports this module before anything that imports torch. A program that imports
torch before detr (or before ctranslate2) gets the slow binding: import detr first.
"""

import contextlib

with contextlib.suppress(ImportError):
    import ctranslate2  # noqa: F401
