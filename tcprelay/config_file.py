"""
Options from a TOML file, for any :class:`twisted.python.usage.Options`.

:class:`ConfigFileOptions` is a mixin: the keys of the file are the long
names of the options (``public-interface = "127.0.0.1"``), flags are
booleans, options that may be repeated (``opt_`` methods taking a value)
take an array, numbers may be written as numbers.  Whatever the command line
gave wins: an option named on the command line ignores the file's value (a
repeatable one ignores all of the file's values).  It works from the
Options' own tables (``longOpt``, ``synonyms``, the dispatch table), so an
option added later needs nothing here.

Unknown keys and values of the wrong type are a
:class:`~twisted.python.usage.UsageError` naming the file and the key.
Tables named in :attr:`ConfigFileOptions.config_tables` are not options:
they are kept, unchecked, in :attr:`ConfigFileOptions.config_extra` for the
Options to check themselves.
"""

from __future__ import annotations

import sys
import tomllib
from typing import Any, Callable, Mapping, Optional

from twisted.python import usage

__all__ = ["ConfigFileOptions", "read_toml"]

_NOT_IN_FILE = frozenset({"help", "version"})


def read_toml(path: str) -> dict[str, Any]:
    """The TOML document at ``path``; UsageError when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"--config: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"--config {path}: not valid TOML ({e})") from None


class ConfigFileOptions(usage.Options):
    """
    Options with a ``--config FILE`` parameter (declare ``config`` in
    ``optParameters``; call :meth:`apply_config_file` first thing in
    ``postOptions``).  The argument list parsed is kept
    (:attr:`argv`) so that the same command line can be parsed again with
    a changed file (:meth:`reparsed`).
    """

    config_option = "config"
    config_tables: tuple[str, ...] = ()
    """Top-level tables of the file that are not options."""

    def __init__(self) -> None:
        super().__init__()
        self.given: set[str] = set()
        """Options named on the command line (canonical long names)."""
        self.config_extra: dict[str, Any] = {}
        self.argv: list[str] = []
        self._original_dispatch = dict(self._dispatch)
        for name, handler in self._original_dispatch.items():
            self._dispatch[name] = self._recording(name, handler)

    def _recording(self, name: str, handler: Any) -> Callable[[str, Any], None]:
        def dispatch(option: str, value: Any) -> None:
            self.given.add(name)
            _call(handler, option, value)

        return dispatch

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def reparsed(self) -> "ConfigFileOptions":
        """Fresh Options parsed from the same command line (and the file as it is now)."""
        fresh = type(self)()
        fresh.parent = self.parent
        fresh.parseOptions(list(self.argv))
        return fresh

    def _file_keys(self) -> dict[str, bool]:
        """Long option names a file may set, and whether each takes a value."""
        keys = {}
        for entry in self.longOpt:
            name = entry[:-1] if entry.endswith("=") else entry
            if name not in _NOT_IN_FILE and name != self.config_option:
                keys[name] = entry.endswith("=")
        return keys

    def apply_config_file(self) -> None:
        """Apply the file named by ``--config`` (if any) to every option the command line left alone."""
        path = self.get(self.config_option)
        if not path:
            return
        document = read_toml(path)
        self.apply_config(document, path)

    def apply_config(self, document: Mapping[str, Any], path: str) -> None:
        """Apply ``document`` (a parsed file, from ``path``) as :meth:`apply_config_file` does."""
        keys = self._file_keys()
        for key, value in document.items():
            if key in self.config_tables:
                if not isinstance(value, dict):
                    raise usage.UsageError(f"--config {path}: {key!r} must be a table")
                self.config_extra[key] = value
                continue
            if key not in keys:
                raise usage.UsageError(f"--config {path}: unknown option {key!r}")
            name = self.synonyms[key]
            if name in self.given:
                continue
            handler = self._original_dispatch[name]
            if not keys[key]:
                if not isinstance(value, bool):
                    raise usage.UsageError(
                        f"--config {path}: {key!r} is a flag: true or false, not {value!r}"
                    )
                if value:
                    _call(handler, name, None)
                continue
            repeatable = not isinstance(handler, usage.CoerceParameter)
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not repeatable:
                raise usage.UsageError(
                    f"--config {path}: {key!r} takes one value, not an array"
                )
            for item in values:
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise usage.UsageError(
                        f"--config {path}: {key!r} must be a string or a number"
                        f"{' (or an array of them)' if repeatable else ''}, not {item!r}"
                    )
                _call(handler, name, str(item))


def _call(handler: Any, name: str, value: Any) -> None:
    if isinstance(handler, usage.CoerceParameter):
        handler.dispatch(name, value)
    else:
        handler(name, value)
