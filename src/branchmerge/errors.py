"""Exceptions raised for bad user input. Each message names the file, tensor or field at fault."""

from __future__ import annotations


class BranchmergeError(Exception):
    """Base class: an error the user can act on (the CLI prints it and exits non-zero)."""


class ConfigError(BranchmergeError, ValueError):
    """A merge, router or pipeline config is invalid."""


class ModelInputError(BranchmergeError, ValueError):
    """An input model folder or its weights are missing, corrupt or incompatible."""


class BundleError(BranchmergeError, ValueError):
    """A bundle on disk is incomplete, corrupt, or of an unknown format version."""


class BranchNotFoundError(BranchmergeError, KeyError):
    """A branch name that the bundle does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""
