"""The package's version: the installed wheel's, which is the binary's (``axsave --version``) and
Cargo.toml's, as maturin takes it from there."""

from importlib import metadata

# For a source tree used without installing; tests/wheel.rs keeps it equal to Cargo.toml's version.
_SOURCE_VERSION = "0.1.0"

try:
    __version__ = metadata.version("axsave")
except metadata.PackageNotFoundError:
    __version__ = _SOURCE_VERSION
