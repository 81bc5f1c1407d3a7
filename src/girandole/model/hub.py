"""Models named by Hugging Face repo id, fetched through huggingface_hub into its cache.

`org/name` is a Hugging Face checkpoint (config.json + .safetensors) or a repo holding one .gguf
file; `org/name:file.gguf` names the file in a repo that holds several. Files land in
huggingface_hub's cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`) with its progress
bars; a later start finds them there. Offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) the
model is served from that cache. Every failure is a ModelSourceError naming the repo.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# owner/name as the Hub spells them (letters, digits, '-', '_', '.'), exactly one '/'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# The files of an HF checkpoint that the loader and tokenizer read (configs, tokenizer,
# generation config, chat template, weights): not the .bin, .onnx or .gguf copies beside them.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
HUB_TIMEOUT_S = 10.0  # the first look-up; past it, the cache is tried


class ModelSourceError(ValueError):
    """A model named by repo id could not be found or fetched; the message says which and why."""


@dataclass(frozen=True)
class RepoModel:
    repo_id: str
    filename: str | None = None  # a .gguf file in the repo; None: the repo decides
    revision: str | None = None  # branch, tag or commit; None: main

    def __str__(self) -> str:
        name = self.repo_id + (f":{self.filename}" if self.filename else "")
        return name + (f" (revision {self.revision})" if self.revision else "")


def parse_repo_model(model: str, revision: str | None = None) -> RepoModel | None:
    """`org/name` or `org/name:file.gguf` as a RepoModel; None when `model` is not a repo id."""
    repo_id, sep, filename = model.partition(":")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith(".gguf"):
        return None  # a .gguf name is a file path that does not exist
    if sep and not filename.endswith(".gguf"):
        raise ModelSourceError(
            f"model {model!r}: after 'org/name:' give a .gguf file of the repo, got {filename!r}"
        )
    return RepoModel(repo_id, filename or None, revision or None)


def model_id_of(ref: RepoModel) -> str:
    """A Fireworks model id for a repo id (`Qwen/Qwen3-0.6B` -> `qwen3-0-6b`; the GGUF file's
    name when one is named): a-z, 0-9 and '-', starting with a letter, at most 63 characters."""
    name = Path(ref.filename).stem if ref.filename else ref.repo_id.split("/")[1]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"^[^a-z]+", "", slug)[:63].rstrip("-")
    return slug or "model"


def fetch_model(ref: RepoModel) -> Path:
    """The local path (a .gguf file or a checkpoint folder) of `ref`, downloaded if need be."""
    from huggingface_hub import constants

    reason = None  # why the cache is the only source, when it is
    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE"):
        reason = "HF_HUB_OFFLINE is set"
    files = None
    if reason is None:
        try:
            files = _hub_files(ref)
        except ModelSourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - no network, Hub down: try the cache
            first_line = (str(exc).splitlines() or [""])[0]
            reason = (
                f"the Hugging Face Hub could not be reached ({type(exc).__name__}: {first_line})"
            )
    if files is None:
        files = _cached_files(ref, reason)
    filename = _choose_file(ref, files, reason)
    local_only = reason is not None
    if local_only:
        log.info("model %s: from the Hugging Face cache (%s)", ref, reason)
    else:
        log.info(
            "model %s: fetching from the Hugging Face Hub into %s", ref, constants.HF_HUB_CACHE
        )
    try:
        if filename is not None:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                ref.repo_id, filename, revision=ref.revision, local_files_only=local_only
            )
        else:
            from huggingface_hub import snapshot_download

            path = snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                allow_patterns=CHECKPOINT_PATTERNS,
                local_files_only=local_only,
            )
    except Exception as exc:  # noqa: BLE001 - named with the repo, as every failure here
        raise ModelSourceError(
            f"model {ref}: download failed: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("model %s: in %s", ref, path)
    return Path(path)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_files(ref: RepoModel) -> list[str]:
    """The repo's file list from the Hub (raises on no network, for the caller's fallback)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # one request (the paginated file listing retries with backoff for half a minute)
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, timeout=HUB_TIMEOUT_S)
        return [s.rfilename for s in info.siblings or []]
    except GatedRepoError as exc:
        raise ModelSourceError(
            f"model {ref.repo_id} is gated: accept its terms on huggingface.co, then log in"
            " (`hf auth login`, or set HF_TOKEN)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"model {ref.repo_id} is neither a local path nor a model on the Hugging Face Hub"
            " (if it is private, log in:"
            " `hf auth login`, or set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelSourceError(f"model {ref.repo_id} has no revision {ref.revision!r}") from exc


def _snapshot_folder(ref: RepoModel) -> Path | None:
    """The cached snapshot of `ref`'s revision (huggingface_hub's cache layout), if any."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo_id.replace("/", "--"))
    revision = ref.revision or "main"
    commit = revision
    if not _COMMIT.fullmatch(revision):
        ref_file = repo / "refs" / revision
        if not ref_file.is_file():
            return None
        commit = ref_file.read_text().strip()
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def _cached_files(ref: RepoModel, reason: str | None) -> list[str]:
    from huggingface_hub import constants

    folder = _snapshot_folder(ref)
    if folder is None:
        raise ModelSourceError(
            f"model {ref} is neither a local path nor in the Hugging Face cache"
            f" ({constants.HF_HUB_CACHE}), and {reason}:"
            " run once with network access to download it"
        )
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
    )  # is_file follows the snapshot's links to blobs: a link to a missing blob is no file


def _choose_file(ref: RepoModel, files: list[str], reason: str | None) -> str | None:
    """The .gguf file to fetch, or None for a checkpoint folder (config.json + .safetensors).
    `reason` is why only the cached copy's files are known (None: the Hub's listing)."""
    where = f" in the Hugging Face cache ({reason})" if reason else ""
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ref.filename is not None:
        if ref.filename in files:
            return ref.filename
        listing = f"; the .gguf files there: {', '.join(ggufs)}" if ggufs else ""
        raise ModelSourceError(f"model {ref.repo_id} has no file {ref.filename}{where}{listing}")
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return None
    # a multimodal projector (mmproj-*.gguf) sits beside the model in many GGUF repos
    models = [f for f in ggufs if not Path(f).name.startswith("mmproj")]
    if len(models) == 1:
        return models[0]
    if not models:
        raise ModelSourceError(
            f"model {ref} has no .gguf file and no config.json with .safetensors weights{where}:"
            " girandole loads one of those"
        )
    raise ModelSourceError(
        f"model {ref} has several .gguf files{where}; name one as {ref.repo_id}:FILE, one of: "
        + ", ".join(models)
    )
