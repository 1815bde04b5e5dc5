"""Box-prompted segmentation on SAM-layout networks (MedSAM-style fine-tuning of the mask decoder)."""
