"""hf://owner/repo/path/file.gguf: fetched with huggingface_hub into its normal cache.

huggingface_hub honours HF_HUB_OFFLINE, HF_ENDPOINT (mirrors), HF_TOKEN and HF_HOME itself.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError, UsageError

PREFIX = "hf://"


def is_hub_ref(model: str) -> bool:
    return model.startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str, str | None]:
    """hf://owner/repo[@revision]/path/file.gguf -> (repo_id, filename, revision)."""
    rest = ref[len(PREFIX):]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise UsageError(f"{ref} is not a Hugging Face file reference; write hf://owner/repo/file.gguf")
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    filename = "/".join(parts[2:])
    if not filename.endswith(".gguf"):
        raise UsageError(f"{ref} does not name a .gguf file; write hf://owner/repo/file.gguf")
    return f"{owner}/{repo}", filename, revision


def fetch(ref: str) -> Path:
    repo_id, filename, revision = parse_ref(ref)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - it is a dependency
        raise BundleError("huggingface_hub is not installed; pip install huggingface_hub") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except LocalEntryNotFoundError:
        raise BundleError(
            f"{ref} is not in the local Hugging Face cache and cannot be downloaded now (offline, or "
            "HF_HUB_OFFLINE=1); connect and retry, set HF_ENDPOINT to a reachable mirror, or pass a local .gguf"
        ) from None
    except GatedRepoError:
        raise BundleError(f"{repo_id} is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise BundleError(f"no repository {repo_id} on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise BundleError(f"{repo_id} has no revision {revision}") from None
    except EntryNotFoundError:
        raise BundleError(f"{repo_id} has no file {filename}; check the name on the Hub") from None
    except OSError as exc:
        raise BundleError(f"downloading {ref} failed: {exc}") from None
