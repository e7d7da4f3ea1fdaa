"""Throughput, memory, FLOPs and utilisation per attention variant; comparing two runs.

Where things are:

* ``case``: ``BenchCase`` (the typed spec a worker process receives), its empty record, the shared step timing.
* one module per suite, each with ``cases(...)`` and ``run(...)``: ``model`` (train/infer step on synthetic
  input), ``attention`` (one attention call per shape and backend), ``scaling`` (the model over frames x image
  sizes), ``pipeline`` (loader clips/s on real data), ``e2e`` (train steps fed by the real loader).
* ``sweep``: the suites in order, ``build_cases``, and ``run_case`` (one case in a fresh process via
  ``timesformer_harness.runner``).
* ``report``: ``summary.md`` and the printed tables. ``compare``: two runs side by side, with a plot.
* ``cli``: ``python -m timesformer_harness.bench`` and ``python -m timesformer_harness.bench compare``; ``resolve``
  builds the config the gate and the profiler use too.

The step every compute suite times is ``timesformer_harness.workload``'s, the one the Trainer runs.
"""

from timesformer_harness.bench.attention import attention_shape
from timesformer_harness.bench.case import BenchCase, SkipCase
from timesformer_harness.bench.cli import attention_types, default_preset, main, measure_peak, modes_of, resolve
from timesformer_harness.bench.sweep import SUITES, build_cases, run_case, run_worker

__all__ = ["BenchCase", "SUITES", "SkipCase", "attention_shape", "attention_types", "build_cases",
           "default_preset", "main", "measure_peak", "modes_of", "resolve", "run_case", "run_worker"]
