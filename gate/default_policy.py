"""The built-in default gate policy, and which policy a ``gate`` run uses.

A newcomer should see the gate work without writing YAML: ``adapters gate REF --base
DIR`` with no ``--policy`` and no policy pinned in the store runs the policy shipped
as package data, ``gate/data/default_policy.yaml`` (structural; generation sanity;
``drift`` against the source for derived models; perplexity against the base on
``gate/data/heldout_en.txt``, about 4 kB of English written for adapterkit). The
YAML documents its thresholds; ``adapters gate --print-default-policy`` prints it to
start one's own from.

The default is an ordinary policy: loaded with :func:`gate.policy.load_policy` from
the package directory, so its digest covers its thresholds and its text like any
other, and a copy written beside a copy of the text has the same digest. A run
under it says so (``default_policy: true`` in JSON, a line in the human output, and
the gate record's ``meta.policy_source`` is :data:`SOURCE`).

**Promotion.** A default is a demonstration, not a release decision anyone made:
:func:`refuse_unpinned_default` (called by :func:`gate.promote.promote`) refuses a
record made under the default policy's digest unless the store's ``config.json``
``gate_policy`` pins exactly that digest.

:func:`gate_policy` decides what a run uses: ``--policy`` if given; else the
store's pinned policy (a path; a digest-only pin is usable only if it is the
default's); else the default.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from registry.errors import BadInputError, GateFailedError

if TYPE_CHECKING:
    from gate.policy import Policy
    from registry.storage.store import Store

DATA_DIR = Path(__file__).resolve().parent / "data"
POLICY_FILE = DATA_DIR / "default_policy.yaml"
HELDOUT_FILE = DATA_DIR / "heldout_en.txt"
SOURCE = "adapterkit built-in default policy"


@functools.cache
def default_policy() -> Policy:
    """The built-in default policy (validated; ``source`` is :data:`SOURCE`).

    Raises:
        BadInputError: The package data is missing or damaged (a broken install).
    """
    from gate.policy import load_policy

    try:
        policy = load_policy(POLICY_FILE)
    except BadInputError as err:
        raise BadInputError(f"the built-in default policy does not load: {err.message}",
                            fix="reinstall adapterkit (gate/data/ ships with the package)") from None
    return replace(policy, source=SOURCE)


def default_digest() -> str:
    """The digest of the built-in default policy.

    Raises:
        BadInputError: As :func:`default_policy`.
    """
    return default_policy().digest


def default_policy_yaml() -> str:
    """The default policy's YAML, with a header naming where its held-out text is."""
    text = POLICY_FILE.read_text(encoding="utf-8")
    return (f"# digest: {default_digest()}\n# held-out text: {HELDOUT_FILE}\n" + text)


def gate_policy(store: Store | None, given: str | Path | None, *,
                allow_outside_data: bool = False) -> tuple[Policy, bool]:
    """``(policy, is the built-in default)`` for a gate run.

    Args:
        store: The registry (its pinned policy), or None.
        given: ``--policy``, if any.
        allow_outside_data: As :func:`gate.policy.load_policy`.

    Raises:
        BadInputError: The given or pinned policy is invalid, or the store pins a
            policy by digest only (its file is needed to run it).
    """
    from gate.policy import load_policy
    from gate.store_config import CONFIG_KEY, pinned_policy

    if given is not None:
        return load_policy(given, allow_outside_data=allow_outside_data), False
    pinned = pinned_policy(store) if store is not None else None
    if pinned is None:
        return default_policy(), True
    digest, where = pinned
    if digest == default_digest():
        return default_policy(), True
    setting = store.config.get(CONFIG_KEY)  # type: ignore[union-attr]
    if isinstance(setting, dict) and not setting.get("path"):
        raise BadInputError(f"the store pins gate policy {digest[:19]}.. by digest only; the "
                            "gate needs the policy file to run it",
                            fix="pass --policy gate.yaml (the file with that digest)")
    return load_policy(where, allow_outside_data=allow_outside_data), False


def refuse_unpinned_default(store: Store, policy_digest: str | None) -> None:
    """Refuse promotion under the built-in default unless the store pins it.

    Raises:
        GateFailedError: ``policy_digest`` is the default's and the store does not pin it.
        BadInputError: The store's pinned policy setting is invalid.
    """
    from gate.store_config import CONFIG_KEY, pinned_policy

    if policy_digest is None:
        return
    try:
        default = default_digest()
    except BadInputError:
        return  # no default installed: no record can have been made under it
    if policy_digest != default:
        return
    pinned = pinned_policy(store)
    if pinned is not None and pinned[0] == default:
        return
    raise GateFailedError(f"policy {default.split(':')[-1][:12]} is adapterkit's built-in "
                          "default; promote accepts records made under it only where the store "
                          "pins it", fix=f"gate under your own policy (adapters gate "
                          f"--print-default-policy > gate.yaml), or pin the default: "
                          f"\"{CONFIG_KEY}\": {{\"digest\": \"{default}\"}} in config.json")
