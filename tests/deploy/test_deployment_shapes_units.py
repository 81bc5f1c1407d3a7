"""The built-in deployment shapes (deploy/shapes.py) over a real model catalog in memory: their
ids, fields and hardware, which models have them, how a deployment body is put on one, and the
record keeping the shape's version."""

from __future__ import annotations

import pytest

from girandole.deploy.shapes import ShapeCatalog, shape_id, shaped_body
from girandole.registry.deployments import (
    DeploymentError,
    DeploymentRecord,
    DeploymentStore,
    Hardware,
)
from girandole.registry.keystore import Database
from girandole.registry.models import CatalogModel, ModelCatalog
from girandole.registry.naming import is_valid_id

CPU = Hardware(None, 0, "CPU only")
H200 = Hardware("NVIDIA_H200_141GB", 1, "one NVIDIA H200")
BASE = "accounts/acme/models/base"
ADAPTER = "accounts/acme/models/lora"


def shapes(hardware: Hardware = CPU) -> ShapeCatalog:
    built_in = [
        CatalogModel(BASE, "org/base", 0.0, built_in=True),
        CatalogModel(ADAPTER, "/adapter", 0.0, base_model=BASE, built_in=True),
        CatalogModel("accounts/fireworks/models/public", "org/public", 0.0, built_in=True),
        CatalogModel("accounts/acme/models/pending", "/up", 0.0, state="UPLOADING"),
    ]
    return ShapeCatalog(ModelCatalog(Database(None), built_in), hardware)


def test_shape_ids_are_valid_and_distinct():
    assert shape_id("gemma-3-270m", "FAST") == "gemma-3-270m-fast"
    odd = ["a" * 63, "a" * 62 + "b", "Qwen2.5_7B", "qwen2-5-7b", "9x", "x--"]
    ids = {shape_id(m, p) for m in odd for p in ("MINIMAL", "FAST", "THROUGHPUT")}
    assert len(ids) == len(odd) * 3 and all(is_valid_id(i) for i in ids), ids


def test_three_shapes_per_ready_base_model_in_its_account():
    catalog = shapes()
    assert [s.shape_id for s in catalog.list("acme")] == [
        "base-minimal", "base-fast", "base-throughput",
    ]  # fmt: skip
    assert [s.shape_id for s in catalog.list("fireworks")][0] == "public-minimal"
    fields = {s.preset: s.to_json() for s in catalog.list("acme")}
    assert fields["MINIMAL"]["maxContextLength"] == 4096
    assert (fields["FAST"]["ngramSpeculationLength"], fields["FAST"]["draftModel"]) == (4, "")
    assert fields["THROUGHPUT"]["maxContextLength"] == 0
    assert "acceleratorType" not in fields["FAST"]  # a CPU: none to name
    on_gpu = shapes(H200).list("acme")[0].to_json()
    assert (on_gpu["acceleratorType"], on_gpu["acceleratorCount"]) == ("NVIDIA_H200_141GB", 1)
    version = catalog.list("acme")[1].version_json()
    assert version["name"] == "accounts/acme/deploymentShapes/base-fast/versions/1"
    assert version["validated"] and version["latestValidated"] and not version["public"]
    # an adapter deploys on its base model's shapes
    assert [s.base_model for s in catalog.for_model(ADAPTER)] == [BASE] * 3
    assert catalog.for_model("accounts/acme/models/pending") == []


def test_resolve():
    catalog = shapes()
    fast = "accounts/acme/deploymentShapes/base-fast"
    for text in (fast, fast + "/versions/1", "base-fast"):
        assert catalog.resolve(text, "acme", BASE).name == fast
    assert catalog.resolve("default", "acme", BASE).preset == "THROUGHPUT"
    assert catalog.resolve("base-fast", "acme", ADAPTER).name == fast
    public = catalog.resolve("public-fast", "acme", "accounts/fireworks/models/public")
    assert public.name == "accounts/fireworks/deploymentShapes/public-fast"
    for text, account, model in [
        (fast, "other", BASE),  # another account's
        (fast + "/versions/2", "acme", BASE),
        ("public-fast", "acme", BASE),  # of another base model
        ("nope", "acme", BASE),
        ("accounts/acme/deploymentShapes", "acme", BASE),
    ]:
        with pytest.raises(DeploymentError) as info:
            catalog.resolve(text, account, model)
        assert info.value.status == 400 and info.value.param == "deploymentShape"


def test_shaped_body():
    fast = shapes().resolve("base-fast", "acme", BASE)
    body = shaped_body({"baseModel": BASE}, fast, skip_validation=False, fill=True)
    assert body["ngramSpeculationLength"] == 4 and body["draftModel"] == ""
    assert body["deploymentShape"] == fast.version_name
    assert "ngramSpeculationLength" not in shaped_body({}, fast, skip_validation=False, fill=False)
    with pytest.raises(DeploymentError) as info:
        shaped_body({"draftModel": "x"}, fast, skip_validation=False, fill=True)
    assert info.value.param == "draftModel" and "contradicts" in info.value.message
    kept = shaped_body({"draftModel": "x"}, fast, skip_validation=True, fill=True)
    assert (kept["draftModel"], kept["ngramSpeculationLength"]) == ("x", 4)


def test_the_record_keeps_its_shape():
    store = DeploymentStore(Database(None))
    version = "accounts/t/deploymentShapes/m-fast/versions/1"
    store.insert(DeploymentRecord("t", "d", "m", deployment_shape=version))
    back = store.get("t", "d")
    assert back.deployment_shape == version and back.to_json()["deploymentShape"] == version
    store.insert(DeploymentRecord("t", "e", "m"))
    assert "deploymentShape" not in store.get("t", "e").to_json()
