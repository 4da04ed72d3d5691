"""Weights by name from the Hugging Face Hub (`hf:OWNER/REPO/PATH[@REVISION]`, python/geomoe/hub.py).

There is no network here: each test lays out a Hub cache by hand, as huggingface_hub writes it
(models--OWNER--REPO/{refs/<branch>, blobs/<etag>, snapshots/<commit>/PATH -> ../../blobs/<etag>}),
points HF_HUB_CACHE at it and sets HF_HUB_OFFLINE=1."""

import hashlib
import importlib.util
import io
import os
import sys

import pytest
import torch

from geomoe import checkpoint, load_original_state_dict, original_state_dict
from geomoe.cli import main

# installed with the hf extra (transformers), as CI does; the syntax errors need no package
needs_hub = pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is None, reason="huggingface_hub not installed")
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _etag(data: bytes, lfs: bool) -> str:
    if lfs:  # an LFS file's etag is the sha256 of its contents
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # a git blob id


def _add(cache, repo, commit, files, refs=("main",), lfs=True, link=True):
    """Put `files` {PATH: bytes} into `cache` as commit `commit` of model repository `repo`."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(commit)
    for path, data in files.items():
        snap = base / "snapshots" / commit / path
        snap.parent.mkdir(parents=True, exist_ok=True)
        if not link:  # a file system without symlinks: the snapshot holds a copy
            snap.write_bytes(data)
            continue
        blob = base / "blobs" / _etag(data, lfs)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snap.symlink_to(os.path.relpath(blob, snap.parent))
    return base


def _safetensors(tensors) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _pth(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # its hub/ is the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.weight": torch.randn(3, 4, generator=g, dtype=torch.float64), "pos": torch.arange(5)}


def _same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@needs_hub
@pytest.mark.parametrize("lfs", [True, False], ids=["lfs-sha256", "git-sha1"])
def test_a_cached_hub_file_loads_and_equals_the_original(hub_cache, lfs):
    st, pth = _tensors(0), _tensors(1)
    _add(
        hub_cache,
        "owner/geomoe-release",
        COMMIT_A,
        {"w/enc.safetensors": _safetensors(st), "enc.pth": _pth({"model": pth})},
        lfs=lfs,
    )
    path, got = checkpoint.read_weights("hf:owner/geomoe-release/w/enc.safetensors", "--weights")
    assert path.startswith(str(hub_cache)) and path.endswith(os.path.join(COMMIT_A, "w", "enc.safetensors"))
    _same(got, st)
    _, got = checkpoint.read_weights("hf:owner/geomoe-release/enc.pth", "--init-weights")
    _same(got, pth)


@needs_hub
def test_a_revision_picks_that_commit_branch_or_tag(hub_cache):
    old, new = _tensors(2), _tensors(3)
    _add(hub_cache, "owner/repo", COMMIT_A, {"enc.safetensors": _safetensors(old)}, refs=("v1",))
    _add(hub_cache, "owner/repo", COMMIT_B, {"enc.safetensors": _safetensors(new)}, refs=("main", "dev"))
    _same(checkpoint.read_weights("hf:owner/repo/enc.safetensors", "--weights")[1], new)  # main
    _same(checkpoint.read_weights(f"hf:owner/repo/enc.safetensors@{COMMIT_A}", "--weights")[1], old)
    _same(checkpoint.read_weights("hf:owner/repo/enc.safetensors@v1", "--weights")[1], old)
    _same(checkpoint.read_weights("hf:owner/repo/enc.safetensors@dev", "--weights")[1], new)
    with pytest.raises(ValueError, match=r"argument '--weights' expected hf:owner/repo/enc.safetensors@v2 in the Hugging"):
        checkpoint.read_weights("hf:owner/repo/enc.safetensors@v2", "--weights")


@needs_hub
def test_a_file_not_in_the_cache_offline_is_a_clear_error_naming_the_flag(hub_cache):
    _add(hub_cache, "owner/repo", COMMIT_A, {"enc.safetensors": _safetensors(_tensors(0))})
    for name in ("hf:owner/repo/other.safetensors", "hf:owner/elsewhere/enc.safetensors"):
        with pytest.raises(ValueError) as info:
            checkpoint.read_weights(name, "--init-weights")
        text = str(info.value)
        assert text.startswith(f"argument '--init-weights' expected {name} in the Hugging Face cache {hub_cache} "), text
        assert "HF_HUB_OFFLINE is set" in text and "got no cached copy" in text and "hf download owner/" in text


@needs_hub
@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
@pytest.mark.parametrize("lfs", [True, False], ids=["lfs-sha256", "git-sha1"])
def test_a_corrupt_or_truncated_cache_file_is_a_clear_error(hub_cache, damage, lfs):
    data = _safetensors(_tensors(0))
    base = _add(hub_cache, "owner/repo", COMMIT_A, {"enc.safetensors": data}, lfs=lfs)
    blob = base / "blobs" / _etag(data, lfs)
    bad = data[: len(data) // 2] if damage == "truncated" else data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]
    blob.write_bytes(bad)
    algorithm = "sha256" if lfs else "git-sha1"
    with pytest.raises(
        ValueError,
        match=rf"^argument '--weights' expected hf:owner/repo/enc.safetensors with {algorithm} {blob.name} \(the Hub's "
        rf"record\), got [0-9a-f]+ from the cached file .*{blob.name} \({len(bad)} bytes\): it is corrupt or truncated",
    ):
        checkpoint.read_weights("hf:owner/repo/enc.safetensors", "--weights")


@needs_hub
def test_a_cache_without_links_loads_with_a_warning_that_it_is_not_verified(hub_cache):
    st = _tensors(4)
    _add(hub_cache, "owner/repo", COMMIT_A, {"enc.safetensors": _safetensors(st)}, link=False)
    with pytest.warns(UserWarning, match=r"--weights hf:owner/repo/enc.safetensors: .* not verified"):
        _, got = checkpoint.read_weights("hf:owner/repo/enc.safetensors", "--weights")
    _same(got, st)


@pytest.mark.parametrize(
    "name, why",
    [
        ("hf:owner/repo", "OWNER, REPO and the file's PATH"),
        ("hf:owner/enc.pth", "OWNER, REPO and the file's PATH"),
        ("hf://owner/repo/enc.pth", "no '//' after 'hf:'"),
        ("hf:owner/repo/enc.pth@", "an empty revision"),
        ("hf:own er/repo/enc.pth", "OWNER 'own er' is not a Hub name"),
        ("hf:owner/-repo/enc.pth", "REPO '-repo' is not a Hub name"),
        ("hf:owner/repo/../enc.pth", "PATH has an empty, '.' or '..' part"),
        ("hf:owner/repo/w//enc.pth", "PATH has an empty"),
    ],
)
def test_a_malformed_name_is_a_clear_error(hub_cache, name, why):
    with pytest.raises(ValueError) as info:
        checkpoint.read_weights(name, "--weights")
    text = str(info.value)
    assert text.startswith(f"argument '--weights' expected hf:OWNER/REPO/PATH or hf:OWNER/REPO/PATH@REVISION, got {name!r}: "), (
        text
    )
    assert why in text, text


@needs_hub
def test_the_python_loaders_take_hub_names(hub_cache):
    from geomoe import GeoMoE
    from geomoe.configs import CONFIGS
    from geomoe.train import load_init_weights

    cfg = CONFIGS["tiny"]["model"]
    src = GeoMoE(**cfg)
    enc = {k: v for k, v in original_state_dict(src).items() if not k.startswith(("decoder", "stage", "norm.", "mask_token"))}
    _add(hub_cache, "owner/repo", COMMIT_A, {"released/encoder.pth": _pth({"model": enc})})
    name = "hf:owner/repo/released/encoder.pth"
    dst = GeoMoE(**cfg)
    note = load_init_weights(dst, name)
    assert f"--init-weights: loaded {len(enc)} tensors from {hub_cache}" in note, note
    for k, v in src.state_dict().items():
        if not k.startswith(("decoder", "stage", "norm.", "mask_token")):
            assert torch.equal(dst.state_dict()[k], v), k
    other = GeoMoE(**cfg)
    res = load_original_state_dict(other, name)
    assert not res.unexpected and all(k.startswith(("decoder", "stage", "norm.", "mask_token")) for k in res.missing)
    assert torch.equal(other.blocks3[1].mlp.w1, src.blocks3[1].mlp.w1)
    with pytest.raises(ValueError, match=r"^argument 'source' expected hf:owner/repo/nothing.pth in the Hugging Face cache"):
        load_original_state_dict(other, "hf:owner/repo/nothing.pth")


@needs_hub
def test_the_cli_says_in_one_line_what_is_wrong_with_a_hub_name(hub_cache, tmp_path, capsys):
    data = _safetensors(_tensors(0))
    base = _add(hub_cache, "owner/repo", COMMIT_A, {"enc.safetensors": data})
    (base / "blobs" / _etag(data, True)).write_bytes(data[:100])  # truncated
    cases = [
        ("hf:owner/repo", "expected hf:OWNER/REPO/PATH"),
        ("hf:owner/repo/missing.pth", "HF_HUB_OFFLINE is set"),
        ("hf:owner/repo/enc.safetensors", "corrupt or truncated"),
    ]
    for i, (name, what) in enumerate(cases):
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "--init-weights", name, "--steps", "1", "--out", str(tmp_path / f"run{i}"), "--no-progress"])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert exit_info.value.code == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("geomoe pretrain: error: argument '--init-weights' expected ") and what in lines[0], err


# ---- online (no network here: huggingface_hub's answers are stood in for) ---------------------------


def _hub_error(cls, text="404 Client Error"):
    exc = cls.__new__(cls)  # the real classes want an HTTP response to build their message from
    Exception.__init__(exc, text)
    return exc


@needs_hub
def test_what_the_hub_answers_online_is_a_clear_error_naming_the_flag(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.delenv("HF_HUB_OFFLINE")
    cases = [
        (
            errors.RepositoryNotFoundError,
            "hf:owner/nope/enc.pth",
            r"expected a Hub model repository, got 'owner/nope': not found, or private or gated",
        ),
        (
            errors.GatedRepoError,
            "hf:owner/gated/enc.pth",
            r"expected a Hub model repository, got 'owner/gated': not found, or private or gated \(log in",
        ),
        (
            errors.RevisionNotFoundError,
            "hf:owner/repo/enc.pth@v9",
            r"expected a revision of owner/repo, got 'v9': not found on the Hub",
        ),
        (
            errors.RemoteEntryNotFoundError,
            "hf:owner/repo/x.pth@v1",
            r"expected a file of owner/repo at revision 'v1', got 'x.pth': not in the repository$",
        ),
        (
            errors.RemoteEntryNotFoundError,
            "hf:owner/repo/ckpt_00000100",
            r"expected a file of owner/repo, got 'ckpt_00000100': not in the repository \(a checkpoint directory\? name its file: ckpt_00000100/model.safetensors\)",
        ),
        (
            errors.LocalEntryNotFoundError,
            "hf:owner/repo/enc.pth",
            r"expected hf:owner/repo/enc.pth in the Hugging Face cache .* \(the Hub could not be reached\), got no cached copy",
        ),
        (
            errors.HfHubHTTPError,
            "hf:owner/repo/enc.pth",
            r"expected hf:owner/repo/enc.pth fetched from the Hub, got HfHubHTTPError: 500 Server Error",
        ),
    ]
    for cls, name, message in cases:
        asked = {}

        def download(repo_id, filename, revision=None, cache_dir=None, local_files_only=False, _cls=cls):
            asked.update(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir, offline=local_files_only)
            raise _hub_error(_cls, "500 Server Error" if _cls is errors.HfHubHTTPError else "404 Client Error")

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        with pytest.raises(ValueError, match=r"^argument '--weights' " + message):
            checkpoint.read_weights(name, "--weights")
        repo, rest = name[3:].split("/", 2)[:2], name[3:].split("/", 2)[2]
        assert asked == dict(
            repo_id="/".join(repo),
            filename=rest.split("@")[0],
            revision=rest.split("@")[1] if "@" in rest else None,
            cache_dir=str(hub_cache),
            offline=False,
        )


@needs_hub
def test_online_a_cache_without_links_is_checked_against_the_hubs_record(hub_cache, monkeypatch):
    import types

    import huggingface_hub

    data = _safetensors(_tensors(5))
    base = _add(hub_cache, "owner/repo", COMMIT_A, {"enc.safetensors": data}, link=False)
    local = str(base / "snapshots" / COMMIT_A / "enc.safetensors")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: local)
    record = {"sha256": hashlib.sha256(data).hexdigest()}
    asked = []

    def paths_info(self, repo_id, paths, revision=None):
        asked.append((repo_id, paths, revision))
        return [types.SimpleNamespace(lfs=types.SimpleNamespace(sha256=record["sha256"]), blob_id="0" * 40)]

    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", paths_info)
    _same(checkpoint.read_weights("hf:owner/repo/enc.safetensors", "--weights")[1], _tensors(5))
    assert asked == [("owner/repo", ["enc.safetensors"], COMMIT_A)]  # the commit the cache holds
    record["sha256"] = hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(ValueError, match=rf"expected hf:owner/repo/enc.safetensors with sha256 {record['sha256']} .* corrupt"):
        checkpoint.read_weights("hf:owner/repo/enc.safetensors", "--weights")


def test_without_huggingface_hub_a_hub_name_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub now raises ImportError
    with pytest.raises(
        ValueError,
        match=r"^argument '--init-weights' expected huggingface_hub installed to fetch hf:owner/repo/enc.pth@v1, got "
        r"(ModuleNotFound|Import)Error: .*\(pip install huggingface_hub\)",
    ):
        checkpoint.read_weights("hf:owner/repo/enc.pth@v1", "--init-weights")
