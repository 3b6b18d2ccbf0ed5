"""evl: efficient video-language models.

Heavy pieces (torch models, decoders) are imported from their submodules, never here, so
`import evl` and `evl --help` stay fast.
"""

__version__ = "0.1.0"
