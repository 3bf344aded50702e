"""Drift's precondition: the candidate's source is at hand and is what its record says.

A drift check compares a derived model with the model it was made from, so before
anything is evaluated the runner makes sure that source can be read (a recorded
location or ``--source DIR``) and, when it is a recorded version, that the directory
holds exactly the weights its record names (:func:`gate.provenance.verify_model_dir`,
exit 3 otherwise). Failing here, before the models load, is what keeps a drift result
from ever describing the wrong model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gate.provenance import verify_model_dir
from registry.errors import BadInputError

if TYPE_CHECKING:
    from gate.context import Candidate
    from registry.storage.store import Store


def check_source(store: Store | None, cand: Candidate) -> dict[str, Any] | None:
    """Make sure the candidate's source can be read and is what its record says.

    Called by the runner before evaluating when the policy has a drift check.

    Raises:
        BadInputError: The source is recorded by reference and no copy is at hand.
        IntegrityError: The source directory is not the recorded model.
    """
    src = cand.source
    if src is None:
        return None
    if src.dir is None:
        raise BadInputError(f"drift needs the source of {cand.label}: {src.note}",
                            fix="pass --source DIR with that model's directory, or drop the "
                                "drift check")
    if src.recorded and store is not None and src.digest:
        return verify_model_dir(store, store.version_by_digest(src.digest), src.dir)
    return None
