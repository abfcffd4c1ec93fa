"""Evaluation (installed as ``vtprune.eval``): the lmms-eval plugin and ``vtprune eval`` live here."""
