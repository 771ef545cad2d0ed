"""Fetching public corpora with checksums (the real download code, for users; tests use a local copy)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from detr.atomic import atomic_path
from detr.errors import DataError

log = logging.getLogger(__name__)

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
# Upstream file name → (our name, SHA-256 of the decompressed text).
MULTI30K_FILES = {
    "train.en.gz": ("train.en", "f7cb7c7d411f6039a15de94de8c4d1709fada7b7474791598fd18451ec62427d"),
    "train.de.gz": ("train.de", "550c2612c7ae45ed46754e67c3011fde500b1bf88592a376e2ed6126903766f7"),
    "train.fr.gz": ("train.fr", "87fd0969fd5d58acc23d2b8d024261df5177e1120c65b54011ca634736dcd661"),
    "train.cs.gz": ("train.cs", "2be68b38c8d586ff4f54eb13cc6e1baaaa053695b3f070d3038303a47f2268da"),
    "val.en.gz": ("valid.en", "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
    "val.de.gz": ("valid.de", "c02c1d05fb89dba12b00503a2744b1105d45fef287501fd701b4fea5b1fca3e5"),
    "val.fr.gz": ("valid.fr", "3a61fe933a20608d6102b5d94dd0870ce8502d1cbec73511afff489ddab0c756"),
    "val.cs.gz": ("valid.cs", "d53827e469b0a1ca8d57e9e26b2b64c4bc4b33f5479c7b03ae87ae5c882c3e33"),
    "test_2016_flickr.en.gz": ("test2016.en", "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    "test_2016_flickr.de.gz": ("test2016.de", "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
    "test_2016_flickr.fr.gz": ("test2016.fr", "dd64ea1883b68f55c887118839b434edc68b1dae3be6064c3bd5ab38033ddc6b"),
    "test_2016_flickr.cs.gz": ("test2016.cs", "45adb85f688de8407fddcbe1b36dca15d12aab868149b337e2576f2d6d2ff8d8"),
}


def fetch_multi30k(dest: str | Path, base_url: str = MULTI30K_URL, langs: Iterable[str] = ("en", "de", "fr", "cs"),
                   progress: bool = False) -> list[Path]:
    """Download Multi30k task 1 (train/valid/test2016) and verify each file's checksum.

    Files are written atomically under `dest` as `{train,valid,test2016}.{lang}`; a file
    already there with the right checksum is not fetched again.

    Raises:
        DataError: a download fails or a checksum does not match (nothing partial is kept).
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{dest}: cannot create folder: {err.strerror}") from None
    written = []
    for upstream, (name, digest) in MULTI30K_FILES.items():
        if name.rsplit(".", 1)[1] not in langs:
            continue
        target = dest / name
        if target.is_file() and _sha256(target) == digest:
            written.append(target)
            continue
        url = f"{base_url.rstrip('/')}/{upstream}"
        log.info("fetching %s", url)
        with atomic_path(target) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                    shutil.copyfileobj(gzip.GzipFile(fileobj=response), out)
            except (OSError, EOFError) as err:
                raise DataError(f"{url}: download failed: {err}") from None
            got = _sha256(tmp)
            if got != digest:
                raise DataError(f"{url}: checksum mismatch for {name}: expected sha256 {digest}, got {got}")
        written.append(target)
    return written


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
