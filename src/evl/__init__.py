"""evl: efficient video-language models.

    import evl
    model = evl.load("runs/quickstart/retrieval/final")    # see evl.api

Heavy pieces (torch models, decoders) are imported from their submodules, never here, so
`import evl` and `evl --help` stay fast: `evl.load`, `evl.EvlModel` and `evl.Answer` are
imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["Answer", "EvlModel", "__version__", "load"]


def __getattr__(name: str):
    if name in ("Answer", "EvlModel", "load"):
        from evl import api

        return getattr(api, name)
    raise AttributeError(f"module 'evl' has no attribute {name!r}")
