"""Data: SynthVL generation, video decoding, annotation readers, datasets, tokenization."""

# The most frames one clip may be read with (`evl eval --frames`, `data.num_frames`, a frame-QA model's
# `num_candidates`): decoded frames and the video tower's tokens grow with it, and far more than a few
# hundred per clip exhausts memory instead of failing. Here, not in `video.py`, so that the CLI can
# state it in `--help` without importing torch.
MAX_FRAMES = 256

# The largest SynthVL `evl synth` writes: clips are planned in memory before they are encoded, and a frame of
# S x S pixels is rendered in int64 grids, so larger values are refused instead of exhausting memory.
MAX_SYNTH_CLIPS = 100_000
MAX_SYNTH_SIZE = 1024
