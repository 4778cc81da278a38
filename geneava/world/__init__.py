"""The default profile's miniature world: the procedural Emo135 stand-in (standin) and the training of
the world's models on it (train). Imports networks and core; nothing imports the world except its
notebook (00_world), `make repro`'s data step and the tests.
"""
