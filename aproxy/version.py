"""The release of aproxy, in a module of its own so that any part can name it without
importing the public API (and everything behind it)."""

__all__ = ["VERSION"]

VERSION = "0.1.0"
