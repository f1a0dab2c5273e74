"""Object storage: the same API tests on a local folder and on a real S3 API server (moto, loopback)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from ray_unlearn.storage import LocalStore, NotFoundError, StorageError, check_key, open_store
from ray_unlearn.storage.s3 import S3Store

from conftest import BUCKET  # noqa: E402  (the moto_s3 fixture lives in conftest)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("moto_s3")
    return open_store(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}")  # endpoint from the env


def test_put_get_exists_delete_list_json(store):
    assert store.list() == [] and not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"one")
    store.put_bytes("a/bc.txt", b"two")
    store.put_bytes("a/sub/c.bin", b"\x00\xff")
    store.put_json("z.json", {"k": [1, 2], "s": "é"})
    assert store.get_bytes("a/b.txt") == b"one" and store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"replaced")
    assert store.get_bytes("a/b.txt") == b"replaced"
    assert store.get_json("z.json") == {"k": [1, 2], "s": "é"}
    assert store.list() == ["a/b.txt", "a/bc.txt", "a/sub/c.bin", "z.json"]
    assert store.list("a/b") == ["a/b.txt", "a/bc.txt"]  # a string prefix, as in S3
    assert store.list("a/") == ["a/b.txt", "a/bc.txt", "a/sub/c.bin"]
    assert store.list("a/sub/") == ["a/sub/c.bin"] and store.list("nope/") == []
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing key is fine
    assert not store.exists("a/b.txt")
    with pytest.raises(NotFoundError) as err:
        store.get_bytes("a/b.txt")
    assert isinstance(err.value, KeyError) and err.value.key == "a/b.txt" and "a/b.txt" in str(err.value)
    with pytest.raises(NotFoundError):
        store.get_bytes("a/sub")  # a "folder" is not an object
    store.put_bytes("bad.json", b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        store.get_json("bad.json")


def test_uri(store, tmp_path):
    if isinstance(store, LocalStore):
        assert store.uri("a/b") == str((tmp_path / "store" / "a" / "b").resolve())
        assert open_store(f"file://{tmp_path / 'store'}").root == store.root
    else:
        assert store.uri("a/b") == f"s3://{BUCKET}/{store.prefix}/a/b"
        assert store.uri() == f"s3://{BUCKET}/{store.prefix}"


@pytest.mark.parametrize("key", ["", "../x", "a/../../x", "/etc/passwd", "a\\b", "a\x00b", "a//b", "a/./b",
                                 "a/", "C:/x", "a/.~tmp-x", "a\nb", "x" * 1100])
def test_bad_keys_are_refused_before_any_access(store, key, tmp_path):
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key),
                 lambda: store.delete(key), lambda: store.put_if_absent(key, b"x")):
        with pytest.raises(ValueError, match="storage key"):
            call()
    assert store.list() == [] and not (tmp_path / "x").exists()


def test_list_prefix_may_end_with_slash_but_not_escape(store):
    with pytest.raises(ValueError):
        store.list("../")
    assert check_key("a/", prefix=True) == "a/"


def test_put_if_absent_is_create_only(store):
    assert store.put_if_absent("locks/r1/1", b"first") is True
    assert store.put_if_absent("locks/r1/1", b"second") is False
    assert store.get_bytes("locks/r1/1") == b"first"
    store.put_bytes("plain", b"x")
    assert store.put_if_absent("plain", b"y") is False and store.get_bytes("plain") == b"x"


def test_put_if_absent_race_has_one_winner(store):
    n, results = 6, []
    barrier = threading.Barrier(n)

    def worker(i):
        barrier.wait()
        results.append((i, store.put_if_absent("race/key", f"writer-{i}".encode())))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results if ok]
    assert len(winners) == 1 and store.get_bytes("race/key") == f"writer-{winners[0]}".encode()


def test_upload_and_download_dir(store, tmp_path):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "w.bin").write_bytes(b"\x01" * 1000)
    keys = store.upload_dir(src, "models/m1")
    assert keys == ["models/m1/model_index.json", "models/m1/unet/w.bin"]
    got = store.download_dir("models/m1", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in got) == ["model_index.json", "unet/w.bin"]
    assert (tmp_path / "dst" / "unet" / "w.bin").read_bytes() == b"\x01" * 1000
    assert store.download_dir("models/m1x", tmp_path / "none") == []  # 'm1x' is not under 'm1/'


def test_local_writes_leave_no_temp_files_and_ignore_dead_ones(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("d/k", b"v")
    store.put_if_absent("d/k2", b"v")
    store.put_if_absent("d/k2", b"w")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["k", "k2"]
    (tmp_path / "d" / ".~tmp-k3-dead").write_bytes(b"half")  # a writer killed mid-write
    assert store.list() == ["d/k", "d/k2"] and not store.exists("d/k3")


def test_open_store_parses_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_UNLEARN_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    s = open_store("s3://bucket/some/prefix/")
    assert isinstance(s, S3Store) and (s.bucket, s.prefix, s.endpoint_url) == ("bucket", "some/prefix", "http://127.0.0.1:9")
    assert open_store("s3://bucket", endpoint_url="http://minio:9000").endpoint_url == "http://minio:9000"
    # transient errors are retried with backoff: botocore standard mode, 5 retries (6 tries in all)
    assert s.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert isinstance(open_store(tmp_path), LocalStore)
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3:///x")
    with pytest.raises(ValueError, match="storage key"):
        open_store("s3://bucket/../x")


def test_s3_missing_bucket_is_a_clear_error(moto_s3):
    s = open_store("s3://no-such-bucket-here/p")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        s.put_bytes("k", b"v")


def test_s3_download_dir_refuses_hostile_listed_keys(moto_s3, tmp_path):
    import boto3

    s = open_store(f"s3://{BUCKET}/hostile")
    boto3.client("s3", endpoint_url=moto_s3).put_object(Bucket=BUCKET, Key="hostile/dl/../../../evil", Body=b"x")
    with pytest.raises(ValueError, match="storage key"):
        s.download_dir("dl", tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not Path(tmp_path.parent / "evil").exists()


class _IgnoresConditions:
    """An S3 client of an endpoint that accepts If-None-Match but ignores it."""

    def __init__(self):
        self.objects = {}

    def put_object(self, Bucket, Key, Body, IfNoneMatch=None):
        self.objects[Key] = Body

    def delete_object(self, Bucket, Key):
        self.objects.pop(Key, None)


def test_s3_endpoint_without_conditional_writes_is_refused():
    s = S3Store("b", "p", client=_IgnoresConditions())
    with pytest.raises(StorageError, match="ignores conditional writes"):
        s.put_if_absent("locks/x", b"1")


def test_the_engine_loads_local_models_only_and_the_platform_downloads_first(moto_s3, tiny_model_dir, tmp_path):
    from ray_unlearn.config import load_config
    from ray_unlearn.engine import load_family
    from ray_unlearn.platform.models import local_model, with_local_model

    uri = f"s3://{BUCKET}/m-{uuid.uuid4().hex[:8]}/hotfix"
    open_store(uri).upload_dir(tiny_model_dir, "")
    cfg = load_config(None, [f"model.path={uri}", f"cache_dir={tmp_path / 'cache'}", "train.device=cpu"])
    with pytest.raises(ValueError, match="download it first"):
        load_family(cfg)
    local = with_local_model(cfg)
    path = Path(local.model.path)
    assert path.is_relative_to(tmp_path / "cache" / "models") and (path / "unet" / "config.json").is_file()
    assert local.model.model_dump(exclude={"path"}) == cfg.model.model_dump(exclude={"path"})
    assert load_family(local, lora=False).channels == 1
    assert with_local_model(local) is local  # already local: the same config
    assert local_model(str(tiny_model_dir), cfg) == str(tiny_model_dir) and local_model("demo", cfg) == "demo"
