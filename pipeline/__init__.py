"""LoRA+ fine-tuning on DeepSpeed ZeRO.

Library modules, bottom to top: ``config`` (typed recipes), ``loraplus`` and ``schedule`` (pure LoRA+ maths),
``data``, ``model``, ``lora``, ``tiny`` (the embedded default), ``distributed`` (the only importer of
DeepSpeed and torch.distributed), ``metrics``, ``checkpoint``, ``loop``.
"""

__version__ = "0.1.0"
