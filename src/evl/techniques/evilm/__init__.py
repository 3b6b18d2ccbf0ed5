"""E-ViLM (Fang et al., 2023): the VQ video tokenizer (`vq_tokenizer`, trained by `vq_train`, `evl vq`) and
the `mvm` loss term that predicts its codes at masked positions. See README.md beside this file."""
