"""The model: loading a checkpoint (``load``, partitioned under ZeRO-3), LoRA injection with PEFT (``lora``), the
embedded tiny default (``tiny``), GGUF import (``gguf``)."""
