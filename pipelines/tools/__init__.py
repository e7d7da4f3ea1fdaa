"""Offline tools: dataset preparation (``prepare``, ``transcode``), the toy dataset generator (``toy``), the
frame encoder (``encode``) and the decode-cost model (``decode_cost``).

A training job never imports them (``tests/test_layers.py`` checks): they run before training, as
``python -m timesformer_harness.pipelines.tools.<name>``, or from benchmarks and tests.
"""
