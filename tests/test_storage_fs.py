"""Specification of the search's storage as one filesystem (tune_mtard.search.storage_fs) and of the node check
on object storage, against moto's real S3 server started here on a free loopback port."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from services import s3_server

from tune_mtard.errors import ConfigError
from tune_mtard.search.nodes import check_nodes_see_storage
from tune_mtard.search.storage_fs import open_storage

BUCKET = "tune-mtard-test"
KEYS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("moto")) as url:
        pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True, **KEYS).create_dir(BUCKET)
        yield url


@pytest.fixture
def aws_env(endpoint, monkeypatch):
    """The standard AWS environment variables naming the test server, as a user of an S3-compatible store sets."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", KEYS["region"])


def _round_trip(storage) -> None:
    assert not storage.exists("trial_0/trace.csv") and storage.list("trial_0") == []
    storage.write_text("trial_0/trace.csv", "step,epoch\n0,0\n")
    storage.write_bytes("trial_0/student.pt", b"\x00\x01weights")
    storage.write_text("best_config.yaml", "name: x\n")
    storage.write_text("best_config.yaml", "name: y\n")  # replaced whole
    assert storage.read_text("trial_0/trace.csv") == "step,epoch\n0,0\n"
    assert storage.child("trial_0").read_bytes("student.pt") == b"\x00\x01weights"
    assert storage.read_text("best_config.yaml") == "name: y\n"
    assert storage.list() == ["best_config.yaml", "trial_0"]
    assert storage.list("trial_0") == ["student.pt", "trace.csv"]  # no temporary file left behind
    storage.delete("best_config.yaml")
    storage.delete("best_config.yaml")  # already gone: nothing to do
    assert not storage.exists("best_config.yaml") and storage.exists("trial_0/trace.csv")
    with pytest.raises(FileNotFoundError):
        storage.read_text("best_config.yaml")


def test_a_folder_round_trips_files_and_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = open_storage("results/search")  # relative: against the working folder
    assert storage.is_local and storage.root == str(tmp_path / "results" / "search")
    _round_trip(storage)
    assert (tmp_path / "results" / "search" / "trial_0" / "trace.csv").is_file()


def test_an_s3_uri_round_trips_through_the_server_named_by_the_aws_environment(aws_env, endpoint):
    storage = open_storage(f"s3://{BUCKET}/env-prefix/search")
    assert not storage.is_local and storage.root == f"{BUCKET}/env-prefix/search"
    _round_trip(storage)
    seen = pafs.S3FileSystem(endpoint_override=endpoint, **KEYS)
    with seen.open_input_stream(f"{BUCKET}/env-prefix/search/trial_0/trace.csv") as stream:
        assert stream.read() == b"step,epoch\n0,0\n"  # a real object in the bucket, not a local copy


def test_an_s3_uri_round_trips_through_the_server_named_by_storage_options(endpoint, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    host = endpoint.removeprefix("http://")
    _round_trip(open_storage(f"s3://{BUCKET}/options-prefix", {"endpoint_override": host, "scheme": "http",
                                                               "connect_timeout": 5, **KEYS}))


@pytest.mark.parametrize(("storage", "options", "key", "says"), [
    ("s3://b/p", {"endpoint": "http://x"}, "search.storage_options", "unknown option 'endpoint'"),
    ("s3://b/p", {"connect_timeout": "5"}, "search.storage_options", "connect_timeout must be a float"),
    ("s3://b/p", {"force_virtual_addressing": 1}, "search.storage_options", "must be a bool"),
    ("s3://b/p", {"region": True}, "search.storage_options", "region must be a str"),
    ("/some/folder", {"region": "us-east-1"}, "search.storage_options", "applies to s3:// storage only"),
    ("nosuchscheme://b/p", {}, "search.storage", "nosuchscheme://b/p: no filesystem for it"),
])
def test_storage_pyarrow_cannot_open_is_a_config_error_naming_the_key(storage, options, key, says):
    with pytest.raises(ConfigError) as error:
        open_storage(storage, options)
    assert error.value.key == key and says in error.value.message, error.value.message


def test_every_node_reads_the_marker_from_the_bucket_and_it_is_removed_after(endpoint, ray_address):
    """The options travel with each node's task (the AWS environment variables must be set on every node)."""
    options = {"endpoint_override": endpoint.removeprefix("http://"), "scheme": "http", **KEYS}
    check_nodes_see_storage(f"s3://{BUCKET}/node-check", 1, 0, options)
    assert open_storage(f"s3://{BUCKET}/node-check", options).list() == []


def test_a_bucket_the_driver_cannot_write_to_is_named_before_any_task_runs(aws_env, ray_address):
    with pytest.raises(ConfigError) as error:
        check_nodes_see_storage("s3://no-such-bucket/search", 1, 0)
    assert error.value.key == "search.storage", error.value.message
    assert error.value.message.startswith("s3://no-such-bucket/search: the driver cannot write there (")
    assert "bucket does not exist" in error.value.message, error.value.message


def test_a_node_that_cannot_reach_the_object_store_is_named(endpoint, ray_address, monkeypatch):
    """The driver writes with its own endpoint; each node's task opens the storage itself, and one whose
    endpoint does not answer (here: every node's, since the task is given a closed port) is named."""
    from tune_mtard.search import nodes

    options = {"endpoint_override": endpoint.removeprefix("http://"), "scheme": "http", **KEYS}
    real = nodes._read_marker

    def read_elsewhere(storage, node_options, marker, token):
        return real(storage, {**node_options, "endpoint_override": "127.0.0.1:9", "connect_timeout": 2.0,
                              "request_timeout": 2.0}, marker, token)

    monkeypatch.setattr(nodes, "_read_marker", read_elsewhere)
    with pytest.raises(ConfigError) as error:
        check_nodes_see_storage(f"s3://{BUCKET}/unreachable", 1, 0, options)
    message = error.value.message
    assert error.value.key == "search.storage" and "1 of 1 Ray nodes cannot read" in message, message
    assert "same endpoint and credentials" in message, message
    assert open_storage(f"s3://{BUCKET}/unreachable", options).list() == []  # the marker is gone all the same


def test_a_folder_the_check_made_is_removed_after(tmp_path, ray_address):
    storage = tmp_path / "results"
    check_nodes_see_storage(str(storage), 1, 0)
    assert not storage.exists()


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_a_divergence_record_and_an_error_file_round_trip_through_the_trials_storage(where, tmp_path, endpoint):
    """What a diverged or failed trial leaves in its folder reaches the driver through Ray's filesystem of
    the storage, whichever it is."""
    from tune_mtard.errors import Diverged
    from tune_mtard.search.storage_fs import folder_on
    from tune_mtard.search.trials import error_file_text, read_divergence, write_divergence

    if where == "folder":
        fs, path = pafs.LocalFileSystem(), str(tmp_path / "search" / "trial_0")
    else:
        fs, path = pafs.S3FileSystem(endpoint_override=endpoint, **KEYS), f"{BUCKET}/records/search/trial_0"
    trial_dir = folder_on(fs, path)
    assert read_divergence(trial_dir) is None and error_file_text(trial_dir) == "error"
    write_divergence(trial_dir, Diverged(17, 2))
    trial_dir.write_text("error.txt", "Traceback (most recent call last):\n  ...\nValueError: bad lr\n\n")
    assert read_divergence(trial_dir) == Diverged(17, 2).tags()
    assert error_file_text(trial_dir) == "ValueError: bad lr"


def test_a_file_in_the_bucket_is_handed_to_a_path_reader_as_a_temporary_copy_removed_after(endpoint, tmp_path):
    bucket = open_storage(f"s3://{BUCKET}/copies", {"endpoint_override": endpoint.removeprefix("http://"),
                                                    "scheme": "http", **KEYS})
    bucket.write_bytes("checkpoint_000001/student.pt", b"weights")
    with bucket.child("checkpoint_000001").local_file("student.pt") as copy:
        assert copy.name == "student.pt" and copy.read_bytes() == b"weights"
    assert not copy.exists() and bucket.exists("checkpoint_000001/student.pt")
    folder = open_storage(str(tmp_path))
    folder.write_bytes("student.pt", b"weights")
    with folder.local_file("student.pt") as itself:
        assert itself == tmp_path / "student.pt"
    assert itself.exists()  # a folder's own file, never removed
