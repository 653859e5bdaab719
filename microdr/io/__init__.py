"""Scene and mesh I/O: files, OBJ meshes, scene files, camera files, images and targets.

The lowest layer above ``errors``/``conventions``/``defaults``: imports nothing else of microDR.
"""
