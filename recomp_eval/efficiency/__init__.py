"""Analytic cost (FLOPs) and timing helpers."""
