"""Scheduling shells (submitit / SLURM) over the dist_decode entry points; no science here."""
