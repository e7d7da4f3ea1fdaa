"""Throughput, memory, FLOPs and utilisation per attention variant; comparing two runs; the gate's verdict.

Where things are:

* ``case``: ``BenchCase`` (what every case spec has; the fresh worker receives it as JSON) and ``ModelCase`` (a
  model at an input size), the step timing every compute suite shares (``time_model_step``, ``measure_step``).
* ``record``: ``BenchRecord`` (versioned, with provenance and raw samples), reading older schemas, writing, the flat
  CSV / JSON-lines exports and TensorBoard scalars.
* one module per suite, each with its ``Case``, ``cases(...)`` and ``run(...)``: ``model`` (train/infer step on
  synthetic input), ``attention`` (one attention call per shape and backend), ``scaling`` (the model over frames x
  image sizes), ``pipeline`` (loader clips/s on real data), ``e2e`` (train steps fed by the real loader).
* ``sweep``: the suites in order, ``build_cases``, and ``run_case`` (one case in a fresh process via
  ``timesformer_harness.runner``).
* ``report``: ``summary.md`` and the printed tables. ``compare``: two runs side by side, like for like or refused,
  with a plot. ``verdict``: the gate's per-case verdict over two runs' records.
* ``cli``: ``python -m timesformer_harness.bench`` and ``python -m timesformer_harness.bench compare``; ``resolve``
  builds the config the gate and the profiler use too.

The step every compute suite times is ``timesformer_harness.workload``'s, the one the Trainer runs.
"""

from timesformer_harness.bench.case import BenchCase, ModelCase, SkipCase
from timesformer_harness.bench.cli import attention_types, default_preset, main, measure_peak, modes_of, resolve
from timesformer_harness.bench.record import BenchRecord, read_results, write_results
from timesformer_harness.bench.sweep import SUITES, build_cases, run_case, run_worker

__all__ = ["BenchCase", "BenchRecord", "ModelCase", "SUITES", "SkipCase", "attention_types",
           "build_cases", "default_preset", "main", "measure_peak", "modes_of", "read_results", "resolve",
           "run_case", "run_worker", "write_results"]
