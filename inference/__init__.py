"""Using a trained run: prediction on new images, SavedModel export, heatmaps and the pointing game."""
