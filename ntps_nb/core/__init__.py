"""Pure math of NTPS: numpy/scipy in, numpy/pandas out; no torch, no I/O beyond save/load."""
