"""One rule for every command that takes "a store ref or a directory".

``unload``, ``gate`` (and any later command accepting either) call
:func:`resolve_ref_or_dir`, so the same word means the same thing everywhere:

1. Text written as a path -- starting with ``/``, ``.`` (``./NAME``, ``../x``,
   ``.hidden``) or ``~`` -- is a directory, never a ref (refs cannot start so).
2. Anything else is first a store ref (``name``, ``org/name``, ``name@digest``,
   ``name:alias``, ``sha256:...``): a ref wins.
3. A word that resolves as a ref *and* names an existing directory is ambiguous
   and refused (:class:`BadInputError`, exit 2) naming both, with the two ways to
   say which one is meant.
4. A word that is not a ref is a directory only when it contains a ``/``
   (``adapters/lora``); a bare word that names a directory but no ref is refused
   with the fix ``./NAME``, so adding a version named like a directory later can
   never silently change what a command reads.

Nothing here imports torch; the store is whatever :class:`StoreReader` the caller
opened (``None`` when there is no store).
"""

from __future__ import annotations

from pathlib import Path

from registry.errors import BadInputError, NotFoundError, shorten
from registry.storage.manifest import Version
from registry.storage.reader import StoreReader

_PATH_STARTS = ("/", ".", "~")


def written_as_path(text: str) -> bool:
    """Whether ``text`` is explicitly a path (``/abs``, ``./rel``, ``../rel``, ``~/x``, ``.x``)."""
    return text.startswith(_PATH_STARTS)


def resolve_ref_or_dir(store: StoreReader | None, text: str) -> Version | Path:
    """A stored version or a directory, by the rule in the module docstring.

    Args:
        store: The store refs resolve in (None: no store; only directories work).
        text: What the user typed.

    Returns:
        The :class:`Version` a ref names, or the directory's :class:`Path`.

    Raises:
        BadInputError: ``text`` is both a ref and a directory, or a bare word naming a
            directory but no ref.
        NotFoundError: Neither a ref nor a directory (or no store for a ref).
        IntegrityError: The ref resolves to a corrupt manifest.
    """
    if written_as_path(text):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise NotFoundError(f"no directory {shorten(text)}",
                                fix="check the path (a stored version is named without ./)")
        return path
    as_dir = Path(text)
    is_dir = as_dir.is_dir()
    version: Version | None = None
    ref_error: Exception | None = None
    if store is not None:
        try:
            version = store.resolve(text)
        except (NotFoundError, BadInputError) as err:
            ref_error = err
    if version is not None:
        if is_dir:
            raise BadInputError(
                f"{shorten(text)} is both a stored version ({version.ref}) and a directory "
                f"({shorten('./' + text)})",
                fix=f"write ./{text} for the directory, or {version.name}@{version.short} "
                    "for the stored version")
        return version
    if is_dir and "/" in text:
        return as_dir
    if is_dir:
        raise BadInputError(f"{shorten(text)} is not a version in the store, but "
                            f"{shorten('./' + text)} is a directory",
                            fix=f"write ./{text} to use the directory")
    if ref_error is not None:
        raise ref_error
    raise NotFoundError(f"{shorten(text)} is not a directory, and there is no store to "
                        "resolve it in", fix="pass --store (or set $ADAPTERS_HOME), or a "
                                             "directory written as a path (./NAME)")
