"""The platform layer: Ray, MLflow and object storage around the engine, which knows none of them.

train.py (Ray Train), search.py (Ray Tune), tracking.py (MLflow), demo.py (the main job). Nothing
is imported here: `ray-unlearn versions` should not pay for importing Ray and torch.
"""
