"""Data: SynthVL generation, video decoding, annotation readers, datasets, tokenization."""
