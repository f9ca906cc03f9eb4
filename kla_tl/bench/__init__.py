"""Benchmark machinery behind ``kla-tl bench`` and ``kla-tl report``.

- :mod:`.suites` -- the suites (``perf/suites.json``, shipped as ``kla_tl.perfdata``) expanded into cases;
- :mod:`.timing` -- the one timer (medians and p20/p80 of ``triton.testing.do_bench``, CUDA-graph replay) and the
  two ceilings (device-to-device copy, bf16 GEMM);
- :mod:`.peers` -- the implementations that get timed: kla-tl's own paths and the peers (fla, FlashQLA), each
  running KLA exactly;
- :mod:`.harness` -- inputs, the float64 correctness check, and one timed job -> result records;
- :mod:`.records` -- the results file: device, versions, records, merge;
- :mod:`.report` -- tables, baseline comparison, plots.

Nothing here imports triton, fla or flash_qla at import time.
"""
