"""The four published techniques, one folder each: its modules, loss terms, runner, recipes (`configs/`), CLI
sub-commands and a README that maps it to its paper. What two or more techniques use lives in the core
packages (`evl.data`, `evl.models`, `evl.losses`, `evl.train`, `evl.tasks`); see docs/design.md.

* `evilm` — E-ViLM: masked video modelling on the codes of a semantic VQ tokenizer;
* `smaug` — SMAUG: masked video autoencoding and space-time token sparsification;
* `egovlpv2` — EgoVLPv2: fusion in the backbone, EgoNCE;
* `vlap` — VLAP: question-aware frame selection and QFormer distillation for frame-level QA.
"""
