"""On-disk cache of frozen image-encoder outputs.

Most methods never change the image encoder, so its outputs are computed once and reused across
epochs, shots, seeds and methods. An entry is one safetensors file per (feature key, image):

    <root>/<key[:16]>/<image_sha[:2]>/<image_sha>.safetensors

The *feature key* hashes everything that changes the features: backbone name, weights identity
(tag, checkpoint content hash, or random seed), input size, normalisation, MLP activation, layers
(except for raw tokens, see below), image variant, the encoder variant (``feature_kinds``: raw
tokens, AnomalyCLIP's DPAM path, WinCLIP's windows) with its parameters,
and the versions of usad_bench, open_clip and torch. The *image sha* hashes the image file's bytes,
so an edited image is a new entry even under the same path.

Raw block tokens are stored one tensor per block (``cls``, ``layer_3``, ``layer_6``, ...) under a key
without layers, so one encoder pass serves every raw request of an image: a later request for a
subset of the stored blocks (the last block, the CLS only) is a hit, and a miss computes the union of
the blocks asked of this backbone so far (``layer_plan``), so the next method's request is a hit too.

Each file carries its key, image sha and a digest of each tensor in the safetensors metadata, and
only the tensors a request needs are read and checked. An entry that cannot be read, belongs to
another key, or fails a digest is reported, deleted and recomputed; it is never used.
Writes go through a temporary file and ``os.replace``, so a killed run leaves either a whole entry or
none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import usad_bench
from usad_bench.io import atomic_path

log = logging.getLogger(__name__)

# Enters every key. "2": images.py decodes 16-bit, palette and alpha images anew; older entries must not be served.
# "3": raw entries hold one tensor per block under a key without layers; digests are per tensor.
FORMAT = "3"


def feature_key(backbone_description: dict, layers: tuple[int, ...], variant: str, kind: dict | None = None) -> str:
    """A hex digest naming one feature configuration (see module docstring).

    ``kind`` is the encoder variant and its parameters (``FeatureRequest.key_fields``); plain raw tokens
    pass none, so their keys do not depend on the variants that exist.
    """
    payload = {
        "backbone": backbone_description,
        "layers": list(layers),
        "variant": variant,
        "usad_bench": usad_bench.__version__,
        "format": FORMAT,
    }
    if kind:
        payload["kind"] = kind
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime) within a process."""
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _DIGESTS:
        _DIGESTS[memo_key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[memo_key]


_DIGESTS: dict[tuple, str] = {}


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class FeatureCache:
    """Read and write cache entries; ``root=None`` disables the cache (``--no-cache``)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # corrupt or foreign entries that were deleted and recomputed

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, key: str, image_sha: str) -> Path:
        assert self.root is not None
        return self.root / key[:16] / image_sha[:2] / f"{image_sha}.safetensors"

    def load(self, key: str, image_sha: str, names: Collection[str] | None = None) -> dict[str, torch.Tensor] | None:
        """The cached tensors (only ``names`` when given), or None on a miss.

        An entry that lacks one of ``names`` is a miss but stays (a larger entry will replace it); an
        invalid entry is removed.
        """
        if self.root is None:
            self.misses += 1
            return None
        path = self.path(key, image_sha)
        if not path.is_file():
            self.misses += 1
            return None
        tensors = self._read_valid(path, key, image_sha, names)
        if tensors is None or (names is not None and not set(names) <= set(tensors)):
            self.misses += 1
            if tensors is None:
                self.rejected += 1
                path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return tensors

    def stored_names(self, key: str, image_sha: str) -> set[str]:
        """Names of the tensors an entry holds (its header only); empty when there is none or it is unreadable."""
        if self.root is None:
            return set()
        try:
            with safe_open(str(self.path(key, image_sha)), framework="pt") as f:
                return set(f.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return set()

    def layer_plan(self, plan_key: str) -> set[int]:
        """Raw blocks requested of one backbone so far (see module docstring); empty without a cache."""
        if self.root is None:
            return set()
        try:
            return {int(i) for i in json.loads(self._plan_path(plan_key).read_text())["layers"]}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def add_to_layer_plan(self, plan_key: str, layers: Collection[int]) -> None:
        # Read-modify-write without a lock: two processes racing can drop one's layers, which costs one
        # extra encoder pass later, never a wrong feature (entries are checked for the blocks they hold).
        planned = self.layer_plan(plan_key)
        if self.root is None or set(layers) <= planned:
            return
        merged = sorted(planned | set(layers))
        with atomic_path(self._plan_path(plan_key)) as tmp:
            tmp.write_text(json.dumps({"layers": merged}))

    def _plan_path(self, plan_key: str) -> Path:
        assert self.root is not None
        return self.root / "layer_plans" / f"{plan_key[:16]}.json"

    def store(self, key: str, image_sha: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        digests = {name: tensor_digest(t) for name, t in tensors.items()}
        meta = {"key": key, "image_sha": image_sha, "digests": json.dumps(digests), "format": FORMAT}
        with atomic_path(self.path(key, image_sha)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def _read_valid(self, path: Path, key: str, image_sha: str, names=None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (those of ``names`` it holds, when given), each checked against its digest."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                wanted = [n for n in f.keys() if names is None or n in names]  # noqa: SIM118 (not a dict)
                tensors = {name: f.get_tensor(name) for name in wanted}
            digests = json.loads(meta.get("digests", "{}"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            log.warning("feature cache: unreadable entry %s (%s); recomputing", path, exc)
            return None
        if meta.get("key") != key or meta.get("image_sha") != image_sha:
            log.warning("feature cache: entry %s belongs to another key; recomputing", path)
            return None
        if any(digests.get(name) != tensor_digest(t) for name, t in tensors.items()):
            log.warning("feature cache: entry %s failed its checksum; recomputing", path)
            return None
        return tensors

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "rejected": self.rejected}
