"""VLAP (Wang et al., ViLA, ECCV 2024): the frame-level QA model (`frame_qa`, `frame_prompter`, `qformer`), its
feature cache (`features`), training (`train`, `evl vlap train`) and evaluation (`evaluate`, `evl vlap eval`,
`evl ask`). See README.md beside this file."""
