"""The store's gate configuration: which policy it pins and which keys it trusts.

``config.json`` carries two settings the release path reads: ``gate_policy`` (a path,
absolute or relative to the store directory, or ``{"path": ..., "digest": ...}`` /
``{"digest": ...}``) and ``trusted_keys`` (a list of public key paths). Reading them is
its own module because three others need it without needing each other:
:mod:`gate.promote` (rule 1, signatures), :mod:`gate.default_policy` (the gate's
policy when none is given) and the CLI (``promote``, ``ui``). A pinned path is
re-hashed on every read, so an edited policy (or eval set) never passes as the
pinned one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from registry.digests import is_digest
from registry.errors import BadInputError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from registry.storage.store import Store

CONFIG_KEY = "gate_policy"
TRUSTED_KEYS_KEY = "trusted_keys"


def configured_trusted_keys(store: Store, given: Sequence[Path] = ()) -> list[Path]:
    """Trusted signing keys for promotion: ``given``, else ``config.json`` ``trusted_keys``.

    Raises:
        BadInputError: ``trusted_keys`` in config.json is not a list of paths.
    """
    if given:
        return [Path(p).expanduser() for p in given]
    setting = store.config.get(TRUSTED_KEYS_KEY)
    if setting is None:
        return []
    if isinstance(setting, str):
        setting = [setting]
    if not isinstance(setting, list) or not all(isinstance(p, str) and p for p in setting):
        raise BadInputError(f"config.json {TRUSTED_KEYS_KEY} must be a list of key paths, got {setting!r}",
                            fix="e.g. \"trusted_keys\": [\"keys/release.pub\"]")
    root = Path(store.root)
    return [p if p.is_absolute() else root / p for p in (Path(x).expanduser() for x in setting)]


def load_configured_trusted_keys(store: Store, given: Sequence[Path] = ()
                                 ) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key of :func:`configured_trusted_keys` (empty when none are set).

    Raises:
        BadInputError: A bad ``trusted_keys`` setting, or a key file that is not an
            ed25519 public key.
    """
    from registry.signing import load_trusted_keys

    files = configured_trusted_keys(store, given)
    return load_trusted_keys(files) if files else {}


def configured_policy(store: Store, policy: str | Path | None = None) -> tuple[str, str]:
    """``(policy digest, where it came from)`` for promotion.

    Raises:
        BadInputError: No policy given or configured, a bad config value, an unreadable
            or invalid policy, or a policy file that no longer matches the pinned digest.
    """
    from gate.policy import load_policy

    if policy is not None:
        return load_policy(policy, allow_outside_data=True).digest, str(policy)  # hashed only
    pinned = pinned_policy(store)
    if pinned is None:
        raise BadInputError("no gate policy given and none configured for this store",
                            fix=f"pass --policy gate.yaml, or set \"{CONFIG_KEY}\" in the "
                            "store's config.json to a policy path or {\"digest\": \"sha256:...\"}")
    return pinned


def pinned_policy(store: Store) -> tuple[str, str] | None:
    """``(digest, where)`` of the policy the store's ``config.json`` pins, or None.

    Raises:
        BadInputError: A bad config value, an unreadable or invalid policy file, or a
            policy file that no longer matches the pinned digest.
    """
    from gate.policy import load_policy

    setting = store.config.get(CONFIG_KEY)
    fix = (f"pass --policy gate.yaml, or set \"{CONFIG_KEY}\" in the store's config.json "
           "to a policy path or {\"digest\": \"sha256:...\"}")
    if setting is None:
        return None
    if isinstance(setting, str):
        setting = {"path": setting}
    if not isinstance(setting, dict) or not (setting.get("path") or setting.get("digest")):
        raise BadInputError(f"config.json {CONFIG_KEY} must be a path or an object with "
                            f"'path' and/or 'digest', got {setting!r}", fix=fix)
    pinned = setting.get("digest")
    if pinned is not None and not is_digest(pinned):
        raise BadInputError(f"config.json {CONFIG_KEY}.digest is not a sha256 digest: {pinned!r}",
                            fix=fix)
    if not setting.get("path") and is_digest(pinned):  # no path: the (checked) digest alone
        return pinned, f"config.json {CONFIG_KEY}.digest"
    path = Path(setting["path"]).expanduser()
    if not path.is_absolute():
        path = Path(store.root) / path
    # promote only hashes the policy's data for its digest (the gate, which reads the
    # data, is where --allow-outside-data is decided)
    digest = load_policy(path, allow_outside_data=True).digest
    if pinned is not None and digest != pinned:
        raise BadInputError(f"policy {path} now has digest {digest}, but config.json pins {pinned}",
                            fix="restore the policy (and its eval data), or update the pinned digest")
    return digest, str(path)


def pinned_policy_file(store: Store, given: str | Path | None) -> str | Path | None:
    """The policy file to read the policy's content from: ``given``, else the pinned path
    (None when the store pins a digest only or nothing)."""
    if given is not None:
        return given
    setting = store.config.get(CONFIG_KEY)
    path = setting if isinstance(setting, str) else \
        setting.get("path") if isinstance(setting, dict) else None
    if not isinstance(path, str) or not path:
        return None
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else Path(store.root) / resolved
