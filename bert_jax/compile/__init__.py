"""Ahead-of-time compiles for TPU slices (or local devices) and the planner that searches mesh,
remat and micro-batch by compiling the candidates."""
