"""The commands: ``loraplus-train`` (``launch``: the DeepSpeed launcher around ``train``), the per-rank training entry
(``train``), ``loraplus-eval`` (``eval``), ``loraplus-watch`` (``watch``)."""
