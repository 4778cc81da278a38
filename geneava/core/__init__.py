"""Core: what every other package uses and nothing of the method itself.

config (params.yaml, its schema, paths), io (atomic writers, caches), resume (resumable item records),
images (reading images and the prepared splits), emo135 (the 135 classes), prompts, metrics (CIs, pairwise
matrices), parallel (accelerate), checkpoints, reference and results (the reference run and its pages).
Imports nothing from the other packages.
"""
