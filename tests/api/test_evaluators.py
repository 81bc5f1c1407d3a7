"""Fireworks' evaluators against a real server with the fireworks-ai SDK: create (BUILDING, then
ACTIVE once a child process loaded the entry function), get, list, update (a new criterion builds
it again), the source and build log through signed URLs, delete; builds that fail (a requirement
not installed, a syntax error, no such function); the 400s of bad fields, 404, 403 for another
account's key and for an inference-user's change; --no-evaluator-code."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator

import fireworks
import httpx
import pytest
from evaluator_server import (
    ACCOUNT,
    EVALUATORS,
    HELPERS,
    MAIN,
    EvaluatorServer,
    criteria,
    evaluator_server,
)  # fmt: skip

CREATE = f"/v1/accounts/{ACCOUNT}/evaluatorsV2"


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[EvaluatorServer]:
    with evaluator_server(tmp_path_factory.mktemp("evaluators")) as server:
        yield server


def test_create_build_get_list_update_and_delete(srv: EvaluatorServer) -> None:
    fw = srv.sdk()
    created = fw.evaluators.create(
        evaluator_id="exact",
        evaluator={
            "display_name": "Exact match",
            "criteria": criteria(),
            "requirements": "numpy>=1\n",
        },  # fmt: skip
    )
    assert created.name == f"accounts/{ACCOUNT}/evaluators/exact"
    assert created.state == "BUILDING"
    active = srv.wait(f"{EVALUATORS}/exact", ("ACTIVE", "BUILD_FAILED"))
    assert active["state"] == "ACTIVE", active["status"]
    got = fw.evaluators.get("exact")
    assert got.display_name == "Exact match" and got.requirements == "numpy>=1\n"
    snippets = got.criteria[0].code_snippets
    assert (snippets.entry_file, snippets.entry_func) == ("main.py", "evaluate")
    assert snippets.file_contents == {"main.py": MAIN, "helpers.py": HELPERS}
    assert [e.name for e in fw.evaluators.list()] == [got.name]
    assert fw.evaluators.get("exact", read_mask="state").model_dump(exclude_none=True) == {"state": "ACTIVE"}  # fmt: skip

    # the source as a tar.gz, and the build log, through signed URLs that need no key
    urls = fw.evaluators.get_source_code_endpoint("exact").filename_to_signed_urls
    archive = tarfile.open(fileobj=io.BytesIO(httpx.get(urls["source.tar.gz"]).content))
    assert archive.extractfile("helpers.py").read().decode() == HELPERS
    log = httpx.get(fw.evaluators.get_build_log_endpoint("exact").build_log_signed_uri)
    assert log.status_code == 200 and "numpy" in log.text and "ready" in log.text

    # metadata changes keep it ACTIVE; new code builds it again
    updated = fw.evaluators.update("exact", display_name="renamed", description="d")
    assert (updated.display_name, updated.state) == ("renamed", "ACTIVE")
    broken = criteria({"main.py": "def evaluate(messages, **kw):\n    return 1\n"}, entry_func="score")  # fmt: skip
    assert fw.evaluators.update("exact", criteria=broken).state == "BUILDING"
    failed = srv.wait(f"{EVALUATORS}/exact", ("ACTIVE", "BUILD_FAILED"))
    assert failed["state"] == "BUILD_FAILED"
    assert "main.py has no function 'score'" in failed["status"]["message"]

    fw.evaluators.delete("exact")
    with pytest.raises(fireworks.NotFoundError):
        fw.evaluators.get("exact")


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (
            {"requirements": "numpy\nnot-a-package-girandole-xyz==1.0\n"},
            "not-a-package-girandole-xyz",
        ),
        ({"criteria": criteria({"main.py": "def evaluate(:\n"})}, "SyntaxError"),
        (
            {"criteria": criteria({"main.py": "raise RuntimeError('at import')\n"})},
            "RuntimeError: at import",
        ),
        (  # every criterion is built: the second's error, naming it
            {
                "criteria": [
                    *criteria(),
                    {**criteria({"main.py": "def evaluate(:\n"})[0], "name": "second"},
                ]
            },  # fmt: skip
            "criterion second: loading main.py failed: ",
        ),
    ],
)
def test_builds_that_fail_say_why(srv: EvaluatorServer, fields: dict, says: str) -> None:
    body = srv.evaluator("broken", **fields)
    try:
        assert body["state"] == "BUILD_FAILED"
        assert says in body["status"]["message"]
    finally:
        srv.http("DELETE", f"{EVALUATORS}/broken")


def _criterion(**snippets) -> list[dict]:
    return [{"type": "CODE_SNIPPETS", "codeSnippets": {"fileContents": {"main.py": MAIN}, **snippets}}]  # fmt: skip


def _files(files: dict[str, str]) -> dict:
    return {"criteria": [{"type": "CODE_SNIPPETS", "codeSnippets": {"fileContents": files}}]}


CODE = "evaluator.criteria[0].codeSnippets"


@pytest.mark.parametrize(
    ("evaluator", "param", "says"),
    [
        ({}, "evaluator.criteria", "needs one criterion of type CODE_SNIPPETS"),
        ({"criteria": []}, "evaluator.criteria", "needs one criterion"),
        (
            {"criteria": [{"type": "TYPE_UNSPECIFIED"}]},
            "evaluator.criteria[0].type",
            "must be CODE_SNIPPETS",
        ),
        (
            {"criteria": [{"type": "CODE_SNIPPETS"}]},
            "evaluator.criteria[0].codeSnippets",
            "is required",
        ),
        ({"criteria": _criterion(language="javascript")}, f"{CODE}.language", "must be python"),
        (
            {"criteria": _criterion(entryFile="eval.py")},
            f"{CODE}.entryFile",
            "'eval.py' is not in fileContents (main.py)",
        ),
        (
            {"criteria": _criterion(entryFunc="not a name")},
            f"{CODE}.entryFunc",
            "not a Python function name",
        ),
        (
            {
                "criteria": [
                    {"type": "CODE_SNIPPETS", "codeSnippets": {"fileContents": {"../x.py": ""}}}
                ]
            },
            f"{CODE}.fileContents",
            "relative path",
        ),
        (_files({"./main.py": ""}), f"{CODE}.fileContents", "relative path"),
        (
            _files({"main.py": "\ud800"}),
            "evaluator.criteria",  # the server's check of every string: the message names it whole
            f"'{CODE}.fileContents.main.py' contains an unpaired UTF-16 surrogate",
        ),
        (
            {"criteria": criteria(), "source": {"type": "TYPE_GITHUB"}},
            "evaluator.source.type",
            "not supported",
        ),
        (
            {"criteria": criteria(), "defaultDataset": "accounts/other/datasets/d"},
            "evaluator.defaultDataset",
            "another account",
        ),
        ({"criteria": criteria(), "colour": "red"}, "evaluator.colour", "Extra inputs"),
        (  # several criteria: each checked, and named apart
            {"criteria": [*criteria(), {"type": "CODE_SNIPPETS"}]},
            "evaluator.criteria[1].codeSnippets",
            "is required",
        ),
        (
            {"criteria": criteria() * 2},
            "evaluator.criteria[1].name",
            "'exact' is another criterion's name too",
        ),
    ],
)
def test_bad_fields_are_400_naming_the_field(srv: EvaluatorServer, evaluator: dict, param: str, says: str) -> None:  # fmt: skip
    body = json.dumps({"evaluatorId": "bad", "evaluator": evaluator})  # a lone surrogate escaped
    r = srv.http("POST", CREATE, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_missing_404_other_account_403_reader_403_and_uploads_400(srv: EvaluatorServer) -> None:
    fw = srv.sdk()
    with pytest.raises(fireworks.NotFoundError, match="Evaluator accounts/acme/evaluators/nope not found"):  # fmt: skip
        fw.evaluators.get("nope")
    r = srv.http("POST", CREATE, json={"evaluatorId": "x", "evaluator": {"criteria": criteria()}}, key=srv.other_key)  # fmt: skip
    assert r.status_code == 403
    assert srv.http("GET", EVALUATORS, key=srv.other_key).status_code == 403
    r = srv.http("POST", CREATE, json={"evaluatorId": "x", "evaluator": {"criteria": criteria()}}, key=srv.reader_key)  # fmt: skip
    assert r.status_code == 403
    assert srv.http("GET", EVALUATORS, key=srv.reader_key).status_code == 200
    srv.evaluator("up")
    r = srv.http("POST", CREATE, json={"evaluatorId": "up", "evaluator": {"criteria": criteria()}})
    assert r.status_code == 409
    fw.evaluators.delete("up")


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(srv: EvaluatorServer, evaluator_id: str, data: bytes, name: str = "src.tar.gz") -> httpx.Response:  # fmt: skip
    urls = srv.sdk().evaluators.get_upload_endpoint(evaluator_id, filename_to_size={name: str(len(data))})  # fmt: skip
    put = httpx.put(urls.filename_to_signed_urls[name], content=data, headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert put.status_code == 200, put.text
    return srv.http("POST", f"{EVALUATORS}/{evaluator_id}:validateUpload", json={})


SCORER = b"from util import same\n\ndef score(messages, ground_truth=None, **kw):\n    return same(messages[-1]['content'], ground_truth)\n"  # fmt: skip


def test_the_source_uploaded_as_an_archive(srv: EvaluatorServer) -> None:
    fw = srv.sdk()
    created = fw.evaluators.create(evaluator_id="uploaded", evaluator={"entry_point": "pkg/scorer.py::score"})  # fmt: skip
    assert created.state == "BUILDING" and ":validateUpload" in created.status.message
    r = srv.http("POST", f"{EVALUATORS}/uploaded:validateUpload", json={})
    assert r.status_code == 400 and "has no archive yet" in r.json()["error"]["message"]
    files = {
        "./pkg/scorer.py": SCORER,
        "util.py": b"def same(a, b):\n    return a == b\n",
        "requirements.txt": b"numpy\n",
        "pkg/__pycache__/scorer.cpython-311.pyc": b"\x00\xff",
        "logo.png": b"\x89PNG\xff\xfe",
    }
    assert upload(srv, "uploaded", tar_gz(files)).status_code == 200
    body = srv.wait(f"{EVALUATORS}/uploaded", ("ACTIVE", "BUILD_FAILED"))
    assert body["state"] == "ACTIVE", body["status"]
    snippets = body["criteria"][0]["codeSnippets"]
    assert (snippets["entryFile"], snippets["entryFunc"]) == ("pkg/scorer.py", "score")
    assert sorted(snippets["fileContents"]) == ["pkg/scorer.py", "requirements.txt", "util.py"]
    assert (body["requirements"], body["source"]) == ("numpy\n", {"type": "TYPE_UPLOAD"})

    # prepareCodeUpload: BUILDING until the next upload, whose entry file must be in it
    prepared = srv.http("PATCH", f"{EVALUATORS}/uploaded", params={"prepareCodeUpload": "true"}, json={})  # fmt: skip
    assert prepared.json()["state"] == "BUILDING"
    r = upload(srv, "uploaded", tar_gz({"main.py": b"def evaluate(**kw): return 1\n"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "entryPoint"
    r = upload(srv, "uploaded", tar_gz({"../evil.py": b"x = 1\n"}))
    assert r.status_code == 400 and "relative path" in r.json()["error"]["message"]
    r = upload(srv, "uploaded", b"not an archive")
    assert r.status_code == 400 and "not a readable archive" in r.json()["error"]["message"]
    with pytest.raises(fireworks.BadRequestError, match="not an archive"):
        fw.evaluators.get_upload_endpoint("uploaded", filename_to_size={"main.py": "10"})
    urls = fw.evaluators.get_upload_endpoint("uploaded", filename_to_size={"a.zip": "10"})
    assert httpx.put(urls.filename_to_signed_urls["a.zip"], content=b"short").status_code == 400
    r = srv.http("POST", CREATE, json={"evaluatorId": "x", "evaluator": {"entryPoint": "main.js"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "evaluator.entryPoint"
    fw.evaluators.delete("uploaded")


def test_no_evaluator_code_refuses_them(tmp_path) -> None:
    with evaluator_server(tmp_path, "--no-evaluator-code") as srv:
        r = srv.http("POST", CREATE, json={"evaluatorId": "x", "evaluator": {"criteria": criteria()}})  # fmt: skip
        assert r.status_code == 403
        assert "--no-evaluator-code" in r.json()["error"]["message"]
        assert srv.http("GET", EVALUATORS).json()["evaluators"] == []
        job = {"evaluator": "e", "inputDataset": "i", "outputDataset": "o"}
        r = srv.http("POST", f"/v1/accounts/{ACCOUNT}/evaluationJobs", json={"evaluationJob": job})
        assert r.status_code == 403 and "--no-evaluator-code" in r.json()["error"]["message"]
        r = srv.http("POST", f"{EVALUATORS}/x:getUploadEndpoint", json={"filenameToSize": {"a.zip": 1}})  # fmt: skip
        assert r.status_code == 403
