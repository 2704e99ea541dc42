"""`make demo`: the main job on the embedded default (see `__main__.py`)."""
