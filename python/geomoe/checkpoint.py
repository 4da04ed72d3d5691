"""Training checkpoints, one directory per step:

    ckpt_00000100/model.safetensors   the weights (and buffers: expert biases), readable anywhere
    ckpt_00000100/train_state.pt      grad scaler, step, data position, RNG states, config, run identity
    ckpt_00000100/dcp/                the training state for resuming: model and optimizer, written by
                                      every rank with torch.distributed.checkpoint (each tensor once,
                                      sharded or not), so a run saved on W processes resumes on any W'

Checkpoints written before the DCP state (format 1) hold the optimizer in train_state.pt (one
process, DDP) or in optimizer_rank<r>.pt files (FSDP, expert parallelism); they still resume, the
per-rank files only with the world size that wrote them. Expert-parallel runs write their experts
into dcp/ as DTensor shards of the global tensors (parallel.py), so they reshard like the rest.

A checkpoint is written into a temporary directory, each file fsynced, then renamed into place (an
atomic step on POSIX): a crash or kill -9 mid-save leaves at most a `.tmp` directory that is never
read, and the previous checkpoint stands. Saving a step that already exists sets the old one aside
first (`.ckpt_<step>.old`), and `recover` puts it back if the process died before the new one was in
place. `--resume auto` takes the newest one that reads; a truncated or corrupt one gets a warning
naming it and why, and the one before is used.

Every checkpoint is sealed before it is committed: the size and CRC-32 of each of its files, over
the bytes as written, go into `checksums.json`, written last (with --async-save by the main rank's
writer once every rank's part is on disk). A resume checks them first: a file whose contents
changed since the save (same size or not) makes the checkpoint unusable, named with the file;
checkpoints written before checksums were kept resume with a warning ("no checksum recorded").
A `.tmp` directory that is sealed and verifies is a save that finished writing but was not yet
moved into place (kill -9 between the two): `recover` commits it; an unsealed one never finished
and is removed by `prune`.

Each checkpoint records the identity of the run that wrote it (`train_state.pt`: "run"). `prune`
removes only that run's own older checkpoints, and only once `keep_last` newer ones of it have been
verified to read: never another run's, never one it cannot read, never the newest that reads."""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shutil
import time
import warnings
import zlib
from typing import Any, Dict, List, Optional

import torch

_NAME = re.compile(r"ckpt_(\d+)$")
_OLD = re.compile(r"\.ckpt_(\d+)\.old$")
_TMP = re.compile(r"\.ckpt_(\d+)\.tmp$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
DCP_DIR = "dcp"
CHECKSUM_FILE = "checksums.json"  # {"algorithm": "crc32", "files": {relative path: {"size", "crc32"}}}
NO_CHECKSUM = "no checksum recorded"
FORMAT = 2  # train_state.pt "format": 2 = model and optimizer state in dcp/ (absent: format 1)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt_{step:08d}")


def temp_path(directory: str, step: int) -> str:
    return os.path.join(directory, f".ckpt_{step:08d}.tmp")


def old_path(directory: str, step: int) -> str:
    return os.path.join(directory, f".ckpt_{step:08d}.old")


def begin(directory: str, step: int) -> str:
    """A fresh temporary directory for checkpoint `step` (one writer creates it)."""
    tmp = temp_path(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_model(tmp: str, model_state: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(weights, os.path.join(tmp, MODEL_FILE))
    _fsync_file(os.path.join(tmp, MODEL_FILE))


def write_state(tmp: str, obj: Any, name: str = STATE_FILE) -> None:
    slow = float(os.environ.get("GEOMOE_FAULT_SLOW_SAVE", "0"))  # fault-injection tests: a window to kill in
    if slow:
        time.sleep(slow)
    with open(os.path.join(tmp, name), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fault_pause(name: str) -> None:
    """Fault-injection tests: GEOMOE_FAULT_<name>=SECONDS opens a window to kill the process in."""
    from .envvars import env_number

    slow = env_number(f"GEOMOE_FAULT_{name}", "0", float, 0)
    if slow:
        time.sleep(slow)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(path: str) -> List[str]:
    """The files of checkpoint directory `path`, relative ('/'-separated), the checksum file excepted."""
    found = []
    for d, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(d, name), path).replace(os.sep, "/")
            if not rel.startswith(CHECKSUM_FILE):
                found.append(rel)
    return sorted(found)


def is_sealed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CHECKSUM_FILE))


def seal(tmp: str) -> None:
    """After every file of checkpoint `tmp` is written (by every rank): record each file's size and
    CRC-32 over the bytes as written in checksums.json, fsynced; the last file a save writes."""
    files = {}
    for rel in _files(tmp):
        full = os.path.join(tmp, rel)
        files[rel] = {"size": os.path.getsize(full), "crc32": f"{_crc32(full):08x}"}
    part = os.path.join(tmp, CHECKSUM_FILE + ".part")
    with open(part, "w") as f:
        json.dump({"algorithm": "crc32", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(tmp, CHECKSUM_FILE))


def verify_checksums(path: str) -> str:
    """Each file recorded in checkpoint `path`'s checksums.json against its size and CRC-32 now;
    raises naming the first file that differs or is missing. Returns what was checked, or
    NO_CHECKSUM for a checkpoint written before checksums were kept."""
    if not is_sealed(path):
        return NO_CHECKSUM
    try:
        with open(os.path.join(path, CHECKSUM_FILE)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{CHECKSUM_FILE} cannot be read ({type(exc).__name__}: {exc})") from exc
    for rel, rec in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise RuntimeError(f"{full} is missing (recorded in {CHECKSUM_FILE} at the save)")
        size = os.path.getsize(full)
        if size != int(rec["size"]):
            cut = " (truncated)" if size < int(rec["size"]) else ""
            raise RuntimeError(f"{full} is {size} bytes, {rec['size']} when it was written{cut}")
        crc = f"{_crc32(full):08x}"
        if crc != rec["crc32"]:
            raise RuntimeError(
                f"{full} has CRC-32 {crc}, {rec['crc32']} when it was written: its contents changed after the save "
                f"(checksum mismatch)"
            )
    return f"{len(files)} files' checksums verified"


def _set_aside(path: str, why: str) -> str:
    """Rename a checkpoint this run cannot vouch for out of the `ckpt_<step>` pattern (it is then
    never read, replaced or pruned) and say so; the name it now has."""
    dest, n = f"{path}.set-aside", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.set-aside-{n}"
    os.replace(path, dest)
    warnings.warn(f"checkpoint {path} {why}: kept, renamed to {os.path.basename(dest)}, not deleted")
    return dest


def commit(directory: str, step: int, run_id: Optional[str] = None) -> str:
    """Move the finished temporary directory into place: the checkpoint exists from this instant.

    Saving a step that exists already (a resumed run that ends where it began, or one that passes
    a corrupt newest checkpoint) never leaves the step without a readable checkpoint: the old one
    is renamed aside to `.ckpt_<step>.old` first, the new one renamed in, and only then the old one
    removed; `recover` restores the old one if the process dies in between. An existing checkpoint
    that is not verifiably this run's (another run's, or unreadable) is kept under another name."""
    tmp, final, old = temp_path(directory, step), checkpoint_path(directory, step), old_path(directory, step)
    if not is_sealed(tmp):  # an --async-save writer seals its checkpoint itself, in the background
        seal(tmp)
    if os.path.isdir(os.path.join(tmp, DCP_DIR)):
        _fsync_dir(os.path.join(tmp, DCP_DIR))
    _fsync_dir(tmp)
    if os.path.exists(final):
        if run_id is not None and _run_id_of(final) != run_id:
            _set_aside(final, "was not written by this run or cannot be read")
        else:
            shutil.rmtree(old, ignore_errors=True)  # a stale one: `final` exists, so it was replaced already
            os.replace(final, old)
        _fsync_dir(directory)
        _fault_pause("SLOW_COMMIT")
    os.replace(tmp, final)
    _fsync_dir(directory)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover(directory: str) -> None:
    """Finish what a process killed while re-saving a step left behind: a `.ckpt_<step>.old` whose
    step has no checkpoint goes back into place; one whose step has its new checkpoint is removed.
    A sealed `.ckpt_<step>.tmp` whose step has no checkpoint (a save that had finished writing when
    the process died, before it was moved into place) is committed if it verifies, else left
    (`prune` removes it)."""
    for old in glob.glob(os.path.join(directory, ".ckpt_*.old")):
        m = _OLD.search(old)
        if not m or not os.path.isdir(old):
            continue
        final = checkpoint_path(directory, int(m.group(1)))
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            _fsync_dir(directory)
            warnings.warn(f"restored {final}: a re-save of step {int(m.group(1))} was interrupted before it finished")
    for tmp in sorted(glob.glob(os.path.join(directory, ".ckpt_*.tmp"))):
        m = _TMP.search(tmp)
        if not m or not os.path.isdir(tmp) or not is_sealed(tmp):
            continue
        final = checkpoint_path(directory, int(m.group(1)))
        if os.path.exists(final):
            continue
        try:
            verify_checksums(tmp)
            verify(tmp)
        except RuntimeError as exc:
            warnings.warn(f"{tmp}: a save that finished writing but does not verify, not used ({exc})")
            continue
        os.replace(tmp, final)
        _fsync_dir(directory)
        warnings.warn(
            f"committed {final}: its save had finished writing (checksums verified) when the process ended, before "
            "it was moved into place"
        )


def save(directory: str, step: int, model_state: Dict[str, torch.Tensor], train_state: Dict[str, Any]) -> str:
    """Write checkpoint `step` atomically from one process; returns its path."""
    tmp = begin(directory, step)
    write_model(tmp, model_state)
    write_state(tmp, train_state)
    return commit(directory, step, run_id_of_state(train_state))


def list_checkpoints(directory: str):
    """Checkpoint directories, oldest first (temporary ones never count)."""
    found = []
    for p in glob.glob(os.path.join(directory, "ckpt_*")):
        m = _NAME.search(p)
        if m and os.path.isdir(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def run_id_of_state(state: Dict[str, Any]) -> Optional[str]:
    run = state.get("run")
    return run.get("id") if isinstance(run, dict) else None


def verify(path: str) -> Dict[str, Any]:
    """Check that checkpoint `path` reads without reading the tensors' data: the safetensors header
    against the file's size, the zip structure of train_state.pt and of each rank's optimizer file
    (memory-mapped). Returns the training state (tensors mapped, not read); raises if any part is
    missing, truncated or malformed."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(path, MODEL_FILE), "pt") as f:
            f.keys()
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True, mmap=True)
        if is_dcp(state):
            verify_dcp(path)
        elif "optimizer" not in state:  # sharded optimizer state: one file per rank
            importlib.import_module("torch.distributed.tensor")
            for rank in range(int(state.get("world", 1))):
                torch.load(os.path.join(path, f"optimizer_rank{rank}.pt"), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    return state


def read_weights(path: str, flag: str):
    """(file, tensors) of a weights argument (`flag` names it in errors): a checkpoint directory (its
    model.safetensors) or a weights file, geomoe's layout or the original's (.pth/.pt/.safetensors),
    local or on the Hugging Face Hub as `hf:OWNER/REPO/PATH[@REVISION]` (hub.py: fetched into its
    cache, checked against the Hub's sha256; the file returned is the cached one)."""
    from . import hub
    from .original import _read

    if hub.is_hub_name(path):
        path = hub.resolve(path, flag)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, MODEL_FILE)):
            found = list_checkpoints(path)
            hint = f": a run directory? name one of its checkpoints, e.g. {found[-1]}" if found else ""
            raise ValueError(
                f"argument '{flag}' expected a checkpoint directory holding {MODEL_FILE} or a weights file, "
                f"got the directory {path!r} without it{hint}"
            )
        path = os.path.join(path, MODEL_FILE)
    try:
        return path, _read(path)
    except Exception as exc:
        raise ValueError(
            f"argument '{flag}' expected a weights file (a dict of tensors) or a checkpoint directory, got {path!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def is_dcp(state: Dict[str, Any]) -> bool:
    """Whether a checkpoint's training state is in its dcp/ directory (format 2)."""
    return int(state.get("format", 1)) >= 2


def write_dcp(tmp: str, state: Dict[str, Any]) -> None:
    """Every rank: write `state` (model and optimizer state dicts, plain or DTensor) into tmp/dcp with
    torch.distributed.checkpoint; a collective when a process group is up. Files are fsynced."""
    import torch.distributed.checkpoint as dcp

    _fault_pause("SLOW_DCP")
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(tmp, DCP_DIR), sync_files=True))


def write_dcp_async(tmp: str, state: Dict[str, Any], process_group=None):
    """Every rank: `write_dcp` with torch.distributed.checkpoint.async_save: the state is copied to
    CPU memory before this returns, the files are written by a background thread; returns what to
    wait on (`.result()`). `process_group`: one kept for checkpoints (gloo), so the background
    collectives never interleave with training's."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        response = dcp.async_save(
            state,
            storage_writer=dcp.FileSystemWriter(os.path.join(tmp, DCP_DIR), sync_files=True),
            process_group=process_group,
        )
    return getattr(response, "upload_completion", response)  # newer torch: an AsyncSaveResponse


def write_files(tmp: str, model_state: Dict[str, torch.Tensor], train_state: Dict[str, Any]) -> None:
    """The main rank's files of a checkpoint (model.safetensors, train_state.pt): for a background
    writer. Fault-injection tests: GEOMOE_FAULT_ASYNC_HOLD_FROM=STEP holds the writer of every step
    from STEP on (for two minutes) so the process can be killed while a save is in flight."""
    from .envvars import env_number

    hold = env_number("GEOMOE_FAULT_ASYNC_HOLD_FROM", "0", int, 0)
    if hold and int(train_state.get("step", 0)) >= hold:
        time.sleep(120)
    write_model(tmp, model_state)
    write_state(tmp, train_state)


def write_files_and_seal(tmp: str, model_state: Dict[str, torch.Tensor], train_state: Dict[str, Any], dcp_done=None) -> None:
    """`write_files`, then wait for this rank's DCP writes (`dcp_done.result()`: on the main rank it
    returns once every rank's part and the metadata are written) and `seal` the checkpoint: from
    then on it is complete on disk, and `recover` commits it should the process die before it is
    moved into place."""
    write_files(tmp, model_state, train_state)
    if dcp_done is not None:
        dcp_done.result()
    seal(tmp)


def read_dcp(path: str, state: Dict[str, Any]) -> None:
    """Load checkpoint `path`'s DCP state into `state` in place (resharded to this run's layout)."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(os.path.join(path, DCP_DIR)))
    except Exception as exc:
        raise RuntimeError(
            f"checkpoint {path}: its training state {os.path.join(path, DCP_DIR)} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def verify_dcp(path: str) -> None:
    """The DCP metadata reads and every file it names is there, at least as long as it says."""
    import torch.distributed.checkpoint as dcp

    root = os.path.join(path, DCP_DIR)
    meta = dcp.FileSystemReader(root).read_metadata()
    need: Dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in need.items():
        got = os.path.getsize(os.path.join(root, rel))
        if got < size:
            raise RuntimeError(f"{os.path.join(root, rel)} is {got} bytes, its metadata says at least {size} (truncated)")


def _run_id_of(path: str) -> Optional[str]:
    """The identity of the run that wrote checkpoint `path`; None if it does not read or has none."""
    try:
        return run_id_of_state(verify(path))
    except RuntimeError:
        return None


def prune(directory: str, keep_last: int, run_id: Optional[str] = None) -> List[str]:
    """Remove this run's (`run_id`'s) checkpoints older than its newest `keep_last` verified ones,
    and the temporary directories a crash left behind; returns the paths removed. Checkpoints of
    other runs, ones without a run identity and ones that do not read are never touched, and with
    keep_last >= 1 the newest checkpoint that reads is always kept. keep_last <= 0 or no run_id:
    no checkpoint is removed."""
    recover(directory)
    removed: List[str] = []
    if keep_last > 0 and run_id is not None:
        ours = [p for p in list_checkpoints(directory) if _run_id_of(p) == run_id]  # verified, oldest first
        for path in ours[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for tmp in glob.glob(os.path.join(directory, ".ckpt_*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
    return removed


def _rank_of(rank_file: str) -> int:
    m = re.search(r"rank(\d+)", rank_file)
    return int(m.group(1)) if m else 0


def load(path: str, rank_file: Optional[str] = None) -> Dict[str, Any]:
    """{"model": weights, **train_state, "path": path} (+ "rank_state" from `rank_file` if named);
    a clear error if any part cannot be read."""
    from safetensors.torch import load_file

    try:
        checked = verify_checksums(path)
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path} cannot be read ({exc})") from exc
    if checked == NO_CHECKSUM:
        warnings.warn(f"checkpoint {path}: {NO_CHECKSUM} (written before checksums were kept); its contents are not verified")
    try:
        model = load_file(os.path.join(path, MODEL_FILE))
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
        if is_dcp(state):
            verify_dcp(path)
        elif rank_file is not None and _rank_of(rank_file) < int(state.get("world", 1)):  # else: the trainer says why
            importlib.import_module("torch.distributed.tensor")  # FSDP2 shards are DTensors: weights_only needs the type

            state["rank_state"] = torch.load(os.path.join(path, rank_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or missing: name it and why
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    return {"model": model, **state, "path": path, "checksums": checked}


def load_latest(directory: str, rank_file: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The newest checkpoint that reads and verifies, warning about each newer one that does not
    (one line each: which and why); None if none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path, rank_file)
        except RuntimeError as exc:
            warnings.warn(f"skipped {exc}; trying the previous checkpoint")
    return None
