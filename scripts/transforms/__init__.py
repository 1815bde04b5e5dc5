"""Data transforms of the LVM-Med bundle (two-view augmentation for self-supervised pretraining)."""
