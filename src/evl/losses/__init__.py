"""Loss terms: what a recipe's `objectives:` trains.

* `evl.losses.functional` — the loss functions (VTC/InfoNCE, EgoNCE, VTM, MLM, QA, MC, MSE targets);
* `evl.losses.step` — the per-step feature cache every term reads (`StepCache`), so no tower runs twice;
* `evl.losses.terms` — the term base class and the core terms (VTC, VTM, MLM, QA, MC);
* `evl.losses.compositional` — generated hard-negative captions as extra negatives (VTC, VTM);
* `evl.losses.registry` — `TERMS`, the one list of every term (core and techniques'), and the parsing
  of `objectives:` with its errors.
The techniques' own terms live beside their modules: `evl.techniques.<paper>`.
"""
