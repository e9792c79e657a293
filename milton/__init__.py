"""Milton: a self-improving local AI toolkit."""

__version__ = "0.1.0"
