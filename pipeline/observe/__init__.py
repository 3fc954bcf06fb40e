"""What a run reports: metrics and progress (``metrics``), TensorBoard / W&B (``trackers``), FLOPs (``flops``), memory
(``memory``)."""
