"""registry.interop.hub_refs.hub_error: huggingface_hub failures -> exit codes with a fix."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub import errors as hf

from registry.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_NOT_FOUND
from registry.interop.hub_refs import hub_error


def _http(status: int) -> hf.HfHubHTTPError:
    request = httpx.Request("GET", "https://huggingface.co/api/models/org/name")
    return hf.HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(("err", "code", "words"), [
    # found by a QA pass: an unreachable Hub exited 2 (bad input), an unreachable S3 endpoint 6
    (httpx.ConnectError("[Errno 111] Connection refused"), EXIT_ENVIRONMENT, "cannot reach the Hub"),
    (ConnectionError("reset by peer"), EXIT_ENVIRONMENT, "cannot reach the Hub"),
    (_http(503), EXIT_ENVIRONMENT, "HTTP 503"),
    (_http(401), EXIT_BAD_INPUT, "not authorised"),
    (_http(404), EXIT_NOT_FOUND, "not found"),
    (_http(422), EXIT_BAD_INPUT, "HTTP 422"),
])
def test_hub_failures_map_to_documented_exit_codes(err: BaseException, code: int, words: str) -> None:
    mapped = hub_error(err, "hf://org/name")
    assert mapped.exit_code == code and words in mapped.message
    assert mapped.message.startswith("hf://org/name: ") and mapped.fix


@pytest.mark.parametrize(("offline", "code"), [(False, EXIT_ENVIRONMENT), (True, EXIT_NOT_FOUND)])
def test_a_cache_miss_is_a_network_failure_unless_offline_was_asked_for(
        monkeypatch: pytest.MonkeyPatch, offline: bool, code: int) -> None:
    # found by a CLI contract pass: `pull` with the network down exited 5 (not found), so a
    # CI job retrying on 6 never retried it; push-hub's unreachable Hub was already 6
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    mapped = hub_error(hf.LocalEntryNotFoundError("cannot find the requested files"), "hf://org/name")
    assert mapped.exit_code == code and "not in the Hugging Face cache" in mapped.message
