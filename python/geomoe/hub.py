"""Weights by name from the Hugging Face Hub: `hf:OWNER/REPO/PATH[@REVISION]`.

Every weights argument (`--weights`, `--init-weights`, `load_original_state_dict`'s source) takes
such a name besides a local path. The file is fetched with `huggingface_hub.hf_hub_download` into
its cache (HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default), or taken from the cache
alone under HF_HUB_OFFLINE=1 (TRANSFORMERS_OFFLINE=1 likewise). The revision is a branch, a tag or
a commit (default `main`); PATH may hold folders; everything after the last `@` is the revision.

Integrity: the cache keeps each file as `blobs/<etag>`, the etag the Hub recorded for it: the
sha256 of the contents for a file in Git LFS (weights are), the git blob sha1 otherwise. The file
read is hashed and compared with it before it is loaded, so a truncated or corrupted cache file is
an error naming the argument and the file, not a failure deep inside torch.load or safetensors. A
cache that holds a copy instead of a link to its blob (no symlinks on this file system) keeps no
hash: it is checked against the Hub's record when online, else read with a warning.

huggingface_hub is imported only when such a name is given."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import NamedTuple, Optional

PREFIX = "hf:"
SYNTAX = "hf:OWNER/REPO/PATH or hf:OWNER/REPO/PATH@REVISION"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a Hub owner or repository name
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


class HubName(NamedTuple):
    repo_id: str  # OWNER/REPO
    filename: str  # PATH inside the repository
    revision: Optional[str]  # None: the default branch

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")


def is_hub_name(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(name: str, flag: str) -> HubName:
    """`hf:OWNER/REPO/PATH[@REVISION]` -> HubName; a ValueError naming `flag` otherwise."""

    def bad(why: str) -> ValueError:
        return ValueError(f"argument '{flag}' expected {SYNTAX}, got {name!r}: {why}")

    rest = name[len(PREFIX) :]
    if rest.startswith("/"):
        raise bad("no '//' after 'hf:'")
    revision: Optional[str] = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise bad("an empty revision after '@'")
    parts = rest.split("/")
    if len(parts) < 3:
        raise bad("OWNER, REPO and the file's PATH in the repository, separated by '/'")
    owner, repo, path = parts[0], parts[1], parts[2:]
    for what, text in (("OWNER", owner), ("REPO", repo)):
        if not _NAME.fullmatch(text) or ".." in text:
            raise bad(f"{what} {text!r} is not a Hub name (letters, digits, '.', '_', '-')")
    if any(p in ("", ".", "..") for p in path):
        raise bad("PATH has an empty, '.' or '..' part")
    return HubName(f"{owner}/{repo}", "/".join(path), revision)


def _truthy(value: Optional[str]) -> bool:  # as huggingface_hub reads its switches
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now, not when huggingface_hub was imported."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> Optional[str]:
    """The Hub cache the environment names now (None: huggingface_hub's default)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _default_cache() -> str:
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except ImportError:
        return "huggingface_hub's cache"


def _hash(path: str, algorithm: str) -> str:
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1()
    if algorithm == "git-sha1":  # a git blob's id: sha1 over "blob <size>\0" and the contents
        h.update(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _recorded_hash(local: str, name: HubName) -> Optional[str]:
    """The Hub's hash of the file at `local`: the cache blob's name (its etag), or, for a cache
    without links, the Hub's record when online. None: none known."""
    real = os.path.realpath(local)
    blob = os.path.basename(real)
    if os.path.basename(os.path.dirname(real)) == "blobs" and (_SHA256.fullmatch(blob) or _SHA1.fullmatch(blob)):
        return blob
    if offline():
        return None
    parts = os.path.normpath(local).split(os.sep)
    at = max((i for i, p in enumerate(parts[:-1]) if p == "snapshots"), default=None)  # .../snapshots/<commit>/PATH
    commit = parts[at + 1] if at is not None else name.revision
    try:
        from huggingface_hub import HfApi

        (info,) = HfApi().get_paths_info(name.repo_id, [name.filename], revision=commit)
        lfs = getattr(info, "lfs", None)
        return lfs.sha256 if lfs is not None else info.blob_id
    except Exception:  # the check is extra: a failure to ask leaves the file unverified
        return None


def verify(local: str, name: HubName, flag: str) -> Optional[str]:
    """Hash the cached file and compare it with the Hub's record; raises a ValueError naming `flag`
    on a mismatch. Returns the algorithm checked (None: no record, warned)."""
    expected = _recorded_hash(local, name)
    if expected is None:
        warnings.warn(f"{flag} {name}: {local} not verified: the cache keeps no hash for it (a copy, not a link to a blob)")
        return None
    algorithm = "sha256" if _SHA256.fullmatch(expected) else "git-sha1"
    got = _hash(local, algorithm)
    if got != expected:
        raise ValueError(
            f"argument '{flag}' expected {name} with {algorithm} {expected} (the Hub's record), got {got} from the "
            f"cached file {os.path.realpath(local)} ({os.path.getsize(local)} bytes): it is corrupt or truncated; "
            f"delete it and fetch it again (without HF_HUB_OFFLINE)"
        )
    return algorithm


def resolve(source: str, flag: str) -> str:
    """The local file of weights name `source` (`hf:OWNER/REPO/PATH[@REVISION]`), fetched into the
    Hub cache (from the cache alone under HF_HUB_OFFLINE=1) and checked against the Hub's hash.
    Every error is a ValueError naming `flag`, what was expected and what came."""
    name = parse(source, flag)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:
        raise ValueError(
            f"argument '{flag}' expected huggingface_hub installed to fetch {name}, got {type(exc).__name__}: {exc} "
            "(pip install huggingface_hub)"
        ) from exc
    where = cache_dir()
    is_offline = offline()
    at = f" at revision {name.revision!r}" if name.revision else ""
    # a geomoe checkpoint directory pushed to the Hub: its weights are one file in it
    hint = (
        ""
        if "." in name.filename.rsplit("/", 1)[-1]
        else f" (a checkpoint directory? name its file: {name.filename}/model.safetensors)"
    )
    try:
        local = hf_hub_download(name.repo_id, name.filename, revision=name.revision, cache_dir=where, local_files_only=is_offline)
    except hf_errors.LocalEntryNotFoundError as exc:  # before EntryNotFoundError: it is one
        cache = where or _default_cache()
        how = "HF_HUB_OFFLINE is set: the cache alone is read" if is_offline else "the Hub could not be reached"
        raise ValueError(
            f"argument '{flag}' expected {name} in the Hugging Face cache {cache} ({how}), got no cached copy of "
            f"{name.filename} in {name.repo_id}{at}; fetch it once online (e.g. `hf download {name.repo_id} "
            f"{name.filename}" + (f" --revision {name.revision}" if name.revision else "") + f"`){hint}"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise ValueError(
            f"argument '{flag}' expected a revision of {name.repo_id}, got {name.revision!r}: not found on the Hub"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:  # GatedRepoError too
        raise ValueError(
            f"argument '{flag}' expected a Hub model repository, got {name.repo_id!r}: not found, or private or gated "
            f"(log in with `hf auth login` or set HF_TOKEN) ({type(exc).__name__})"
        ) from exc
    except hf_errors.EntryNotFoundError as exc:
        raise ValueError(
            f"argument '{flag}' expected a file of {name.repo_id}{at}, got {name.filename!r}: not in the repository{hint}"
        ) from exc
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise ValueError(f"argument '{flag}' expected {name} fetched from the Hub, got {type(exc).__name__}: {exc}") from exc
    verify(local, name, flag)
    return local
