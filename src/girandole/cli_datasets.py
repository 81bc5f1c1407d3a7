"""A local JSONL file uploaded as a new dataset of the account, as the CLIs that take one do
(`girandole batch create requests.jsonl`, `girandole sftj create --dataset rows.jsonl`)."""

from __future__ import annotations

from pathlib import Path

from girandole.deploy.cli import CLIError, ControlPlane


def upload_dataset(plane: ControlPlane, account: str, path: Path, dataset_id: str) -> str:
    """Create dataset `dataset_id` and upload `path` into it; its full name. `plane` has no
    resource prefix (ControlPlane(..., resource=""))."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    plane.call("POST", "/datasets", json={"datasetId": dataset_id, "dataset": {}})
    files = {"file": (path.name if path.suffix else "input.jsonl", data, "application/jsonl")}
    plane.call("POST", f"/datasets/{dataset_id}:upload", files=files)
    return f"accounts/{account}/datasets/{dataset_id}"
