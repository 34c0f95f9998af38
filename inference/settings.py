"""What using a trained run accepts by name: the heatmap methods. The one list.

Kept free of TensorFlow so that the command line checks names at once; inference/heatmap.py makes each.
"""

# "auto" is Grad-CAM where every backbone of a run exposes its feature map, else SmoothGrad; "attention"
# is a token head's own attention weights over its token map (heads attention and attentive).
HEATMAP_METHODS = ("auto", "gradcam", "smoothgrad", "attention")
