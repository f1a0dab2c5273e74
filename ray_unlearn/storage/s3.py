"""A store in an S3 bucket (AWS S3, MinIO, any S3-compatible store).

boto3 is imported on first use, so that a local store never needs the AWS SDK. Throttling and 5xx
answers are retried by botocore (standard mode, 5 attempts, with backoff).
"""

from __future__ import annotations

import threading
import time
import uuid

from ray_unlearn.storage.base import NotFoundError, Store, StorageError, _join, check_key, s3_endpoint
_S3_RETRIES = {"max_attempts": 5, "mode": "standard"}


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        if not bucket:
            raise ValueError("an S3 store URI needs a bucket: s3://BUCKET/optional/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.endpoint_url = s3_endpoint(endpoint_url)
        self._client = client
        self._conditional_ok = False
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:  # boto3 sessions are not thread-safe: build the (thread-safe) client once
            if self._client is None:
                import boto3  # lazy: a local store needs no AWS SDK
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, config=Config(retries=_S3_RETRIES))
        return self._client

    def uri(self, key: str = "") -> str:
        path = _join(self.prefix, check_key(key)) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _k(self, key: str) -> str:
        return _join(self.prefix, key)

    def _where(self, key: str = "") -> str:
        """A location for messages, never re-checked (a listed prefix may end in '/')."""
        path = _join(self.prefix, key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _call(self, what: str, key: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(key, self.uri()) from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            raise StorageError(self._explain(what, key, code, err)) from None
        except EndpointConnectionError as err:
            raise StorageError(f"S3 {what} {self._where(key)}: cannot reach the S3 endpoint "
                               f"{self.endpoint_url or 'of AWS'} ({err}): check the endpoint URL "
                               "($RAY_UNLEARN_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL) and the network") from None
        except NoCredentialsError:
            raise StorageError(f"S3 {what} {self._where(key)}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role)") from None
        except BotoCoreError as err:
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            raise StorageError(f"S3 {what} {self._where(key)}{where} failed: {err} "
                               f"(check credentials, the endpoint URL and that the bucket exists)") from None

    def _explain(self, what: str, key: str, code: str, err) -> str:
        """What an S3 error code means for the operator, naming the URI and the fix."""
        where = self._where(key)
        if code == "NoSuchBucket":
            return (f"S3 {what} {where}: bucket '{self.bucket}' does not exist ({code}"
                    + (f" at {self.endpoint_url}" if self.endpoint_url else "")
                    + "): create it, or fix the store URI (--store / $RAY_UNLEARN_STORE)")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidToken"):
            return (f"S3 {what} {where}: access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID / "
                    "AWS_PROFILE, not expired) and that the bucket policy allows s3:ListBucket, s3:GetObject, "
                    f"s3:PutObject and s3:DeleteObject on s3://{self.bucket}/{self.prefix}")
        return f"S3 {what} {where}: {code}: {err}"

    def _put(self, key: str, data: bytes) -> None:
        self._call("put", key, self.client.put_object, Key=self._k(key), Body=data)

    def _get(self, key: str) -> bytes:
        resp = self._call("get", key, self.client.get_object, Key=self._k(key))
        return resp["Body"].read()

    def _exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=self._k(key))
            return True
        except NotFoundError:
            return False

    def _delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._k(key))

    def _list(self, prefix: str) -> list[str]:
        full = _join(self.prefix, prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys, token = [], None
        while True:
            kw = {"Prefix": full, **({"ContinuationToken": token} if token else {})}
            resp = self._call("list", prefix, self.client.list_objects_v2, **kw)
            keys += [o["Key"][strip:] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return keys
            token = resp["NextContinuationToken"]

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        if not self._conditional_ok:
            self._check_conditional_writes()
        return self._create(key, data)

    def _create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        for attempt in range(6):
            try:
                self._call("put", key, self.client.put_object, Key=self._k(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code", "") == "PreconditionFailed":  # 412: it exists
                    return False
                # 409 ConditionalRequestConflict: a concurrent conditional write to the same key is
                # in flight; AWS says retry (the other writer usually wins and we then get 412)
                time.sleep(0.05 * 2**attempt)
        raise StorageError(f"S3 conditional put {self.uri(key)}: conflicting writes did not settle; try again")

    def _check_conditional_writes(self) -> None:
        # An endpoint that ignores If-None-Match would let two processors claim one request;
        # find out once, up front, rather than by a double-applied hotfix.
        probe = f".ray_unlearn/probe-{uuid.uuid4().hex}"
        first = self._create(probe, b"1")
        second = self._create(probe, b"2")
        self._delete(probe)
        if not first or second:
            raise StorageError(
                f"{self.uri()}: this S3 endpoint ignores conditional writes (PUT with If-None-Match: *); "
                "the request queue needs them. Use AWS S3, a MinIO release from 2024 or later, or a local store."
            )
        self._conditional_ok = True
