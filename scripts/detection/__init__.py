"""Detection on the LVM-Med ResNet-50: MONAI RetinaNet with a torchvision-free feature pyramid, data, mAP."""
