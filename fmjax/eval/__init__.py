"""Evaluations after training that read a model without changing it."""
