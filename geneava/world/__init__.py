"""The default profile's miniature world: its people and their drawing (standin), the stand-in dataset as
files (dataset: data/emo135 and the labelled pairs data/pairs), and the training of the world's models on
fresh renders (train, with samples, loops and checks). Imports networks and core; nothing imports the
world except its notebook (00_world), `make repro`'s data step (`python -m geneava.world.dataset`) and the
tests: the stages see the world only as files (models/world, data).
"""
