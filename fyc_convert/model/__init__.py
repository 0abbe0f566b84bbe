"""Models in: checkpoints (weights_only by default), model folders, finding and swapping the classifier, and the
converted model's weights file. Uses `head/`."""
