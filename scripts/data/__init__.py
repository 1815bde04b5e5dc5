"""Data layer of the LVM-Med bundle: manifests of source datasets, image readers, intensity normalisation,
the 2D slice dataset for pretraining, modality balancing and the embedded default data."""
