"""seer_train: SwAV pretraining of RegNetY (SEER), composed from fsdpkit, planner and ckpt."""

__all__: list[str] = []
