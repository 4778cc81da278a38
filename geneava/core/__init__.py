"""Core: what every other package uses and nothing of the method itself.

config (reads params.yaml; the one path resolver) and schema (its keys, checks and lists of names), io
(atomic writers, caches), resume (resumable item records), images (reading images and the prepared
splits), emo135 (the 135 classes), prompts, metrics (CIs, pairwise matrices), parallel (accelerate),
checkpoints, cli (the stage command line and a notebook's first cell). Imports nothing from the other
packages.
"""
