"""Data: SynthVL generation, video decoding, annotation readers, datasets, tokenization."""

# The most frames one clip may be read with (`evl eval --frames`, `data.num_frames`, a frame-QA model's
# `num_candidates`): decoded frames and the video tower's tokens grow with it, and far more than a few
# hundred per clip exhausts memory instead of failing. Here, not in `video.py`, so that the CLI can
# state it in `--help` without importing torch.
MAX_FRAMES = 256
