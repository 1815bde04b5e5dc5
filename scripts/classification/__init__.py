"""Classification on LVM-Med encoders: datalists, image reading, metrics and handlers of train_cls/inference_cls."""
