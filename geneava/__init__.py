"""geneava: a reproduction of GenEAva (cartoon avatars with 135 fine-grained facial expressions)."""

__version__ = "0.1.0"
