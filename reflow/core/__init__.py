"""Core math, torch only and no I/O: the path and losses, time samplers, solvers, seeded noise, sampling."""
