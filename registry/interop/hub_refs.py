"""Hugging Face Hub names and failures: ``hf://`` references, repo ids, branches, errors.

Everything here is pure parsing and mapping, apart from the Hub transfer itself
(:mod:`registry.interop.hub`), so commands can refuse a bad reference before opening
a store or touching the network. Repo ids are exactly ``org/name`` model repos
(datasets and spaces hold no adapters); a revision is a branch, tag or commit.
huggingface_hub's exceptions are translated by :func:`hub_error` into
:mod:`registry.errors` classes with a fix: a repo, revision or offline cache miss ->
:class:`~registry.errors.NotFoundError` (5); authentication and offline mode ->
:class:`~registry.errors.BadInputError` (2); an unreachable Hub or an HTTP 5xx ->
:class:`~registry.errors.EnvironmentFailure` (6, as an unreachable S3 endpoint). huggingface_hub is
imported inside :func:`hub_error` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import AdapterkitError, BadInputError, EnvironmentFailure, NotFoundError

SCHEME = "hf://"
_SEGMENT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?\Z")
_REVISION = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*\Z")
_REF_FIX = "write hf://org/name or hf://org/name@revision (a branch, tag or commit)"
_AUTH_FIX = "run `hf auth login` or pass --token (a token with write access for push-hub)"


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://org/name[@revision]``.

    Attributes:
        repo_id: ``org/name`` (a model repo).
        revision: Branch, tag or commit asked for; None means the default branch.
    """

    repo_id: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        """The ``hf://`` form."""
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


def _check_repo_id(repo_id: str, shown: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_SEGMENT.match(p) for p in parts) \
            or any("--" in p or ".." in p for p in parts):
        if parts[0] in ("datasets", "spaces") and len(parts) == 3:
            raise BadInputError(f"{shown!r}: only model repos hold adapters", fix=_REF_FIX)
        raise BadInputError(
            f"{shown!r} is not a Hub model repo id (org/name: letters, digits, '-', '_', '.', "
            "at most 96 each, no '--' or '..')", fix=_REF_FIX)
    return repo_id


def parse_hub_ref(text: str) -> HubRef:
    """Parse ``hf://org/name`` or ``hf://org/name@revision``.

    Raises:
        BadInputError: Missing ``hf://``, not exactly ``org/name``, or a bad revision.
    """
    if not isinstance(text, str) or not text.startswith(SCHEME):
        raise BadInputError(f"{str(text)[:200]!r} is not an hf:// reference", fix=_REF_FIX)
    body = text[len(SCHEME):]
    repo_id, sep, revision = body.partition("@")
    _check_repo_id(repo_id, text[:200])
    if sep and (not revision or len(revision) > 255 or not _REVISION.match(revision)
                or ".." in revision or "." in revision.split("/")):
        raise BadInputError(f"{text[:200]!r}: bad revision after '@'", fix=_REF_FIX)
    return HubRef(repo_id, revision or None)


def parse_repo_id(text: str) -> str:
    """A push target: ``org/name`` (an ``hf://`` prefix is accepted, ``@rev`` is not).

    Raises:
        BadInputError: Not exactly ``org/name``, or a revision given in the id.
    """
    body = text[len(SCHEME):] if text.startswith(SCHEME) else text
    if "@" in body:
        raise BadInputError(f"{text[:200]!r}: put the branch in --revision, not after '@'",
                            fix="write e.g. `adapters push-hub REF org/name --revision dev`")
    return _check_repo_id(body, text[:200])


def check_branch(revision: str | None) -> str | None:
    """Check a ``--revision`` branch name for push (None passes).

    Raises:
        BadInputError: Characters other than letters, digits, ``.``, ``_``, ``-``, ``/``.
    """
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise BadInputError(f"bad branch name {revision[:200]!r}",
                            fix="use letters, digits, '.', '_', '-' and '/' (no '..')")
    return revision


def hub_error(err: BaseException, what: str) -> AdapterkitError:
    """Translate a huggingface_hub / HTTP exception into a registry error with a fix.

    Args:
        err: The exception raised by huggingface_hub.
        what: What was being done, e.g. ``"hf://org/name@main"``, for the message.

    Returns:
        The error to raise (``raise hub_error(exc, what) from exc``).
    """
    from huggingface_hub import errors as hf

    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    offline_fix = ("reach the Hub (unset HF_HUB_OFFLINE, check the network), or fill the "
                   "cache first with `hf download`")
    if isinstance(err, hf.GatedRepoError):
        return BadInputError(f"{what}: gated repo; access not granted to this token",
                             fix="request access on the repo page, then " + _AUTH_FIX)
    if isinstance(err, hf.RepositoryNotFoundError):
        return NotFoundError(f"{what}: repository not found (or private)",
                             fix="check the org/name spelling; for a private repo " + _AUTH_FIX)
    if isinstance(err, hf.RevisionNotFoundError):
        return NotFoundError(f"{what}: revision not found", fix="check the branch, tag or commit")
    if isinstance(err, hf.LocalEntryNotFoundError):
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):  # asked for the cache alone
            return NotFoundError(f"{what} is not in the Hugging Face cache (HF_HUB_OFFLINE is "
                                 "set)", fix=offline_fix)
        # online, so the Hub could not be reached: a network failure, exit 6 as elsewhere
        return EnvironmentFailure(f"{what} is not in the Hugging Face cache and the Hub cannot "
                                  "be reached", fix=offline_fix)
    if isinstance(err, hf.OfflineModeIsEnabled):
        return BadInputError(f"{what}: HF_HUB_OFFLINE is set, the Hub cannot be reached",
                             fix="unset HF_HUB_OFFLINE (or set it to 0) and retry")
    if isinstance(err, hf.LocalTokenNotFoundError):
        return BadInputError(f"{what}: no Hugging Face token found", fix=_AUTH_FIX)
    if isinstance(err, hf.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return BadInputError(f"{what}: not authorised (HTTP {status})", fix=_AUTH_FIX)
        if status == 404:
            return NotFoundError(f"{what}: not found on the Hub ({detail})",
                                 fix="check the repo id and revision")
        if status is not None and status >= 500:  # the service, not the request
            return EnvironmentFailure(f"{what}: the Hub answered HTTP {status}: {detail}",
                                      fix="retry later; see https://status.huggingface.co")
        return BadInputError(f"{what}: the Hub answered HTTP {status}: {detail}",
                             fix="check the repo id, revision and files, then retry")
    if type(err).__module__.split(".")[0].startswith("httpx") or isinstance(err, ConnectionError):
        return EnvironmentFailure(f"{what}: cannot reach the Hub ({type(err).__name__}: {detail})",
                                  fix="check the network, proxy and HF_ENDPOINT, then retry")
    if isinstance(err, ValueError):  # huggingface_hub's own argument validation
        return BadInputError(f"{what}: {detail}", fix="check the repo id and revision")
    return BadInputError(f"{what}: {type(err).__name__}: {detail}",
                         fix="retry; if it persists, report it with the full message")
