"""Identity room: face encoders (InsightFace ONNX, dlib), body encoder (vision backbone over the person crop),
the differentiable recognizer for the training loss, and the on-disk embedding cache."""
