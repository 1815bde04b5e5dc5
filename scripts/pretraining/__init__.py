"""Pretraining workflow pieces that the pretraining configs reference."""
