"""LoRA+ itself: the parameter groups and their lrs (``loraplus``) and the schedules that multiply each group's own base
lr (``schedule``)."""
