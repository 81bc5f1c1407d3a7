"""The model catalog's upload state: a database written before it (no state column) keeps its
models READY, and what an uploaded model's folder must hold for its kind."""

from __future__ import annotations

import pytest

from girandole.registry.keystore import DB_NAME, Database
from girandole.registry.models import ModelCatalog, check_uploaded_files


def test_a_database_from_before_uploads_keeps_its_models_ready(tmp_path):
    db = Database(tmp_path / DB_NAME)
    db.execute("CREATE TABLE models (name TEXT PRIMARY KEY, source TEXT NOT NULL, created REAL)")
    db.execute("INSERT INTO models VALUES ('accounts/a/models/old', '/x', 1.0)")
    catalog = ModelCatalog(db, [])
    old = catalog.get("accounts/a/models/old")
    assert (old.state, old.to_json()["state"], old.to_json()["displayName"]) == (
        "READY",
        "READY",
        "old",
    )
    made = catalog.create_upload("accounts/a/models/new", str(tmp_path / "new"), None, "New")
    assert catalog.create_upload("accounts/a/models/new", "/y") is None  # taken
    assert made.to_json()["state"] == "UPLOADING"
    assert catalog.mark_ready(made.name, "/z")
    ready = catalog.get(made.name)
    assert (ready.state, ready.source, ready.display_name) == ("READY", "/z", "New")
    db.close()


@pytest.mark.parametrize(
    "files, adapter, expected",
    [
        ([], False, "config.json and its weights"),
        (["config.json"], False, "its weights (*.safetensors)"),
        (["adapter_config.json", "adapter_model.safetensors"], False, "HF_PEFT_ADDON"),
        (["a.gguf", "b.gguf"], False, "one .gguf file"),
        (["adapter_model.safetensors"], True, "adapter_config.json"),
        (["adapter_config.json"], True, "adapter_model.safetensors"),
    ],
)
def test_what_is_missing_is_named(tmp_path, files, adapter, expected):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError) as raised:
        check_uploaded_files(tmp_path, adapter)
    assert expected in str(raised.value)


def test_the_source_of_a_complete_upload(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    assert check_uploaded_files(tmp_path, False) == str(tmp_path / "model.gguf")
    (tmp_path / "model.gguf").unlink()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert check_uploaded_files(tmp_path, False) == str(tmp_path)
