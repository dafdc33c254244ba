"""The version of msff. A leaf module (imports nothing), so any module may read it without
importing the package's public API (``msff/__init__`` builds models, which import the ops)."""
__version__ = "0.1.0"
