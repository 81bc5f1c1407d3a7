"""`own_resource_id` (registry/naming.py): a field naming one of the caller's own objects takes
the bare id or the full name under the caller's account; another account's name and malformed
names are refused (a ValueError whose message the routes answer as a 400 naming the field)."""

from __future__ import annotations

import pytest

from girandole.registry.naming import own_resource_id


@pytest.mark.parametrize(
    "value, expected",
    [
        ("reviews", "reviews"),
        ("accounts/alice/datasets/reviews", "reviews"),
        ("file-0a1b", "file-0a1b"),
    ],
)
def test_own_names_give_the_id(value, expected):
    assert own_resource_id(value, "alice", "datasets") == expected


@pytest.mark.parametrize(
    "value",
    ["accounts/bob/datasets/reviews", "accounts/bob/datasets/Not-An-Id"],
)
def test_another_accounts_name_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="another account's dataset") as exc:
        own_resource_id(value, "alice", "datasets")
    assert repr(value) in str(exc.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bob/reviews",  # a shorthand: no collection says what it is
        "accounts/alice/models/reviews",  # another collection
        "accounts/alice/datasets/",
        "accounts//datasets/reviews",
        "accounts/alice/datasets/reviews/extra",
        "/accounts/alice/datasets/reviews",
        "accounts/alice/datasets/Reviews",
        "accounts/Bob/datasets/reviews",
    ],
)
def test_malformed_names_are_refused(value):
    with pytest.raises(ValueError, match="is not a dataset id or name") as exc:
        own_resource_id(value, "alice", "datasets")
    assert repr(value) in str(exc.value)


def test_the_collection_is_the_one_asked_for():
    job = "accounts/alice/batchInferenceJobs/j-1"
    assert own_resource_id(job, "alice", "batchInferenceJobs") == "j-1"
    with pytest.raises(ValueError, match="not a batch inference job id or name"):
        own_resource_id("accounts/alice/datasets/j-1", "alice", "batchInferenceJobs")
