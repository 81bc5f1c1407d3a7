"""Batch input files as editors and other tools write them, on the real server and default
model through the openai SDK: a UTF-8 byte order mark, CRLF line ends, trailing blank lines and
no final newline all read as the same lines."""

from __future__ import annotations

import json
import time

import fireworks
import openai
import pytest
from api_helpers import ACCOUNT, API_KEY, MODEL

from girandole.batch.lines import read_input

COMPLETIONS = "/v1/completions"
BOM = b"\xef\xbb\xbf"  # what Notepad and PowerShell 5's `Out-File -Encoding utf8` write first


def jsonl(*custom_ids: str) -> bytes:
    return "".join(
        json.dumps({"custom_id": c, "url": COMPLETIONS,
                    "body": {"model": MODEL, "prompt": c, "max_tokens": 1}}) + "\n"
        for c in custom_ids
    ).encode()  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [
        BOM + jsonl("a", "b"),
        jsonl("a", "b").replace(b"\n", b"\r\n"),
        BOM + jsonl("a", "b").replace(b"\n", b"\r\n") + b"\r\n\r\n",
        jsonl("a", "b").rstrip(b"\n"),
    ],
    ids=["bom", "crlf", "bom-crlf-blank-lines", "no-final-newline"],
)
def test_a_files_bom_line_ends_and_blank_lines_are_not_its_lines(data):
    assert [(x.line, x.custom_id) for x in read_input(data, 10)] == [(0, "a"), (1, "b")]


def test_a_bom_only_in_the_middle_of_a_file_is_still_a_bad_line():
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_input(jsonl("a") + BOM + jsonl("b"), 10)


@pytest.mark.slow
def test_a_batch_of_a_file_starting_with_a_bom_runs_its_lines(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    data = BOM + jsonl("first", "second").replace(b"\n", b"\r\n")
    uploaded = client.files.create(file=("windows.jsonl", data), purpose="batch")
    assert client.files.content(uploaded.id).content == data  # the bytes as they came
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=COMPLETIONS, completion_window="24h"
    )
    assert batch.request_counts.total == 2
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert (batch.status, batch.request_counts.completed) == ("completed", 2)
    results = client.files.content(batch.output_file_id).text.splitlines()
    assert [json.loads(r)["custom_id"] for r in results] == ["first", "second"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"temperature": 9}, "temperature"),
        ({"top_p": 1.5}, "topP"),
        ({"top_k": -1}, "topK"),
        ({"max_tokens": -1}, "maxTokens"),
        ({"n": 0}, "n"),
    ],
)
def test_a_jobs_parameter_out_of_range_is_a_400_before_any_line_runs(server, parameters, field):
    # accepted, it failed every line alike, each with the endpoint's 400, in a job that "completed"
    fw = fireworks.Fireworks(api_key=API_KEY, account_id=ACCOUNT, base_url=server.url)
    with pytest.raises(fireworks.BadRequestError) as caught:
        fw.batch_inference_jobs.create(
            batch_inference_job_id="out-of-range",
            model=MODEL,
            input_dataset_id=f"accounts/{ACCOUNT}/datasets/none-needed",
            inference_parameters=parameters,
        )
    error = caught.value.body["error"]
    assert error["param"] == f"inferenceParameters.{field}", error
    with pytest.raises(fireworks.NotFoundError):  # nothing was made
        fw.batch_inference_jobs.get("out-of-range")


def test_a_utf16_file_is_a_400_that_says_so():
    # PowerShell 5's `>` writes UTF-16 with its byte order mark: say which encoding it is
    data = jsonl("a").decode().encode("utf-16")
    with pytest.raises(ValueError, match="UTF-16.*save it as UTF-8"):
        read_input(data, 10)
