"""Ignite handlers used by the bundle's workflows."""
