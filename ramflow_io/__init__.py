"""Shared I/O at the bottom of the layers: the on-disk formats, webdataset shards and params.yaml.

``data_engine`` and ``ram_model`` both read and write the data root through this package and never
import each other; ``engine_rounds`` (the data engine's rounds that use the model) sits above both,
``orchestration`` on top. ``tests/test_layers.py`` checks the layering.
"""
