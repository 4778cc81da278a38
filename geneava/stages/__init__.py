"""Stages: one module per DVC stage, each with `stage_params(profile)`, `run(profile, inputs..., out_dir)`
and `main(argv)`; the notebook of the same name calls them.

prepare -> finetune -> generate -> evaluate, memorization, stylize, ablation -> refill -> release,
userstudy; qc is generate's face check, shared by the stages that render. Imports networks and core,
never the world: the default profile's world reaches a stage only as files (models, data).
"""
