"""Settings for every test, the notebooks included: one torch thread, and the notebooks' small settings
(``MEMLOC_QUICK=1``: they train small testbeds, so their numbers are a smoke test, not results)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEMLOC_QUICK", "1")
