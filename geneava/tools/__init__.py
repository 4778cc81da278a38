"""Maintainer tools outside the pipeline: the committed reference run (`reference`: make compare, update)
and the pages generated from it (`results`: docs/results.md, README's results block). No stage imports
these, so editing them reruns nothing."""
